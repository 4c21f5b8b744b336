"""Output layer fused with the soft-Q loss sum: hidden states in, loss sum out, no full logits.

``fused_output_soft_q_loss_sum(hidden, weight, ...)`` gives the same loss sum, per-token
metrics and gradients w.r.t. ``hidden`` and ``weight`` as Megatron's vocab-parallel output
layer (ColumnParallelLinear without ``gather_output``) followed by the summed
``vocab_parallel_soft_q_loss``:

    logits = hidden @ weight.T              # [b, s, v/tp]; never materialised here
    vocab_parallel_soft_q_loss(logits, labels, loss_mask, terminal, ...).loss.sum()

but it holds at most ``chunk_size`` tokens' logits ``[v/tp, chunk_size]`` (fp32) at a time.

Only the scalar sum is differentiable: the gradient of ``g * sum_t loss_t`` is ``g`` times the
gradient of the sum, so the gradients w.r.t. ``hidden`` and ``weight`` are computed in the
forward pass, while each chunk's logits are at hand (three ``tokens x h x v/tp`` matmuls in
all, as unfused: logits, hidden gradient, weight gradient), and backward only scales them by
``g``. The per-token outputs are returned detached, for metrics.

Per chunk of tokens, once the chunk's logits are turned into ``exp(z - m)`` (``m`` this rank's
row max) and the row maxima and sums are combined over the TP ranks flash-style
(``M = max_r m_r``, ``sum_exp = sum_r sum_exp_r * exp(m_r - M)``, ``V = M + log(sum_exp)``),
the gradient w.r.t. the logits is ``coef_value_t * softmax_t + coef_target_t * onehot(a_t)``
(``soft_q._per_token_grad_coefficients``). The TD term couples neighbours:

- ``coef_value_t`` needs ``V(s_t)`` and the target logit of the trained token ``t'`` whose
  next state is ``t`` (through ``delta_{t'}``; ``t' = t - 1`` except after a chat's user turn),
  both known when the chunk is reached, since chunks run in token order and ``t' < t``. So
  the softmax part goes through the two gradient matmuls right away (``_softmax_coefficient``).
- ``coef_target_t`` needs ``delta_t``, hence the *next* state's ``V(s_{n_t})``, which may lie
  in a later chunk. The one-hot part is only a gather and a scatter of ``[tokens, h]`` rows (no
  matmul), so it is added after the last chunk, with the coefficients of the unfused loss.

Collectives over ``tp_group`` (all on contiguous tensors; none at one rank):
    forward, per chunk of c tokens: all-reduce MAX of ``[c]`` fp32 (row max), then all-reduce
        SUM of ``[2, c]`` fp32 (target logit and rescaled sum of exponentials).
    backward: all-reduce SUM of ``grad_hidden`` ``[b*s, h]`` (``hidden``'s dtype), when
        ``hidden`` needs a gradient - the all-reduce ColumnParallelLinear's backward does
        (``copy_to_tensor_model_parallel_region``): every rank's vocabulary shard contributes
        to the gradient of the replicated hidden states.

Sequence parallelism: ``hidden`` must hold the whole sequence. Sequence-sharded hidden states
are all-gathered by the caller first, as Megatron's output layer does, with a backward that
*splits* the gradient (``gather_from_sequence_parallel_region(...,
tensor_parallel_output_grad=False)``) since the gradient returned here is already summed over
the TP group (``megatron_irl.core.model`` does exactly this).

Memory: the weight gradient ``[v/tp, h]`` (fp32 while accumulating) and the hidden gradient
``[b*s, h]`` are held from forward to backward, next to one chunk buffer during forward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_irl.loss.parallel import all_reduce, default_tp_group, real_columns, vocab_shard
from megatron_irl.loss.soft_q import (
    SoftQLossOutput,
    _check_per_token_inputs,
    _per_token_grad_coefficients,
    _per_token_terms,
    bootstraps_mask,
    checked_vocab_size,
    default_next_position,
)


class FusedLossSum(NamedTuple):
    """Result of ``fused_output_soft_q_loss_sum``."""

    loss_sum: torch.Tensor  # 0-dim fp32, sum of per_token.loss; differentiable
    per_token: SoftQLossOutput  # [b, s] fp32 each, detached


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


def _chunk_logits(hidden_rows: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor):
    """fp32 logits of ``hidden_rows`` ``[c, h]``, vocabulary-major: ``[v/tp, c]``, contiguous,
    in the first ``v/tp * c`` elements of the flat fp32 ``buffer``.

    Vocabulary-major because ``weight @ hidden_rows.T`` (the vocabulary is the matmul's long
    dimension) runs much faster with MKL on two threads than ``hidden_rows @ weight.T`` at
    chunk sizes in the hundreds (docs/benchmarks.md, issue #10), and it makes the weight
    gradient matmul ``[v/tp, c] @ [c, h]`` need no transpose. bf16/fp16 inputs multiply in
    their own dtype (the logits are rounded to it, as the unfused ``hidden @ weight.T`` gives
    them) and are then copied to fp32.
    """
    out = buffer[: weight.size(0) * hidden_rows.size(0)].view(weight.size(0), -1)
    if hidden_rows.dtype == torch.float32:
        torch.mm(weight, hidden_rows.t(), out=out)
    else:
        out.copy_(weight @ hidden_rows.t())
    return out


def _previous_token(loss_mask, terminal, next_position, lam, gamma, stop_value_grad):
    """For each flat token t of ``[b*s]``: the trained token ``t'`` whose TD term bootstraps
    from ``V(s_t)`` (``n_{t'} = t``; int64, 0 where none) and how much ``delta_{t'}`` pulls on
    ``V(s_t)`` in ``d(sum loss)/dV(s_t)`` (fp32): ``2 * lam * gamma * loss_mask_{t'}``, else 0;
    all 0 with ``stop_value_grad``. ``t' < t`` and at most one per t (checked with
    ``check_labels``)."""
    b, s = loss_mask.shape
    weight = torch.zeros(b * s, dtype=torch.float32, device=loss_mask.device)
    previous = torch.zeros(b * s, dtype=torch.int64, device=loss_mask.device)
    if not stop_value_grad:
        pulls = (loss_mask > 0) & bootstraps_mask(terminal, next_position)  # [b, s]
        row_start = torch.arange(b, device=loss_mask.device)[:, None] * s
        target = (row_start + next_position)[pulls]
        weight[target] = (2.0 * lam * gamma * loss_mask * (~terminal))[pulls]
        previous[target] = (row_start + torch.arange(s, device=loss_mask.device))[pulls]
    return previous, weight


def _softmax_coefficient(rows, value, target_logit, loss_mask, previous, previous_weight,
                         gamma):
    """``coef_value`` of ``soft_q._per_token_grad_coefficients`` for ``d(sum loss)``, at the
    flat token ``rows`` (a slice of ``[b*s]``), from what the chunks so far have given.

    With upstream gradient 1 on every loss it is ``loss_mask_t - previous_weight_t *
    delta_{t'}``, where ``delta_{t'} = z_{t'}[a_{t'}] - gamma * V(s_t)`` wherever
    ``previous_weight_t`` is not 0 (``t' = previous_t``, ``_previous_token``). Reads
    ``value`` at ``rows`` and ``target_logit`` at ``previous[rows]``, all computed already.
    """
    previous_delta = target_logit[previous[rows]] - gamma * value[rows]
    return loss_mask[rows] - previous_weight[rows] * previous_delta  # [c]


def _exp_logits_and_statistics(logits, local_label, owned, tp_group):
    """In place: the chunk's ``logits`` ``[v/tp, c]`` fp32 become ``exp(z - m)``, ``m`` this
    rank's max per token (padded rows, already -inf, become 0). Returns ``[c]`` fp32 per
    token: ``logits_max`` (``M``, over all ranks), ``shifted_target`` (``z[a] - M``),
    ``sum_exp`` (``sum exp(z - M)`` over the whole vocabulary) and ``shard_scale``
    (``exp(m - M)``, turning this rank's ``exp(z - m)`` into ``exp(z - M)``).
    ``local_label`` ``[c]`` indexes this rank's shard where ``owned``.
    All-reduces MAX of ``[c]`` and SUM of ``[2, c]`` over ``tp_group``.
    """
    # Clamped so that a shard of padding only (all -inf) gives exp(-inf - m) = 0, not NaN,
    # and a shard scale exp(m - M) of 0.
    local_max = logits.amax(dim=0).clamp_(min=torch.finfo(torch.float32).min)
    local_target = logits.gather(0, local_label.unsqueeze(0)).squeeze(0)
    logits.sub_(local_max).exp_()
    logits_max = local_max.clone()
    all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
    # The online-softmax combination: each shard's sum rescaled to the global max.
    shard_scale = torch.exp(local_max - logits_max)
    target_and_sum_exp = torch.stack((
        torch.where(owned, local_target - logits_max, 0.0),
        logits.sum(dim=0) * shard_scale,
    ))  # [2, c]
    all_reduce(target_and_sum_exp, dist.ReduceOp.SUM, tp_group)
    shifted_target, sum_exp = target_and_sum_exp.unbind(0)
    return logits_max, shifted_target, sum_exp, shard_scale


class _FusedOutputSoftQLossSum(torch.autograd.Function):
    """Forward and backward of ``fused_output_soft_q_loss_sum``; see there and the module doc."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_mask, terminal, next_position, lam, gamma,
                stop_value_grad, chunk_size, tp_group, want_hidden, want_weight, vocab_size):
        b, s, h = hidden.shape
        num_tokens = b * s
        flat_hidden = hidden.reshape(num_tokens, h)  # [t, h]
        vocab_start, vocab_end = vocab_shard(weight.size(0), tp_group)
        real_rows = real_columns(weight.size(0), vocab_size, tp_group)
        flat_labels = labels.reshape(-1)
        owned = (flat_labels >= vocab_start) & (flat_labels < vocab_end)  # [t]
        local_label = torch.where(owned, flat_labels - vocab_start, 0)  # [t]
        flat_mask = loss_mask.reshape(-1).float()
        previous, previous_weight = _previous_token(loss_mask, terminal, next_position, lam,
                                                    gamma, stop_value_grad)

        value = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)  # V(s_t)
        target_logit = torch.empty_like(value)  # z_t[a_t]
        neg_log_prob = torch.empty_like(value)  # V - z[a] without the max, as unfused
        grad_hidden = torch.empty_like(flat_hidden) if want_hidden else None  # [t, h]
        # fp32 accumulator over chunks whatever the weight's dtype; [v/tp, h]. Not zeroed:
        # the first chunk's matmul overwrites it (beta = 0), saving a pass over [v/tp, h].
        grad_weight = torch.empty_like(weight, dtype=torch.float32) if want_weight else None
        buffer = hidden.new_empty(min(chunk_size, num_tokens) * weight.size(0),
                                  dtype=torch.float32)
        for rows in _chunks(num_tokens, chunk_size):
            hidden_rows = flat_hidden[rows]
            # In place: logits -> exp(z - m).
            exp_logits = _chunk_logits(hidden_rows, weight, buffer)  # [v/tp, c]
            # Padded vocabulary rows are no token: -inf, so their softmax and gradient are 0.
            exp_logits[real_rows:] = float("-inf")
            logits_max, shifted_target, sum_exp, shard_scale = _exp_logits_and_statistics(
                exp_logits, local_label[rows], owned[rows], tp_group)  # [c] each
            log_sum_exp = torch.log(sum_exp)
            value[rows] = logits_max + log_sum_exp
            target_logit[rows] = logits_max + shifted_target
            neg_log_prob[rows] = log_sum_exp - shifted_target
            if not (want_hidden or want_weight):
                continue
            coef = _softmax_coefficient(rows, value, target_logit, flat_mask, previous,
                                        previous_weight, gamma)
            # The softmax part of the gradient w.r.t. the logits is exp_logits * token_scale
            # (per column); the scale goes onto the [c, h] side of each matmul instead, which
            # saves a pass over the [v/tp, c] buffer.
            token_scale = (coef * shard_scale / sum_exp).unsqueeze(-1)  # [c, 1]
            if want_hidden:
                hidden_grad_rows = grad_hidden[rows]  # [c, h]
                torch.mm(exp_logits.t().to(hidden.dtype), weight, out=hidden_grad_rows)
                hidden_grad_rows.mul_(token_scale)
            if want_weight:
                grad_weight.addmm_(exp_logits, hidden_rows.float() * token_scale,
                                   beta=0.0 if rows.start == 0 else 1.0)
        del buffer

        out, td_active = _per_token_terms(
            value.view(b, s), target_logit.view(b, s), neg_log_prob.view(b, s),
            loss_mask, terminal, next_position, lam, gamma,
        )
        if want_hidden or want_weight:
            _add_one_hot_part(out, flat_hidden, weight, owned, local_label, loss_mask, terminal,
                              next_position, td_active, lam, gamma, chunk_size, grad_hidden,
                              grad_weight)
        ctx.grad_hidden = grad_hidden.view(b, s, h) if want_hidden else None
        ctx.grad_weight = grad_weight.to(weight.dtype) if want_weight else None
        ctx.tp_group = tp_group
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*out)
        return (out.loss.sum(), *out)

    @staticmethod
    def backward(ctx, grad_loss_sum, *unused_per_token_grads):
        if not hasattr(ctx, "grad_weight"):
            raise RuntimeError("fused_output_soft_q_loss_sum: backward may run only once")
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        del ctx.grad_hidden, ctx.grad_weight  # the returned tensors are the only references
        if grad_loss_sum is None:
            return (None,) * 14
        # In place: the gradients of the sum become those of grad_loss_sum * sum.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss_sum)
            all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.tp_group)  # contiguous [b, s, h]
        if grad_weight is not None:
            grad_weight.mul_(grad_loss_sum)
        return (grad_hidden, grad_weight) + (None,) * 12


def _add_one_hot_part(out, flat_hidden, weight, owned, local_label, loss_mask, terminal,
                      next_position, td_active, lam, gamma, chunk_size, grad_hidden,
                      grad_weight):
    """Adds ``coef_target_t * onehot(a_t)``'s share to ``grad_hidden`` ``[t, h]`` (rows
    ``coef * weight[a_t]``) and ``grad_weight`` ``[v/tp, h]`` fp32 (``coef * hidden_t`` into row
    ``a_t``), where this rank owns ``a_t``; in place, ``chunk_size`` tokens at a time so that
    no extra ``[t, h]`` tensor is made."""
    upstream = SoftQLossOutput(torch.ones_like(out.loss), *(torch.zeros_like(out.loss),) * 3)
    _, coef_target = _per_token_grad_coefficients(
        upstream, out.delta, loss_mask, terminal, next_position, td_active, lam, gamma,
        stop_value_grad=True,
    )  # stop_value_grad changes only coef_value, which is not used here
    coef_target = (coef_target.reshape(-1) * owned).unsqueeze(-1)  # [t, 1]
    for rows in _chunks(flat_hidden.size(0), chunk_size):
        labels_rows = local_label[rows]  # [c]
        if grad_hidden is not None:
            grad_hidden[rows] += (coef_target[rows] * weight[labels_rows].float()).to(
                grad_hidden.dtype)
        if grad_weight is not None:
            # index_put_ rather than index_add_, which is ~10x slower on CPU (torch 2.13).
            grad_weight.index_put_((labels_rows,), coef_target[rows] * flat_hidden[rows].float(),
                                   accumulate=True)


def fused_output_soft_q_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal: torch.Tensor,
    *,
    lam: float,
    gamma: float,
    next_position: Optional[torch.Tensor] = None,
    chunk_size: int = 256,
    tp_group: Optional[dist.ProcessGroup] = None,
    stop_value_grad: bool = False,
    check_labels: bool = False,
    vocab_size: Optional[int] = None,
) -> FusedLossSum:
    """Summed soft-Q loss of ``hidden @ weight.T`` without materialising the ``[b*s, v/tp]``
    logits, with per-token metrics.

    Args:
        hidden: ``[b, s, h]`` final hidden states (batch-major, the layout of the labels; a
            Megatron ``[s, b, h]`` tensor is passed as ``hidden.transpose(0, 1)``), the whole
            sequence, the same on every TP rank. fp32, bf16 or fp16.
        weight: ``[v/tp, h]`` this rank's vocabulary shard of the output weight
            (ColumnParallelLinear's layout; the tied embedding weight has it too), rows
            ``[r * v/tp, (r + 1) * v/tp)`` on rank r; same dtype as ``hidden``.
        labels, loss_mask, terminal, next_position, lam, gamma, stop_value_grad, check_labels,
            vocab_size: as in ``vocab_parallel_soft_q_loss`` (the weight rows of ids
            ``>= vocab_size`` are padding: no probability, and a weight gradient of 0).
        chunk_size: tokens per chunk (any size >= 1); the working buffer is
            ``[v/tp, chunk_size]`` fp32, e.g. 128 MiB for 256 tokens at v/tp = 128k.
        tp_group: tensor-parallel group; defaults to Megatron's when initialised, else one rank.

    Returns:
        ``FusedLossSum(loss_sum, per_token)``: ``loss_sum`` is ``per_token.loss.sum()`` (0-dim
        fp32) and the only differentiable output; ``per_token`` is the detached
        ``SoftQLossOutput(loss, nll, delta, value)``, each ``[b, s]`` fp32, equal (to fp32
        rounding) to the unfused loss of ``hidden @ weight.T``.

    Gradients (of ``loss_sum`` only): ``hidden`` gets the full gradient, summed over the TP
    group (one all-reduce in backward, see the module doc for every collective); ``weight``
    gets this shard's gradient. Both are computed during forward when grad mode is on and the
    tensor requires grad (under ``torch.no_grad`` only the loss is computed) and held until
    backward: ``[b, s, h]`` and ``[v/tp, h]`` in the inputs' dtype, the latter accumulated in
    fp32 (a transient fp32 ``[v/tp, h]`` with bf16/fp16 weights). The maths runs in fp32; with
    bf16/fp16 inputs the logits are rounded to that dtype first (as the unfused matmul gives
    them) and the hidden gradient's matmul runs in the input dtype. Mutates nothing; backward
    may run only once.
    """
    if tp_group is None:
        tp_group = default_tp_group()
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if hidden.dim() != 3 or hidden.size(0) * hidden.size(1) == 0:
        raise ValueError(f"hidden must be [b, s, h] with at least one token, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.size(1) != hidden.size(2):
        raise ValueError(f"weight must be [v/tp, h] with h = {hidden.size(2)} to match hidden "
                         f"{tuple(hidden.shape)}, got shape {tuple(weight.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"weight ({weight.dtype}, {weight.device}) must have hidden's dtype "
                        f"and device ({hidden.dtype}, {hidden.device})")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size (--fused-output-chunk-size) must be an int >= 1, "
                         f"got {chunk_size!r}")
    if next_position is None:
        next_position = default_next_position(labels)
    _check_per_token_inputs(
        f"hidden {tuple(hidden.shape)}", hidden.shape[:2], hidden.device,
        labels, loss_mask, terminal, next_position, lam, gamma,
        vocab_size=checked_vocab_size(weight.size(0) * tp_size, vocab_size, check_labels),
    )
    grad_enabled = torch.is_grad_enabled()
    loss_sum, *per_token = _FusedOutputSoftQLossSum.apply(
        hidden, weight, labels, loss_mask, terminal, next_position, float(lam), float(gamma),
        stop_value_grad,
        chunk_size, tp_group, grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad, vocab_size,
    )
    return FusedLossSum(loss_sum, SoftQLossOutput(*per_token))
