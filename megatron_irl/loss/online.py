"""Online inverse soft-Q loss: the offline loss plus the policy's own states (docs/method.md,
section 3).

    L = - E_E[Q(s,a) - gamma V(s')] + E_mix[V(s) - gamma V(s')] + lam * E_td[(Q(s,a) - gamma V(s'))^2]
    E_mix = (1 - alpha_mix) E_E + alpha_mix E_P;   E_td = E_E (``td_over="expert"``) or E_mix

over expert transitions E (dataset responses) and policy transitions P (responses sampled from
the model). Expectations are per-token means: ``E_E[f] = sum_{t in E} f_t / N_E`` and
``E_P[f] = sum_{t in P} f_t / N_P``, with N_E, N_P the numbers of expert and policy tokens
(positions with ``loss_mask > 0``, ``policy_mask > 0``) of the whole global batch.

Per-token form. With ``u_t = V(s_t) - gamma (1 - terminal_t) V(s')`` (value difference) and
``delta_t = Q(s_t, a_t) - gamma (1 - terminal_t) V(s')`` (TD residual), where ``s'`` is the
state at ``next_position[t]`` (``t + 1`` but after a chat's user turn, ``loss/soft_q.py``), the
expert pair
``-delta_t + (1 - alpha_mix) u_t`` is ``nll_t - alpha_mix * u_t``, because ``u_t - delta_t =
V(s_t) - Q(s_t, a_t) = -log pi(a_t|s_t)``: V(s') cancels. Hence

    L = sum_t expert_loss_t / N_E + sum_t policy_loss_t / N_P
    expert_loss_t = [t in E] * (nll_t + lam_E delta_t^2 - alpha_mix * u_t)     (offline loss_t - ...)
    policy_loss_t = [t in P] * alpha_mix * (u_t + lam * delta_t^2 [td_over="mixture"])
    lam_E = lam (td_over="expert") or (1 - alpha_mix) * lam (td_over="mixture")

``u_t`` and ``delta_t`` count only where the next state is known (terminal, or t + 1 in the row),
as the offline TD term: a truncated last position keeps ``nll_t`` and nothing else. With
``alpha_mix = 0`` the expert part is ``vocab_parallel_soft_q_loss(...).loss`` itself, minus
terms multiplied by 0, so outputs and gradients are bit-identical to the offline loss.

Megatron's per-token loss contract (``objective(output, batch) -> (loss_sum, num_tokens, ...)``,
the schedule dividing by the summed ``num_tokens``): return
``expert_loss.sum() + (N_E / N_P) * policy_loss.sum()`` and the local expert token count,
where N_E / N_P is the global batch's ratio, known before the step.

Layout: one model forward over a batch whose rows (or positions) are expert or policy tokens;
``logits`` ``[b, s, v/tp]``, everything else ``[b, s]``. Gradients reach the logits through
the soft-Q loss's per-token scalars (target logit, value), so this adds only ``[b, s]`` tensors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_irl.loss.soft_q import (
    _next_state_value,
    default_next_position,
    td_active_mask,
    vocab_parallel_soft_q_loss,
)

TD_OVER = ("expert", "mixture")


class OnlineSoftQLossOutput(NamedTuple):
    """Per-token results, each ``[b, s]`` fp32; 0 where not defined."""

    expert_loss: torch.Tensor  # summed and divided by N_E
    policy_loss: torch.Tensor  # summed and divided by N_P
    nll: torch.Tensor  # -log pi(a_t|s_t) on expert tokens
    delta: torch.Tensor  # TD residual where the TD term is active (expert, or expert and policy)
    value: torch.Tensor  # V(s_t) at every position
    value_diff: torch.Tensor  # u_t on expert and policy tokens whose next state is known


def value_difference(value: torch.Tensor, terminal: torch.Tensor, next_position: torch.Tensor,
                     gamma: float, active: torch.Tensor) -> torch.Tensor:
    """``u_t = V(s_t) - gamma (1 - terminal_t) V(s_{n_t})`` where ``active``, else 0; ``[b, s]``.

    Differentiable through both values (no stop-gradient: the initial-state term needs both).
    """
    u = value - gamma * (~terminal).float() * _next_state_value(value, next_position)
    return torch.where(active, u, 0.0)


def _check_online_inputs(loss_mask, policy_mask, alpha_mix, td_over, check_inputs):
    if tuple(policy_mask.shape) != tuple(loss_mask.shape):
        raise ValueError(
            f"policy_mask must be [b, s] = {tuple(loss_mask.shape)} like loss_mask, "
            f"got {tuple(policy_mask.shape)}"
        )
    if not policy_mask.dtype.is_floating_point:
        raise TypeError(f"policy_mask must be a float tensor (1 = policy token), "
                        f"got {policy_mask.dtype}")
    if not 0.0 <= alpha_mix <= 1.0:
        raise ValueError(f"alpha_mix must be in [0, 1], got {alpha_mix}")
    if td_over not in TD_OVER:
        raise ValueError(f"td_over must be one of {TD_OVER}, got {td_over!r}")
    if check_inputs:
        both = (loss_mask > 0) & (policy_mask > 0)
        if bool(both.any()):
            raise ValueError(
                f"{int(both.sum())} position(s) are both expert (loss_mask) and policy "
                f"(policy_mask) tokens, e.g. [b, s] = {tuple(both.nonzero()[0].tolist())}"
            )


def online_soft_q_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    policy_mask: torch.Tensor,
    terminal: torch.Tensor,
    *,
    lam: float,
    gamma: float,
    alpha_mix: float,
    td_over: str = "mixture",
    next_position: Optional[torch.Tensor] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    stop_value_grad: bool = False,
    check_inputs: bool = False,
    vocab_size: Optional[int] = None,
) -> OnlineSoftQLossOutput:
    """Per-token online soft-Q loss over vocab-parallel logits; see the module doc for the maths.

    Args:
        logits: ``[b, s, v/tp]`` this rank's vocabulary shard, from one forward over expert and
            policy sequences (e.g. expert rows then policy rows).
        labels: ``[b, s]`` global token ids: dataset targets at expert tokens, the sampled
            tokens at policy tokens (read only with ``td_over="mixture"``).
        loss_mask: ``[b, s]`` float, 1 = expert (dataset response) token.
        policy_mask: ``[b, s]`` float, 1 = policy token (a sampled response position); no
            position may be in both masks.
        terminal: ``[b, s]`` bool, the transition at t ends its sequence (``V(s_{t+1}) = 0``).
        lam, gamma: TD weight (>= 0) and discount in [0, 1], as the offline loss.
        alpha_mix: policy weight of the mixture in [0, 1]; 0 gives the offline loss.
        td_over: ``"expert"``: TD-squared over expert transitions; ``"mixture"``: over
            ``(1 - alpha_mix) E + alpha_mix P``.
        next_position: ``[b, s]`` int64 next-state positions, as ``vocab_parallel_soft_q_loss``
            (None: ``t + 1``).
        tp_group: tensor-parallel group; defaults to Megatron's when initialised.
        stop_value_grad: ablation; no gradient through ``V(s_{t+1})`` in the TD-squared term
            (the value difference ``u_t`` always differentiates both values).
        check_inputs: also check labels against the vocabulary and that the masks are
            disjoint (device syncs).
        vocab_size: the real vocabulary (padded ids above it get no probability), as in
            ``vocab_parallel_soft_q_loss``.

    Returns:
        ``OnlineSoftQLossOutput``; the loss is ``expert_loss.sum() / N_E +
        policy_loss.sum() / N_P`` (module doc).

    Collectives: those of ``vocab_parallel_soft_q_loss`` (one call: all-reduce MAX of
    ``[b, s]`` and SUM of ``[2, b, s]`` fp32 over ``tp_group`` in forward), nothing else.

    Mutation: as ``vocab_parallel_soft_q_loss``: fp32 ``logits`` are overwritten with the
    softmax in forward and with their gradient in backward.
    """
    _check_online_inputs(loss_mask, policy_mask, alpha_mix, td_over, check_inputs)
    if next_position is None:
        next_position = default_next_position(labels)
    expert = loss_mask > 0
    policy = policy_mask > 0
    mixture_td = td_over == "mixture"
    # TD residuals (and target logits) are needed on the tokens the TD term covers.
    td_mask = loss_mask + policy_mask if mixture_td else loss_mask
    out = vocab_parallel_soft_q_loss(
        logits, labels, td_mask, terminal, lam=lam, gamma=gamma, next_position=next_position,
        tp_group=tp_group, stop_value_grad=stop_value_grad, check_labels=check_inputs,
        vocab_size=vocab_size,
    )
    # next state known, [b, s]
    known = td_active_mask(loss_mask + policy_mask, terminal, next_position)
    u = value_difference(out.value, terminal, next_position, gamma, known)
    alpha = float(alpha_mix)

    # out.loss = td_mask * (nll + lam * delta^2): the offline loss on expert tokens.
    expert_loss = torch.where(expert, out.loss, 0.0) - alpha * torch.where(expert, u, 0.0)
    policy_loss = alpha * torch.where(policy, u, 0.0)
    if mixture_td:
        td_squared = lam * out.delta.square()  # 0 where the TD term is inactive
        expert_loss = expert_loss - alpha * torch.where(expert, td_squared, 0.0)
        policy_loss = policy_loss + alpha * torch.where(policy, td_squared, 0.0)
    nll = torch.where(expert, out.nll, 0.0)
    return OnlineSoftQLossOutput(expert_loss, policy_loss, nll, out.delta, out.value, u)
