"""``--irl-loss soft_q``: nll + lambda * delta^2 (inverse soft-Q; lambda = 0: MLE)."""

from __future__ import annotations

import torch

from megatron_irl.config import IRLConfig, TrainConfig
from megatron_irl.loss import vocab_parallel_entropy, vocab_parallel_soft_q_loss
from megatron_irl.loss.fused_output import fused_output_soft_q_loss_sum
from megatron_irl.loss.soft_q import td_active_mask
from megatron_irl.training.objectives.base import Objective, SampledStep


class SoftQObjective(Objective):
    """nll + lambda * delta^2, and with ``entropy_weight`` (``mle_entropy``) minus that times
    the entropy.

    One objective per step: ``lam`` follows the warm-up schedule of step ``iteration``.
    ``vocab_size``: the real vocabulary (the padded logit columns above it get no
    probability); None: every column is a token.
    """

    name = "soft_q"
    batch_fields = ("labels", "loss_mask", "terminal", "next_position")
    has_td_term = True
    with_entropy = False

    def __init__(self, irl: IRLConfig, iteration: int, vocab_size: int | None = None):
        self.irl = irl
        self.lam = self.lambda_at(irl, iteration)
        self.vocab_size = vocab_size

    @classmethod
    def for_step(cls, cfg: TrainConfig, iteration: int, sampled: SampledStep | None):
        return cls(cfg.irl, iteration, cfg.model.vocab_size)

    @classmethod
    def means(cls, sums: dict[str, float], cfg: TrainConfig | None = None) -> dict[str, float]:
        """Per-token means: loss, nll and entropy per trained token; td_squared and reward per
        token where the TD term is active."""
        trained = max(sums["trained_tokens"], 1.0)
        td = max(sums["td_tokens"], 1.0)
        return {
            "loss": sums["loss"] / trained,
            "nll": sums["nll"] / trained,
            "td_squared": sums["td_squared"] / td,
            "reward": sums["reward"] / td,
            "entropy": sums["entropy"] / trained,
            "trained_tokens": sums["trained_tokens"],
        }

    def __call__(self, output, batch: dict):
        labels, loss_mask, terminal = batch["labels"], batch["loss_mask"], batch["terminal"]
        next_position = batch["next_position"]
        options = dict(
            lam=self.lam,
            gamma=self.irl.irl_gamma,
            next_position=next_position,
            stop_value_grad=self.irl.irl_stop_value_grad,
            vocab_size=self.vocab_size,
        )
        if self.irl.fused_output_loss:  # soft_q only (IRLConfig checks)
            # Differentiable only through the sum, which is all the schedule backpropagates.
            loss_sum, out = fused_output_soft_q_loss_sum(
                output.hidden, output.weight, labels, loss_mask, terminal,
                chunk_size=self.irl.fused_output_chunk_size, **options,
            )
        else:
            # Before the soft-Q loss, which overwrites fp32 logits in place.
            entropy = (vocab_parallel_entropy(output, vocab_size=self.vocab_size)
                       if self.with_entropy else None)  # [b, s]
            out = vocab_parallel_soft_q_loss(output, labels, loss_mask, terminal, **options)
            loss_sum = out.loss.sum()
        entropy_sum = (entropy * loss_mask).sum() if self.with_entropy else torch.zeros(())
        if self.with_entropy:
            loss_sum = loss_sum - self.irl.entropy_coef * entropy_sum
        trained_tokens = (loss_mask > 0).sum()
        metric_sums = {
            "loss": loss_sum.detach(),
            "nll": out.nll.detach().sum(),
            "td_squared": out.delta.detach().square().sum(),
            "reward": out.delta.detach().sum(),
            "entropy": entropy_sum.detach().to(loss_sum.device),
            "trained_tokens": trained_tokens.float(),
            "td_tokens": td_active_mask(loss_mask, terminal, next_position).sum().float(),
        }
        return loss_sum, trained_tokens.to(torch.int), metric_sums
