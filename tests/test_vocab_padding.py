"""Padded vocabulary rows carry no probability in any loss (``vocab_size`` of the losses).

The vocabulary is padded to equal TP shards with rows that are no token. Every loss gets the
logits of all ``PADDED`` columns, the padded ones made large (so that any probability they
kept would show), and must equal the float64 reference computed on the real columns
``[0, vocab_size)`` only; the gradient in the padded columns (and the padded rows of the fused
loss's output weight) must be exactly 0. Layouts: at TP 1, the last 4 of 16 columns are
padding; at TP 2 (8 columns a rank), padding on the second rank only (vocab 12), and padding
from the first rank's shard into the second, whose whole shard is padding (vocab 6).
"""

import pytest
import torch

from megatron_irl.loss import vocab_parallel_entropy, vocab_parallel_soft_q_loss
from megatron_irl.loss.fused_output import fused_output_soft_q_loss_sum
from megatron_irl.loss.gail import gail_policy_loss
from megatron_irl.loss.online import online_soft_q_loss
from megatron_irl.loss.reference import (
    gail_policy_loss_reference,
    online_soft_q_loss_reference,
    soft_q_loss_reference,
)
from megatron_irl.testing import run_distributed
from helpers import FP32_RTOL, IGNORE, assert_close_scaled

PADDED = 16
HIDDEN = 8
PADDED_LOGIT = 30.0  # far above the real logits (scale 3): a leak would dominate V
OPTIONS = dict(lam=0.5, gamma=0.9)


def make_inputs(vocab_size: int, seed: int) -> dict:
    """Per-token inputs ``[2, 6]`` with labels in the real vocabulary, full logits
    ``[2, 6, PADDED]`` with large padded columns, and hidden states ``[2, 6, HIDDEN]`` and an
    output weight ``[PADDED, HIDDEN]`` whose padded rows give large logits too."""
    gen = torch.Generator().manual_seed(seed)
    b, s = 2, 6
    logits = torch.randn(b, s, PADDED, generator=gen) * 3.0
    logits[..., vocab_size:] = PADDED_LOGIT
    trained = torch.rand(b, s, generator=gen) < 0.5
    policy = ~trained & (torch.rand(b, s, generator=gen) < 0.8)
    labels = torch.randint(0, vocab_size, (b, s), generator=gen)
    hidden = torch.randn(b, s, HIDDEN, generator=gen)
    weight = torch.randn(PADDED, HIDDEN, generator=gen)
    # Padded rows along the mean hidden state: large positive logits for every token.
    weight[vocab_size:] = 10.0 * hidden.mean(dim=(0, 1)) / hidden.mean(dim=(0, 1)).norm()
    return dict(
        vocab_size=vocab_size, logits=logits, hidden=hidden, weight=weight,
        labels=torch.where(trained | policy, labels, IGNORE), loss_mask=trained.float(),
        policy_mask=policy.float(), terminal=torch.rand(b, s, generator=gen) < 0.2,
        rewards=torch.randn(b, s, generator=gen),
    )


# ---------------------------------------------------------------- every loss, one rank's shard


def _tp_rank_and_size():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _with_grad(tensor: torch.Tensor, rank: int, tp: int, dim: int) -> torch.Tensor:
    local = tensor.size(dim) // tp
    return tensor.narrow(dim, rank * local, local).clone().requires_grad_()


def _all_losses(inputs: dict) -> dict:
    """Each loss on this rank's vocabulary shard through the default TP group, with
    ``vocab_size``; returns its outputs and the gradient w.r.t. the shard."""
    rank, tp = _tp_rank_and_size()
    vocab = inputs["vocab_size"]
    per_token = [inputs[name] for name in ("labels", "loss_mask", "terminal")]
    results = {}

    logits = _with_grad(inputs["logits"], rank, tp, -1)
    out = vocab_parallel_soft_q_loss(logits, *per_token, vocab_size=vocab, check_labels=True,
                                     **OPTIONS)
    (out.loss.sum() + 0.3 * out.value.sum()).backward()
    results["soft_q"] = ([t.detach() for t in out], logits.grad)

    hidden = inputs["hidden"].clone().requires_grad_()
    weight = _with_grad(inputs["weight"], rank, tp, 0)
    loss_sum, fused = fused_output_soft_q_loss_sum(hidden, weight, *per_token, chunk_size=5,
                                                   vocab_size=vocab, **OPTIONS)
    loss_sum.backward()
    results["fused"] = (list(fused), (hidden.grad, weight.grad))

    logits = _with_grad(inputs["logits"], rank, tp, -1)
    entropy = vocab_parallel_entropy(logits, vocab_size=vocab)
    entropy.sum().backward()
    results["entropy"] = ([entropy.detach()], logits.grad)

    logits = _with_grad(inputs["logits"], rank, tp, -1)
    online = online_soft_q_loss(logits, inputs["labels"], inputs["loss_mask"],
                                inputs["policy_mask"], inputs["terminal"], alpha_mix=0.3,
                                td_over="mixture", vocab_size=vocab, **OPTIONS)
    (online.expert_loss.sum() + online.policy_loss.sum()).backward()
    results["online"] = ([t.detach() for t in online], logits.grad)

    logits = _with_grad(inputs["logits"], rank, tp, -1)
    gail = gail_policy_loss(logits, inputs["labels"], inputs["loss_mask"], inputs["policy_mask"],
                            inputs["terminal"], inputs["rewards"], gamma=0.9, entropy_weight=0.1,
                            vocab_size=vocab)
    (gail.expert_loss.sum() + gail.policy_loss.sum()).backward()
    results["gail"] = ([t.detach() for t in gail], logits.grad)
    return results


# ---------------------------------------------------------------- float64 references


def _references(inputs: dict) -> dict:
    """The same losses in float64 on the real columns only; gradients w.r.t. them."""
    vocab = inputs["vocab_size"]
    per_token = (inputs["labels"], inputs["loss_mask"].double(), inputs["terminal"])
    real = lambda: inputs["logits"][..., :vocab].double().requires_grad_()  # noqa: E731
    expected = {}

    logits = real()
    out = soft_q_loss_reference(logits, *per_token, **OPTIONS)
    (out.loss.sum() + 0.3 * out.value.sum()).backward()
    expected["soft_q"] = (list(out), logits.grad)

    hidden = inputs["hidden"].double().requires_grad_()
    weight = inputs["weight"][:vocab].double().requires_grad_()
    out = soft_q_loss_reference(hidden @ weight.t(), *per_token, **OPTIONS)
    out.loss.sum().backward()
    expected["fused"] = (list(out), (hidden.grad, weight.grad))

    logits = real()
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    entropy.sum().backward()
    expected["entropy"] = ([entropy], logits.grad)

    logits = real()
    online = online_soft_q_loss_reference(
        logits, inputs["labels"], inputs["loss_mask"].double(), inputs["policy_mask"].double(),
        inputs["terminal"], alpha_mix=0.3, td_over="mixture", **OPTIONS)
    (online.expert_loss.sum() + online.policy_loss.sum()).backward()
    expected["online"] = (list(online), logits.grad)

    logits = real()
    gail = gail_policy_loss_reference(
        logits, inputs["labels"], inputs["loss_mask"].double(), inputs["policy_mask"].double(),
        inputs["terminal"], inputs["rewards"].double(), gamma=0.9, entropy_weight=0.1)
    (gail.expert_loss.sum() + gail.policy_loss.sum()).backward()
    expected["gail"] = (list(gail), logits.grad)
    return expected


# ---------------------------------------------------------------- runs

LAYOUTS = {  # name: (TP, real vocabulary of the PADDED columns)
    "tp1": (1, 12),
    "tp2_padding_on_one_rank": (2, 12),
    "tp2_padding_spans_ranks_second_all_padding": (2, 6),
}


def _gathered(per_rank: list[dict], loss: str, tp: int):
    """(outputs of rank 0, gradient(s) concatenated over the vocabulary shards)."""
    outputs, grad = per_rank[0][loss]
    if loss == "fused":
        hidden_grad, _ = grad
        weight_grad = torch.cat([r[loss][1][1] for r in per_rank[:tp]], dim=0)
        return outputs, (hidden_grad, weight_grad)
    return outputs, torch.cat([r[loss][1] for r in per_rank[:tp]], dim=-1)


@pytest.fixture(scope="module")
def runs():
    """Every layout's inputs and per-rank results: TP 1 in this process, the two TP 2
    layouts in one launch of two ranks."""
    inputs = {name: make_inputs(vocab, seed) for seed, (name, (_, vocab))
              in enumerate(LAYOUTS.items())}
    results = {"tp1": (inputs["tp1"], [_all_losses(inputs["tp1"])])}
    tp2 = [name for name, (tp, _) in LAYOUTS.items() if tp == 2]
    per_rank = run_distributed(_run_layouts, 2, tp=2, args=([inputs[n] for n in tp2],))
    for index, name in enumerate(tp2):
        results[name] = (inputs[name], [rank_results[index] for rank_results in per_rank])
    return results


def _run_layouts(layouts: list[dict]) -> list[dict]:
    return [_all_losses(inputs) for inputs in layouts]


def _check_against_reference(runs, layout: str, loss: str):
    inputs, per_rank = runs[layout]
    tp, vocab = LAYOUTS[layout]
    outputs, grads = _gathered(per_rank, loss, tp)
    expected_outputs, expected_grads = _references(inputs)[loss]
    expected_outputs = [None if e is None else e.detach() for e in expected_outputs]
    scale = max(float(e.abs().max()) for e in expected_outputs if e is not None)
    for index, (actual, expected) in enumerate(zip(outputs, expected_outputs)):
        if expected is not None:
            assert_close_scaled(actual, expected, FP32_RTOL, f"{loss} output {index}", scale)
    if loss == "fused":
        (hidden_grad, weight_grad), (expected_hidden, expected_weight) = grads, expected_grads
        assert_close_scaled(hidden_grad, expected_hidden, FP32_RTOL, "fused hidden gradient")
        assert_close_scaled(weight_grad[:vocab], expected_weight, FP32_RTOL,
                            "fused weight gradient, real rows")
        assert torch.equal(weight_grad[vocab:], torch.zeros_like(weight_grad[vocab:])), \
            "the padded rows of the output weight got a gradient"
        return
    assert_close_scaled(grads[..., :vocab], expected_grads, FP32_RTOL, f"{loss} gradient")
    assert torch.equal(grads[..., vocab:], torch.zeros_like(grads[..., vocab:])), \
        f"{loss}: the padded columns got a gradient"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("loss", ["soft_q", "fused", "entropy", "online", "gail"])
def test_loss_with_padding_equals_the_reference_over_the_real_vocabulary(runs, layout, loss):
    _check_against_reference(runs, layout, loss)


def test_vocab_size_beyond_the_logit_columns_is_an_error():
    inputs = make_inputs(12, seed=0)
    with pytest.raises(ValueError, match="vocab_size 17"):
        vocab_parallel_soft_q_loss(inputs["logits"], inputs["labels"], inputs["loss_mask"],
                                   inputs["terminal"], vocab_size=17, **OPTIONS)


def test_check_labels_rejects_a_trained_label_in_the_padding():
    inputs = make_inputs(12, seed=0)
    labels = torch.where(inputs["loss_mask"] > 0, 13, inputs["labels"])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 12\)"):
        vocab_parallel_soft_q_loss(inputs["logits"], labels, inputs["loss_mask"],
                                   inputs["terminal"], vocab_size=12, check_labels=True,
                                   **OPTIONS)


# ---------------------------------------------------------------- the checkpoint's record

ARCHITECTURE = {"hidden_size": 64, "padded_vocab_size": 128, "vocab_size": 100}


def test_checkpoint_with_another_real_vocabulary_is_refused_naming_the_flag():
    from megatron_irl.core.checkpoint import CheckpointError, _check_architecture

    with pytest.raises(CheckpointError, match=r"vocab_size \(--vocab-size\): checkpoint 100, "
                                              r"this run 98"):
        _check_architecture(ARCHITECTURE, {**ARCHITECTURE, "vocab_size": 98}, "ckpt")


def test_checkpoint_without_a_real_vocabulary_loads_with_the_fallback_named(caplog):
    from megatron_irl.core.checkpoint import _check_architecture

    saved = {name: value for name, value in ARCHITECTURE.items() if name != "vocab_size"}
    _check_architecture(saved, {**ARCHITECTURE, "vocab_size": 98}, "ckpt")
    assert "does not record its real vocabulary" in caplog.text
    assert "taking 98 (--vocab-size, else the tokenizer's size)" in caplog.text


def test_real_vocabulary_is_the_flag_else_the_tokenizers_and_never_below_it():
    from megatron_irl.config import ConfigError, ModelConfig
    from megatron_irl.core.vocabulary import real_vocab_size

    assert real_vocab_size(ModelConfig(), 98) == 98
    assert real_vocab_size(ModelConfig(vocab_size=100), 98) == 100
    with pytest.raises(ConfigError, match="--vocab-size 97 is smaller than the tokenizer's 98"):
        real_vocab_size(ModelConfig(vocab_size=97), 98)
