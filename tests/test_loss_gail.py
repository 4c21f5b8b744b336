"""GAIL losses: reward-to-go, discriminator cross entropy and reward, the policy-gradient loss
(hand-derived gradient on a tiny case; float64 reference on one process and at TP = 2).

Layouts: logits ``[b, s, v]``, everything else ``[b, s]``; upstream gradients ``[5, b, s]``
for the per-token outputs (expert_loss, policy_loss, log_prob, returns, advantage) plus one
``[b, s]`` for the entropy.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_irl.loss.gail import (
    GailPolicyLossOutput,
    discriminator_loss,
    gail_policy_loss,
    gail_reward,
    reward_to_go,
)
from megatron_irl.loss.reference import gail_policy_loss_reference, reward_to_go_reference
from megatron_irl.testing import run_distributed
from helpers import FP32_RTOL, GRAD_RTOL, assert_close_scaled, make_online_batch

VOCAB = 12


# ------------------------------------------------------------------ reward-to-go


def test_reward_to_go_restarts_after_terminal_and_at_end_of_row():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    policy = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    terminal = torch.tensor([[False, False, True, False, False, False]])
    returns = reward_to_go(rewards, policy, terminal, gamma=0.5)
    # Run [1, 2] ends at the terminal; run [3, 5] at the row's end (truncated).
    expected = torch.tensor([[0.0, 1 + 0.5 * 2, 2.0, 3 + 0.5 * 4 + 0.25 * 5, 4 + 0.5 * 5, 5.0]])
    assert torch.equal(returns, expected)


def test_reward_to_go_stops_at_a_non_policy_position():
    rewards = torch.tensor([[1.0, 2.0, 7.0, 3.0]])
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    returns = reward_to_go(rewards, policy, torch.zeros(1, 4, dtype=torch.bool), gamma=1.0)
    assert torch.equal(returns, torch.tensor([[3.0, 2.0, 0.0, 3.0]]))


def test_reward_to_go_matches_direct_summation():
    for seed in range(10):
        batch = make_online_batch(3, 8, 5, seed=seed, p_trained=0.8, p_terminal=0.3)
        rewards = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed)).double()
        returns = reward_to_go(rewards, batch.policy_mask, batch.terminal, gamma=0.9)
        expected = reward_to_go_reference(rewards, batch.policy_mask, batch.terminal, gamma=0.9)
        torch.testing.assert_close(returns.double(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ discriminator loss, reward


def test_discriminator_loss_is_binary_cross_entropy_expert_one_policy_zero():
    batch = make_online_batch(2, 6, 5, seed=1)
    d = torch.randn(2, 6, generator=torch.Generator().manual_seed(1)) * 3
    out = discriminator_loss(d, batch.loss_mask, batch.policy_mask)
    expert, policy = batch.loss_mask > 0, batch.policy_mask > 0
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(out.expert_loss[expert], bce(d[expert], torch.ones_like(d[expert]),
                                                            reduction="none"))
    torch.testing.assert_close(out.policy_loss[policy], bce(d[policy], torch.zeros_like(d[policy]),
                                                            reduction="none"))
    assert (out.expert_loss[~expert] == 0).all() and (out.policy_loss[~policy] == 0).all()


def test_gail_reward_is_the_detached_discriminator_logit_on_policy_tokens():
    batch = make_online_batch(2, 6, 5, seed=2)
    d = torch.randn(2, 6, requires_grad=True)
    reward = gail_reward(d, batch.policy_mask)
    policy = batch.policy_mask > 0
    assert not reward.requires_grad
    assert torch.equal(reward, torch.where(policy, d.detach(), 0.0))


# ------------------------------------------------------------------ policy loss


def test_policy_gradient_equals_hand_derived_gradient_on_tiny_case():
    # One row: position 0 expert, positions 1..3 one sampled response, rewards 1, -2, 4.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 3, generator=gen)
    labels = torch.tensor([[2, 0, 1, 2]])
    loss_mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    policy_mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 1.0, -2.0, 4.0]])
    terminal = torch.tensor([[False, False, False, True]])
    # gamma 0.5: returns 1 + 0.5 * 0 = 1, -2 + 0.5 * 4 = 0, 4; mean 5/3.
    advantage = torch.tensor([0.0, 1 - 5 / 3, 0 - 5 / 3, 4 - 5 / 3])
    mle_weight = 0.5

    x = logits.clone().requires_grad_()
    out = gail_policy_loss(x, labels, loss_mask, policy_mask, terminal, rewards, gamma=0.5,
                           mle_weight=mle_weight)
    (out.expert_loss.sum() / 1 + out.policy_loss.sum() / 3).backward()

    weight = torch.tensor([mle_weight, *advantage[1:] / 3])  # d loss / d (-log pi) per position
    expected = weight[:, None] * (torch.softmax(logits[0], -1) - F.one_hot(labels[0], 3))
    torch.testing.assert_close(out.advantage[0], advantage)
    torch.testing.assert_close(x.grad[0], expected, rtol=1e-6, atol=1e-6)


def _policy_inputs(seed, v=VOCAB):
    batch = make_online_batch(2, 7, v, seed=seed, p_trained=0.9, p_terminal=0.2)
    gen = torch.Generator().manual_seed(seed + 7)
    rewards = torch.randn(2, 7, generator=gen)
    ref_log_prob = -torch.rand(2, 7, generator=gen) * 3
    upstream = torch.randn(6, 2, 7, generator=gen)
    return batch, rewards, ref_log_prob, upstream


OPTIONS = [
    dict(gamma=1.0, mle_weight=1.0),
    dict(gamma=0.9, mle_weight=0.3, entropy_weight=0.1, kl_weight=0.05, mean_baseline=False),
    dict(gamma=0.5, mle_weight=0.0, entropy_weight=0.5, kl_weight=0.2),
]


def _weighted(out, upstream):
    return sum((f * g.to(f.dtype)).sum() for f, g in zip(out, upstream) if f is not None)


def run_policy_loss(logits, inputs, options, tp_group=None):
    """The fused loss on a clone of ``logits`` (maybe a shard); (outputs, gradient)."""
    batch, rewards, ref_log_prob, upstream = inputs
    x = logits.clone().requires_grad_()
    out = gail_policy_loss(x, batch.labels, batch.loss_mask, batch.policy_mask, batch.terminal,
                           rewards, ref_log_prob=ref_log_prob, tp_group=tp_group, **options)
    _weighted(out, upstream).backward()
    return GailPolicyLossOutput(*(None if f is None else f.detach() for f in out)), x.grad


def run_policy_reference(logits, inputs, options):
    batch, rewards, ref_log_prob, upstream = inputs
    x = logits.double().requires_grad_()
    out = gail_policy_loss_reference(
        x, batch.labels, batch.loss_mask.double(), batch.policy_mask.double(), batch.terminal,
        rewards.double(), ref_log_prob=ref_log_prob.double(), **options)
    _weighted(out, upstream.double()).backward()
    return GailPolicyLossOutput(*(None if f is None else f.detach() for f in out)), x.grad


def assert_policy_outputs_close(out, grad, ref_out, ref_grad, dtype, what=""):
    for name, a, e in zip(GailPolicyLossOutput._fields, out, ref_out):
        assert (a is None) == (e is None), f"{what} {name}"
        if a is not None:
            assert_close_scaled(a, e, FP32_RTOL, f"{what} {name}", scale=1.0)
    assert_close_scaled(grad, ref_grad, GRAD_RTOL[dtype], f"{what} grad")


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_and_gradient_match_reference(dtype, options):
    inputs = _policy_inputs(seed=4)
    logits = inputs[0].logits.to(dtype)
    out, grad = run_policy_loss(logits, inputs, options)
    ref_out, ref_grad = run_policy_reference(logits, inputs, options)
    assert_policy_outputs_close(out, grad, ref_out, ref_grad, dtype)


def test_kl_weight_without_reference_log_probs_is_rejected():
    batch, rewards, _, _ = _policy_inputs(seed=5)
    with pytest.raises(ValueError, match="kl_weight > 0 needs ref_log_prob"):
        gail_policy_loss(batch.logits, batch.labels, batch.loss_mask, batch.policy_mask,
                         batch.terminal, rewards, kl_weight=0.1)


# ------------------------------------------------------------------ tensor parallelism


def _run_policy_cases_on_shard(cases):
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    results = []
    for inputs, options in cases:
        local = inputs[0].logits.size(-1) // tp
        shard = inputs[0].logits[..., rank * local:(rank + 1) * local].contiguous()
        results.append(run_policy_loss(shard, inputs, options))
    return results


def test_policy_loss_on_vocab_parallel_logits_matches_reference_at_tp2():
    cases = [(_policy_inputs(seed=10 + i), options) for i, options in enumerate(OPTIONS)]
    per_rank = run_distributed(_run_policy_cases_on_shard, 2, tp=2, args=(cases,))
    for i, (inputs, options) in enumerate(cases):
        ref_out, ref_grad = run_policy_reference(inputs[0].logits, inputs, options)
        grad = torch.cat([per_rank[r][i][1] for r in range(2)], dim=-1)
        assert_policy_outputs_close(per_rank[0][i][0], grad, ref_out, ref_grad, torch.float32,
                                    f"case {i}")
