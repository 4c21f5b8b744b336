"""The frozen reference policy of GAIL's KL penalty (``--gail-kl-weight``).

The penalty ``kl_weight * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))`` in the reward pulls the
policy towards ``pi_ref``, the model the run started from (as RLHF-style trainers do): its
weights right after start-up (``--load ... --finetune``, or the initialisation), never
updated, at the training layout (this rank's own model chunk, TP/PP-sharded like the trained
one), in eval mode. When responses are drawn, ``pi_ref`` scores them: one forward-only pass of
Megatron-Core's schedule over the policy rows, whose log-probabilities the last pipeline stage
broadcasts to the model replica's other stages, so that every rank's samples (and their
checkpoint, ``policy_samples.pt``) carry them.

Resuming: the reference is saved once per ``--save`` directory, as a weights-only checkpoint
in ``<save>/gail_reference`` (a Megatron distributed checkpoint, loadable at any layout),
and a resumed run (``--load`` without ``--finetune``) reads it from ``<load>/gail_reference``,
so an interrupted run and an uninterrupted one penalise towards the same weights. A ``--load``
checkpoint without that directory, saved by a run that had no reference (another loss, or no
KL penalty), starts a new GAIL run: its loaded weights become the reference. A checkpoint
saved by a GAIL run with a KL penalty whose ``gail_reference`` is missing is an error.

Memory: one more copy of this rank's weights in the parameter dtype (no gradients, no
optimizer state); ``megatron-irl plan`` counts it.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_irl.config import TrainConfig
from megatron_irl.core.checkpoint import (
    CheckpointError,
    TrainingState,
    latest_iteration,
    load_checkpoint,
    read_saved_state,
    save_checkpoint,
)
from megatron_irl.core.model import build_model_chunks
from megatron_irl.cpu_support import current_device
from megatron_irl.data import block_causal_attention_mask
from megatron_irl.loss import vocab_parallel_soft_q_loss

REFERENCE_DIRNAME = "gail_reference"


def _log_probs_of_batch(logits: torch.Tensor, batch: dict, vocab_size: int):
    """The schedule's loss function: no loss, ``log pi_ref(label)`` on policy positions."""
    out = vocab_parallel_soft_q_loss(logits, batch["labels"], batch["policy_mask"],
                                     batch["terminal"], lam=0.0, gamma=1.0,
                                     vocab_size=vocab_size)
    return (torch.zeros((), device=logits.device), torch.tensor(0, dtype=torch.int),
            {"log_prob": -out.nll.detach()})


def _forward_step(data_iterator, model, vocab_size: int):
    batch = next(data_iterator)
    mask = block_causal_attention_mask(batch["document_ids"])  # [b, 1, s, s]
    logits = model(batch["tokens"], batch["position_ids"], mask)  # [b, s, v/tp]
    return logits, partial(_log_probs_of_batch, batch=batch, vocab_size=vocab_size)


class ReferencePolicy:
    """This rank's frozen copy of the starting weights, and its log-probabilities.

    Args:
        cfg: the run's configuration (the model and its parallel layout).
        vocab_size: the real vocabulary, as for the trained model.
    """

    def __init__(self, cfg: TrainConfig, vocab_size: int):
        # Its random initialisation is overwritten: it must not move the run's random streams
        # (a resumed run builds it after restoring them).
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker_states = tracker.get_states()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()]
                                   if torch.cuda.is_available() else []):
            [self.chunk] = build_model_chunks(cfg, vocab_size)  # no virtual stages
        tracker.set_states(tracker_states)
        self.chunk.requires_grad_(False)
        self.chunk.eval()
        self.config = cfg
        self.vocab_size = vocab_size
        self._saved_to: set[str] = set()

    def copy_from(self, chunk) -> None:
        """Take ``chunk``'s current weights (the trained model's, before its first step)."""
        self.chunk.load_state_dict(chunk.state_dict())

    def restore(self, load_dir: str, trained_chunk) -> str:
        """The reference of a run resumed from ``load_dir`` (module doc); a message for the
        log. Collective over the world group."""
        directory = os.path.join(load_dir, REFERENCE_DIRNAME)
        if latest_iteration(directory) is not None:
            load_checkpoint(directory, [self.chunk], load_optimizer=False, load_rng=False)
            return f"loaded the KL reference (the run's starting weights) from {directory}"
        saved = read_saved_state(load_dir)["config"]
        if saved.get("irl", {}).get("loss") == "gail" \
                and saved.get("gail", {}).get("kl_weight", 0) > 0:
            raise CheckpointError(
                f"{load_dir} was saved by a GAIL run with --gail-kl-weight but {directory} "
                "(its KL reference, the weights it started from) is missing; restore it, or "
                "start a new run from these weights with --finetune")
        self.copy_from(trained_chunk)
        return (f"no {directory}: the weights loaded from {load_dir} are the KL reference "
                "(a new GAIL run starts from them)")

    def save(self, save_dir: str) -> None:
        """Write the reference into ``<save_dir>/gail_reference`` unless it is there already.
        Collective over the world group; every rank calls it."""
        directory = os.path.join(save_dir, REFERENCE_DIRNAME)
        if save_dir in self._saved_to or latest_iteration(directory) is not None:
            return
        save_checkpoint(directory, TrainingState(0, 0, self.config.to_dict()), [self.chunk],
                        None, None)
        self._saved_to.add(save_dir)

    @torch.no_grad()
    def log_probs(self, rows: dict, rows_per_micro_batch: int) -> torch.Tensor:
        """``log pi_ref(labels)`` ``[R, s]`` fp32 (CPU) of the policy ``rows`` (dict of
        ``[R, s]``, ``training.sampling.policy_rows``) at their policy positions, 0
        elsewhere, on every rank of the model replica.

        Collective over the TP and PP groups: the forward-only schedule, then a broadcast of
        ``[R, s]`` fp32 from the last pipeline stage.
        """
        device = current_device()
        fields = ("tokens", "labels", "policy_mask", "terminal", "position_ids", "document_ids")
        micro_batches = [{name: rows[name][start:start + rows_per_micro_batch].to(device)
                          for name in fields}
                         for start in range(0, rows["tokens"].shape[0], rows_per_micro_batch)]
        per_micro_batch = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, vocab_size=self.vocab_size),
            data_iterator=iter(micro_batches),
            model=self.chunk, num_microbatches=len(micro_batches),
            seq_length=rows["tokens"].shape[1], micro_batch_size=rows_per_micro_batch,
            forward_only=True,
        )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            log_probs = torch.cat([m["log_prob"] for m in per_micro_batch]).float()
        else:
            log_probs = torch.empty(rows["tokens"].shape, dtype=torch.float32, device=device)
        group = parallel_state.get_pipeline_model_parallel_group()
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        log_probs = log_probs.contiguous()
        dist.broadcast(log_probs, src=last, group=group)
        return log_probs.cpu()
