"""The shape every training objective has (``Objective``), with Megatron-Core's loss-function
contract.

An objective is called as ``objective(output, batch) -> (loss_sum, num_tokens, metric_sums)``
on the last pipeline stage: ``output`` is the model's, logits ``[b, s, v/tp]`` or, with
``--fused-output-loss``, ``HiddenStatesAndWeight`` (hidden ``[b, s, h]`` and the output weight
``[v/tp, h]``, see ``megatron_irl.core.model``); ``batch`` is the micro-batch dict. It
returns the *sum* of per-token losses and the number of trained tokens; with
``TransformerConfig.calculate_per_token_loss`` the schedule adds up the token counts of all
micro-batches and data-parallel ranks and divides the gradients by that total, so the average
is exact however the global batch is split. ``metric_sums`` maps names to fp32 scalar sums
that the trainer adds up the same way; the class's ``means`` turns the totals into the logged
per-token means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from megatron_irl.config import IRLConfig, TrainConfig


@dataclass
class SampledStep:
    """What a step of a sampling objective knows besides its micro-batches: the global batch's
    expert and policy token counts N_E, N_P (at least 1) and this rank's GAIL discriminator
    (``training/online.py``; None without one or off the last pipeline stage)."""

    expert_tokens: float
    policy_tokens: float
    discriminator: Any = None


class Objective:
    """The interface of a training objective; one subclass per ``--irl-loss``.

    Class attributes say what the objective needs: ``batch_fields``, the micro-batch fields it
    reads; ``samples_policy``, whether each micro-batch carries the policy's sampled rows
    (``policy_mask``, ``training/online.py``); ``needs_discriminator``, whether it trains a
    GAIL discriminator; ``has_td_term``, whether ``--irl-lambda`` weighs a TD term.
    """

    name: ClassVar[str]
    batch_fields: ClassVar[tuple[str, ...]]
    samples_policy: ClassVar[bool] = False
    needs_discriminator: ClassVar[bool] = False
    has_td_term: ClassVar[bool] = False

    @classmethod
    def lambda_at(cls, irl: IRLConfig, iteration: int) -> float:
        """The TD weight at step ``iteration`` (0-based): ramps linearly from 0 to
        ``--irl-lambda`` over ``--irl-lambda-warmup-iters`` steps, then stays there."""
        if not cls.has_td_term:
            return 0.0
        if iteration >= irl.irl_lambda_warmup_iters:
            return irl.irl_lambda
        return irl.irl_lambda * iteration / irl.irl_lambda_warmup_iters

    @classmethod
    def needs_reference(cls, cfg: TrainConfig) -> bool:
        """Whether a frozen copy of the starting weights scores the samples (``reference.py``)."""
        return False

    @classmethod
    def for_step(cls, cfg: TrainConfig, iteration: int,
                 sampled: SampledStep | None) -> "Objective":
        """The objective of training step ``iteration``; ``sampled`` for sampling objectives."""
        raise NotImplementedError

    @classmethod
    def for_evaluation(cls, cfg: TrainConfig, iteration: int) -> "Objective":
        """The objective the validation set is scored with at step ``iteration`` (dataset rows
        only, so a sampling objective is scored by the offline soft-Q one)."""
        return cls.for_step(cfg, iteration, None)

    @classmethod
    def means(cls, sums: dict[str, float], cfg: TrainConfig) -> dict[str, float]:
        """The logged means from ``metric_sums`` added over all micro-batches and ranks."""
        raise NotImplementedError

    def __call__(self, output, batch: dict) -> tuple[torch.Tensor, torch.Tensor,
                                                      dict[str, torch.Tensor]]:
        raise NotImplementedError


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values.detach().float(), 0.0).sum()


def per(sums: dict, name: str, count: str) -> float:
    return sums[name] / max(sums[count], 1.0)
