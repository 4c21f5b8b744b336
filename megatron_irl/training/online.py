"""Policy sampling for the objectives that need it (``Objective.samples_policy``: ``--irl-loss
online``, online IQ-Learn, and ``gail``, the GAIL baseline; the objectives are in
``training/objectives/``).

``OnlineTraining`` brackets each step of the loop:

* ``prepare_step`` draws (or reuses) the policy's samples (``PolicySampler``), appends them to
  every micro-batch as ``--online-policy-rows-per-micro-batch`` rows after the dataset rows
  (``[b_E + b_P, s]``: pipeline stages exchange activations of that fixed shape), counts the
  global batch's expert and policy tokens N_E, N_P (one all-reduce over data parallelism) and
  returns them with the discriminator as a ``SampledStep``, from which the loop builds the
  step's objective;
* the schedule runs the objective on the last pipeline stage, as the offline one;
* ``finish_step`` steps the GAIL discriminator and returns the step's scalars.

Normalisation, with Megatron's per-token contract (``objectives/base.py``): a micro-batch returns
``sum(expert terms) + (N_E / N_P) * sum(policy terms)`` and its own expert token count; the
schedule divides the gradients by the global N_E, so the step minimises
``sum(expert terms) / N_E + sum(policy terms) / N_P`` over the global batch exactly
(``loss/online.py``, ``loss/gail.py``).

The GAIL discriminator lives on the last pipeline stage, replicated over tensor parallelism (it
sees the same batch there): the objective computes its logits on each micro-batch, backpropagates
its loss at once (a graph of its own) and uses the logits, detached, as rewards; ``finish_step``
sums its gradients over data parallelism and steps its Adam. Its weights and Adam state are
saved with each checkpoint as ``discriminator.pt`` (written by tensor- and data-parallel rank
0 of the last stage, read by every last-stage rank).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_irl.config import TrainConfig
from megatron_irl.cpu_support import current_device
from megatron_irl.training.discriminator import TokenDiscriminator
from megatron_irl.training.objectives import OBJECTIVES, SampledStep
from megatron_irl.training.reference import ReferencePolicy
from megatron_irl.training.sampling import PolicySampler, all_reduce_dp, mix_in, save_synced


class DiscriminatorTrainer:
    """The GAIL discriminator of a last-stage rank: model, Adam, checkpoint file.

    Built identically on every rank that has one (seeded by ``--seed`` in a forked RNG, so the
    run's own random streams are untouched).
    """

    FILENAME = "discriminator.pt"

    def __init__(self, cfg: TrainConfig, vocab_size: int):
        gail = cfg.gail
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.training.seed)
            model = TokenDiscriminator(vocab_size, cfg.model.seq_length,
                                       hidden_size=gail.disc_hidden_size,
                                       num_layers=gail.disc_num_layers,
                                       num_heads=gail.disc_num_heads)
        self.model = model.to(current_device())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=gail.disc_lr)

    def step(self) -> None:
        """Sum the gradients over data parallelism (each rank's are already divided by the
        global token counts), step Adam and clear them. Collective over the DP group."""
        params = list(self.model.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in params])
        dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        for param, grad in zip(params, flat.split([p.numel() for p in params])):
            param.grad = grad.view_as(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: str) -> None:
        if parallel_state.get_tensor_model_parallel_rank() == 0 \
                and parallel_state.get_data_parallel_rank() == 0:
            save_synced({"model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict()},
                        os.path.join(directory, self.FILENAME))

    def load(self, directory: str) -> str:
        path = os.path.join(directory, self.FILENAME)
        if not os.path.exists(path):
            return f"no {self.FILENAME} in {directory}: the discriminator starts afresh"
        device = next(self.model.parameters()).device
        state = torch.load(path, weights_only=True, map_location=device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return f"loaded the discriminator from {path}"


class OnlineTraining:
    """Sampling, the reference and the discriminator of a sampling objective (module doc).

    Args:
        cfg: the run's configuration (``--irl-loss online`` or ``gail``).
        model, chunk: this rank's DDP-wrapped model chunks and the unwrapped one (exactly one:
            virtual pipeline stages are rejected by the configuration).
        tokenizer, dataset, num_microbatches: the training data's.
    """

    def __init__(self, cfg: TrainConfig, model: list, chunk, tokenizer, dataset,
                 num_microbatches: int):
        self.chunk = chunk
        objective = OBJECTIVES[cfg.irl.loss]
        self.reference = None
        if objective.needs_reference(cfg):
            self.reference = ReferencePolicy(cfg, cfg.model.vocab_size)
        self.sampler = PolicySampler(cfg, model, chunk, tokenizer, dataset, num_microbatches,
                                     self.reference)
        self.discriminator = None
        if objective.needs_discriminator \
                and parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            self.discriminator = DiscriminatorTrainer(cfg, cfg.model.vocab_size)
        self._scalars: dict[str, float] = {}
        self._update_start = 0.0

    def prepare_step(self, iteration: int, expert_batches: list[dict]):
        """(``SampledStep``, micro-batches ``[b_E + b_P, s]``) for step ``iteration``.

        Collective: sampling (model replica, when due) and one all-reduce over data parallelism.
        """
        policy_batches, sample_seconds = self.sampler.policy_rows_for(iteration, expert_batches)
        micro_batches = [mix_in(e, p) for e, p in zip(expert_batches, policy_batches)]
        expert_tokens, policy_tokens = all_reduce_dp([
            sum(float((b["loss_mask"] > 0).sum()) for b in micro_batches),
            sum(float((b["policy_mask"] > 0).sum()) for b in micro_batches)])
        expert_tokens, policy_tokens = max(expert_tokens, 1.0), max(policy_tokens, 1.0)
        self._scalars = {"sample_seconds": sample_seconds,
                         "sample_step": float(self.sampler.samples.iteration),
                         **self.sampler.stats}
        self._update_start = time.monotonic()
        return SampledStep(expert_tokens, policy_tokens, self.discriminator), micro_batches

    def finish_step(self) -> dict[str, float]:
        """Step the discriminator (GAIL, last stage); the step's sampling and update seconds
        and sample statistics (response length, EOS fraction)."""
        if self.discriminator is not None:
            self.discriminator.step()
        return {**self._scalars, "update_seconds": time.monotonic() - self._update_start}

    def save(self, directory: str) -> None:
        """Write the samples and the discriminator into checkpoint ``directory``, and GAIL's
        KL reference next to it (once per save directory). Collective over the world group;
        every rank calls it."""
        self.sampler.save(directory)
        if self.discriminator is not None:
            self.discriminator.save(directory)
        if self.reference is not None:
            self.reference.save(os.path.dirname(os.path.normpath(directory)))

    def start_reference(self, load_dir: str | None) -> list[str]:
        """Set GAIL's KL reference to the run's starting weights: the model's weights now
        (a new run, after ``--load ... --finetune``), or those a resumed run (``load_dir``)
        started from (``training/reference.py``). Messages for the log."""
        if self.reference is None:
            return []
        if load_dir is None:
            self.reference.copy_from(self.chunk)
            return ["the KL reference is the model's starting weights"]
        return [self.reference.restore(load_dir, self.chunk)]

    def load(self, directory: str) -> list[str]:
        """Restore what ``save`` wrote; returns messages for the log."""
        messages = [self.sampler.load(directory)]
        if self.discriminator is not None:
            messages.append(self.discriminator.load(directory))
        return messages
