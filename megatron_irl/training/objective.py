"""The training objectives, with Megatron-Core's loss-function contract.

Every objective is called as ``objective(logits, batch) -> (loss_sum, num_tokens, metric_sums)``
on the last pipeline stage: ``logits`` ``[b, s, v/tp]`` from the model, ``batch`` the
micro-batch dict. It returns the *sum* of per-token losses and the number of trained tokens;
with ``TransformerConfig.calculate_per_token_loss`` the schedule adds up the token counts of
all micro-batches and data-parallel ranks and divides the gradients by that total, so the
average is exact however the global batch is split. ``metric_sums`` is a ``[len(METRICS)]``
fp32 tensor of sums that the trainer adds up the same way before dividing.
"""

from __future__ import annotations

import torch

from megatron_irl.config import IRLConfig
from megatron_irl.loss import vocab_parallel_entropy, vocab_parallel_soft_q_loss
from megatron_irl.loss.soft_q import td_active_mask

# Sums per micro-batch. Means: loss, nll and entropy per trained token; td_squared and
# reward per token where the TD term is active.
METRICS = ("loss", "nll", "td_squared", "reward", "entropy", "trained_tokens", "td_tokens")


class Objective:
    """``soft_q``: nll + lambda * delta^2 (lambda = 0: MLE). ``mle_entropy``: nll - beta * H."""

    def __init__(self, irl: IRLConfig):
        self.irl = irl

    def __call__(self, logits: torch.Tensor, batch: dict):
        labels, loss_mask, terminal = batch["labels"], batch["loss_mask"], batch["terminal"]
        with_entropy = self.irl.loss == "mle_entropy"
        # Before the soft-Q loss, which overwrites fp32 logits in place.
        entropy = vocab_parallel_entropy(logits) if with_entropy else None  # [b, s]
        out = vocab_parallel_soft_q_loss(
            logits, labels, loss_mask, terminal,
            lam=0.0 if with_entropy else self.irl.irl_lambda,
            gamma=self.irl.irl_gamma,
            stop_value_grad=self.irl.irl_stop_value_grad,
        )
        loss_sum = out.loss.sum()
        entropy_sum = (entropy * loss_mask).sum() if with_entropy else torch.zeros(())
        if with_entropy:
            loss_sum = loss_sum - self.irl.entropy_coef * entropy_sum
        trained_tokens = (loss_mask > 0).sum()
        metric_sums = torch.stack([
            loss_sum.detach(),
            out.nll.detach().sum(),
            out.delta.detach().square().sum(),
            out.delta.detach().sum(),
            entropy_sum.detach().to(loss_sum.device),
            trained_tokens.float(),
            td_active_mask(loss_mask, terminal).sum().float(),
        ])
        return loss_sum, trained_tokens.to(torch.int), metric_sums


def metric_means(metric_sums: torch.Tensor) -> dict[str, float]:
    """Per-token means from summed ``metric_sums`` (all micro-batches, all ranks)."""
    sums = dict(zip(METRICS, metric_sums.tolist()))
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
