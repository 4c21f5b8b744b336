"""Saves killed at each point, and saves written in the background (``--async-save``), with
real Megatron-Core on CPU (gloo).

The kill tests fork one-rank processes (``_train_and_save_main``) that SIGKILL their process
group (themselves and dist_checkpointing's writer processes) at a chosen point of the save
of iteration 2, then resume in another (``_resume_main``) and compare the losses with an
uninterrupted run's. The background-save scenarios run at two ranks (``run_distributed``)
and compare what a background save wrote with a synchronous save of the same state.
"""

import json
import multiprocessing
import os
import signal
from functools import partial

import pytest
import torch
import torch.distributed as dist
from helpers import CONFIG, GLOBAL_BATCH, build_training, train_step
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_irl.core import checkpoint_files, checkpoint_finalize
from megatron_irl.core.checkpoint import (
    CheckpointError,
    TrainingState,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from megatron_irl.core.checkpoint_finalize import BackgroundSaves
from megatron_irl.cpu_support import enable_cpu_support
from megatron_irl.testing import run_distributed

WORLD_SIZE = 2


# ------------------------------------------------------------ one-rank runs that get killed


def _start_one_rank_world(store_path):
    """A world of one rank in a forked process, leading a session of its own (so that a
    kill of its process group takes dist_checkpointing's helper processes along)."""
    os.setsid()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=0, world_size=1)
    enable_cpu_support()
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)


def _kill_this_process_group():
    os.killpg(0, signal.SIGKILL)


def _cut_a_shard_then_kill(directory):
    # Emulates a kill in the middle of writing a shard: the file system then holds a shard
    # cut short, as here, and no later file of the save.
    shard = os.path.join(directory, "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)
    _kill_this_process_group()


def _write_then_cut_a_shard_and_kill(write, directory, *args, **kwargs):
    """The background writer's function (in the writer process): write, then stand for a
    kill during the write as ``_cut_a_shard_then_kill`` does."""
    write(*args, **kwargs)
    _cut_a_shard_then_kill(directory)


def _arm_kill_point(kill_point):
    """Patch the save path so that this process group is SIGKILLed at ``kill_point``."""
    real_save = dist_checkpointing.save
    real_write, real_manifest = (checkpoint_finalize.write_file_synced,
                                 checkpoint_finalize.write_manifest)
    real_marker_write = checkpoint_files.write_file_synced
    real_replace = checkpoint_finalize.replace_file_atomically

    def save(*args, **kwargs):
        if kill_point == "before the shards":
            _kill_this_process_group()
        request = real_save(*args, **kwargs)
        if kill_point == "in a shard":
            _cut_a_shard_then_kill(args[1])
        if kill_point == "after the shards":
            _kill_this_process_group()
        if kill_point == "in the background write":
            # The writer process kills the group (the training process with it) before it
            # ends, so no finalisation can have started.
            request = request._replace(async_fn=partial(
                _write_then_cut_a_shard_and_kill, request.async_fn, args[1]))
        if kill_point == "before the finalisation":
            # Runs once every rank's writer has ended, before Megatron-Core's finalisation
            # (the .metadata index) and the training state, manifest and marker.
            request.finalize_fns.insert(0, _kill_this_process_group)
        return request

    def write(path, text):
        real_write(path, text)
        if kill_point == "after training_state.json" and path.endswith("training_state.json"):
            _kill_this_process_group()

    def write_manifest(directory):
        real_manifest(directory)
        if kill_point == "after the manifest":
            _kill_this_process_group()

    def write_marker(path, text):
        real_marker_write(path, text)
        if kill_point == "before the marker's rename" and path.endswith(".tmp"):
            _kill_this_process_group()

    def replace(path, text):
        real_replace(path, text)
        if kill_point == "after the marker moved":
            _kill_this_process_group()

    dist_checkpointing.save = save
    checkpoint_finalize.replace_file_atomically = replace
    checkpoint_finalize.write_file_synced = write
    checkpoint_finalize.write_manifest = write_manifest
    checkpoint_files.write_file_synced = write_marker


def _train_and_save_main(directory, store_path, kill_point, losses_path, in_background=False):
    """Train steps 1..4 (dropout 0), saving after steps 1 and 2; with ``kill_point`` the
    save of step 2 is killed there. Writes {step: loss} to ``losses_path`` as it goes.
    ``in_background``: save as the trainer does with --async-save (poll after each step,
    complete a pending save before the next one and at the end)."""
    _start_one_rank_world(store_path)
    chunks, optimizer, scheduler = build_training(dropout=0.0)
    background = BackgroundSaves() if in_background else None
    losses = {}
    for iteration in (1, 2, 3, 4):
        losses[iteration] = train_step(chunks, optimizer, scheduler, iteration)
        with open(losses_path, "w") as file:
            json.dump(losses, file)
        if background is not None:
            background.finalize(blocking=False)
        if iteration <= 2:
            if background is not None:
                background.finalize(blocking=True)
            if iteration == 2 and kill_point is not None:
                _arm_kill_point(kill_point)
            save_checkpoint(directory, TrainingState(iteration, iteration * GLOBAL_BATCH, CONFIG),
                            chunks, optimizer, scheduler, background=background)
    if background is not None:
        background.finalize(blocking=True)


def _resume_main(directory, store_path, result_path):
    """Load the checkpoint the marker names, train on to step 4; writes the loaded
    iteration and {step: loss} to ``result_path``."""
    _start_one_rank_world(store_path)
    chunks, optimizer, scheduler = build_training(dropout=0.0)
    state = load_checkpoint(directory, chunks, optimizer, scheduler)
    losses = {iteration: train_step(chunks, optimizer, scheduler, iteration)
              for iteration in range(state.iteration + 1, 5)}
    with open(result_path, "w") as file:
        json.dump({"loaded": state.iteration, "losses": losses}, file)


def _run_forked(target, *args):
    """Run ``target(*args)`` in a forked process (this one has torch and Megatron imported
    already; a fresh interpreter would spend seconds importing them); its exit code."""
    process = multiprocessing.get_context("fork").Process(target=target, args=args)
    process.start()
    process.join(timeout=300)
    if process.is_alive():
        os.killpg(process.pid, signal.SIGKILL)
        process.join()
        raise TimeoutError(f"{target.__name__} did not finish in 300 s")
    return process.exitcode


def _kill_the_save_then_resume(tmp_path, kill_point, in_background) -> dict:
    """The marker after the killed run, and what the resumed run loaded and its losses."""
    directory = str(tmp_path / "ckpt")
    exit_code = _run_forked(_train_and_save_main, directory, str(tmp_path / "store"),
                            kill_point, str(tmp_path / "losses.json"), in_background)
    assert exit_code == -signal.SIGKILL
    marker = latest_iteration(directory)
    assert _run_forked(_resume_main, directory, str(tmp_path / "store2"),
                       str(tmp_path / "resumed.json")) == 0
    return {"marker": marker, **json.loads((tmp_path / "resumed.json").read_text())}


# --------------------------------------------------------- background saves at two ranks


def _background_and_synchronous_saves(background_dir, synchronous_dir, save_options=None):
    """Train 2 steps; save that state synchronously and in the background (both with
    ``save_options`` for save_checkpoint); train 2 more steps while the background write runs
    (the uninterrupted run) and then finalise it; load it into fresh objects and train the
    same 2 steps (the resumed run)."""
    chunks, optimizer, scheduler = build_training()
    for iteration in (1, 2):
        train_step(chunks, optimizer, scheduler, iteration)
    state = TrainingState(2, 2 * GLOBAL_BATCH, CONFIG)
    save_checkpoint(synchronous_dir, state, chunks, optimizer, scheduler, **(save_options or {}))
    background = BackgroundSaves()
    save_checkpoint(background_dir, state, chunks, optimizer, scheduler, background=background,
                    **(save_options or {}))
    scheduled = {"marker": latest_iteration(background_dir),
                 "pending": background.pending_iterations}
    uninterrupted = [train_step(chunks, optimizer, scheduler, iteration) for iteration in (3, 4)]
    finalized = background.finalize(blocking=True)

    fresh_chunks, fresh_optimizer, fresh_scheduler = build_training()
    load_checkpoint(background_dir, fresh_chunks, fresh_optimizer, fresh_scheduler)
    resumed = [train_step(fresh_chunks, fresh_optimizer, fresh_scheduler, iteration)
               for iteration in (3, 4)]
    return {"scheduled": scheduled, "finalized": finalized,
            "marker": latest_iteration(background_dir),
            "uninterrupted": uninterrupted, "resumed": resumed}


def _background_write_failing_on_rank_1(directory):
    """Train 1 step and save it in the background, rank 1's writer raising; the error that
    finalising raises on this rank, the marker and what is left pending."""
    chunks, optimizer, scheduler = build_training()
    train_step(chunks, optimizer, scheduler, 1)
    real_save = dist_checkpointing.save

    def save_with_a_failing_writer(*args, **kwargs):
        request = real_save(*args, **kwargs)
        if dist.get_rank() == 1:
            request = request._replace(async_fn=_write_fails)
        return request

    background = BackgroundSaves()
    dist_checkpointing.save = save_with_a_failing_writer
    try:
        save_checkpoint(directory, TrainingState(1, GLOBAL_BATCH, CONFIG), chunks, optimizer,
                        scheduler, background=background)
    finally:
        dist_checkpointing.save = real_save
    try:
        background.finalize(blocking=True)
        error = None
    except CheckpointError as raised:
        error = str(raised)
    return {"error": error, "marker": latest_iteration(directory),
            "pending": background.pending_iterations}


def _write_fails(*_args, **_kwargs):
    raise OSError("No space left on device (emulated in the background writer)")


def _saved_tensors(directory) -> dict:
    """Every tensor of a torch_dist checkpoint (model, optimizer, RNG states), read without a
    process group."""
    merged = f"{directory}.pt"
    dcp_to_torch_save(directory, merged)
    return torch.load(merged, weights_only=False)


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory):
    """{step: loss} of steps 1..4 of the run that the killed saves interrupt."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    assert _run_forked(_train_and_save_main, str(tmp_path / "ckpt"), str(tmp_path / "store"),
                       None, str(tmp_path / "losses.json")) == 0
    return json.loads((tmp_path / "losses.json").read_text())


@pytest.mark.parametrize("kill_point, resumed_from", [
    ("before the shards", 1), ("in a shard", 1), ("after the shards", 1),
    ("after training_state.json", 1), ("after the manifest", 1),
    ("before the marker's rename", 1), ("after the marker moved", 2)])
def test_save_killed_at_any_point_resumes_from_a_complete_checkpoint_with_the_same_losses(
        tmp_path, uninterrupted_losses, kill_point, resumed_from):
    result = _kill_the_save_then_resume(tmp_path, kill_point, in_background=False)
    assert result["marker"] == result["loaded"] == resumed_from
    assert result["losses"] == {step: uninterrupted_losses[step] for step in result["losses"]}
    assert list(result["losses"]) == [str(step) for step in range(resumed_from + 1, 5)]


# "in the background write" and "before the finalisation" are the kills a synchronous save
# does not have: the marker must not have moved, although the save call returned long ago.
@pytest.mark.parametrize("kill_point, resumed_from", [
    ("in the background write", 1), ("before the finalisation", 1),
    ("after training_state.json", 1), ("after the marker moved", 2)])
def test_background_save_killed_before_its_finalisation_ends_resumes_from_the_previous_one(
        tmp_path, uninterrupted_losses, kill_point, resumed_from):
    result = _kill_the_save_then_resume(tmp_path, kill_point, in_background=True)
    assert result["marker"] == result["loaded"] == resumed_from
    assert result["losses"] == {step: uninterrupted_losses[step] for step in result["losses"]}
    assert list(result["losses"]) == [str(step) for step in range(resumed_from + 1, 5)]


@pytest.fixture(scope="module")
def background_save(tmp_path_factory):
    """Per-rank results of ``_background_and_synchronous_saves`` at PP=2, and the two
    checkpoint directories."""
    root = tmp_path_factory.mktemp("background_save")
    background_dir, synchronous_dir = root / "background", root / "synchronous"
    results = run_distributed(_background_and_synchronous_saves, WORLD_SIZE, pp=2,
                              args=(str(background_dir), str(synchronous_dir)))
    return results, background_dir / "iter_0000002", synchronous_dir / "iter_0000002"


def test_background_save_writes_the_files_of_a_synchronous_save(background_save):
    _, background, synchronous = background_save
    for name in ("training_state.json", "config.yaml"):
        assert (background / name).read_text() == (synchronous / name).read_text(), name
    written, expected = (json.loads((directory / "manifest.json").read_text())["files"]
                         for directory in (background, synchronous))
    # The torch_dist tensor index records its directory's path and a random save id.
    assert written.pop(".metadata") > 0 and expected.pop(".metadata") > 0
    assert written == expected
    assert any(name.endswith(".distcp") for name in written)


def test_background_save_holds_the_tensors_at_the_save_although_training_went_on(
        background_save):
    _, background, synchronous = background_save
    written, expected = _saved_tensors(str(background)), _saved_tensors(str(synchronous))
    assert written.keys() == expected.keys()
    assert any(key.startswith("optimizer") for key in written)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(written[key], value), key
        else:
            assert written[key] == value, key


def test_background_save_moves_the_marker_only_when_finalized(background_save):
    for rank_result in background_save[0]:
        assert rank_result["scheduled"] == {"marker": None, "pending": [2]}
        assert [iteration for iteration, _ in rank_result["finalized"]] == [2]
        assert rank_result["marker"] == 2


def test_run_resumed_from_a_background_save_continues_with_the_uninterrupted_losses(
        background_save):
    last_stage = background_save[0][1]
    assert len(last_stage["uninterrupted"]) == 2
    assert last_stage["resumed"] == last_stage["uninterrupted"]


def test_background_fully_parallel_save_holds_the_tensors_of_a_synchronous_one_and_resumes(
        tmp_path):
    background, synchronous = tmp_path / "background", tmp_path / "synchronous"
    results = run_distributed(_background_and_synchronous_saves, WORLD_SIZE,
                              args=(str(background), str(synchronous), {"fully_parallel": True}))
    written = _saved_tensors(str(background / "iter_0000002"))
    expected = _saved_tensors(str(synchronous / "iter_0000002"))
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(written[key], value), key
    for rank_result in results:  # DP=2: both ranks train and resume
        assert rank_result["resumed"] == rank_result["uninterrupted"]


def test_failed_background_write_raises_on_every_rank_naming_the_save(tmp_path):
    directory = str(tmp_path / "ckpt")
    for rank_result in run_distributed(_background_write_failing_on_rank_1, WORLD_SIZE,
                                       args=(directory,)):
        assert rank_result["error"].startswith(
            f"the background save of iteration 1 to {directory}/iter_0000001 (--async-save) "
            "failed: ")
        assert "latest_checkpointed_iteration.txt still names the previous one" in \
            rank_result["error"]
        assert rank_result["marker"] is None
        assert rank_result["pending"] == []
