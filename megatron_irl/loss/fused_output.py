"""Output layer fused with the soft-Q loss: hidden states in, per-token loss out, no full logits.

``fused_output_soft_q_loss(hidden, weight, ...)`` gives the same outputs and the same gradients
w.r.t. ``hidden`` and ``weight`` as Megatron's vocab-parallel output layer (ColumnParallelLinear
without ``gather_output``) followed by ``vocab_parallel_soft_q_loss``:

    logits = hidden @ weight.T              # [b, s, v/tp]; never materialised here
    vocab_parallel_soft_q_loss(logits, labels, loss_mask, terminal, ...)

but it holds at most ``chunk_size`` tokens' logits ``[chunk_size, v/tp]`` (fp32) at a time.

Forward (pass 1): for each chunk of tokens, compute the chunk's logits, this rank's row max
``m_r``, its sum of ``exp(z - m_r)`` and the target logit where this rank owns the label.
Once every token is done, the ranks' partial results combine flash-style:
``M = max_r m_r`` and ``sum_exp = sum_r sum_exp_r * exp(m_r - M)``, so ``V = M + log(sum_exp)``
for *all* tokens is known before any per-token term. The TD term couples t to t+1
(``delta_t`` needs ``V(s_{t+1})``), which is why V is computed for every token first: chunk
boundaries then need no special handling, and the per-token maths is the unfused loss's own
(``soft_q._per_token_terms``).

Backward (pass 2): the gradient w.r.t. the logits is ``coef_value * softmax + coef_target *
onehot(label)`` with two per-token scalars (``soft_q._per_token_grad_coefficients``), known
for all tokens from pass 1's saved ``[b, s]`` tensors. Each chunk's logits are recomputed,
turned in place into ``exp(z - V)`` (the softmax), then into the chunk's logit gradient, which
gives the chunk's rows of ``grad_hidden`` and is accumulated into ``grad_weight`` (fp32).

Collectives over ``tp_group`` (all on contiguous tensors; none at one rank):
    forward:  all-reduce MAX of ``[b*s]`` fp32 (row max), then all-reduce SUM of ``[2, b*s]``
              fp32 (target logit and rescaled sum of exponentials) - as the unfused loss.
    backward: all-reduce SUM of ``grad_hidden`` ``[b*s, h]`` (``hidden``'s dtype), when
              ``hidden`` needs a gradient - the all-reduce ColumnParallelLinear's backward does
              (``copy_to_tensor_model_parallel_region``): every rank's vocabulary shard
              contributes to the gradient of the replicated hidden states.

Sequence parallelism: ``hidden`` must hold the whole sequence. Sequence-sharded hidden states
are all-gathered by the caller first, as Megatron's output layer does, with a backward that
*splits* the gradient (``gather_from_sequence_parallel_region(...,
tensor_parallel_output_grad=False)``) since the gradient returned here is already summed over
the TP group (``megatron_irl.training.model`` does exactly this).

Cost: the chunk logits are computed twice (forward and backward), so four matmuls of
``tokens x h x v/tp`` instead of the unfused three.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_irl.loss.parallel import all_reduce, default_tp_group
from megatron_irl.loss.soft_q import (
    SoftQLossOutput,
    _check_per_token_inputs,
    _per_token_grad_coefficients,
    _per_token_terms,
    _upstream_grads,
    _vocab_range,
)


def _chunk_logits(hidden_rows: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor):
    """fp32 logits ``[c, v/tp]`` of ``hidden_rows`` ``[c, h]``, written into ``buffer[:c]``.

    bf16/fp16 inputs multiply in their own dtype (the logits are rounded to it, as the unfused
    ``hidden @ weight.T`` gives them) and are then copied to fp32.
    """
    out = buffer[: hidden_rows.size(0)]
    if hidden_rows.dtype == torch.float32:
        torch.mm(hidden_rows, weight.t(), out=out)
    else:
        out.copy_(hidden_rows @ weight.t())
    return out


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


class _FusedOutputSoftQLoss(torch.autograd.Function):
    """Forward and backward of ``fused_output_soft_q_loss``; see there and the module doc."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_mask, terminal, lam, gamma, stop_value_grad,
                chunk_size, tp_group):
        b, s, h = hidden.shape
        flat_hidden = hidden.reshape(b * s, h)  # [t, h], t = b * s tokens
        vocab_start, vocab_end = _vocab_range(weight.size(0), tp_group)
        flat_labels = labels.reshape(-1)
        owned = (flat_labels >= vocab_start) & (flat_labels < vocab_end)  # [t]
        local_label = torch.where(owned, flat_labels - vocab_start, 0).unsqueeze(-1)  # [t, 1]

        local_max = torch.empty(b * s, dtype=torch.float32, device=hidden.device)
        local_sum_exp = torch.empty_like(local_max)  # sum of exp(z - local_max), this shard
        target_logit = torch.empty_like(local_max)  # z[label] where owned, else 0
        buffer = hidden.new_empty(min(chunk_size, b * s), weight.size(0), dtype=torch.float32)
        for rows in _chunks(b * s, chunk_size):
            logits = _chunk_logits(flat_hidden[rows], weight, buffer)  # [c, v/tp]
            chunk_max = logits.amax(dim=-1)
            local_max[rows] = chunk_max
            target = logits.gather(-1, local_label[rows]).squeeze(-1)
            target_logit[rows] = torch.where(owned[rows], target, 0.0)
            local_sum_exp[rows] = logits.sub_(chunk_max.unsqueeze(-1)).exp_().sum(dim=-1)
        del buffer

        logits_max = local_max.clone()
        all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
        # The online-softmax combination: each shard's sum rescaled to the global max.
        rescaled_sum_exp = local_sum_exp * torch.exp(local_max - logits_max)
        shifted_target = torch.where(owned, target_logit - logits_max, 0.0)
        target_and_sum_exp = torch.stack((shifted_target, rescaled_sum_exp))  # [2, t]
        all_reduce(target_and_sum_exp, dist.ReduceOp.SUM, tp_group)
        shifted_target, sum_exp = (x.view(b, s) for x in target_and_sum_exp.unbind(0))
        logits_max = logits_max.view(b, s)

        log_sum_exp = torch.log(sum_exp)
        out, td_active = _per_token_terms(
            logits_max + log_sum_exp, logits_max + shifted_target, log_sum_exp - shifted_target,
            loss_mask, terminal, lam, gamma,
        )
        ctx.save_for_backward(hidden, weight, owned, local_label, out.value, out.delta,
                              loss_mask, terminal, td_active)
        ctx.lam, ctx.gamma, ctx.stop_value_grad = lam, gamma, stop_value_grad
        ctx.chunk_size, ctx.tp_group = chunk_size, tp_group
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_delta, grad_value):
        (hidden, weight, owned, local_label, value, delta,
         loss_mask, terminal, td_active) = ctx.saved_tensors
        upstream = _upstream_grads((grad_loss, grad_nll, grad_delta, grad_value), delta)
        coef_value, coef_target = _per_token_grad_coefficients(
            upstream, delta, loss_mask, terminal, td_active,
            ctx.lam, ctx.gamma, ctx.stop_value_grad,
        )
        b, s, h = hidden.shape
        flat_hidden = hidden.reshape(b * s, h)
        coef_value = coef_value.reshape(-1, 1)  # [t, 1]
        coef_target = (coef_target.reshape(-1) * owned).unsqueeze(-1)  # [t, 1]
        value = value.reshape(-1, 1)  # [t, 1]
        want_hidden, want_weight = ctx.needs_input_grad[:2]

        grad_hidden = torch.empty_like(flat_hidden) if want_hidden else None  # [t, h]
        # fp32 accumulator over chunks whatever the weight's dtype; [v/tp, h].
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        buffer = hidden.new_empty(min(ctx.chunk_size, b * s), weight.size(0),
                                  dtype=torch.float32)
        for rows in _chunks(b * s, ctx.chunk_size):
            hidden_rows = flat_hidden[rows]
            logits = _chunk_logits(hidden_rows, weight, buffer)  # [c, v/tp]
            # In place: logits -> softmax exp(z - V) -> the chunk's gradient w.r.t. logits.
            grad_logits = logits.sub_(value[rows]).exp_().mul_(coef_value[rows])
            grad_logits.scatter_add_(-1, local_label[rows], coef_target[rows])
            if want_hidden:
                torch.mm(grad_logits.to(hidden.dtype), weight, out=grad_hidden[rows])
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), hidden_rows.float())
        del buffer

        if want_hidden:
            all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.tp_group)  # contiguous [t, h]
            grad_hidden = grad_hidden.view(b, s, h)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def fused_output_soft_q_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal: torch.Tensor,
    *,
    lam: float,
    gamma: float,
    chunk_size: int = 256,
    tp_group: Optional[dist.ProcessGroup] = None,
    stop_value_grad: bool = False,
    check_labels: bool = False,
) -> SoftQLossOutput:
    """Soft-Q loss of ``hidden @ weight.T`` without materialising the ``[b*s, v/tp]`` logits.

    Args:
        hidden: ``[b, s, h]`` final hidden states (batch-major, the layout of the labels; a
            Megatron ``[s, b, h]`` tensor is passed as ``hidden.transpose(0, 1)``), the whole
            sequence, the same on every TP rank. fp32, bf16 or fp16.
        weight: ``[v/tp, h]`` this rank's vocabulary shard of the output weight
            (ColumnParallelLinear's layout; the tied embedding weight has it too), rows
            ``[r * v/tp, (r + 1) * v/tp)`` on rank r; same dtype as ``hidden``.
        labels, loss_mask, terminal, lam, gamma, stop_value_grad, check_labels: as in
            ``vocab_parallel_soft_q_loss``.
        chunk_size: tokens per chunk (any size >= 1); the working buffer is
            ``[chunk_size, v/tp]`` fp32, e.g. 128 MiB for 256 tokens at v/tp = 128k.
        tp_group: tensor-parallel group; defaults to Megatron's when initialised, else one rank.

    Returns:
        ``SoftQLossOutput(loss, nll, delta, value)``, each ``[b, s]`` fp32, equal (to fp32
        rounding) to the unfused loss of ``hidden @ weight.T``.

    Gradients: ``hidden`` gets the full gradient, summed over the TP group (one all-reduce, see
    the module doc for every collective); ``weight`` gets this shard's gradient. The maths runs
    in fp32; with bf16/fp16 inputs the logits are rounded to that dtype first (as the unfused
    matmul gives them), the weight gradient is accumulated in fp32 and the hidden gradient is
    computed in the input dtype. Mutates nothing; backward may run only once.
    """
    if tp_group is None:
        tp_group = default_tp_group()
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [b, s, h], got shape {tuple(hidden.shape)}")
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
    _check_per_token_inputs(
        f"hidden {tuple(hidden.shape)}", hidden.shape[:2], hidden.device,
        labels, loss_mask, terminal, lam, gamma,
        vocab_size=weight.size(0) * tp_size if check_labels else None,
    )
    return SoftQLossOutput(*_FusedOutputSoftQLoss.apply(
        hidden, weight, labels, loss_mask, terminal, float(lam), float(gamma), stop_value_grad,
        chunk_size, tp_group,
    ))
