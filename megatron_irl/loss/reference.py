"""Plain-PyTorch losses over the full vocabulary, differentiated by autograd.

The readable definitions that the vocab-parallel losses must match: for tests, and for readers
who want the maths without the collectives and in-place buffers. They allocate several
``[b, s, v]`` tensors, so they are not for training.
"""

from __future__ import annotations

import torch

from megatron_irl.loss.gail import GailPolicyLossOutput
from megatron_irl.loss.online import OnlineSoftQLossOutput
from megatron_irl.loss.soft_q import SoftQLossOutput, default_next_position


def _next_value_and_known(value, terminal, next_position):
    """``V(s_{n_t})`` (0 past the row) and whether t's next state is known, ``[b, s]`` each,
    written out with a Python loop over positions (no gather, no scatter)."""
    b, s = value.shape
    if next_position is None:
        next_position = default_next_position(value)
    columns = []
    for t in range(s):
        n = next_position[:, t]
        picked = value[torch.arange(b), n.clamp(max=s - 1)]
        columns.append(torch.where(n < s, picked, torch.zeros_like(picked)))
    return torch.stack(columns, dim=1), terminal | (next_position < s)


def soft_q_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal: torch.Tensor,
    *,
    lam: float,
    gamma: float,
    next_position: torch.Tensor | None = None,
    stop_value_grad: bool = False,
) -> SoftQLossOutput:
    """Same contract as ``vocab_parallel_soft_q_loss`` with the whole vocabulary ``[b, s, v]``.

    Computes in the dtype of ``logits`` (pass float64 for a tight reference).
    """
    v = logits.size(-1)
    trained = loss_mask > 0
    value = torch.logsumexp(logits, dim=-1)  # V(s_t)             [b, s]
    safe_labels = torch.where(trained, labels, 0).clamp(0, v - 1)
    target_logit = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # z_t[a_t]

    next_value, next_state_known = _next_value_and_known(value, terminal, next_position)
    if stop_value_grad:
        next_value = next_value.detach()
    td_active = trained & next_state_known

    delta = target_logit - gamma * (~terminal).to(logits.dtype) * next_value
    delta = torch.where(td_active, delta, torch.zeros_like(delta))
    nll = torch.where(trained, value - target_logit, torch.zeros_like(value))
    mask = loss_mask.to(logits.dtype)
    loss = mask * (nll + lam * delta.square())
    return SoftQLossOutput(loss, nll, delta, value)


def online_soft_q_loss_reference(
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
    next_position: torch.Tensor | None = None,
    stop_value_grad: bool = False,
) -> OnlineSoftQLossOutput:
    """Same contract as ``online_soft_q_loss`` with the whole vocabulary ``[b, s, v]``, written
    as docs/method.md section 3 states it: ``-(Q - gamma V') + (1 - alpha_mix)(V - gamma V')``
    per expert token (which reduces to ``V - Q`` where the next state is unknown),
    ``alpha_mix (V - gamma V')`` per policy token, and the TD-squared term over the chosen
    transitions.
    """
    v = logits.size(-1)
    expert, policy = loss_mask > 0, policy_mask > 0
    td_tokens = expert | policy if td_over == "mixture" else expert
    value = torch.logsumexp(logits, dim=-1)  # V(s_t)  [b, s]
    safe_labels = torch.where(td_tokens, labels, 0).clamp(0, v - 1)
    q = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # Q(s_t, a_t)
    next_value, next_state_known = _next_value_and_known(value, terminal, next_position)
    known = (expert | policy) & next_state_known
    discount = gamma * (~terminal).to(logits.dtype)
    td_target_gap = q - discount * next_value  # Q - gamma V'
    value_diff = value - discount * next_value  # V - gamma V'
    td_next_value = next_value.detach() if stop_value_grad else next_value
    delta = torch.where(td_tokens & known, q - discount * td_next_value, 0.0)

    pair = torch.where(known, -td_target_gap + (1 - alpha_mix) * value_diff, value - q)
    if td_over == "mixture":
        expert_lam, policy_lam = (1 - alpha_mix) * lam, alpha_mix * lam
    else:
        expert_lam, policy_lam = lam, 0.0
    zero = torch.zeros_like(value)
    expert_loss = torch.where(expert, pair + expert_lam * delta.square(), zero)
    policy_term = alpha_mix * value_diff + policy_lam * delta.square()
    policy_loss = torch.where(policy & known, policy_term, zero)
    nll = torch.where(expert, value - q, zero)
    return OnlineSoftQLossOutput(
        expert_loss, policy_loss, nll, delta, value, torch.where(known, value_diff, zero)
    )


def reward_to_go_reference(rewards, policy_mask, terminal, gamma: float) -> torch.Tensor:
    """``G_t = sum_k gamma^(k - t) r_k`` over k from t to the end of t's run of policy tokens
    (a terminal transition or a following non-policy position ends it), by direct summation.
    Python loops: for tiny tests only."""
    b, s = rewards.shape
    policy, done, r = (policy_mask > 0).tolist(), terminal.tolist(), rewards.tolist()
    returns = [[0.0] * s for _ in range(b)]
    for row in range(b):
        for t in range(s):
            k, discount = t, 1.0
            while policy[row][t]:
                returns[row][t] += discount * r[row][k]
                if done[row][k] or k + 1 == s or not policy[row][k + 1]:
                    break
                k, discount = k + 1, discount * gamma
    return torch.tensor(returns, dtype=rewards.dtype, device=rewards.device)


def gail_policy_loss_reference(
    logits, labels, loss_mask, policy_mask, terminal, rewards, *, gamma=1.0, mle_weight=1.0,
    entropy_weight=0.0, kl_weight=0.0, ref_log_prob=None, mean_baseline=True,
) -> GailPolicyLossOutput:
    """Same contract as ``gail_policy_loss`` with the whole vocabulary ``[b, s, v]``."""
    v = logits.size(-1)
    expert, policy = loss_mask > 0, policy_mask > 0
    log_probs = torch.log_softmax(logits, dim=-1)  # [b, s, v]
    safe_labels = torch.where(expert | policy, labels, 0).clamp(0, v - 1)
    log_prob = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # log pi(a_t|s_t)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if entropy_weight > 0 else None
    shaped = torch.where(policy, rewards.to(logits.dtype), 0.0)
    if kl_weight > 0:
        shaped = shaped - kl_weight * (log_prob.detach() - ref_log_prob.to(logits.dtype))
    returns = reward_to_go_reference(shaped, policy_mask, terminal, gamma)
    baseline = returns[policy].mean() if mean_baseline and policy.any() else 0.0
    advantage = torch.where(policy, returns - baseline, 0.0).detach()
    policy_term = -advantage * log_prob
    if entropy is not None:
        policy_term = policy_term - entropy_weight * entropy
    zero = torch.zeros_like(log_prob)
    return GailPolicyLossOutput(
        torch.where(expert, -mle_weight * log_prob, zero),
        torch.where(policy, policy_term, zero),
        torch.where(expert | policy, log_prob.detach(), zero),
        returns.detach(), advantage, entropy,
    )
