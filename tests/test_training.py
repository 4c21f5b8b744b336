"""The training job end to end: real torchrun launches of ``megatron-irl train`` on CPU/gloo.

Every run uses the bundled tiny configuration, shortened, and writes its per-step scalars to a
JSONL metrics file that the tests compare. Dropout is 0 in that configuration, so runs that
only differ in how the work is split must produce the same losses.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SHORT_RUN,
    assert_golden_losses,
    assert_same_losses,
    losses,
    run_train,
    train_command,
    train_env,
)


@pytest.fixture(scope="module")
def single_rank_run(tmp_path_factory) -> list[dict]:
    return run_train(tmp_path_factory.mktemp("single"), 1)


@pytest.fixture(scope="module")
def six_step_losses(tmp_path_factory) -> dict[int, float]:
    """An uninterrupted 6-step run, for the resume tests to match."""
    return losses(run_train(tmp_path_factory.mktemp("six"), 1, "--train-iters", "6"))


def test_tensor_parallel_matches_single_rank(tmp_path, single_rank_run):
    tp2 = run_train(tmp_path, 2, "--tensor-model-parallel-size", "2")
    assert_same_losses(losses(tp2), losses(single_rank_run))


def test_data_parallel_matches_single_rank(tmp_path, single_rank_run):
    dp2 = run_train(tmp_path, 2)
    assert_same_losses(losses(dp2), losses(single_rank_run))


def test_distributed_optimizer_matches_single_rank(tmp_path, single_rank_run):
    dp2 = run_train(tmp_path, 2, "--use-distributed-optimizer")
    assert_same_losses(losses(dp2), losses(single_rank_run))


def test_pipeline_schedules_match_no_pipelining_from_the_same_checkpoint(tmp_path):
    # Initialisation seeds differ per pipeline stage, so all runs start from one checkpoint
    # (saved at PP=1 after one step) and resume: the 1F1B and interleaved schedules must then
    # give the no-pipelining losses. Four layers so that 2 stages x 2 chunks divide them.
    four_layers = ["--num-layers", "4"]
    run_train(tmp_path, 1, *four_layers, "--train-iters", "1", "--lr-warmup-iters", "0",
              name="init", save=True)
    resume = [*four_layers, "--load", str(tmp_path / "init_ckpt"), "--train-iters", "3"]
    no_pipelining = losses(run_train(tmp_path, 1, *resume, name="pp1"))
    one_f_one_b = losses(run_train(tmp_path, 2, *resume, "--pipeline-model-parallel-size", "2",
                                   name="pp2"))
    interleaved = losses(run_train(tmp_path, 2, *resume, "--pipeline-model-parallel-size", "2",
                                   "--virtual-pipeline-model-parallel-size", "2", name="vpp2"))
    assert list(no_pipelining) == [2, 3]
    assert_same_losses(one_f_one_b, no_pipelining)
    assert_same_losses(interleaved, no_pipelining)


def test_loss_falls_on_the_tiny_set(tmp_path):
    steps = run_train(tmp_path, 1, "--train-iters", "40", "--lr-warmup-iters", "4")
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    assert steps[-1]["nll"] < steps[0]["nll"]


@pytest.fixture(scope="module")
def first_half_checkpoint(tmp_path_factory) -> str:
    """The checkpoint at step 3 of a 6-step run (stopped by --exit-interval)."""
    tmp_path = tmp_path_factory.mktemp("first_half")
    run_train(tmp_path, 1, "--train-iters", "6", "--exit-interval", "3", name="first_half",
              save=True)
    return str(tmp_path / "first_half_ckpt")


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, six_step_losses,
                                                         first_half_checkpoint):
    resumed = losses(run_train(tmp_path, 1, "--train-iters", "6", "--load",
                               first_half_checkpoint, name="second_half"))
    assert list(resumed) == [4, 5, 6]
    assert_same_losses(resumed, {i: six_step_losses[i] for i in (4, 5, 6)})


def test_resuming_a_finished_run_says_there_is_nothing_to_train(first_half_checkpoint):
    result = subprocess.run(
        train_command(1, [*SHORT_RUN, "--train-iters", "3", "--load", first_half_checkpoint]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("nothing to train: the checkpoint is at iteration 3 and --train-iters is 3"
            in result.stdout)


def test_damaged_checkpoint_stops_the_run_with_a_message_naming_the_file(
        tmp_path, first_half_checkpoint):
    damaged = tmp_path / "damaged"
    shutil.copytree(first_half_checkpoint, damaged)
    common = damaged / "iter_0000003" / "common.pt"
    common.write_bytes(common.read_bytes()[:100])
    result = subprocess.run(
        train_command(1, [*SHORT_RUN, "--train-iters", "6", "--load", str(damaged)]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert (f"megatron-irl train: error: checkpoint {damaged}/iter_0000003 (iteration 3, chosen "
            f"by latest_checkpointed_iteration.txt) is unusable: common.pt: 100 bytes"
            in result.stderr)
    assert "no other checkpoint under" in result.stderr
    assert "Traceback" not in result.stderr


def _cosine_lr(max_lr: float, min_lr: float, step: int, warmup: int = 1, decay: int = 6) -> float:
    """Megatron's cosine schedule (in steps): the learning rate step ``step + 1`` trains with."""
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1) * (max_lr - min_lr)


def test_resume_applies_the_current_lr_and_min_lr(tmp_path, first_half_checkpoint):
    # The tiny configuration: --lr 3e-3 --min-lr 3e-4, cosine; the checkpoint is at step 3.
    resumed = run_train(tmp_path, 1, "--train-iters", "6", "--load", first_half_checkpoint,
                        "--lr", "6e-3", "--min-lr", "1e-4", name="new_lr")
    assert [step["lr"] for step in resumed] == pytest.approx(
        [_cosine_lr(6e-3, 1e-4, step) for step in (3, 4, 5)], rel=1e-6)


def test_use_checkpoint_opt_param_scheduler_keeps_the_saved_lr(tmp_path, first_half_checkpoint):
    resumed = run_train(tmp_path, 1, "--train-iters", "6", "--load", first_half_checkpoint,
                        "--lr", "6e-3", "--use-checkpoint-opt_param-scheduler", name="kept_lr")
    assert [step["lr"] for step in resumed] == pytest.approx(
        [_cosine_lr(3e-3, 3e-4, step) for step in (3, 4, 5)], rel=1e-6)


def test_tensor_parallel_checkpoint_resumes_at_tp1(tmp_path, six_step_losses):
    run_train(tmp_path, 2, "--tensor-model-parallel-size", "2", "--train-iters", "6",
              "--exit-interval", "3", name="tp2", save=True)
    resumed = losses(run_train(tmp_path, 1, "--train-iters", "6", "--load",
                               str(tmp_path / "tp2_ckpt"), name="tp1"))
    assert_same_losses(resumed, {i: six_step_losses[i] for i in (4, 5, 6)})


def test_golden_loss_curve(single_rank_run):
    """Catches silent numerical changes: the tiny run's first losses are pinned."""
    assert_golden_losses("tiny_soft_q_losses", single_rank_run)


@pytest.fixture(scope="module")
def mle_entropy_run(tmp_path_factory) -> list[dict]:
    return run_train(tmp_path_factory.mktemp("mle_entropy"), 1, "--irl-loss", "mle_entropy",
                     "--irl-entropy-coef", "0.01")


def test_mle_entropy_golden_loss_curve(mle_entropy_run):
    assert_golden_losses("tiny_mle_entropy_losses", mle_entropy_run)


def test_mle_entropy_baseline_trains_and_logs_entropy(mle_entropy_run):
    steps = mle_entropy_run
    assert all(step["entropy"] > 0 for step in steps)
    # loss = nll - coef * entropy per trained token
    for step in steps:
        assert step["loss"] == pytest.approx(step["nll"] - 0.01 * step["entropy"], rel=1e-5)


def test_lambda_zero_logs_no_td_contribution(tmp_path):
    steps = run_train(tmp_path, 1, "--irl-lambda", "0")
    for step in steps:
        assert step["loss"] == pytest.approx(step["nll"], rel=1e-6)
        assert step["td_squared"] > 0  # still measured, just not trained on


def test_termination_signal_saves_a_checkpoint_and_the_run_resumes_there(tmp_path):
    metrics = tmp_path / "signal.metrics.jsonl"
    save = tmp_path / "signal_ckpt"
    proc = subprocess.Popen(
        train_command(1, [*SHORT_RUN, "--train-iters", "100000", "--save", str(save),
                     "--metrics-file", str(metrics)]),
        cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    stopped_at = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert stopped_at >= 2
    assert f"stopping at iteration {stopped_at}" in output
    resumed = run_train(tmp_path, 1, "--train-iters", str(stopped_at + 2),
                        "--load", str(save), name="after_signal")
    assert [step["iteration"] for step in resumed] == [stopped_at + 1, stopped_at + 2]


def test_async_save_completes_every_save_before_stopping_and_the_run_resumes_there(
        tmp_path, six_step_losses):
    from megatron_irl.core.checkpoint_files import checkpoint_problem

    save = tmp_path / "async_ckpt"
    result = subprocess.run(
        train_command(1, [*SHORT_RUN, "--train-iters", "6", "--exit-interval", "3", "--save",
                          str(save), "--save-interval", "1", "--async-save"]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for iteration in (1, 2, 3):
        assert f"scheduled the save of iteration {iteration} " in output
        assert f"saved checkpoint at iteration {iteration} to {save}/iter_000000{iteration}" in output
        assert checkpoint_problem(str(save / f"iter_000000{iteration}")) is None
    assert output.index("saved checkpoint at iteration 3") < output.index("stopping at iteration 3")
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3\n"
    resumed = losses(run_train(tmp_path, 1, "--train-iters", "6", "--load", str(save),
                               name="after_async"))
    assert_same_losses(resumed, {i: six_step_losses[i] for i in (4, 5, 6)})


def test_invalid_configuration_stops_before_any_process_group(tmp_path):
    result = subprocess.run(
        train_command(2, [*SHORT_RUN, "--global-batch-size", "6", "--micro-batch-size", "4"]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "--global-batch-size" in result.stderr
    assert "init_process_group" not in result.stderr


def test_malformed_training_data_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Q: 1?", "response": " 1"}\n{"prompt": "Q: 2?", "respon\n')
    result = subprocess.run(
        train_command(1, [*SHORT_RUN, "--train-data-path", str(data)]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert f"{data}:2" in result.stderr


def test_lambda_warmup_continues_across_a_resume(tmp_path):
    warm_up = ["--irl-lambda-warmup-iters", "4", "--train-iters", "6"]
    first = run_train(tmp_path, 1, *warm_up, "--exit-interval", "2", name="first", save=True)
    second = run_train(tmp_path, 1, *warm_up, "--load", str(tmp_path / "first_ckpt"),
                       name="second")
    # Step k (1-based) trains with lambda_at(k - 1): 0.1 * (k - 1) / 4, then 0.1.
    assert [step["lambda"] for step in first + second] == pytest.approx(
        [0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


def test_fp16_skips_overflowing_steps_and_lowers_the_loss_scale(tmp_path):
    steps = run_train(tmp_path, 1, "--fp16", "--train-iters", "6")
    scales = [step["loss_scale"] for step in steps]
    # Megatron's dynamic scaler starts at 2**32: the first steps overflow, are skipped, and
    # (after its hysteresis of two overflows) halve the scale.
    assert steps[0]["skipped"] == 1
    assert scales == sorted(scales, reverse=True) and scales[-1] < 2.0**32
    assert all(math.isfinite(step["loss"]) for step in steps)


def _checkpoint_weights(directory: Path) -> dict:
    """The model tensors of a saved iteration, read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    merged = directory.parent / f"{directory.name}.pt"
    dcp_to_torch_save(str(directory), str(merged))
    state = torch.load(merged, weights_only=False)
    return {key: value for key, value in state.items()
            if isinstance(value, torch.Tensor) and not key.startswith(("optimizer", "rng_state"))}


@pytest.fixture(scope="module")
def poisoned_pipeline_run(tmp_path_factory):
    """PP=2, a checkpoint every step, NaN losses in steps 2, 3 and 5..7 (3 in a row stop it)."""
    tmp_path = tmp_path_factory.mktemp("poisoned")
    metrics, save = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    command = train_command(2, [*SHORT_RUN, "--train-iters", "10", "--save", str(save),
                           "--save-interval", "1", "--metrics-file", str(metrics),
                           "--pipeline-model-parallel-size", "2", "--max-nonfinite-steps", "3"])
    module = command.index("megatron_irl")  # run the poisoning script instead
    command[module - 1:module + 2] = [str(REPO / "tests" / "train_with_poisoned_steps.py")]
    result = subprocess.run(command, cwd=REPO, env={**train_env(), "POISONED_STEPS": "2,3,5,6,7"},
                            capture_output=True, text=True, timeout=600)
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    return result, [step for step in steps if step["split"] == "train"], save


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(poisoned_pipeline_run):
    result, steps, _ = poisoned_pipeline_run
    assert result.returncode == 1, result.stderr[-4000:]
    assert ("megatron-irl train: error: steps 5..7 all had a non-finite loss or gradient norm"
            in result.stderr)
    assert "--max-nonfinite-steps 3" in result.stderr
    assert [step["iteration"] for step in steps] == [1, 2, 3, 4, 5, 6, 7]
    assert [step["skipped"] for step in steps] == [0, 1, 1, 0, 1, 1, 1]
    assert [step["nonfinite_steps"] for step in steps] == [0, 1, 2, 2, 3, 4, 5]
    assert [math.isfinite(step["loss"]) for step in steps] == [
        True, False, False, True, False, False, False]
    # The scheduler advances on updates only: step 4 trains with step 2's learning rate.
    assert steps[3]["lr"] == steps[1]["lr"] != steps[0]["lr"]


def test_skipped_steps_leave_every_pipeline_stage_unchanged(poisoned_pipeline_run):
    import torch

    _, _, save = poisoned_pipeline_run
    after_1, after_3, after_4 = (_checkpoint_weights(save / f"iter_{i:07d}") for i in (1, 3, 4))
    # The first stage's embedding, the last one's output layer, and both stages' layers
    # (stacked: layer 0 on stage 0, layer 1 on stage 1).
    assert {"embedding.word_embeddings.weight", "output_layer.weight"} <= after_1.keys()
    assert after_1["decoder.layers.mlp.linear_fc1.weight"].shape[0] == 2
    for name, weight in after_1.items():
        assert torch.equal(after_3[name], weight), name
    assert any(not torch.equal(after_4[name], weight) for name, weight in after_1.items())


def test_nonfinite_stop_saves_nothing_and_leaves_the_marker(poisoned_pipeline_run):
    _, _, save = poisoned_pipeline_run
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6\n"
    assert not (save / "iter_0000007").exists()
    for weight in _checkpoint_weights(save / "iter_0000006").values():
        assert bool(weight.isfinite().all())
