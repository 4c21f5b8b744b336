"""online_soft_q_loss: alpha_mix = 0 is the offline loss bit for bit; otherwise it matches
``online_soft_q_loss_reference`` (float64, docs/method.md's pair form) on one process and at TP = 2.

Batches mix expert and policy tokens: each trained position of ``make_batch`` is assigned to
one population at random, so rows hold both and every masking case occurs. Layouts: logits
``[b, s, v]``, everything else ``[b, s]``; upstream gradients ``[6, b, s]``, one per output.
"""


import pytest
import torch

from megatron_irl.config import IRLConfig
from megatron_irl.config_online import OnlineConfig
from megatron_irl.loss.online import OnlineSoftQLossOutput, online_soft_q_loss
from megatron_irl.loss.reference import online_soft_q_loss_reference
from megatron_irl.loss.soft_q import vocab_parallel_soft_q_loss
from megatron_irl.testing import run_distributed
from helpers import (
    FP32_RTOL,
    GRAD_RTOL,
    IGNORE,
    OnlineBatch,
    assert_close_scaled,
    make_online_batch,
    weighted_sum,
)

VOCAB = 12  # divisible by the TP size 2


def run_online(logits, batch, tp_group=None, **options):
    """The loss on a clone of ``logits`` (any dtype, maybe a shard); (outputs, gradient)."""
    logits = logits.clone().requires_grad_()
    out = online_soft_q_loss(logits, batch.labels, batch.loss_mask, batch.policy_mask,
                             batch.terminal, tp_group=tp_group, **options)
    weighted_sum(out, batch.upstream).backward()
    return OnlineSoftQLossOutput(*(f.detach() for f in out)), logits.grad.clone()


def run_reference(logits, batch, **options):
    logits = logits.double().requires_grad_()
    out = online_soft_q_loss_reference(
        logits, batch.labels, batch.loss_mask.double(), batch.policy_mask.double(),
        batch.terminal, **options,
    )
    weighted_sum(out, batch.upstream.double()).backward()
    return OnlineSoftQLossOutput(*(f.detach() for f in out)), logits.grad


def assert_matches_reference(out, grad, ref_out, ref_grad, dtype, what=""):
    value_scale = ref_out.value.abs().max().item()
    for name, a, e in zip(OnlineSoftQLossOutput._fields, out, ref_out):
        assert a.dtype == torch.float32, f"{what} {name} is {a.dtype}"
        assert_close_scaled(a, e, FP32_RTOL, f"{what} {name}", scale=value_scale)
    assert grad.dtype == dtype
    assert_close_scaled(grad, ref_grad, GRAD_RTOL[dtype], f"{what} grad")


def _offline_on_expert_tokens(logits, batch, *, lam, gamma, stop_value_grad=False):
    """The offline loss of the same forward: policy tokens untrained. (outputs, gradient) after
    backward with the online upstream of the matching fields."""
    logits = logits.clone().requires_grad_()
    out = vocab_parallel_soft_q_loss(logits, batch.labels, batch.loss_mask, batch.terminal,
                                     lam=lam, gamma=gamma, stop_value_grad=stop_value_grad)
    loss_nll_value = batch.upstream[[0, 2, 4]]
    weighted_sum((out.loss, out.nll, out.value), loss_nll_value).backward()
    return out, logits.grad.clone()


# Cases: (td_over, lam, gamma, alpha_mix, stop_value_grad)
CASES = [
    ("expert", 0.5, 1.0, 0.1, False),
    ("expert", 1.0, 0.9, 0.5, True),
    ("mixture", 0.5, 1.0, 0.1, False),
    ("mixture", 2.0, 0.99, 1.0, False),
    ("mixture", 1.0, 0.5, 0.3, True),
    ("expert", 0.0, 1.0, 0.2, False),
]


def _options(case):
    td_over, lam, gamma, alpha_mix, stop = case
    return dict(td_over=td_over, lam=lam, gamma=gamma, alpha_mix=alpha_mix, stop_value_grad=stop)


# ------------------------------------------------------------------ alpha_mix = 0 is offline


def _zero_alpha_upstream(batch):
    """Upstream only on expert_loss, nll and value (the fields the offline loss also has);
    the policy_loss upstream stays on to show that its zero contribution is exact."""
    keep = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    return batch._replace(upstream=batch.upstream * keep[:, None, None])


@pytest.mark.parametrize("stop_value_grad", [False, True])
@pytest.mark.parametrize("td_over", ["expert", "mixture"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_alpha_zero_outputs_and_gradient_equal_offline_bitwise(dtype, td_over, stop_value_grad):
    batch = _zero_alpha_upstream(make_online_batch(3, 9, 13, seed=11))
    logits = batch.logits.to(dtype)
    out, grad = run_online(logits, batch, lam=0.7, gamma=0.9, alpha_mix=0.0, td_over=td_over,
                           stop_value_grad=stop_value_grad)
    offline, offline_grad = _offline_on_expert_tokens(logits, batch, lam=0.7, gamma=0.9,
                                                      stop_value_grad=stop_value_grad)
    assert torch.equal(out.expert_loss, offline.loss)
    assert torch.equal(out.nll, offline.nll)
    assert torch.equal(out.value, offline.value)
    assert torch.equal(out.policy_loss, torch.zeros_like(out.policy_loss))
    assert torch.equal(grad, offline_grad)


def test_alpha_zero_mean_loss_and_gradient_equal_offline_token_mean_bitwise():
    batch = make_online_batch(2, 8, 11, seed=12)
    n_expert, n_policy = batch.loss_mask.sum(), batch.policy_mask.sum()
    online_logits = batch.logits.clone().requires_grad_()
    out = online_soft_q_loss(online_logits, batch.labels, batch.loss_mask, batch.policy_mask,
                             batch.terminal, lam=1.0, gamma=1.0, alpha_mix=0.0)
    online_loss = out.expert_loss.sum() / n_expert + out.policy_loss.sum() / n_policy
    online_loss.backward()
    offline_logits = batch.logits.clone().requires_grad_()
    offline = vocab_parallel_soft_q_loss(offline_logits, batch.labels, batch.loss_mask,
                                         batch.terminal, lam=1.0, gamma=1.0)
    offline_loss = offline.loss.sum() / n_expert
    offline_loss.backward()
    assert torch.equal(online_loss.detach(), offline_loss.detach())
    assert torch.equal(online_logits.grad, offline_logits.grad)


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_and_gradient_match_reference(dtype, case):
    batch = make_online_batch(3, 9, 13, seed=13)
    logits = batch.logits.to(dtype)
    out, grad = run_online(logits, batch, **_options(case))
    ref_out, ref_grad = run_reference(logits, batch, **_options(case))
    assert_matches_reference(out, grad, ref_out, ref_grad, dtype)


def test_random_masks_and_terminals_match_reference():
    for seed in range(20):
        batch = make_online_batch(2, 6, 7, seed=100 + seed, p_trained=0.8, p_terminal=0.3)
        case = CASES[seed % len(CASES)]
        out, grad = run_online(batch.logits, batch, **_options(case))
        ref_out, ref_grad = run_reference(batch.logits, batch, **_options(case))
        assert_matches_reference(out, grad, ref_out, ref_grad, torch.float32, f"seed {seed}")


# ------------------------------------------------------------------ policy tokens


def _policy_row(terminal_last: bool) -> OnlineBatch:
    """One row of prompt (2 positions) then 4 policy tokens; no expert tokens."""
    base = make_online_batch(1, 6, 7, seed=14, p_trained=1.0)
    policy = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    terminal = torch.zeros(1, 6, dtype=torch.bool)
    terminal[0, -1] = terminal_last
    return base._replace(loss_mask=torch.zeros(1, 6), policy_mask=policy, terminal=terminal)


def test_truncated_policy_response_has_no_term_at_its_last_position():
    batch = _policy_row(terminal_last=False)
    out, _ = run_online(batch.logits, batch, lam=1.0, gamma=1.0, alpha_mix=0.5)
    assert out.value_diff[0, -1] == 0.0 and out.policy_loss[0, -1] == 0.0
    assert (out.value_diff[0, 2:-1] != 0).all()


def test_terminal_policy_token_value_difference_is_its_value():
    batch = _policy_row(terminal_last=True)
    out, _ = run_online(batch.logits, batch, lam=1.0, gamma=0.9, alpha_mix=0.5,
                        td_over="expert")
    assert out.value_diff[0, -1] == out.value[0, -1]
    assert out.policy_loss[0, -1] == 0.5 * out.value[0, -1]


def test_policy_labels_are_ignored_when_td_is_over_expert_tokens():
    batch = make_online_batch(2, 7, 11, seed=15)
    results = []
    for fill in (IGNORE, 0, 10**12):
        labels = torch.where(batch.policy_mask > 0, fill, batch.labels)
        results.append(run_online(batch.logits, batch._replace(labels=labels), lam=1.0,
                                  gamma=0.9, alpha_mix=0.3, td_over="expert"))
    (out0, grad0), rest = results[0], results[1:]
    for out, grad in rest:
        assert all(torch.equal(a, b) for a, b in zip(out, out0))
        assert torch.equal(grad, grad0)


def _default_options() -> dict:
    """The loss options of ``--irl-loss online`` with every other flag at its default."""
    irl, online = IRLConfig(loss="online"), OnlineConfig()
    return dict(lam=irl.irl_lambda, gamma=irl.irl_gamma, alpha_mix=online.alpha_mix,
                td_over=online.td_over)


def test_default_flags_train_every_sampled_token_as_the_reference():
    # One expert row, one finished sampled response: at gamma 1 with the value term over the
    # policy states only, it would telescope to V(s_0) and leave tokens 2.. without gradient.
    base = make_online_batch(2, 6, 7, seed=20, p_trained=1.0)
    batch = base._replace(
        loss_mask=torch.tensor([[0.0, 1, 1, 1, 1, 1], [0] * 6]),
        policy_mask=torch.tensor([[0.0] * 6, [0, 0, 1, 1, 1, 1]]),
        terminal=torch.tensor([[False] * 5 + [True], [False] * 5 + [True]]),
        upstream=torch.zeros(6, 2, 6))
    # The step's loss: sum(expert_loss) / N_E + sum(policy_loss) / N_P.
    batch.upstream[0] = batch.loss_mask / batch.loss_mask.sum()
    batch.upstream[1] = batch.policy_mask / batch.policy_mask.sum()
    out, grad = run_online(batch.logits, batch, **_default_options())
    ref_out, ref_grad = run_reference(batch.logits, batch, **_default_options())
    assert_matches_reference(out, grad, ref_out, ref_grad, torch.float32)
    later_policy_tokens = grad[1, 3:]  # [4, v]: the sampled tokens after the first
    assert (later_policy_tokens.abs().sum(-1) > 1e-3).all()


# ------------------------------------------------------------------ bad input


def _call(batch, **options):
    options = {"lam": 1.0, "gamma": 1.0, "alpha_mix": 0.1, **options}
    return online_soft_q_loss(batch.logits.clone(), batch.labels, batch.loss_mask,
                              batch.policy_mask, batch.terminal, **options)


def test_overlapping_masks_are_rejected_with_check_inputs():
    batch = make_online_batch(2, 5, 7, seed=16)
    overlap = batch._replace(policy_mask=(batch.policy_mask + batch.loss_mask).clamp(max=1))
    with pytest.raises(ValueError, match="both expert \\(loss_mask\\) and policy"):
        _call(overlap, check_inputs=True)


@pytest.mark.parametrize("alpha_mix", [-0.1, 1.5])
def test_alpha_mix_outside_unit_interval_is_rejected(alpha_mix):
    with pytest.raises(ValueError, match="alpha_mix must be in \\[0, 1\\]"):
        _call(make_online_batch(1, 4, 5, seed=17), alpha_mix=alpha_mix)


def test_unknown_td_over_is_rejected():
    with pytest.raises(ValueError, match="td_over must be one of"):
        _call(make_online_batch(1, 4, 5, seed=18), td_over="policy")


def test_policy_mask_of_wrong_shape_is_rejected():
    batch = make_online_batch(2, 4, 5, seed=19)
    with pytest.raises(ValueError, match="policy_mask must be \\[b, s\\]"):
        _call(batch._replace(policy_mask=batch.policy_mask[:, :-1]))


# ------------------------------------------------------------------ tensor parallelism


def _shard(logits, rank, tp):
    local = logits.size(-1) // tp
    return logits[..., rank * local:(rank + 1) * local].contiguous()


def _run_tp_cases(cases):
    """On each rank: the loss on this rank's shard per (batch, dtype, options), and for
    alpha_mix = 0 whether it equals the offline loss bit for bit there."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    results = []
    for batch, dtype, options in cases:
        shard = _shard(batch.logits.to(dtype), rank, tp)
        out, grad = run_online(shard, batch, **options)
        zero = _zero_alpha_upstream(batch)
        online_zero, online_zero_grad = run_online(shard, zero, **{**options, "alpha_mix": 0.0})
        offline, offline_grad = _offline_on_expert_tokens(
            shard, zero, lam=options["lam"], gamma=options["gamma"],
            stop_value_grad=options["stop_value_grad"])
        exact = (torch.equal(online_zero.expert_loss, offline.loss)
                 and torch.equal(online_zero_grad, offline_grad))
        results.append((out, grad, exact))
    return results


@pytest.fixture(scope="module", params=[1, 2], ids=lambda tp: f"tp{tp}")
def tp_run(request):
    cases = [(make_online_batch(2, 7, VOCAB, seed=200 + i), dtype, _options(case))
             for i, case in enumerate(CASES) for dtype in (torch.float32, torch.bfloat16)]
    return request.param, cases, run_distributed(_run_tp_cases, 2, tp=request.param,
                                                 args=(cases,))


def test_outputs_and_gathered_gradient_match_reference_at_tp(tp_run):
    tp, cases, per_rank = tp_run
    for i, (batch, dtype, options) in enumerate(cases):
        ref_out, ref_grad = run_reference(batch.logits.to(dtype), batch, **options)
        grad = torch.cat([per_rank[r][i][1] for r in range(tp)], dim=-1)
        assert_matches_reference(per_rank[0][i][0], grad, ref_out, ref_grad, dtype,
                                 f"case {i} {options}")


def test_alpha_zero_equals_offline_bitwise_at_tp(tp_run):
    _, cases, per_rank = tp_run
    for rank, rank_results in enumerate(per_rank):
        for i, (_, _, exact) in enumerate(rank_results):
            assert exact, f"rank {rank}, case {i} {cases[i][2]}"
