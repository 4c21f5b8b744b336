"""The training objectives, with Megatron-Core's loss-function contract.

Every objective is called as ``objective(output, batch) -> (loss_sum, num_tokens, metric_sums)``
on the last pipeline stage: ``output`` is the model's, logits ``[b, s, v/tp]`` or, with
``--fused-output-loss``, ``HiddenStatesAndWeight`` (hidden ``[b, s, h]`` and the output weight
``[v/tp, h]``, see ``megatron_irl.core.model``); ``batch`` is the micro-batch dict. It
returns the *sum* of per-token losses and the number of trained tokens; with
``TransformerConfig.calculate_per_token_loss`` the schedule adds up the token counts of all
micro-batches and data-parallel ranks and divides the gradients by that total, so the average
is exact however the global batch is split. ``metric_sums`` is a ``[len(METRICS)]``
fp32 tensor of sums that the trainer adds up the same way before dividing.
"""

from __future__ import annotations

import torch

from megatron_irl.config import IRLConfig
from megatron_irl.loss import vocab_parallel_entropy, vocab_parallel_soft_q_loss
from megatron_irl.loss.fused_output import fused_output_soft_q_loss_sum
from megatron_irl.loss.soft_q import td_active_mask

# Sums per micro-batch. Means: loss, nll and entropy per trained token; td_squared and
# reward per token where the TD term is active.
METRICS = ("loss", "nll", "td_squared", "reward", "entropy", "trained_tokens", "td_tokens")


def lambda_at(irl: IRLConfig, iteration: int) -> float:
    """The TD weight at step ``iteration`` (0-based): ramps linearly from 0 to
    ``--irl-lambda`` over ``--irl-lambda-warmup-iters`` steps, then stays there."""
    if irl.loss not in ("soft_q", "online"):  # the losses with a TD term
        return 0.0
    if iteration >= irl.irl_lambda_warmup_iters:
        return irl.irl_lambda
    return irl.irl_lambda * iteration / irl.irl_lambda_warmup_iters


class Objective:
    """``soft_q``: nll + lambda * delta^2 (lambda = 0: MLE). ``mle_entropy``: nll - beta * H.

    One objective per step: ``lam`` follows the warm-up schedule of step ``iteration``.
    ``vocab_size``: the real vocabulary (the padded logit columns above it get no
    probability); None: every column is a token.
    """

    def __init__(self, irl: IRLConfig, iteration: int, vocab_size: int | None = None):
        self.irl = irl
        self.lam = lambda_at(irl, iteration)
        self.vocab_size = vocab_size

    def __call__(self, output, batch: dict):
        labels, loss_mask, terminal = batch["labels"], batch["loss_mask"], batch["terminal"]
        next_position = batch["next_position"]
        with_entropy = self.irl.loss == "mle_entropy"
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
                       if with_entropy else None)  # [b, s]
            out = vocab_parallel_soft_q_loss(output, labels, loss_mask, terminal, **options)
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
            td_active_mask(loss_mask, terminal, next_position).sum().float(),
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
