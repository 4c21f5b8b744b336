"""Vocab-parallel soft-Q loss: cross entropy plus the inverse-soft-Q TD regulariser.

The logits ``z_t`` are read as soft Q-values. Per position t of a row (docs/method.md, section 2):

    V(s_t)   = logsumexp_v z_t[v]                                     (value)
    nll_t    = V(s_t) - z_t[a_t]                                      (-log pi(a_t|s_t))
    delta_t  = z_t[a_t] - gamma * (1 - terminal_t) * V(s_{n_t})       (implicit reward)
    loss_t   = loss_mask_t * (nll_t + lam * delta_t^2)

v runs over the real vocabulary only (``vocab_size``): the rows that pad the vocabulary to
equal TP shards are no action, so they get -inf logits (probability and gradient 0).

``n_t = next_position[t]`` is the position of the agent's next state: ``t + 1`` (the default),
except at the last token of a non-final assistant turn of a chat, where it is the position
that predicts the next assistant turn's first token: the user's tokens in between are the
environment's move, not actions (docs/method.md, section 1, "Multi-turn records").

The TD term is active at t iff ``loss_mask[t]`` and (``terminal[t]`` or ``n_t < s``): a row's
last position that is not terminal was cut by the sequence length, its next state is not in
the batch, so it keeps only its MLE term.

Layout: ``logits`` is ``[b, s, v/tp]``, this rank's contiguous vocabulary shard; everything
else is ``[b, s]``. With tensor parallelism every rank holds all positions of its shard, so
the gather ``t -> n_t`` that the TD term needs is local once ``V`` has been all-reduced.

The maths lives in small pure helpers (``_per_token_terms``, ``_per_token_grad_coefficients``);
``_VocabParallelSoftQLoss`` owns the collectives and the in-place buffer reuse, in the manner
of Megatron-Core's ``tensor_parallel/cross_entropy.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_irl.loss.parallel import all_reduce, default_tp_group, real_columns, vocab_shard


class SoftQLossOutput(NamedTuple):
    """Per-token results, each ``[b, s]`` fp32."""

    loss: torch.Tensor  # loss_mask * (nll + lam * delta^2); 0 where not trained
    nll: torch.Tensor  # -log pi(a_t|s_t) where trained, else 0
    delta: torch.Tensor  # TD residual = implicit reward where the TD term is active, else 0
    value: torch.Tensor  # V(s_t) = logsumexp(z_t) at every position


def default_next_position(like: torch.Tensor) -> torch.Tensor:
    """int64 ``[b, s]`` ``t + 1`` at every position t of ``like`` ``[b, s]`` (single-turn)."""
    b, s = like.shape
    return torch.arange(1, s + 1, device=like.device).expand(b, s)


def _next_state_value(value: torch.Tensor, next_position: torch.Tensor) -> torch.Tensor:
    """``V(s_{n_t})`` for each t of ``[b, s]``; 0 where ``n_t`` is past the row (masks fill in)."""
    s = value.size(1)
    inside = next_position < s
    return torch.where(inside, value.gather(1, next_position.clamp(max=s - 1)), 0.0)


def bootstraps_mask(terminal: torch.Tensor, next_position: torch.Tensor) -> torch.Tensor:
    """bool ``[b, s]``: the transition at t reads ``V(s_{n_t})`` (not terminal, ``n_t`` in the
    row)."""
    return ~terminal & (next_position < terminal.size(1))


def td_active_mask(loss_mask: torch.Tensor, terminal: torch.Tensor,
                   next_position: torch.Tensor) -> torch.Tensor:
    """Where the TD term applies, bool ``[b, s]``: trained, and the next state is known
    (the transition is terminal, or its next state's position is in the row)."""
    return (loss_mask > 0) & (terminal | (next_position < terminal.size(1)))


def _per_token_terms(
    value: torch.Tensor,
    target_logit: torch.Tensor,
    neg_log_prob: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal: torch.Tensor,
    next_position: torch.Tensor,
    lam: float,
    gamma: float,
) -> tuple[SoftQLossOutput, torch.Tensor]:
    """The loss from the per-token scalars cross entropy already has. All ``[b, s]``.

    ``neg_log_prob`` is ``value - target_logit`` computed without the max (which cancels),
    so confident tokens keep their precision when the logits are large.
    Returns the outputs and the bool mask where the TD term is active.
    """
    trained = loss_mask > 0
    td_active = td_active_mask(loss_mask, terminal, next_position)
    continues = (~terminal).float()
    delta = target_logit - gamma * continues * _next_state_value(value, next_position)
    delta = torch.where(td_active, delta, 0.0)
    nll = torch.where(trained, neg_log_prob, 0.0)
    loss = loss_mask * (nll + lam * delta.square())
    return SoftQLossOutput(loss, nll, delta, value), td_active


def _per_token_grad_coefficients(
    grads: SoftQLossOutput,
    delta: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal: torch.Tensor,
    next_position: torch.Tensor,
    td_active: torch.Tensor,
    lam: float,
    gamma: float,
    stop_value_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rule down to the two per-token scalars, ``[b, s]`` each.

    ``grads`` holds the upstream gradients of (loss, nll, delta, value). Returns
    ``(coef_value, coef_target)`` such that ``dL/dz_t = coef_value_t * softmax(z_t)
    + coef_target_t * onehot(a_t)``, because ``dV_t/dz_t = softmax(z_t)`` and
    ``dz_t[a_t]/dz_t = onehot(a_t)``. With ``grads.loss = mask / N`` and nothing else this is
    the closed form of docs/method.md section 2.
    """
    trained = (loss_mask > 0).float()
    mle = grads.loss * loss_mask + grads.nll * trained  # d/d nll_t
    # d/d delta_t: the caller's gradient plus the TD-squared term's 2 * lam * delta_t.
    td = (grads.delta + 2.0 * lam * grads.loss * loss_mask * delta) * td_active
    coef_target = td - mle
    coef_value = mle + grads.value
    if not stop_value_grad:
        # delta_t depends on V(s_{n_t}) with weight -gamma * (1 - terminal_t). Positions whose
        # n_t is past the row add 0 (to the last position, a valid index).
        pull = torch.where(bootstraps_mask(terminal, next_position),
                           -(gamma * (~terminal).float() * td), 0.0)
        coef_value.scatter_add_(1, next_position.clamp(max=coef_value.size(1) - 1), pull)
    return coef_value, coef_target


def _upstream_grads(grads, like: torch.Tensor) -> SoftQLossOutput:
    """The four upstream gradients of an autograd backward as fp32, zeros for ``None``."""
    return SoftQLossOutput(*(torch.zeros_like(like) if g is None else g.float() for g in grads))


def mask_padded_columns_(logits: torch.Tensor, real_columns: int) -> None:
    """In place: ``logits`` ``[..., v/tp]`` fp32 get -inf in their columns from
    ``real_columns`` on, the padded vocabulary rows, which are no token. Every softmax and
    logsumexp then gives them exactly 0 probability and 0 gradient; the fill touches only the
    padded columns (no new buffer, no collective)."""
    if real_columns < logits.size(-1):
        logits[..., real_columns:] = float("-inf")


class _VocabParallelSoftQLoss(torch.autograd.Function):
    """Forward and backward over the vocab-parallel logits; see ``vocab_parallel_soft_q_loss``."""

    @staticmethod
    def forward(ctx, logits, labels, loss_mask, terminal, next_position, lam, gamma,
                stop_value_grad, tp_group, vocab_size):
        # fp32 logits are used as the working buffer (no copy); bf16/fp16 get one fp32 copy.
        buffer = logits.float()  # [b, s, v/tp]
        mask_padded_columns_(buffer, real_columns(buffer.size(-1), vocab_size, tp_group))
        # A shard that is all padding has max -inf; the MAX over ranks is finite (rank 0
        # always holds real tokens), so z - max below is -inf there, never NaN.
        logits_max = buffer.amax(dim=-1)  # [b, s]
        all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)

        # In place: the buffer becomes z - max, then exp(z - max), then the softmax, which
        # backward turns into the gradient. No other [b, s, v/tp] tensor is allocated.
        buffer.sub_(logits_max.unsqueeze(-1))

        vocab_start, vocab_end = vocab_shard(buffer.size(-1), tp_group)
        owned = (labels >= vocab_start) & (labels < vocab_end)  # [b, s]
        local_label = torch.where(owned, labels - vocab_start, 0).unsqueeze(-1)  # [b, s, 1]
        # Gather before the exp overwrites the buffer; labels owned by another rank give 0.
        shifted_target = torch.where(owned, buffer.gather(-1, local_label).squeeze(-1), 0.0)

        torch.exp(buffer, out=buffer)
        sum_exp = buffer.sum(dim=-1)  # [b, s]

        # One all-reduce carries both sums (Megatron's cross entropy issues two).
        target_and_sum_exp = torch.stack((shifted_target, sum_exp))  # [2, b, s], contiguous
        all_reduce(target_and_sum_exp, dist.ReduceOp.SUM, tp_group)
        shifted_target, sum_exp = target_and_sum_exp.unbind(0)

        buffer.div_(sum_exp.unsqueeze(-1))  # softmax, saved for backward
        log_sum_exp = torch.log(sum_exp)
        value = logits_max + log_sum_exp  # V(s_t)
        target_logit = logits_max + shifted_target  # z_t[a_t]

        out, td_active = _per_token_terms(
            value, target_logit, log_sum_exp - shifted_target, loss_mask, terminal, next_position,
            lam, gamma,
        )

        ctx.save_for_backward(buffer, owned, local_label, out.delta, loss_mask, terminal,
                              next_position, td_active)
        ctx.lam, ctx.gamma, ctx.stop_value_grad = lam, gamma, stop_value_grad
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_delta, grad_value):
        (softmax, owned, local_label, delta, loss_mask, terminal, next_position,
         td_active) = ctx.saved_tensors
        upstream = _upstream_grads((grad_loss, grad_nll, grad_delta, grad_value), delta)
        coef_value, coef_target = _per_token_grad_coefficients(
            upstream, delta, loss_mask, terminal, next_position, td_active,
            ctx.lam, ctx.gamma, ctx.stop_value_grad,
        )
        # In place: the saved softmax buffer becomes the gradient (backward runs once).
        grad_logits = softmax.mul_(coef_value.unsqueeze(-1))  # [b, s, v/tp]
        grad_logits.scatter_add_(-1, local_label, (coef_target * owned).unsqueeze(-1))
        return grad_logits, None, None, None, None, None, None, None, None, None


def _check_inputs(logits, labels, loss_mask, terminal, next_position, lam, gamma, tp_size,
                  check_labels, vocab_size):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [b, s, v/tp], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    _check_per_token_inputs(
        f"logits {tuple(logits.shape)}", logits.shape[:2], logits.device,
        labels, loss_mask, terminal, next_position, lam, gamma,
        vocab_size=checked_vocab_size(logits.size(-1) * tp_size, vocab_size, check_labels),
    )


def checked_vocab_size(padded_vocab: int, vocab_size: Optional[int],
                       check_labels: bool) -> Optional[int]:
    """The bound of the trained-label check (None: no check), after checking that the real
    ``vocab_size`` fits the ``padded_vocab`` logit columns."""
    if vocab_size is not None and not 1 <= vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size {vocab_size} (--vocab-size) must be in [1, "
                         f"{padded_vocab}], the logits' vocabulary columns over all TP ranks")
    if not check_labels:
        return None
    return padded_vocab if vocab_size is None else vocab_size


def _check_per_token_inputs(source, batch_shape, device, labels, loss_mask, terminal,
                            next_position, lam, gamma, vocab_size):
    """Checks of the ``[b, s]`` inputs and hyperparameters shared by the unfused and fused
    losses. ``source`` names the tensor they must match; ``vocab_size`` (None: skip) asks for
    the trained-label and next-position range checks, which need a device sync."""
    per_token = {"labels": labels, "loss_mask": loss_mask, "terminal": terminal,
                 "next_position": next_position}
    for name, tensor in per_token.items():
        if tuple(tensor.shape) != tuple(batch_shape):
            raise ValueError(
                f"{name} must be [b, s] = {tuple(batch_shape)} to match {source}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, {source} on {device}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    if not loss_mask.dtype.is_floating_point:
        raise TypeError(f"loss_mask must be a float tensor (1 = trained), got {loss_mask.dtype}")
    if terminal.dtype != torch.bool:
        raise TypeError(f"terminal must be a bool tensor, got {terminal.dtype}")
    if next_position.dtype != torch.int64:
        raise TypeError(f"next_position must be an int64 tensor, got {next_position.dtype}")
    if not lam >= 0.0 or lam == float("inf"):
        raise ValueError(f"lam (--irl-lambda) must be finite and >= 0, got {lam}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma (--irl-gamma) must be in [0, 1], got {gamma}")
    if vocab_size is not None:
        trained_labels = labels[loss_mask > 0]
        bad = (trained_labels < 0) | (trained_labels >= vocab_size)
        if bool(bad.any()):
            raise ValueError(
                f"{int(bad.sum())} trained label(s) outside the vocabulary [0, {vocab_size}), "
                f"e.g. {int(trained_labels[bad][0])}"
            )
        _check_next_position(loss_mask, next_position)


def _check_next_position(loss_mask, next_position):
    """Each trained position's next state lies after it, and no two trained positions share
    one (the fused loss relies on both)."""
    trained = loss_mask > 0
    s = next_position.size(1)
    after = next_position > torch.arange(s, device=next_position.device)
    if not bool(after[trained].all()):
        raise ValueError("next_position must be > t at every trained position t")
    inside = trained & (next_position < s)
    flat = (next_position + s * torch.arange(next_position.size(0),
                                             device=next_position.device)[:, None])[inside]
    if flat.numel() != flat.unique().numel():
        raise ValueError("two trained positions bootstrap from the same next_position")


def vocab_parallel_soft_q_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal: torch.Tensor,
    *,
    lam: float,
    gamma: float,
    next_position: Optional[torch.Tensor] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    stop_value_grad: bool = False,
    check_labels: bool = False,
    vocab_size: Optional[int] = None,
) -> SoftQLossOutput:
    """Per-token soft-Q loss over vocab-parallel logits. ``lam = 0`` is exactly cross entropy.

    Args:
        logits: ``[b, s, v/tp]`` this rank's vocabulary shard (fp32, bf16 or fp16; the maths
            runs in fp32). The shard of rank r is ``[r * v/tp, (r + 1) * v/tp)``.
        labels: ``[b, s]`` global token ids; the target at t is token t+1. Labels at
            untrained positions are ignored and may hold anything (e.g. -100).
        loss_mask: ``[b, s]`` float, 1 = trained token, 0 = prompt or padding.
        terminal: ``[b, s]`` bool, the transition at t ends its document (``V(s_{t+1}) = 0``).
        lam: weight of the TD-squared term (>= 0).
        gamma: discount in [0, 1].
        next_position: ``[b, s]`` int64, the position ``n_t > t`` of the state the TD term at
            t bootstraps from (``s`` or more: not in the row); None: ``t + 1`` (single-turn).
            Packed rows carry it (``megatron_irl.data.packing``); no two trained positions may
            share one.
        tp_group: tensor-parallel group; defaults to Megatron's when initialised, else one rank.
        stop_value_grad: ablation; no gradient through ``V(s_{n_t})`` in the TD term.
        check_labels: also check that trained labels lie in the vocabulary and the
            ``next_position`` rules above (a device sync).
        vocab_size: the real vocabulary; the logit columns of ids ``>= vocab_size`` (the
            padding up to ``v``) are no token and get probability 0 (excluded from every
            softmax and ``V``; their gradient is 0). None: all ``v`` columns are tokens.

    Returns:
        ``SoftQLossOutput(loss, nll, delta, value)``, each ``[b, s]`` fp32; the caller reduces
        ``loss.sum() / loss_mask.sum()``. ``delta`` is 0 where the TD term is inactive.

    Collectives over ``tp_group`` in forward: all-reduce MAX of ``[b, s]`` fp32, all-reduce SUM
    of ``[2, b, s]`` fp32 (target logit and sum of exponentials). None in backward.

    Mutation: fp32 ``logits`` are overwritten with the softmax (0 in padded columns) in
    forward and with their own gradient in backward (as in Megatron's cross entropy; clone
    them if you still need them).
    bf16/fp16 logits are not modified (one fp32 copy is made). Backward may run only once.
    """
    if tp_group is None:
        tp_group = default_tp_group()
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if next_position is None:
        next_position = default_next_position(labels)
    _check_inputs(logits, labels, loss_mask, terminal, next_position, lam, gamma, tp_size,
                  check_labels, vocab_size)
    return SoftQLossOutput(*_VocabParallelSoftQLoss.apply(
        logits, labels, loss_mask, terminal, next_position, float(lam), float(gamma),
        stop_value_grad, tp_group, vocab_size,
    ))
