"""save_checkpoint / load_checkpoint with real Megatron-Core on CPU (gloo, two ranks).

Each scenario builds what the trainer builds: a tiny GPTModel (local spec, 2 layers,
hidden 64, 4 heads, vocab 128, seq 16) in Megatron's DistributedDataParallel, fp32 Adam
from ``get_megatron_optimizer`` and an ``OptimizerParamScheduler``. Scenarios run in the
spawned workers of ``run_distributed``; a module-scoped fixture runs each once and the
tests assert one behaviour each on its results. Saves killed at each point, and background
saves (``--async-save``), are tested in ``test_checkpoint_crash.py``.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from helpers import CONFIG, GLOBAL_BATCH, build_training, microbatches, train_step
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.optimizer import distrib_optimizer

from megatron_irl.core.checkpoint import (
    CheckpointError,
    TrainingState,
    iteration_dir,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from megatron_irl.core.checkpoint_files import choose_iteration, remove_old_checkpoints
from megatron_irl.testing import run_distributed
from megatron_irl.training.nonfinite import weights_are_finite

WORLD_SIZE = 2


# ---------------------------------------------------------------- run on the workers


def _advance_rngs_by_rank():
    """Draw rank+1 numbers from every RNG stream, so that ranks' states differ and a
    checkpoint that mixed them up would be caught."""
    draws = dist.get_rank() + 1
    for _ in range(draws):
        random.random()
    np.random.rand(draws)
    torch.rand(draws)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(draws)


def _rng_draws():
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracker_draw = torch.rand(3)
    return {"python": random.random(), "numpy": np.random.rand(3), "torch": torch.rand(3),
            "tracker": tracker_draw, "gauss": random.gauss(0, 1)}


def _adam_moments(optimizer):
    """[(exp_avg, exp_avg_sq, step)] of every parameter, in parameter order."""
    moments = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.optimizer.state[param]
            moments.append((state["exp_avg"].clone(), state["exp_avg_sq"].clone(),
                            float(state["step"])))
    return moments


def _continue_training(chunks, optimizer, scheduler, first_iteration):
    losses = [train_step(chunks, optimizer, scheduler, it)
              for it in (first_iteration, first_iteration + 1)]
    return {"losses": losses, "lr": optimizer.param_groups[0]["lr"], "rng": _rng_draws()}


def _round_trip(directory, save_options=None):
    """Train 2 steps, save (with ``save_options`` for save_checkpoint), train 2 more (the
    uninterrupted run); then load into a freshly initialised model and train the same 2
    steps (the resumed run)."""
    chunks, optimizer, scheduler = build_training()
    _advance_rngs_by_rank()
    for iteration in (1, 2):
        train_step(chunks, optimizer, scheduler, iteration)
    save_checkpoint(directory, TrainingState(2, 2 * GLOBAL_BATCH, CONFIG),
                    chunks, optimizer, scheduler, **(save_options or {}))
    saved = {"moments": _adam_moments(optimizer), "scheduler": scheduler.state_dict()}
    uninterrupted = _continue_training(chunks, optimizer, scheduler, 3)

    fresh_chunks, fresh_optimizer, fresh_scheduler = build_training()
    state = load_checkpoint(directory, fresh_chunks, fresh_optimizer, fresh_scheduler)
    loaded = {"moments": _adam_moments(fresh_optimizer),
              "scheduler": fresh_scheduler.state_dict()}
    resumed = _continue_training(fresh_chunks, fresh_optimizer, fresh_scheduler, 3)
    return {"state": state, "saved": saved, "loaded": loaded,
            "uninterrupted": uninterrupted, "resumed": resumed}


def _eval_logits(chunks):
    """Full logits [b, s, v] (gathered over TP) of a fixed batch, dropout off."""
    model = chunks[0].module
    batch = microbatches(0, 1)[0]
    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, v/tp]
    model.train()
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def _global_weights(chunks):
    """{name: tensor} of this rank's chunks, layers named by their global index."""
    weights = {}
    for chunk in chunks:
        renames = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
                   for i, layer in enumerate(chunk.module.decoder.layers)}
        for name, param in chunk.module.named_parameters():
            prefix = next((p for p in renames if name.startswith(p)), None)
            global_name = renames[prefix] + name[len(prefix):] if prefix else name
            weights[global_name] = param.detach().clone()
    return weights


def _save_then_step(directory, num_layers, observe):
    """Train 1 step and save; ``observe(chunks)`` at the save and after one more step."""
    chunks, optimizer, scheduler = build_training(dropout=0.0, num_layers=num_layers)
    train_step(chunks, optimizer, scheduler, 1)
    save_checkpoint(directory, TrainingState(1, GLOBAL_BATCH, CONFIG), chunks, optimizer, scheduler)
    at_save = observe(chunks)
    train_step(chunks, optimizer, scheduler, 2)
    return {"at_save": at_save, "after_step": observe(chunks)}


def _load_then_step(directory, num_layers, observe):
    """Load into freshly initialised objects; ``observe(chunks)`` before and after loading
    and after one more step."""
    chunks, optimizer, scheduler = build_training(dropout=0.0, num_layers=num_layers)
    fresh = observe(chunks)
    load_checkpoint(directory, chunks, optimizer, scheduler)
    at_save = observe(chunks)
    train_step(chunks, optimizer, scheduler, 2)
    return {"fresh": fresh, "at_save": at_save, "after_step": observe(chunks)}


class _SimulatedCrash(Exception):
    pass


def _save_that_fails_after_the_shards(directory):
    """Save iteration 1; make the save of iteration 2 fail on every rank right after
    dist_checkpointing wrote its shards; load; save iteration 2 again, twice."""
    chunks, optimizer, scheduler = build_training()
    train_step(chunks, optimizer, scheduler, 1)
    save_checkpoint(directory, TrainingState(1, GLOBAL_BATCH, CONFIG), chunks, optimizer, scheduler)
    weights_at_1 = _global_weights(chunks)
    train_step(chunks, optimizer, scheduler, 2)
    state_at_2 = TrainingState(2, 2 * GLOBAL_BATCH, CONFIG)

    real_save = dist_checkpointing.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _SimulatedCrash()

    dist_checkpointing.save = save_then_crash
    try:
        save_checkpoint(directory, state_at_2, chunks, optimizer, scheduler)
        crashed = False
    except _SimulatedCrash:
        crashed = True
    finally:
        dist_checkpointing.save = real_save
    dist.barrier()  # every rank has looked at the files before rank 0 saves again
    after_crash = {"marker": latest_iteration(directory),
                   "partial_files": sorted(os.listdir(iteration_dir(directory, 2)))}
    dist.barrier()

    fresh_chunks, fresh_optimizer, fresh_scheduler = build_training()
    loaded_iteration = load_checkpoint(
        directory, fresh_chunks, fresh_optimizer, fresh_scheduler).iteration
    loaded_weights = _global_weights(fresh_chunks)

    resaved_dir = save_checkpoint(directory, state_at_2, chunks, optimizer, scheduler)
    state_file = os.path.join(resaved_dir, "training_state.json")
    written_at = os.stat(state_file).st_mtime_ns
    dist.barrier()
    again_dir = save_checkpoint(directory, state_at_2, chunks, optimizer, scheduler)
    return {
        "crashed": crashed,
        "after_crash": after_crash,
        "loaded_iteration": loaded_iteration,
        "loaded_weights_match": weights_at_1.keys() == loaded_weights.keys() and all(
            torch.equal(weights_at_1[name], weight) for name, weight in loaded_weights.items()),
        "marker_after_resave": latest_iteration(directory),
        "resaved_files": sorted(os.listdir(resaved_dir)),
        "saved_again": (again_dir == resaved_dir, os.stat(state_file).st_mtime_ns != written_at),
    }


def _save_before_the_first_step_then_load(directory):
    """Save a never-stepped optimizer, load it into fresh objects, then take a step."""
    chunks, optimizer, scheduler = build_training()
    save_checkpoint(directory, TrainingState(0, 0, CONFIG), chunks, optimizer, scheduler)
    fresh_chunks, fresh_optimizer, fresh_scheduler = build_training()
    load_checkpoint(directory, fresh_chunks, fresh_optimizer, fresh_scheduler)
    return train_step(fresh_chunks, fresh_optimizer, fresh_scheduler, 1)


def _save_and_load_distributed_optimizer(directory):
    """Save with the distributed optimizer; load with its state (the error) and without."""
    chunks, optimizer, scheduler = build_training(distributed_optimizer=True)
    train_step(chunks, optimizer, scheduler, 1)
    save_checkpoint(directory, TrainingState(1, GLOBAL_BATCH, CONFIG), chunks, optimizer, scheduler)
    fresh_chunks, fresh_optimizer, fresh_scheduler = build_training(distributed_optimizer=True)
    try:
        load_checkpoint(directory, fresh_chunks, fresh_optimizer, fresh_scheduler)
        error = None
    except CheckpointError as raised:
        error = str(raised)
    load_checkpoint(directory, fresh_chunks, fresh_optimizer, fresh_scheduler,
                    load_optimizer=False)
    return {"error": error, "weights_loaded": all(
        torch.equal(weight, _global_weights(fresh_chunks)[name])
        for name, weight in _global_weights(chunks).items())}


def _fully_parallel_round_trip_then_dp_reshardable_save(round_trip_dir, dp_reshardable_dir):
    """At DP=2: the round trip saved with --ckpt-fully-parallel-save; then a distributed
    optimizer saved in the dp_reshardable format, loaded back in the same layout."""
    round_trip = _round_trip(round_trip_dir, {"fully_parallel": True})
    chunks, optimizer, scheduler = build_training(distributed_optimizer=True)
    train_step(chunks, optimizer, scheduler, 1)
    save_checkpoint(dp_reshardable_dir, TrainingState(1, GLOBAL_BATCH, CONFIG), chunks, optimizer,
                    scheduler, optimizer_fully_reshardable=False)
    fresh_chunks, fresh_optimizer, fresh_scheduler = build_training(distributed_optimizer=True)
    try:
        load_checkpoint(dp_reshardable_dir, fresh_chunks, fresh_optimizer, fresh_scheduler)
        same_layout_error = None
    except CheckpointError as raised:
        same_layout_error = str(raised)
    return {"round_trip": round_trip, "same_layout_error": same_layout_error}


def _load_with_optimizer_state(directory):
    chunks, optimizer, scheduler = build_training(distributed_optimizer=True)
    try:
        load_checkpoint(directory, chunks, optimizer, scheduler)
    except CheckpointError as raised:
        return str(raised)
    return None


def _load_iteration(directory, hidden_size=64):
    chunks, optimizer, scheduler = build_training(hidden_size=hidden_size)
    return load_checkpoint(directory, chunks, optimizer, scheduler).iteration


def _saved_twice(root, keep_last):
    """Save iterations 1, 2 (and 3) of one model under ``root``."""
    chunks, optimizer, scheduler = build_training()
    train_step(chunks, optimizer, scheduler, 1)
    for iteration in (1, 2, 3):
        if iteration == 3 and keep_last is None:
            break
        save_checkpoint(root, TrainingState(iteration, iteration * GLOBAL_BATCH, CONFIG),
                        chunks, optimizer, scheduler, keep_last=keep_last)


def _weights_finite_before_and_after_one_nan_on_rank_1():
    chunks, _, _ = build_training()
    before = weights_are_finite(chunks)
    if dist.get_rank() == 1:
        with torch.no_grad():
            next(chunks[0].parameters()).view(-1)[0] = float("nan")
    return before, weights_are_finite(chunks)


def _load_damaged(root, ckpt_step):
    chunks, optimizer, scheduler = build_training()
    return load_checkpoint(root, chunks, optimizer, scheduler, ckpt_step=ckpt_step).iteration


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """The round trip at PP=2 (one layer per stage); per-rank results and the directory."""
    directory = str(tmp_path_factory.mktemp("round_trip"))
    return run_distributed(_round_trip, WORLD_SIZE, pp=2, args=(directory,)), directory


def test_resumed_run_continues_with_the_uninterrupted_losses(round_trip):
    results, _ = round_trip
    last_stage = results[1]
    assert len(last_stage["uninterrupted"]["losses"]) == 2
    assert last_stage["resumed"]["losses"] == last_stage["uninterrupted"]["losses"]


def test_load_restores_adam_moments_and_scheduler_exactly(round_trip):
    for rank_result in round_trip[0]:
        saved, loaded = rank_result["saved"], rank_result["loaded"]
        assert loaded["scheduler"] == saved["scheduler"]
        assert saved["scheduler"]["num_steps"] == 2 * GLOBAL_BATCH
        assert len(loaded["moments"]) == len(saved["moments"]) > 0
        for (avg, avg_sq, step), (saved_avg, saved_avg_sq, saved_step) in zip(
                loaded["moments"], saved["moments"]):
            assert torch.equal(avg, saved_avg) and torch.equal(avg_sq, saved_avg_sq)
            assert step == saved_step == 2
        assert rank_result["resumed"]["lr"] == rank_result["uninterrupted"]["lr"]


def test_load_restores_every_ranks_own_rng_streams(round_trip):
    results, _ = round_trip
    for rank_result in results:
        resumed, uninterrupted = rank_result["resumed"]["rng"], rank_result["uninterrupted"]["rng"]
        assert resumed.keys() == uninterrupted.keys()
        for name, draw in uninterrupted.items():
            np.testing.assert_array_equal(resumed[name], draw, err_msg=name)
    # The ranks' streams were advanced differently before the save.
    assert results[0]["resumed"]["rng"]["python"] != results[1]["resumed"]["rng"]["python"]


def test_load_returns_the_saved_training_state(round_trip):
    for rank_result in round_trip[0]:
        state = rank_result["state"]
        assert (state.iteration, state.consumed_samples, state.config) == (
            2, 2 * GLOBAL_BATCH, CONFIG)


def test_save_writes_config_yaml_and_marker_naming_the_iteration(round_trip):
    _, directory = round_trip
    with open(os.path.join(iteration_dir(directory, 2), "config.yaml")) as file:
        assert yaml.safe_load(file) == CONFIG
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt")) as file:
        assert file.read() == "2\n"
    assert latest_iteration(directory) == 2


@pytest.fixture(scope="module")
def tp2_to_tp1(tmp_path_factory):
    """2 layers saved at TP=2 and loaded at TP=1 (DP=2); full logits of a fixed batch."""
    directory = str(tmp_path_factory.mktemp("tp2_to_tp1"))
    args = (directory, 2, _eval_logits)
    at_tp2 = run_distributed(_save_then_step, WORLD_SIZE, tp=2, seed=1, args=args)
    return at_tp2[0], run_distributed(_load_then_step, WORLD_SIZE, seed=2, args=args)


def test_tp2_checkpoint_loads_at_tp1_with_identical_outputs(tp2_to_tp1):
    at_tp2, at_tp1 = tp2_to_tp1
    for rank_result in at_tp1:
        assert not torch.allclose(rank_result["fresh"], at_tp2["at_save"])
        torch.testing.assert_close(rank_result["at_save"], at_tp2["at_save"], rtol=1e-5, atol=1e-6)


def test_tp2_optimizer_state_resumes_at_tp1_with_the_same_next_step(tp2_to_tp1):
    at_tp2, at_tp1 = tp2_to_tp1
    assert not torch.allclose(at_tp2["after_step"], at_tp2["at_save"])
    for rank_result in at_tp1:
        torch.testing.assert_close(rank_result["after_step"], at_tp2["after_step"],
                                   rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def interrupted_save(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("interrupted_save"))
    return run_distributed(_save_that_fails_after_the_shards, WORLD_SIZE, args=(directory,))


def test_save_failing_after_its_shards_leaves_the_marker_at_the_previous_one(interrupted_save):
    for result in interrupted_save:
        assert result["crashed"]
        assert result["after_crash"]["marker"] == 1
        # dist_checkpointing had finished: a directory it would accept, but unmarked.
        assert "metadata.json" in result["after_crash"]["partial_files"]
        assert "training_state.json" not in result["after_crash"]["partial_files"]


def test_load_after_a_failed_save_restores_the_previous_checkpoint(interrupted_save):
    for result in interrupted_save:
        assert result["loaded_iteration"] == 1
        assert result["loaded_weights_match"]


def test_saving_the_iteration_of_a_failed_save_again_completes_it(interrupted_save):
    for result in interrupted_save:
        assert result["marker_after_resave"] == 2
        assert {"training_state.json", "config.yaml", "metadata.json"} <= set(
            result["resaved_files"])


def test_saving_the_latest_iteration_again_writes_nothing(interrupted_save):
    for result in interrupted_save:
        assert result["saved_again"] == (True, False)


def test_checkpoint_saved_before_the_first_step_loads_with_a_fresh_optimizer(tmp_path):
    losses = run_distributed(_save_before_the_first_step_then_load, WORLD_SIZE,
                             args=(str(tmp_path),))
    assert all(len(rank_losses) == 1 and np.isfinite(rank_losses[0]) for rank_losses in losses)


@pytest.fixture(scope="module")
def interleaved_to_tp1(tmp_path_factory):
    """4 layers saved at PP=2 x 2 virtual stages (model0/model1), loaded at PP=1 (DP=2);
    the weights, merged over the pipeline stages."""
    directory = str(tmp_path_factory.mktemp("interleaved_to_tp1"))
    args = (directory, 4, _global_weights)
    stages = run_distributed(_save_then_step, WORLD_SIZE, pp=2, vpp=2, seed=1, args=args)
    merged = {key: {**stages[0][key], **stages[1][key]} for key in ("at_save", "after_step")}
    return merged, run_distributed(_load_then_step, WORLD_SIZE, seed=2, args=args)


def test_interleaved_pipeline_checkpoint_loads_unpipelined_with_identical_weights(
        interleaved_to_tp1):
    saved, loaded = interleaved_to_tp1
    for rank_result in loaded:
        assert "decoder.layers.3.mlp.linear_fc2.weight" in rank_result["at_save"]
        assert not torch.equal(rank_result["fresh"]["embedding.word_embeddings.weight"],
                               saved["at_save"]["embedding.word_embeddings.weight"])
        for name, weight in rank_result["at_save"].items():
            assert torch.equal(weight, saved["at_save"][name]), name


def test_interleaved_pipeline_optimizer_state_resumes_unpipelined(interleaved_to_tp1):
    saved, loaded = interleaved_to_tp1
    for rank_result in loaded:
        for name, weight in rank_result["after_step"].items():
            torch.testing.assert_close(weight, saved["after_step"][name], rtol=1e-5, atol=1e-6,
                                       msg=name)


@pytest.mark.skipif(distrib_optimizer.HAVE_APEX_OR_TE, reason="a fused Adam loads this state")
def test_distributed_optimizer_on_torch_adam_loads_only_without_its_optimizer_state(tmp_path):
    for result in run_distributed(_save_and_load_distributed_optimizer, WORLD_SIZE,
                                  args=(str(tmp_path),)):
        assert "--no-load-optim" in result["error"]
        assert result["weights_loaded"]


@pytest.fixture(scope="module")
def save_options_at_dp2(tmp_path_factory):
    """Per-rank results of ``_fully_parallel_round_trip_then_dp_reshardable_save`` at DP=2
    and its two directories."""
    round_trip_dir = str(tmp_path_factory.mktemp("fully_parallel"))
    dp_reshardable_dir = str(tmp_path_factory.mktemp("dp_reshardable"))
    results = run_distributed(_fully_parallel_round_trip_then_dp_reshardable_save, WORLD_SIZE,
                              args=(round_trip_dir, dp_reshardable_dir))
    return results, round_trip_dir, dp_reshardable_dir


def test_fully_parallel_save_resumes_with_the_uninterrupted_losses(save_options_at_dp2):
    results, _, _ = save_options_at_dp2
    for rank_result in results:
        round_trip = rank_result["round_trip"]
        assert len(round_trip["uninterrupted"]["losses"]) == 2
        assert round_trip["resumed"]["losses"] == round_trip["uninterrupted"]["losses"]


def test_fully_parallel_save_spreads_the_replicated_weights_over_the_data_parallel_ranks(
        save_options_at_dp2):
    _, round_trip_dir, _ = save_options_at_dp2
    directory = iteration_dir(round_trip_dir, 2)
    sizes = {rank: sum(os.path.getsize(os.path.join(directory, name))
                       for name in os.listdir(directory)
                       if name.startswith(f"__{rank}_") and name.endswith(".distcp"))
             for rank in range(WORLD_SIZE)}
    # Without the wrapper rank 1 writes only its RNG states (weights and Adam moments are
    # replicated over DP and written by DP rank 0): about 40 KiB of 1.6 MiB.
    assert min(sizes.values()) > sum(sizes.values()) / 4, sizes


def test_dp_reshardable_format_reaches_megatron_core_and_the_training_state(save_options_at_dp2):
    _, _, dp_reshardable_dir = save_options_at_dp2
    directory = iteration_dir(dp_reshardable_dir, 1)
    common = dist_checkpointing.load_common_state_dict(directory)
    assert common["optimizer"]["param_state_sharding_type"] == "dp_reshardable"
    with open(os.path.join(directory, "training_state.json")) as file:
        assert json.load(file)["optimizer_format"] == "dp_reshardable"


@pytest.mark.skipif(distrib_optimizer.HAVE_APEX_OR_TE, reason="a fused Adam loads this state")
def test_dp_reshardable_state_in_the_saved_layout_passes_the_layout_check(save_options_at_dp2):
    for rank_result in save_options_at_dp2[0]:
        # The torch-Adam refusal comes after the layout check (and only on CPU).
        assert "torch.optim.Adam" in rank_result["same_layout_error"]


def test_dp_reshardable_state_refuses_another_layout_naming_the_flag_and_saved_sizes(
        save_options_at_dp2):
    _, _, dp_reshardable_dir = save_options_at_dp2
    for error in run_distributed(_load_with_optimizer_state, WORLD_SIZE, tp=2,
                                 args=(dp_reshardable_dir,)):
        assert "--dist-ckpt-optim-fully-reshardable" in error
        assert "data_parallel_size 2 (this run 1)" in error
        assert "tensor_model_parallel_size 1 (this run 2)" in error
        assert "--no-load-optim" in error


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Iterations 1 and 2 saved at two ranks (two shard files), and the same with a third
    saved under --keep-last-checkpoints 2."""
    root = tmp_path_factory.mktemp("two_checkpoints")
    run_distributed(_saved_twice, WORLD_SIZE, args=(str(root / "all"), None))
    run_distributed(_saved_twice, WORLD_SIZE, args=(str(root / "keep2"), 2))
    return root


def _damaged_copy(two_checkpoints, tmp_path, file_name):
    """A copy of the two checkpoints with ``file_name`` of iteration 2 cut in half."""
    root = tmp_path / "damaged"
    shutil.copytree(two_checkpoints / "all", root)
    path = root / "iter_0000002" / file_name
    os.truncate(path, os.path.getsize(path) // 2)
    return str(root)


@pytest.mark.parametrize("file_name", ["__1_0.distcp", ".metadata", "common.pt",
                                       "training_state.json"])
def test_damaged_latest_checkpoint_names_iteration_file_and_fallback(
        two_checkpoints, tmp_path, file_name):
    root = _damaged_copy(two_checkpoints, tmp_path, file_name)
    with pytest.raises(CheckpointError) as raised:
        choose_iteration(root)
    message = str(raised.value)
    assert f"{iteration_dir(root, 2)} (iteration 2" in message
    assert f"unusable: {file_name}: " in message
    assert "the newest usable checkpoint is iteration 1: load it with --ckpt-step 1" in message


def test_save_writes_a_manifest_of_every_file_and_its_size(two_checkpoints):
    directory = two_checkpoints / "all" / "iter_0000002"
    manifest = json.loads((directory / "manifest.json").read_text())["files"]
    on_disk = {path.name: path.stat().st_size for path in directory.iterdir()
               if path.name != "manifest.json"}
    assert manifest == on_disk
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt",
            "training_state.json"} <= manifest.keys()


def test_load_of_a_damaged_checkpoint_raises_on_every_rank_and_ckpt_step_loads_another(
        two_checkpoints, tmp_path):
    root = _damaged_copy(two_checkpoints, tmp_path, "common.pt")
    with pytest.raises(CheckpointError, match="--ckpt-step 1"):
        run_distributed(_load_damaged, WORLD_SIZE, args=(root, None))
    assert run_distributed(_load_damaged, WORLD_SIZE, args=(root, 1)) == [1, 1]


def test_ckpt_step_of_a_missing_iteration_names_the_newest_usable_one(two_checkpoints):
    with pytest.raises(CheckpointError, match=r"iteration 7, chosen by --ckpt-step 7\) is "
                       r"unusable: the directory does not exist; the newest usable "
                       r"checkpoint is iteration 2"):
        choose_iteration(str(two_checkpoints / "all"), 7)


def test_keep_last_checkpoints_deletes_only_older_ones(two_checkpoints):
    root = two_checkpoints / "keep2"
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000003",
                                        "latest_checkpointed_iteration.txt"]


def test_keep_last_never_deletes_the_newest_usable_checkpoint(two_checkpoints, tmp_path):
    root = _damaged_copy(two_checkpoints, tmp_path, "common.pt")  # 2 is marked but damaged
    assert remove_old_checkpoints(root, keep_last=1) == []
    assert sorted(os.listdir(root))[:2] == ["iter_0000001", "iter_0000002"]


def test_load_without_a_checkpoint_names_the_load_flag_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"--load {tmp_path}: nothing to load")):
        run_distributed(_load_iteration, WORLD_SIZE, args=(str(tmp_path),))


def test_load_into_a_different_hidden_size_names_the_differing_fields(round_trip):
    _, directory = round_trip
    with pytest.raises(CheckpointError) as raised:
        run_distributed(_load_iteration, WORLD_SIZE, args=(directory, 128))
    message = str(raised.value)
    assert "hidden_size (--hidden-size): checkpoint 64, this run 128" in message
    assert "ffn_hidden_size (--ffn-hidden-size): checkpoint 256, this run 512" in message
    assert "num_layers" not in message


def test_one_nan_weight_on_one_rank_is_seen_by_every_rank_before_a_save():
    assert run_distributed(_weights_finite_before_and_after_one_nan_on_rank_1, WORLD_SIZE) == [
        (True, False), (True, False)]


def test_latest_iteration_is_none_without_a_marker(tmp_path):
    assert latest_iteration(str(tmp_path)) is None
    assert latest_iteration(str(tmp_path / "missing")) is None
