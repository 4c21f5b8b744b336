"""vocab_parallel_soft_q_loss on one process (no tensor parallelism).

The fused loss is checked against ``soft_q_loss_reference`` run in float64 on exactly the
values the fused loss sees (fp32 inputs are drawn in fp32; bf16 inputs are rounded first and
the reference gets the rounded values), on hand-built rows for each masking case, on extreme
logits, on bad input, and for its documented in-place behaviour. ``tests/test_loss_distributed.py``
does the same at TP = 1, 2, 4; both use the batches and references of tests/helpers.py.

Layouts: logits ``[b, s, v]``, everything else ``[b, s]``; upstream gradients ``[4, b, s]``,
one per output field (loss, nll, delta, value).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_irl import SoftQLossOutput, vocab_parallel_soft_q_loss
from helpers import (
    Batch,
    FP32_RTOL,
    GRAD_RTOL,
    IGNORE,
    LAM_GAMMA,
    assert_close_scaled,
    assert_outputs_close,
    make_batch,
    run_fused,
    run_reference,
    upstream_only_on,
    weighted_sum,
)


def dyadic_logits(b, s, v, seed) -> torch.Tensor:
    """Multiples of 1/4 in [-4, 4): ``(z - max) + max`` is exact, so are target logits."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-16, 16, (b, s, v), generator=gen).float() / 4


def call(logits, batch, **kwargs):
    """The fused loss forward on a clone (no backward), default lam/gamma."""
    kwargs = {"lam": 0.5, "gamma": 1.0, **kwargs}
    return vocab_parallel_soft_q_loss(
        logits.clone(), batch.labels, batch.loss_mask, batch.terminal, **kwargs
    )


# ------------------------------------------------------------------ against the reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("stop_value_grad", [False, True])
@pytest.mark.parametrize("lam,gamma", LAM_GAMMA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outputs_match_reference(dtype, lam, gamma, stop_value_grad):
    batch = make_batch(3, 9, 13, seed=1)
    logits = batch.logits.to(dtype)
    out, _ = run_fused(logits, batch, lam=lam, gamma=gamma, stop_value_grad=stop_value_grad)
    ref, _ = run_reference(logits, batch, lam=lam, gamma=gamma, stop_value_grad=stop_value_grad)
    assert_outputs_close(out, ref)


@pytest.mark.parametrize("stop_value_grad", [False, True])
@pytest.mark.parametrize("lam,gamma", LAM_GAMMA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logit_gradient_matches_reference(dtype, lam, gamma, stop_value_grad):
    batch = make_batch(3, 9, 13, seed=2)
    logits = batch.logits.to(dtype)
    _, grad = run_fused(logits, batch, lam=lam, gamma=gamma, stop_value_grad=stop_value_grad)
    _, ref = run_reference(logits, batch, lam=lam, gamma=gamma, stop_value_grad=stop_value_grad)
    assert grad.dtype == dtype
    assert_close_scaled(grad, ref, GRAD_RTOL[dtype], "grad")


@st.composite
def random_cases(draw):
    """(batch, logits in their dtype, lam, gamma, stop_value_grad) over shapes incl. s = 1."""
    b, s, v = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 11))
    bits = st.lists(st.booleans(), min_size=b * s, max_size=b * s)
    trained = torch.tensor(draw(bits)).view(b, s)
    terminal = torch.tensor(draw(bits)).view(b, s)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    base = make_batch(b, s, v, seed=draw(st.integers(0, 2**31 - 1)), scale=scale, p_trained=1.0)
    batch = base._replace(
        labels=torch.where(trained, base.labels, IGNORE),
        loss_mask=trained.float(),
        terminal=terminal,
    )
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    lam, gamma = draw(st.floats(0.0, 2.0)), draw(st.floats(0.0, 1.0))
    return batch, batch.logits.to(dtype), lam, gamma, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(random_cases())
def test_random_inputs_match_reference(case):
    batch, logits, lam, gamma, stop_value_grad = case
    out, grad = run_fused(logits, batch, lam=lam, gamma=gamma, stop_value_grad=stop_value_grad)
    ref_out, ref_grad = run_reference(
        logits, batch, lam=lam, gamma=gamma, stop_value_grad=stop_value_grad
    )
    assert_outputs_close(out, ref_out)
    assert_close_scaled(grad, ref_grad, GRAD_RTOL[logits.dtype], "grad")


# ------------------------------------------------------------------ terminals and truncation


def _full_row_batch(s, v, *, terminal_at=(), seed=0) -> Batch:
    """One fully trained row of dyadic logits with terminals at the given positions."""
    base = make_batch(1, s, v, seed=seed, p_trained=1.0)
    terminal = torch.zeros(1, s, dtype=torch.bool)
    terminal[0, list(terminal_at)] = True
    return base._replace(logits=dyadic_logits(1, s, v, seed), terminal=terminal)


def _target_logits(batch: Batch) -> torch.Tensor:
    return batch.logits.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def test_terminal_mid_row_makes_delta_the_target_logit_exactly():
    batch = _full_row_batch(6, 7, terminal_at=[2])
    out = call(batch.logits, batch, lam=1.0, gamma=1.0)
    assert out.delta[0, 2] == _target_logits(batch)[0, 2]  # V(s_3) contributes exactly 0


def test_terminal_mid_row_sends_no_td_gradient_into_next_position():
    batch = _full_row_batch(6, 7, terminal_at=[2])
    logits = batch.logits.clone().requires_grad_()
    out = vocab_parallel_soft_q_loss(
        logits, batch.labels, batch.loss_mask, batch.terminal, lam=1.0, gamma=1.0
    )
    out.delta[0, 2].backward()
    assert torch.equal(logits.grad[0, 3], torch.zeros(7))
    onehot = torch.nn.functional.one_hot(batch.labels[0, 2], 7).float()
    assert torch.equal(logits.grad[0, 2], onehot)  # d delta_2 = d z_2[a_2] only


def test_truncated_last_position_has_zero_delta_and_loss_equal_to_nll():
    batch = _full_row_batch(5, 7)  # not terminal: the row was cut by the sequence length
    out = call(batch.logits, batch, lam=2.0, gamma=1.0)
    assert out.delta[0, -1] == 0.0
    assert out.loss[0, -1] == out.nll[0, -1]
    assert (out.delta[0, :-1] != 0).all()  # the TD term is active everywhere else


def test_terminal_last_position_keeps_td_term_with_delta_the_target_logit():
    batch = _full_row_batch(5, 7, terminal_at=[4])
    lam = 2.0
    out = call(batch.logits, batch, lam=lam, gamma=1.0)
    target = _target_logits(batch)[0, -1]
    assert out.delta[0, -1] == target
    assert math.isclose(out.loss[0, -1], out.nll[0, -1] + lam * target**2, rel_tol=1e-6)


# ------------------------------------------------------------------ masks and labels

# One row: two prompt positions, three trained, two of padding. Position 4 is trained and not
# terminal, so its TD term reads V(s_5), the value of a padding position. The upstream gradient
# is on loss, nll and delta only: V(s_t) itself would send gradient into every position.
ROW_MASK = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
PADDING_AFTER_TRAINED = 5


def _prompt_and_padding_batch() -> Batch:
    base = upstream_only_on(make_batch(1, 7, 11, seed=3, p_trained=1.0), "loss", "nll", "delta")
    labels = torch.where(ROW_MASK > 0, base.labels, IGNORE)
    return base._replace(labels=labels, loss_mask=ROW_MASK, terminal=torch.zeros(1, 7).bool())


def test_untrained_positions_have_zero_loss_nll_and_delta():
    batch = _prompt_and_padding_batch()
    out = call(batch.logits, batch, lam=1.0, gamma=1.0)
    untrained = ROW_MASK == 0
    for name in ("loss", "nll", "delta"):
        assert torch.equal(getattr(out, name)[untrained], torch.zeros(4)), name


def test_value_is_logsumexp_at_every_position():
    batch = _prompt_and_padding_batch()
    out = call(batch.logits, batch, lam=1.0, gamma=1.0)
    expected = torch.logsumexp(batch.logits.double(), dim=-1)
    assert_close_scaled(out.value, expected, FP32_RTOL, "value")


def _prompt_and_padding_gradient(stop_value_grad):
    batch = _prompt_and_padding_batch()
    return run_fused(batch.logits, batch, lam=1.0, gamma=0.9, stop_value_grad=stop_value_grad)[1]


def test_untrained_positions_get_no_gradient_except_as_next_state_of_trained_position():
    grad = _prompt_and_padding_gradient(stop_value_grad=False)
    zero = torch.zeros(11)
    for t in (0, 1, 6):
        assert torch.equal(grad[0, t], zero), f"position {t}"
    assert grad[0, PADDING_AFTER_TRAINED].abs().max() > 1e-3  # through V(s_5) of delta_4


def test_stop_value_grad_cuts_gradient_into_untrained_next_position():
    grad = _prompt_and_padding_gradient(stop_value_grad=True)
    assert torch.equal(grad[0, PADDING_AFTER_TRAINED], torch.zeros(11))


def test_gradient_into_untrained_next_position_matches_reference():
    grad = _prompt_and_padding_gradient(stop_value_grad=False)
    batch = _prompt_and_padding_batch()
    _, ref = run_reference(batch.logits, batch, lam=1.0, gamma=0.9)
    t = PADDING_AFTER_TRAINED
    assert_close_scaled(grad[0, t], ref[0, t], FP32_RTOL, f"position {t}")


def test_labels_at_untrained_positions_are_ignored():
    batch = _prompt_and_padding_batch()
    results = []
    for fill in (IGNORE, 0, 11, 10**12):  # v = 11: in vocab, just past it, far past it
        labels = torch.where(ROW_MASK > 0, batch.labels, fill)
        results.append(run_fused(batch.logits, batch._replace(labels=labels), lam=1.0, gamma=0.9))
    (out0, grad0), rest = results[0], results[1:]
    for out, grad in rest:
        assert all(torch.equal(a, b) for a, b in zip(out, out0))
        assert torch.equal(grad, grad0)


# ------------------------------------------------------------------ extreme logits


def _large_logit_batch(dtype) -> tuple[Batch, torch.Tensor]:
    batch = make_batch(2, 6, 9, seed=4, scale=1e4)
    logits = batch.logits.clone()
    logits[0, 1] = 1e4  # a row of equal logits at the extreme
    logits[1, 2] = -1e4
    return batch, logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_of_magnitude_1e4_give_finite_outputs_and_gradient(dtype):
    batch, logits = _large_logit_batch(dtype)
    out, grad = run_fused(logits, batch, lam=2.0, gamma=1.0)
    for name, field in zip(SoftQLossOutput._fields, out):
        assert torch.isfinite(field).all(), name
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_of_magnitude_1e4_match_reference(dtype):
    batch, logits = _large_logit_batch(dtype)
    out, grad = run_fused(logits, batch, lam=2.0, gamma=1.0)
    ref_out, ref_grad = run_reference(logits, batch, lam=2.0, gamma=1.0)
    assert_outputs_close(out, ref_out)
    assert_close_scaled(grad, ref_grad, GRAD_RTOL[dtype], "grad")


# ------------------------------------------------------------------ bad input


def _small_batch() -> Batch:
    return make_batch(2, 3, 5, seed=5)


@pytest.mark.parametrize("name", ["labels", "loss_mask", "terminal"])
def test_shape_mismatch_error_names_the_tensor(name):
    batch = _small_batch()
    bad = batch._replace(**{name: getattr(batch, name)[:, :-1]})
    with pytest.raises(ValueError, match=f"^{name} must be \\[b, s\\]"):
        call(batch.logits, bad)


def test_logits_without_vocab_dimension_are_rejected():
    batch = _small_batch()
    with pytest.raises(ValueError, match="logits must be \\[b, s, v/tp\\]"):
        call(batch.logits[..., 0], batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=str)
def test_non_integer_labels_are_rejected(dtype):
    batch = _small_batch()
    with pytest.raises(TypeError, match="labels must be integer"):
        call(batch.logits, batch._replace(labels=batch.labels.clamp(min=0).to(dtype)))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64], ids=str)
def test_non_float_loss_mask_is_rejected(dtype):
    batch = _small_batch()
    with pytest.raises(TypeError, match="loss_mask must be a float tensor"):
        call(batch.logits, batch._replace(loss_mask=batch.loss_mask.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32], ids=str)
def test_non_bool_terminal_is_rejected(dtype):
    batch = _small_batch()
    with pytest.raises(TypeError, match="terminal must be a bool tensor"):
        call(batch.logits, batch._replace(terminal=batch.terminal.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64], ids=str)
def test_unsupported_logit_dtype_is_rejected(dtype):
    batch = _small_batch()
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        call(batch.logits.to(dtype), batch)


@pytest.mark.parametrize("lam", [-0.1, math.nan, math.inf])
def test_lam_must_be_finite_and_non_negative(lam):
    with pytest.raises(ValueError, match="lam \\(--irl-lambda\\)"):
        batch = _small_batch()
        call(batch.logits, batch, lam=lam)


@pytest.mark.parametrize("gamma", [-0.01, 1.01, math.nan])
def test_gamma_must_lie_in_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma \\(--irl-gamma\\)"):
        batch = _small_batch()
        call(batch.logits, batch, gamma=gamma)


@pytest.mark.parametrize("label", [5, 6, -1, IGNORE])
def test_check_labels_rejects_trained_label_outside_vocabulary(label):
    batch = _small_batch()  # v = 5
    labels = batch.labels.clone()
    labels[0, 0] = label
    bad = batch._replace(labels=labels, loss_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="trained label\\(s\\) outside the vocabulary \\[0, 5\\)"):
        call(batch.logits, bad, check_labels=True)


def test_check_labels_accepts_out_of_vocabulary_label_at_untrained_position():
    batch = _small_batch()
    labels = torch.where(batch.loss_mask > 0, batch.labels, 10**6)
    assert (batch.loss_mask == 0).any()
    call(batch.logits, batch._replace(labels=labels), check_labels=True)


# ------------------------------------------------------------------ documented mutation


def test_fp32_logits_are_overwritten_with_softmax_in_forward():
    batch = _small_batch()
    logits = batch.logits.clone()
    vocab_parallel_soft_q_loss(
        logits, batch.labels, batch.loss_mask, batch.terminal, lam=1.0, gamma=1.0
    )
    assert_close_scaled(logits, torch.softmax(batch.logits.double(), -1), FP32_RTOL, "")


def test_fp32_logits_are_overwritten_with_their_gradient_in_backward():
    batch = _small_batch()
    logits = batch.logits.clone().requires_grad_()
    out = vocab_parallel_soft_q_loss(
        logits, batch.labels, batch.loss_mask, batch.terminal, lam=1.0, gamma=1.0
    )
    weighted_sum(out, batch.upstream).backward()
    assert torch.equal(logits.detach(), logits.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_logits_are_not_modified(dtype):
    batch = _small_batch()
    logits = batch.logits.to(dtype).requires_grad_()
    before = logits.detach().clone()
    out = vocab_parallel_soft_q_loss(
        logits, batch.labels, batch.loss_mask, batch.terminal, lam=1.0, gamma=1.0
    )
    weighted_sum(out, batch.upstream).backward()
    assert torch.equal(logits.detach(), before)
