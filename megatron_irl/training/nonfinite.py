"""Steps whose loss or gradient norm is not finite: skipped, counted, and a stop after too many.

A diverging run (too high a learning rate, a bad batch) produces an inf / NaN loss or
gradient norm. Such a step is skipped: the optimizer does not update the weights, so they
stay finite and a checkpoint never holds NaN. ``--max-nonfinite-steps`` such steps in a row
stop the run with :class:`NonFiniteTrainingError` (exit status 1) instead of training on.

Every rank must take the same decision, or the ranks that step and those that skip would
drift apart (and, at PP > 1, wait in different collectives): the loss exists only on the
last pipeline stage, so the decision is all-reduced over the world group. The gradient norm
is Megatron-Core's global one (reduced over the model-parallel group, and over data
parallelism with the distributed optimizer), the same value on every rank.

With ``--fp16`` Megatron's dynamic loss scaler keeps its own logic: it skips the steps whose
scaled gradients overflow and lowers the scale (normal in the first steps, and not counted
here); a non-finite *loss* is skipped and counted as for the other precisions.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_irl.cpu_support import current_device


class NonFiniteTrainingError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm, or the weights
    became non-finite; the run stops without saving."""


def all_ranks_true(local: bool) -> bool:
    """Whether ``local`` holds on every rank of the world group (one all-reduce, MIN)."""
    flag = torch.tensor([int(local)], device=current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def optimizer_step(optimizer, metric_sums: dict[str, torch.Tensor] | None, fp16: bool):
    """Megatron's optimizer step, skipped when the loss or gradient norm is not finite.

    Args:
        optimizer: a ``get_megatron_optimizer`` optimizer whose gradients are reduced.
        metric_sums: the step's named metric sums on the last pipeline stage (None elsewhere).
        fp16: whether the optimizer has a dynamic loss scaler.

    Returns:
        (updated, grad_norm, nonfinite): whether the weights changed, the gradient norm
        before clipping (NaN when not computed), and whether the step counts as non-finite.

    Collective: an all-reduce over the world group, plus the optimizer's own.
    """
    loss_finite = all_ranks_true(
        metric_sums is None
        or bool(torch.isfinite(torch.stack(list(metric_sums.values()))).all()))
    if not loss_finite:
        return False, math.nan, True
    if fp16:
        updated, grad_norm, _ = optimizer.step()  # the scaler skips overflowing steps itself
        return updated, float(grad_norm) if grad_norm is not None else math.nan, False
    # The main gradients are ready after prepare_grads (for bf16 a copy from the model's
    # gradients, which step() repeats); their global norm decides before any update.
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm, True
    updated, _, _ = optimizer.step()
    return updated, grad_norm, False


class NonFiniteSteps:
    """Counts non-finite steps; raises after ``limit`` of them in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, nonfinite: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if nonfinite else 0
        self.total += nonfinite

    def stop_at_the_limit(self, iteration: int, last_saved: int | None) -> None:
        """Raise NonFiniteTrainingError if the steps up to ``iteration`` (1-based) ended
        with ``limit`` non-finite ones in a row."""
        if self.in_a_row >= self.limit:
            first = iteration - self.in_a_row + 1
            resume = (f"resume from the checkpoint of iteration {last_saved} "
                      if last_saved is not None else "restart ")
            raise NonFiniteTrainingError(
                f"steps {first}..{iteration} all had a non-finite loss or gradient norm "
                f"({self.in_a_row} in a row, --max-nonfinite-steps {self.limit}); they were "
                f"skipped and the run stops without saving: {resume}with a lower --lr (or "
                f"--clip-grad), or look for bad data in the batches of these steps")


def weights_are_finite(model_chunks: list) -> bool:
    """Whether every parameter on every rank is finite (one all-reduce, world group)."""
    checks = [torch.isfinite(param).all() for chunk in model_chunks for param in chunk.parameters()]
    return all_ranks_true(bool(torch.stack(checks).all()) if checks else True)  # one sync
