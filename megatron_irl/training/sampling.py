"""Responses sampled from the model under training, as policy rows of the training batch
(``--irl-loss online`` and ``gail``).

Schedule: at step ``i`` (0-based) with ``i % --online-sample-interval == 0`` every data-parallel
replica samples ``P = --online-policy-rows-per-micro-batch`` responses per micro-batch; the
steps in between reuse them. The prompts of a micro-batch are those of the documents in its
own dataset rows, in order (repeated when it holds fewer than P). Micro-batches are numbered
over the global batch (data-parallel rank r's micro-batch m is ``g = r * M + m``), and row
``j = g * P + k`` draws with seed ``SeedSequence([--seed, i, j])``. The samples are therefore a
function of the step, the seed and the weights, whatever the data-parallel split, and a
resumed run gets the samples of an uninterrupted one: fresh ones at the sampling steps, the
checkpointed ones (``policy_samples.pt``) in between.

A policy row holds one prompt and its response, laid out like a packed row (all ``[s]``):

    tokens         prompt + response (+ EOS when it ended with one), then pad
    labels         tokens shifted by one, pad where nothing is predicted
    loss_mask      0 (no dataset token)
    policy_mask    1 where the label is a sampled token (from the position that predicts the
                   first one)
    terminal       True where the label is the EOS
    position_ids   0, 1, ... over the sequence; document_ids 0 there, -1 on padding
    next_position  t + 1 (one response: the next state is the next position)
    ref_log_prob   log pi_ref(label) of GAIL's frozen reference (``training/reference.py``)
                   at policy positions, scored when drawn; 0 without a reference

A response cut by the token budget keeps its last token as an input position without a label,
so its next state, whose value the TD and value terms read, is in the row (docs/method.md
section 1: truncated, not terminal). Dataset rows get ``policy_mask`` and ``ref_log_prob`` of 0.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_irl.config import TrainConfig
from megatron_irl.cpu_support import current_device
from megatron_irl.data import DataError, SFTDataset, Tokenizer
from megatron_irl.inference.generation import Generator, SamplingParams

SAMPLES_FILENAME = "policy_samples.pt"
POLICY_FIELDS = ("policy_mask", "ref_log_prob")


@dataclass
class SampleSet:
    """One data-parallel rank's sampled sequences (prompt + response), R rows of width s."""

    iteration: int  # the step that drew them
    tokens: torch.Tensor  # int64 [R, s]: prompt + response (+ EOS), pad after
    prompt_lengths: torch.Tensor  # int64 [R]
    lengths: torch.Tensor  # int64 [R]: tokens in the sequence
    finished: torch.Tensor  # bool [R]: the response ended with EOS (else the budget ran out)
    ref_log_probs: torch.Tensor  # float32 [R, s]: the same under GAIL's reference (else 0)

    TENSORS = ("tokens", "prompt_lengths", "lengths", "finished", "ref_log_probs")


def policy_rows(samples: SampleSet, pad_id: int) -> dict:
    """The policy rows of ``samples``: a dict of ``[R, s]`` tensors (module doc for the layout)."""
    tokens, lengths = samples.tokens, samples.lengths[:, None]
    positions = torch.arange(tokens.shape[1])[None]  # [1, s]
    # A finished sequence's EOS is only a label; a truncated one's last token is an input.
    is_input = positions < lengths - samples.finished[:, None].long()
    has_label = positions < lengths - 1
    policy = has_label & (positions >= samples.prompt_lengths[:, None] - 1)
    shift = torch.full_like(tokens[:, :1], pad_id)

    def at_labels(per_token: torch.Tensor) -> torch.Tensor:  # token t's value at position t - 1
        return torch.where(policy, torch.cat([per_token[:, 1:], torch.zeros_like(shift)], dim=1),
                           0.0).float()

    return {
        "tokens": torch.where(is_input, tokens, pad_id),
        "labels": torch.where(has_label, torch.cat([tokens[:, 1:], shift], dim=1), pad_id),
        "loss_mask": torch.zeros(tokens.shape, dtype=torch.float32),
        "terminal": policy & samples.finished[:, None] & (positions == lengths - 2),
        "position_ids": torch.where(is_input, positions, 0),
        "document_ids": torch.where(is_input, 0, -1),
        "next_position": (positions + 1).expand(tokens.shape).clone(),
        "policy_mask": policy.float(),
        "ref_log_prob": at_labels(samples.ref_log_probs),
    }


def mix_in(expert: dict, policy: dict) -> dict:
    """One micro-batch ``[b_E + b_P, s]``: the dataset rows, then the policy rows."""
    zeros = torch.zeros(expert["tokens"].shape, dtype=torch.float32)
    expert = {**expert, **{name: zeros for name in POLICY_FIELDS}}
    return {name: torch.cat([expert[name], policy[name]]) for name in policy}


def check_prompts_fit(dataset: SFTDataset, max_new_tokens: int, seq_length: int) -> None:
    """Raise a DataError naming the first document whose prompt (the tokens before its last
    response) is empty or leaves fewer than ``--online-max-new-tokens`` positions in a row."""
    documents = dataset.documents
    too_long = []
    for index in np.unique(dataset.plan.doc_indices):
        prompt = int(np.sum(documents.segment_lengths(index)[:-1]))
        if prompt < 1 or prompt + max_new_tokens > seq_length:
            too_long.append((index, prompt))
    if too_long:
        index, prompt = too_long[0]
        raise DataError(
            f"{documents.where(int(index))}: a prompt of {prompt} tokens cannot be sampled from: "
            f"it needs 1 to --seq-length {seq_length} - --online-max-new-tokens {max_new_tokens} "
            f"= {seq_length - max_new_tokens} tokens ({len(too_long)} document(s) of the data "
            "do not fit); lower --online-max-new-tokens, raise --seq-length or drop them")


def save_synced(obj, path: str) -> None:
    """``torch.save`` that reaches the disk before it returns (checkpoint files must, before
    the checkpoint's marker moves)."""
    with open(path, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())


def all_reduce_dp(values: list[float]) -> list[float]:
    """Sums of ``values`` over the data-parallel group (one all-reduce)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=current_device())
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor.tolist()


class PolicySampler:
    """Draws, keeps and checkpoints this data-parallel rank's samples.

    Args:
        cfg: the run's configuration (``online`` section, ``--seed``, ``--seq-length``).
        model: this rank's DDP-wrapped model chunks (one: no virtual pipeline stages); they
            are put in eval mode while sampling and back in train mode after.
        chunk: the unwrapped GPTModel of ``model``, which generates.
        tokenizer, dataset: the training data's; prompts come from the dataset's documents.
        reference: GAIL's frozen reference policy, which scores the samples when drawn;
            None: no reference log-probabilities (0).
    """

    def __init__(self, cfg: TrainConfig, model: list, chunk, tokenizer: Tokenizer,
                 dataset: SFTDataset, num_microbatches: int, reference=None):
        online = cfg.online
        check_prompts_fit(dataset, online.max_new_tokens, cfg.model.seq_length)
        self.model = model
        self.dataset = dataset
        self.pad_id = tokenizer.pad_id
        self.seed = cfg.training.seed
        self.interval = online.sample_interval
        self.rows_per_micro_batch = online.policy_rows
        self.num_microbatches = num_microbatches
        self.seq_length = cfg.model.seq_length
        self.params = SamplingParams(temperature=online.temperature,
                                     max_new_tokens=online.max_new_tokens)
        self.generator = Generator(chunk, cfg.model.vocab_size, tokenizer.eos_id,
                                   cfg.model.seq_length,
                                   parallel_state.get_pipeline_model_parallel_group())
        self.reference = reference
        self.samples: SampleSet | None = None
        self.stats: dict[str, float] = {}

    def policy_rows_for(self, iteration: int,
                        expert_batches: list[dict]) -> tuple[list[dict], float]:
        """Per micro-batch, the policy rows ``[P, s]`` to train on at step ``iteration``, and the
        seconds spent sampling (0 when the step reuses samples). Collective over the model
        replica (TP and PP groups) and the data-parallel group when it samples."""
        seconds = 0.0
        if self.samples is None or iteration % self.interval == 0:
            start = time.monotonic()
            self.samples = self._draw(iteration, expert_batches)
            self._update_stats()
            seconds = time.monotonic() - start
        rows = policy_rows(self.samples, self.pad_id)
        per = self.rows_per_micro_batch
        return [{name: tensor[m * per:(m + 1) * per] for name, tensor in rows.items()}
                for m in range(self.num_microbatches)], seconds

    def _prompts(self, expert_batches: list[dict]) -> list[list[int]]:
        prompts = []
        for batch in expert_batches:
            ids = torch.unique_consecutive(batch["document_ids"].flatten())
            documents = [int(i) for i in ids if i >= 0]
            prompts += [self.dataset.prompt_tokens(documents[k % len(documents)]).tolist()
                        for k in range(self.rows_per_micro_batch)]
        return prompts

    def _seeds(self, iteration: int) -> list[int]:
        rows = self.num_microbatches * self.rows_per_micro_batch
        first = parallel_state.get_data_parallel_rank() * rows  # global index of the first row
        return [int(np.random.SeedSequence([self.seed, iteration, j]).generate_state(1)[0])
                for j in range(first, first + rows)]

    def _draw(self, iteration: int, expert_batches: list[dict]) -> SampleSet:
        prompts = self._prompts(expert_batches)
        for chunk in self.model:
            chunk.eval()  # no dropout while sampling
        try:
            generations = self.generator.sample(prompts, self.params, self._seeds(iteration))
        finally:
            for chunk in self.model:
                chunk.train()
        rows, width = len(prompts), self.seq_length
        tokens = torch.full((rows, width), self.pad_id, dtype=torch.int64)
        lengths = torch.zeros(rows, dtype=torch.int64)
        for row, (prompt, generation) in enumerate(zip(prompts, generations)):
            response = generation.tokens + ([self.generator.eos_id] if generation.finished else [])
            sequence = prompt + response
            tokens[row, :len(sequence)] = torch.tensor(sequence)
            lengths[row] = len(sequence)
        samples = SampleSet(iteration, tokens, torch.tensor([len(p) for p in prompts]), lengths,
                            torch.tensor([g.finished for g in generations]),
                            torch.zeros(rows, width))
        if self.reference is not None:
            at_labels = self.reference.log_probs(policy_rows(samples, self.pad_id),
                                                 self.rows_per_micro_batch)  # [R, s]
            samples.ref_log_probs[:, 1:] = at_labels[:, :-1]  # token t from position t - 1
        return samples

    def _update_stats(self) -> None:
        """Mean response length (EOS included) and EOS fraction over all replicas' samples."""
        samples = self.samples
        responses, tokens, finished = all_reduce_dp([
            float(len(samples.lengths)), float((samples.lengths - samples.prompt_lengths).sum()),
            float(samples.finished.sum())])
        self.stats = {"response_length": tokens / responses, "eos_fraction": finished / responses}

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str) -> None:
        """Gather every replica's samples over the data-parallel group and write them, from
        rank 0, to ``directory/policy_samples.pt`` (global row order). Collective over the
        data-parallel group; every rank calls it (nothing is written before the first step)."""
        if self.samples is None:
            return
        gathered = {name: self._gather(getattr(self.samples, name)) for name in SampleSet.TENSORS}
        if dist.get_rank() == 0:
            save_synced({"iteration": self.samples.iteration, **gathered},
                        os.path.join(directory, SAMPLES_FILENAME))

    def load(self, directory: str) -> str:
        """Take this rank's share of the samples saved in ``directory``; returns what happened,
        for the log. Without a file, or with one of another batch layout, the next step samples
        anew. Every rank reads the file; collective over the data-parallel group."""
        path = os.path.join(directory, SAMPLES_FILENAME)
        if not os.path.exists(path):
            return f"no {SAMPLES_FILENAME} in {directory}: the first step samples anew"
        saved = torch.load(path, weights_only=True)
        rows = self.num_microbatches * self.rows_per_micro_batch
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        missing = [name for name in SampleSet.TENSORS if name not in saved]
        if missing:
            return f"{path} lacks {', '.join(missing)}: the first step samples anew"
        if tuple(saved["tokens"].shape) != (rows * dp_size, self.seq_length):
            return (f"{path} holds {tuple(saved['tokens'].shape)} [rows, --seq-length] samples, "
                    f"this run uses {(rows * dp_size, self.seq_length)}: the first step samples "
                    "anew")
        self.samples = SampleSet(saved["iteration"], *(
            saved[name][dp_rank * rows:(dp_rank + 1) * rows] for name in SampleSet.TENSORS))
        self._update_stats()
        return f"resumed the samples drawn at step {saved['iteration']} from {path}"

    @staticmethod
    def _gather(tensor: torch.Tensor) -> torch.Tensor:
        """``[R, ...]`` of every data-parallel rank, concatenated in rank order (on the CPU)."""
        if tensor.dtype == torch.bool:  # not every backend reduces or gathers bool
            return PolicySampler._gather(tensor.to(torch.uint8)).bool()
        group = parallel_state.get_data_parallel_group()
        local = tensor.to(current_device()).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts).cpu()
