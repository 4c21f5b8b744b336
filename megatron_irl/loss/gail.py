"""GAIL baseline losses (docs/method.md, section 4): discriminator, reward, returns, policy
gradient.

A discriminator ``D(s_t, a_t) = sigmoid(d_t)`` tells expert transitions (dataset responses)
from policy transitions (responses sampled from the model); ``d_t`` is its logit
(``megatron_irl.training.discriminator.TokenDiscriminator``). The policy is trained by REINFORCE
on the sampled responses with the discriminator's per-token reward, plus MLE on the dataset
and an entropy bonus (and optionally a KL penalty towards a reference model) for stability.

Reward: ``r_t = log D - log(1 - D) = d_t``. At the optimal discriminator this is
``log p_expert(s, a) - log p_policy(s, a)``, so the return is an estimate of
``-KL(policy || expert)`` and carries no sign bias: ``-log(1 - D) > 0`` (original GAIL) pays
the policy for every extra token and favours long responses, ``log D < 0`` favours short ones.

Batch layout as ``online_soft_q_loss``: one forward over expert and policy sequences, logits
``[b, s, v/tp]``, every other tensor ``[b, s]``; ``loss_mask`` marks expert tokens, ``policy_mask``
sampled response tokens. Expectations are per-token means over each population:
``L = sum(expert_loss) / N_E + sum(policy_loss) / N_P`` (N_E, N_P: expert and policy tokens of the
global batch; with Megatron's per-token contract return ``sum(expert_loss) + (N_E / N_P) *
sum(policy_loss)`` with the local expert token count).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_irl.loss.entropy import vocab_parallel_entropy
from megatron_irl.loss.soft_q import vocab_parallel_soft_q_loss


class DiscriminatorLossOutput(NamedTuple):
    """Per-token binary cross entropy, each ``[b, s]`` fp32, 0 off its population."""

    expert_loss: torch.Tensor  # -log D(s_t, a_t) on expert tokens (label 1)
    policy_loss: torch.Tensor  # -log(1 - D(s_t, a_t)) on policy tokens (label 0)


class GailPolicyLossOutput(NamedTuple):
    """Per-token results, each ``[b, s]`` fp32, 0 where not defined."""

    expert_loss: torch.Tensor  # mle_weight * (-log pi) on expert tokens
    policy_loss: torch.Tensor  # advantage * (-log pi) - entropy_weight * entropy on policy tokens
    log_prob: torch.Tensor  # log pi(a_t|s_t) on expert and policy tokens
    returns: torch.Tensor  # reward-to-go of the (KL-shaped) reward on policy tokens
    advantage: torch.Tensor  # returns - baseline on policy tokens (no gradient)
    entropy: Optional[torch.Tensor]  # H(pi(.|s_t)) at every position; None if entropy_weight = 0


def discriminator_loss(disc_logits: torch.Tensor, loss_mask: torch.Tensor,
                       policy_mask: torch.Tensor) -> DiscriminatorLossOutput:
    """Binary cross entropy of the discriminator logits ``[b, s]``: expert tokens are labelled 1,
    policy tokens 0. The loss is ``sum(expert_loss) / N_E + sum(policy_loss) / N_P``, so both
    classes weigh the same whatever their token counts. Pure; no collectives.
    """
    d = disc_logits.float()
    expert_loss = torch.where(loss_mask > 0, F.softplus(-d), 0.0)  # -log sigmoid(d)
    policy_loss = torch.where(policy_mask > 0, F.softplus(d), 0.0)  # -log(1 - sigmoid(d))
    return DiscriminatorLossOutput(expert_loss, policy_loss)


def gail_reward(disc_logits: torch.Tensor, policy_mask: torch.Tensor) -> torch.Tensor:
    """Per-token reward ``r_t = log D - log(1 - D) = d_t`` on policy tokens, 0 elsewhere;
    ``[b, s]`` fp32, detached (the policy loss must not train the discriminator)."""
    return torch.where(policy_mask > 0, disc_logits.detach().float(), 0.0)


def reward_to_go(rewards: torch.Tensor, policy_mask: torch.Tensor, terminal: torch.Tensor,
                 gamma: float) -> torch.Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` within each run of consecutive policy tokens; ``[b, s]``.

    A run (one sampled response) ends at a terminal transition or where the next position is
    not a policy token (padding, another sequence, the row's end), so responses packed in one
    row never share returns. 0 off the policy tokens. A loop over s of ``[b]`` operations.
    """
    policy = policy_mask > 0
    continues = torch.zeros_like(policy)
    continues[:, :-1] = policy[:, 1:]
    continues &= ~terminal
    discount = gamma * continues.float()  # [b, s]
    rewards = torch.where(policy, rewards.float(), 0.0)
    running = torch.zeros_like(rewards[:, 0])  # [b]
    columns = []
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + discount[:, t] * running
        columns.append(running)
    returns = torch.stack(columns[::-1], dim=1)
    return torch.where(policy, returns, 0.0)


def _check_policy_inputs(logits, policy_mask, rewards, gamma, kl_weight, ref_log_prob):
    for name, tensor in (("policy_mask", policy_mask), ("rewards", rewards),
                         ("ref_log_prob", ref_log_prob)):
        if tensor is not None and tuple(tensor.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"{name} must be [b, s] = {tuple(logits.shape[:2])} to match "
                             f"logits {tuple(logits.shape)}, got {tuple(tensor.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if kl_weight > 0 and ref_log_prob is None:
        raise ValueError("kl_weight > 0 needs ref_log_prob, the reference model's log-probs")


def gail_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    policy_mask: torch.Tensor,
    terminal: torch.Tensor,
    rewards: torch.Tensor,
    *,
    gamma: float = 1.0,
    mle_weight: float = 1.0,
    entropy_weight: float = 0.0,
    kl_weight: float = 0.0,
    ref_log_prob: Optional[torch.Tensor] = None,
    mean_baseline: bool = True,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> GailPolicyLossOutput:
    """REINFORCE on policy tokens plus MLE on expert tokens, over vocab-parallel logits.

        shaped_t    = r_t - kl_weight * (log pi(a_t|s_t) - ref_log_prob_t)      (no gradient)
        advantage_t = G_t - b,  G = reward_to_go(shaped, gamma),  b = mean of G over the
                      micro-batch's policy tokens (``mean_baseline``) or 0
        policy_loss_t = advantage_t * (-log pi(a_t|s_t)) - entropy_weight * H(pi(.|s_t))
        expert_loss_t = mle_weight * (-log pi(a_t|s_t))

    so ``d policy_loss_t / d z_t = advantage_t * (softmax(z_t) - onehot(a_t)) - entropy_weight *
    dH_t/dz_t``. The KL penalty sits in the reward, as a REINFORCE estimate of the gradient of
    ``-kl_weight * KL(pi || ref)`` over sampled responses needs it there.

    Args:
        logits: ``[b, s, v/tp]`` this rank's vocabulary shard.
        labels: ``[b, s]`` dataset targets at expert tokens, sampled tokens at policy tokens.
        loss_mask, policy_mask: ``[b, s]`` float, 1 = expert / policy token (disjoint).
        terminal: ``[b, s]`` bool, the transition at t ends its sequence.
        rewards: ``[b, s]`` per-token rewards (``gail_reward``); read on policy tokens.
        gamma: discount of the reward-to-go in [0, 1].
        mle_weight, entropy_weight, kl_weight: weights of the three stabilising terms.
        ref_log_prob: ``[b, s]`` reference model's ``log pi_ref(a_t|s_t)``; needed iff
            ``kl_weight > 0``.
        mean_baseline: subtract the mean return of the policy tokens.
        tp_group: tensor-parallel group; defaults to Megatron's when initialised.
        vocab_size: the real vocabulary (padded ids above it get no probability), as in
            ``vocab_parallel_soft_q_loss``.

    Collectives over ``tp_group`` in forward: those of ``vocab_parallel_entropy`` (when
    ``entropy_weight > 0``) and of ``vocab_parallel_soft_q_loss`` (lam = 0: cross entropy).

    Memory: ``entropy_weight > 0`` holds one more fp32 ``[b, s, v/tp]`` buffer (the entropy's
    softmax) until backward; otherwise only the cross entropy's.

    Mutation: fp32 ``logits`` are overwritten with the softmax in forward and with their
    gradient in backward (``vocab_parallel_soft_q_loss``); the entropy reads them first.
    """
    _check_policy_inputs(logits, policy_mask, rewards, gamma, kl_weight, ref_log_prob)
    expert, policy = loss_mask > 0, policy_mask > 0
    # Before the cross entropy, which overwrites fp32 logits in place.
    entropy = (vocab_parallel_entropy(logits, tp_group, vocab_size) if entropy_weight > 0
               else None)  # [b, s]
    out = vocab_parallel_soft_q_loss(
        logits, labels, loss_mask + policy_mask, terminal, lam=0.0, gamma=1.0, tp_group=tp_group,
        vocab_size=vocab_size,
    )
    nll = out.nll  # -log pi on expert and policy tokens
    log_prob = -nll.detach()
    with torch.no_grad():
        shaped = rewards.float()
        if kl_weight > 0:
            shaped = shaped - kl_weight * (log_prob - ref_log_prob.float())
        returns = reward_to_go(shaped, policy_mask, terminal, gamma)
        # returns is 0 off the policy tokens; no device sync for the count.
        baseline = returns.sum() / policy.sum().clamp(min=1) if mean_baseline else 0.0
        advantage = torch.where(policy, returns - baseline, 0.0)
    policy_term = advantage * nll
    if entropy is not None:
        policy_term = policy_term - entropy_weight * entropy
    policy_loss = torch.where(policy, policy_term, 0.0)
    expert_loss = mle_weight * torch.where(expert, nll, 0.0)
    return GailPolicyLossOutput(
        expert_loss, policy_loss, torch.where(expert | policy, log_prob, 0.0),
        returns, advantage, entropy,
    )
