"""fused_output_soft_q_loss_sum against the unfused composition ``hidden @ weight.T`` followed
by vocab_parallel_soft_q_loss and a sum: the loss sum, the per-token outputs and the gradients
w.r.t. hidden and weight.

Single-rank cases run in the pytest process; TP = 2 runs in gloo workers (run_distributed),
each rank on its vocabulary shard of the weight, with the unfused hidden gradient all-reduced
over the TP group as ColumnParallelLinear's backward does. The loss sum gets an upstream
gradient other than 1, so the scaling in backward is checked too. The last test trains the
tiny example both ways and compares the logged losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from megatron_irl.loss import SoftQLossOutput, vocab_parallel_soft_q_loss
from megatron_irl.loss.fused_output import fused_output_soft_q_loss_sum
from megatron_irl.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
FP32_RTOL = 2e-5
BF16_RTOL = 3e-2
HIDDEN, VOCAB = 16, 12  # VOCAB divisible by TP = 2


class Inputs(NamedTuple):
    hidden: torch.Tensor  # [b, s, h] fp32
    weight: torch.Tensor  # [v, h] fp32, the whole vocabulary
    labels: torch.Tensor
    loss_mask: torch.Tensor
    terminal: torch.Tensor
    upstream: float  # gradient into the loss sum


def make_inputs(b, s, *, seed) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    trained = torch.rand(b, s, generator=gen) < 0.7
    labels = torch.where(trained, torch.randint(0, VOCAB, (b, s), generator=gen), -100)
    terminal = torch.rand(b, s, generator=gen) < 0.2
    upstream = 0.5 + torch.rand((), generator=gen).item()
    return Inputs(hidden, weight, labels, trained.float(), terminal, upstream)


def boundary_inputs() -> Inputs:
    """2 rows of 11 tokens (chunks of 7 cross rows): a terminal on each chunk's last token,
    an untrained token right after a chunk boundary, a trained one right before it."""
    inputs = make_inputs(2, 11, seed=5)
    flat_mask, flat_terminal = inputs.loss_mask.view(-1), inputs.terminal.view(-1)
    flat_terminal.zero_()
    flat_terminal[[6, 20]] = True  # last tokens of chunks 0 and 2
    flat_mask[[7, 14]] = 0.0  # first tokens of chunks 1 and 2
    flat_mask[[6, 13]] = 1.0
    labels = inputs.labels.view(-1)
    labels[[6, 13]] = 3
    labels[flat_mask == 0] = -100
    return inputs


def _tp_shard(weight, tp_group):
    import torch.distributed as dist

    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    local = weight.size(0) // size
    return weight[rank * local:(rank + 1) * local].clone()


def run_both(inputs: Inputs, *, dtype=torch.float32, chunk_size, lam=0.5, gamma=0.9,
             stop_value_grad=False, tp_group=None):
    """(unfused, fused), each (loss sum, per-token outputs, grad hidden, grad of this rank's
    weight shard)."""
    import torch.distributed as dist

    results = []
    for fused in (False, True):
        hidden = inputs.hidden.to(dtype, copy=True).requires_grad_()
        weight = _tp_shard(inputs.weight, tp_group).to(dtype).requires_grad_()
        per_token = (inputs.labels, inputs.loss_mask, inputs.terminal)
        options = dict(lam=lam, gamma=gamma, tp_group=tp_group, stop_value_grad=stop_value_grad)
        if fused:
            loss_sum, out = fused_output_soft_q_loss_sum(
                hidden, weight, *per_token, chunk_size=chunk_size, **options)
        else:
            out = vocab_parallel_soft_q_loss(hidden @ weight.t(), *per_token, **options)
            loss_sum = out.loss.sum()
        (inputs.upstream * loss_sum).backward()
        grad_hidden = hidden.grad.clone()
        if not fused and tp_group is not None:
            dist.all_reduce(grad_hidden, group=tp_group)  # ColumnParallelLinear's backward
        results.append((loss_sum.detach(), SoftQLossOutput(*(f.detach() for f in out)),
                        grad_hidden, weight.grad.clone()))
    return results


def assert_same(unfused, fused, rtol, what=""):
    (sum_u, out_u, gh_u, gw_u), (sum_f, out_f, gh_f, gw_f) = unfused, fused
    torch.testing.assert_close(sum_f, sum_u, rtol=rtol, atol=rtol,
                               msg=lambda m: f"{what} loss sum: {m}")
    for name, u, f in zip(SoftQLossOutput._fields, out_u, out_f):
        assert f.dtype == torch.float32, name
        torch.testing.assert_close(f, u, rtol=rtol, atol=rtol * (u.abs().max().item() + 1),
                                   msg=lambda m: f"{what} {name}: {m}")
    for name, u, f in (("grad hidden", gh_u, gh_f), ("grad weight", gw_u, gw_f)):
        assert f.dtype == u.dtype and f.shape == u.shape, name
        u, f = u.float(), f.float()
        torch.testing.assert_close(f, u, rtol=rtol, atol=rtol * u.abs().max().item(),
                                   msg=lambda m: f"{what} {name}: {m}")


# ------------------------------------------------------------------ single rank


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_matches_unfused_for_any_chunk_size(chunk_size):
    unfused, fused = run_both(make_inputs(3, 9, seed=1), chunk_size=chunk_size)
    assert_same(unfused, fused, FP32_RTOL)


@pytest.mark.parametrize("lam,gamma", [(0.0, 1.0), (1.0, 1.0), (2.0, 0.0)])
def test_matches_unfused_for_lambda_and_gamma(lam, gamma):
    unfused, fused = run_both(make_inputs(2, 10, seed=2), chunk_size=3, lam=lam, gamma=gamma)
    assert_same(unfused, fused, FP32_RTOL)


def test_stop_value_grad_matches_unfused():
    unfused, fused = run_both(make_inputs(2, 10, seed=3), chunk_size=4, stop_value_grad=True)
    assert_same(unfused, fused, FP32_RTOL)


@pytest.mark.parametrize("chunk_size", [1, 7, 11])  # 11: chunk boundaries = row boundaries
def test_masks_and_terminals_at_chunk_boundaries_match_unfused(chunk_size):
    inputs = boundary_inputs()
    unfused, fused = run_both(inputs, chunk_size=chunk_size)
    assert_same(unfused, fused, FP32_RTOL)
    # The TD gradient crosses the boundary: token 13's delta reaches V(token 14)'s hidden.
    assert fused[2].view(-1, HIDDEN)[14].abs().sum() > 0


def test_bf16_inputs_match_unfused_at_bf16_precision():
    unfused, fused = run_both(make_inputs(2, 12, seed=4), dtype=torch.bfloat16, chunk_size=5)
    assert_same(unfused, fused, BF16_RTOL, "bf16")


def _fused(inputs: Inputs, weight=None, **kwargs):
    return fused_output_soft_q_loss_sum(
        inputs.hidden, inputs.weight if weight is None else weight, inputs.labels,
        inputs.loss_mask, inputs.terminal, lam=0.5, gamma=1.0, chunk_size=4, **kwargs)


def test_without_hidden_gradient_gives_the_weight_gradient():
    inputs = make_inputs(2, 6, seed=6)
    weight = inputs.weight.clone().requires_grad_()
    loss_sum, _ = _fused(inputs, weight)
    (inputs.upstream * loss_sum).backward()
    (*_, expected), _ = run_both(inputs, chunk_size=4, gamma=1.0)
    torch.testing.assert_close(weight.grad, expected, rtol=FP32_RTOL, atol=1e-5)


def test_per_token_outputs_are_detached_and_sum_to_the_loss_sum():
    inputs = make_inputs(2, 6, seed=6)
    loss_sum, per_token = _fused(inputs, inputs.weight.clone().requires_grad_())
    assert loss_sum.requires_grad and loss_sum.shape == ()
    assert not any(field.requires_grad for field in per_token)
    torch.testing.assert_close(loss_sum, per_token.loss.sum())


def test_under_no_grad_gives_the_same_outputs_without_a_graph():
    inputs = make_inputs(2, 6, seed=6)
    weight = inputs.weight.clone().requires_grad_()
    expected_sum, expected = _fused(inputs, weight)
    with torch.no_grad():
        loss_sum, per_token = _fused(inputs, weight)
    assert not loss_sum.requires_grad
    torch.testing.assert_close(loss_sum, expected_sum.detach())
    for field, expected_field in zip(per_token, expected):
        torch.testing.assert_close(field, expected_field)


def test_second_backward_is_an_error():
    inputs = make_inputs(2, 6, seed=6)
    loss_sum, _ = _fused(inputs, inputs.weight.clone().requires_grad_())
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward may run only once"):
        loss_sum.backward()


@pytest.mark.parametrize("bad,match", [
    (dict(chunk_size=0), "chunk_size \\(--fused-output-chunk-size\\)"),
    (dict(weight=torch.zeros(VOCAB, HIDDEN + 1)), "weight must be \\[v/tp, h\\]"),
    (dict(labels=torch.zeros(2, 5, dtype=torch.long)), "labels must be \\[b, s\\]"),
])
def test_bad_inputs_are_rejected_with_the_argument_named(bad, match):
    inputs = make_inputs(2, 6, seed=7)
    kwargs = dict(hidden=inputs.hidden, weight=inputs.weight, labels=inputs.labels,
                  loss_mask=inputs.loss_mask, terminal=inputs.terminal, chunk_size=4)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_output_soft_q_loss_sum(lam=0.1, gamma=1.0, **kwargs)


def test_config_rejects_fused_output_loss_without_soft_q():
    from megatron_irl.config import ConfigError, IRLConfig

    with pytest.raises(ConfigError, match="^--fused-output-loss: must be off unless --irl-loss"):
        IRLConfig(loss="mle_entropy", fused_output_loss=True)
    with pytest.raises(ConfigError, match="^--fused-output-chunk-size 0: must be >= 1"):
        IRLConfig(fused_output_loss=True, fused_output_chunk_size=0)


# ------------------------------------------------------------------ tensor parallel


def _tensor_parallel_cases(cases):
    """On a worker: run_both through Megatron's TP group for each (inputs, kwargs)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return [run_both(inputs, tp_group=group, **kwargs) for inputs, kwargs in cases]


@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_parallel_matches_unfused(tp):
    cases = [
        (make_inputs(3, 9, seed=8), dict(chunk_size=1)),
        (make_inputs(3, 9, seed=8), dict(chunk_size=7)),
        (make_inputs(3, 9, seed=8), dict(chunk_size=100)),
        (boundary_inputs(), dict(chunk_size=7)),
        (make_inputs(2, 10, seed=9), dict(chunk_size=3, stop_value_grad=True)),
        (make_inputs(2, 12, seed=4), dict(chunk_size=5, dtype=torch.bfloat16)),
    ]
    for rank_results in run_distributed(_tensor_parallel_cases, 2, tp=tp, args=(cases,)):
        for (inputs, kwargs), (unfused, fused) in zip(cases, rank_results):
            bf16 = kwargs.get("dtype") == torch.bfloat16
            assert_same(unfused, fused, BF16_RTOL if bf16 else FP32_RTOL, f"TP={tp} {kwargs}")


def _sequence_parallel_gradients(inputs: Inputs):
    """On a worker (TP = 2): this rank's sequence shard ``[s/tp, b, h]`` through the output
    layer + loss, unfused as Megatron's ColumnParallelLinear does under sequence parallelism
    (all-gather, reduce-scatter in backward) and fused as ``HiddenStatesGPTModel`` does
    (all-gather whose backward splits the gradient the fused loss already summed over TP).
    Returns (unfused, fused) gradients w.r.t. the shard."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    group = parallel_state.get_tensor_model_parallel_group()
    rank, size = group.rank(), group.size()
    weight = _tp_shard(inputs.weight, group)
    sequence_major = inputs.hidden.transpose(0, 1)  # [s, b, h]
    shard_length = sequence_major.size(0) // size
    per_token = (inputs.labels, inputs.loss_mask, inputs.terminal)
    options = dict(lam=0.5, gamma=0.9, tp_group=group)
    grads = []
    for fused in (False, True):
        shard = sequence_major[rank * shard_length:(rank + 1) * shard_length].clone()
        shard.requires_grad_()
        hidden = gather_from_sequence_parallel_region(
            shard, tensor_parallel_output_grad=not fused, group=group).transpose(0, 1)
        if fused:
            loss_sum, _ = fused_output_soft_q_loss_sum(hidden, weight, *per_token,
                                                       chunk_size=5, **options)
        else:
            loss_sum = vocab_parallel_soft_q_loss(hidden @ weight.t(), *per_token,
                                                  **options).loss.sum()
        (inputs.upstream * loss_sum).backward()
        grads.append(shard.grad)
    return grads


def test_sequence_parallel_layout_gives_the_unfused_gradient_of_each_sequence_shard():
    inputs = make_inputs(3, 8, seed=11)  # 8 positions: 4 per rank
    for unfused, fused in run_distributed(_sequence_parallel_gradients, 2, tp=2,
                                          args=(inputs,)):
        torch.testing.assert_close(fused, unfused, rtol=FP32_RTOL,
                                   atol=FP32_RTOL * unfused.abs().max().item())


# ------------------------------------------------------------------ training end to end


def _train_losses(tmp_path: Path, name: str, nproc: int, *flags: str) -> list[float]:
    metrics = tmp_path / f"{name}.jsonl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    result = subprocess.run(
        launcher + [
            "-m", "megatron_irl", "train", "--config", "examples/tiny.yaml",
            "--train-iters", "3", "--lr-warmup-iters", "1", "--log-interval", "1",
            "--progress-bar", "off", "--tensorboard-dir=", "--valid-data-path=", "--save=",
            "--save-interval=", "--metrics-file", str(metrics), *flags,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [step["loss"] for step in steps if step["split"] == "train"]


@pytest.mark.parametrize("nproc,layout", [
    (1, ["--untie-embeddings-and-output-weights", "false"]),  # weight = the embedding's
    (2, ["--tensor-model-parallel-size", "2"]),  # untied output layer, hidden grad all-reduced
], ids=["tp1-tied", "tp2-untied"])
def test_training_with_fused_output_loss_gives_the_unfused_losses(tmp_path, nproc, layout):
    unfused = _train_losses(tmp_path, "unfused", nproc, *layout)
    fused = _train_losses(tmp_path, "fused", nproc, *layout, "--fused-output-loss",
                          "--fused-output-chunk-size", "100")
    assert len(fused) == len(unfused) == 3
    assert fused == pytest.approx(unfused, rel=1e-5)
