"""vocab_parallel_soft_q_loss with tensor parallelism, in gloo worker processes (run_distributed).

Every rank gets the same full-vocabulary inputs (built here, in the pytest process) and runs
the loss on its vocabulary shard ``[r * v/tp, (r + 1) * v/tp)`` of the logits, through
Megatron's tensor-parallel group. The pytest process concatenates the ranks' gradient shards
along the vocabulary and compares them, and the per-token outputs, to the float64 reference
(tolerances as in ``tests/helpers.py``). TP = 1 and 2 share one two-rank pool (TP = 1 there
means two data-parallel ranks, each with the whole vocabulary); TP = 4 has a four-rank pool.
Megatron's global ranks are TP-innermost, so ranks ``0 .. tp-1`` form one TP group.
"""

import random

import pytest
import torch

from megatron_irl import vocab_parallel_soft_q_loss
from megatron_irl.testing import run_distributed
from helpers import (
    FP32_RTOL,
    GRAD_RTOL,
    LAM_GAMMA,
    assert_close_scaled,
    assert_outputs_close,
    make_batch,
    run_fused,
    run_reference,
    upstream_only_on,
)

WORLD_SIZE = {1: 2, 2: 2, 4: 4}  # world size that runs each TP size
VOCAB = 12  # divisible by 1, 2 and 4; the TP = 4 shard (3) is odd


# ---------------------------------------------------------------- run on the workers


def _shard(logits: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """A contiguous copy of rank ``rank``'s vocabulary shard of ``[b, s, v]`` logits."""
    local = logits.size(-1) // tp
    return logits[..., rank * local:(rank + 1) * local].clone(memory_format=torch.contiguous_format)


def _tp_rank_and_size():
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _run_cases(cases):
    """The fused loss on this rank's shard for each (batch, dtype, lam, gamma, stop) case,
    through the default (Megatron's) TP group. Returns [(outputs, gradient shard)]."""
    rank, tp = _tp_rank_and_size()
    return [
        run_fused(_shard(batch.logits.to(dtype), rank, tp), batch,
                  lam=lam, gamma=gamma, stop_value_grad=stop)
        for batch, dtype, lam, gamma, stop in cases
    ]


def _run_on_world_group(batch, lam, gamma):
    """The fused loss with the vocabulary split over the whole world, passed explicitly."""
    import torch.distributed as dist

    group = dist.group.WORLD
    shard = _shard(batch.logits, dist.get_rank(group), dist.get_world_size(group))
    return run_fused(shard, batch, lam=lam, gamma=gamma, tp_group=group)


def _lam_zero_and_megatron_cross_entropy(batches):
    """Per batch: (ours, Megatron's), each (per-token loss, gradient shard), fp32, with the
    upstream gradient ``upstream[0] * loss_mask`` into the per-token loss."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    rank, tp = _tp_rank_and_size()
    results = []
    for batch in batches:
        loss_only = upstream_only_on(batch, "loss")
        out, grad = run_fused(_shard(batch.logits, rank, tp), loss_only, lam=0.0, gamma=1.0)

        # Megatron's needs a vocabulary id everywhere; the untrained positions get weight 0.
        labels = torch.where(batch.loss_mask > 0, batch.labels, 0)
        logits = _shard(batch.logits, rank, tp).requires_grad_()  # Megatron overwrites it
        megatron_loss = vocab_parallel_cross_entropy(logits, labels)
        (megatron_loss * batch.upstream[0] * batch.loss_mask).sum().backward()
        results.append(((out.loss, grad), (megatron_loss.detach(), logits.grad.clone())))
    return results


def _check_labels_on_shard(batch):
    rank, tp = _tp_rank_and_size()
    vocab_parallel_soft_q_loss(
        _shard(batch.logits, rank, tp), batch.labels, batch.loss_mask, batch.terminal,
        lam=1.0, gamma=1.0, check_labels=True,
    )


# ---------------------------------------------------------------- checked in pytest


def _gathered_grad(per_rank, case_index, tp):
    """The full-vocabulary gradient: the TP group's shards (ranks 0 .. tp-1) side by side."""
    return torch.cat([per_rank[r][case_index][1] for r in range(tp)], dim=-1)


def _tp_cases():
    """fp32 and bf16, several (lam, gamma), value gradient on and off; one batch each."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for lam, gamma in LAM_GAMMA:
            for stop in (False, True):
                batch = make_batch(2, 7, VOCAB, seed=len(cases))
                cases.append((batch, dtype, lam, gamma, stop))
    return cases


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def tp_run(request):
    """(tp, cases, per-rank results of ``_run_cases``), computed once per TP size."""
    tp = request.param
    cases = _tp_cases()
    return tp, cases, run_distributed(_run_cases, WORLD_SIZE[tp], tp=tp, args=(cases,))


def test_outputs_match_reference_at_tp(tp_run):
    _, cases, per_rank = tp_run
    for i, (batch, dtype, lam, gamma, stop) in enumerate(cases):
        ref, _ = run_reference(batch.logits.to(dtype), batch, lam=lam, gamma=gamma,
                               stop_value_grad=stop)
        what = f"case {i} ({dtype}, lam {lam}, gamma {gamma}, stop_value_grad {stop})"
        assert_outputs_close(per_rank[0][i][0], ref, what)


def test_gathered_logit_gradient_matches_reference_at_tp(tp_run):
    tp, cases, per_rank = tp_run
    for i, (batch, dtype, lam, gamma, stop) in enumerate(cases):
        _, ref = run_reference(batch.logits.to(dtype), batch, lam=lam, gamma=gamma,
                               stop_value_grad=stop)
        grad = _gathered_grad(per_rank, i, tp)
        assert grad.dtype == dtype
        what = f"case {i} ({dtype}, lam {lam}, gamma {gamma}, stop_value_grad {stop})"
        assert_close_scaled(grad, ref, GRAD_RTOL[dtype], what)


def test_all_ranks_return_identical_outputs(tp_run):
    _, cases, per_rank = tp_run
    for i in range(len(cases)):
        for rank_results in per_rank[1:]:
            for a, b in zip(rank_results[i][0], per_rank[0][i][0]):
                assert torch.equal(a, b), f"case {i}"


@pytest.fixture(scope="module", params=[1, 2], ids=lambda tp: f"tp{tp}")
def megatron_run(request):
    """(tp, batches, per-rank results of ``_lam_zero_and_megatron_cross_entropy``)."""
    tp = request.param
    batches = [make_batch(3, 6, VOCAB, seed=100 + i, scale=s) for i, s in enumerate((0.5, 3, 20))]
    return tp, batches, run_distributed(
        _lam_zero_and_megatron_cross_entropy, WORLD_SIZE[tp], tp=tp, args=(batches,)
    )


def test_lam_zero_loss_equals_megatron_cross_entropy(megatron_run):
    _, batches, per_rank = megatron_run
    for batch, ((loss, _), (megatron_loss, _)) in zip(batches, per_rank[0]):
        trained = batch.loss_mask > 0
        # nll = V - z[a] vs Megatron's log(sum exp(z - max)) - (z[a] - max): same fp32 maths,
        # rounded differently, so the slack is relative to the logits' scale (see tests/helpers.py).
        scale = batch.logits.abs().max().item()
        assert_close_scaled(loss[trained], megatron_loss[trained], FP32_RTOL, "loss", scale)


def test_lam_zero_gradient_equals_megatron_cross_entropy(megatron_run):
    tp, batches, per_rank = megatron_run
    for i in range(len(batches)):
        grad = torch.cat([per_rank[r][i][0][1] for r in range(tp)], dim=-1)
        megatron_grad = torch.cat([per_rank[r][i][1][1] for r in range(tp)], dim=-1)
        assert_close_scaled(grad, megatron_grad, FP32_RTOL, f"batch {i}")


def _random_sweep_cases(count, tp, seed):
    """Random shapes (s = 1 and odd shard widths included), masks, terminals, lam, gamma."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        b, s, v = rng.randint(1, 3), rng.choice([1, 2, 5, 8]), tp * rng.randint(1, 5)
        batch = make_batch(
            b, s, v, seed=rng.randrange(2**31), scale=rng.choice([0.1, 3.0, 30.0]),
            p_trained=rng.random(), p_terminal=rng.random(),
        )
        dtype = rng.choice([torch.float32, torch.bfloat16])
        cases.append((batch, dtype, rng.uniform(0, 2), rng.uniform(0, 1), rng.random() < 0.5))
    return cases


def test_random_sweep_matches_reference_at_tp2():
    cases = _random_sweep_cases(30, tp=2, seed=7)
    per_rank = run_distributed(_run_cases, 2, tp=2, args=(cases,))
    for i, (batch, dtype, lam, gamma, stop) in enumerate(cases):
        ref, ref_grad = run_reference(batch.logits.to(dtype), batch, lam=lam, gamma=gamma,
                                      stop_value_grad=stop)
        assert_outputs_close(per_rank[0][i][0], ref, f"case {i}")
        assert_close_scaled(_gathered_grad(per_rank, i, 2), ref_grad, GRAD_RTOL[dtype], f"case {i}")


def test_explicit_tp_group_overrides_megatron_default():
    # Megatron's TP group has one rank here; the world group given explicitly has two.
    batch = make_batch(2, 5, VOCAB, seed=200)
    per_rank = run_distributed(_run_on_world_group, 2, tp=1, args=(batch, 1.0, 0.9))
    ref, ref_grad = run_reference(batch.logits, batch, lam=1.0, gamma=0.9)
    assert_outputs_close(per_rank[0][0], ref)
    grad = torch.cat([per_rank[r][1] for r in range(2)], dim=-1)
    assert_close_scaled(grad, ref_grad, FP32_RTOL, "grad")


def _labels_batch(label):
    """All positions trained; one label set to ``label``."""
    batch = make_batch(2, 4, VOCAB, seed=300, p_trained=1.0)
    labels = batch.labels.clone()
    labels[1, 2] = label
    return batch._replace(labels=labels)


def test_check_labels_accepts_label_in_another_ranks_shard_at_tp2():
    # Rank 0 owns [0, 6); 11 is outside its shard but inside the global vocabulary [0, 12).
    run_distributed(_check_labels_on_shard, 2, tp=2, args=(_labels_batch(VOCAB - 1),))


def test_check_labels_rejects_label_beyond_global_vocabulary_at_tp2():
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 12\), e.g. 12"):
        run_distributed(_check_labels_on_shard, 2, tp=2, args=(_labels_batch(VOCAB),))
