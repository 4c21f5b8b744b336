"""The GPU path's decisions, taken on this CPU machine: device requests, fusions, FP8 recipes,
megatron-core version compatibility, the planner's FP8 and checkpoint-save terms.

The decisions are functions of what a GPU node would report (CUDA present, compute capability,
Transformer Engine's version, the launch environment), so the tests pass those values in as a
cluster would produce them (each names what it stands for). No spawned processes.
"""

import re
import types
from pathlib import Path

import pytest
import torch

from megatron_irl.arguments import parse_train_config
from megatron_irl.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    TrainingConfig,
)
from megatron_irl.core.distributed import DeviceError, init_distributed
from megatron_irl.core.model import HiddenStatesGPTModel, fusion_settings
from megatron_irl.cpu_support import device_problem, fp8_recipe_problem, requested_gpus

REPO = Path(__file__).resolve().parents[1]
HOPPER, ADA, BLACKWELL = (9, 0), (8, 9), (10, 0)


# --- no silent CPU fallback -------------------------------------------------------------------

@pytest.mark.parametrize("env", [
    {"SLURM_GPUS_ON_NODE": "8"},  # sbatch --gpus-per-node=8
    {"SLURM_JOB_GPUS": "0,1,2,3"},  # --gres=gpu:4
    {"SLURM_STEP_GPUS": "0"},
    {"CUDA_VISIBLE_DEVICES": "0"},  # a launcher or container runtime giving GPU 0
])
def test_a_launch_that_asked_for_gpus_stops_when_cuda_is_missing(env):
    problem = device_problem("auto", env, cuda_available=False)
    assert problem is not None and "asked for GPUs" in problem
    assert next(iter(env)) in problem and "--device cpu" in problem


@pytest.mark.parametrize("env", [
    {}, {"SLURM_GPUS_ON_NODE": "0"}, {"CUDA_VISIBLE_DEVICES": ""},
    {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, {"CUDA_VISIBLE_DEVICES": "-1"},
])
def test_a_launch_without_gpus_runs_on_the_cpu(env):
    assert requested_gpus(env) is None
    assert device_problem("auto", env, cuda_available=False) is None


def test_device_cuda_without_cuda_is_an_error_and_device_cpu_overrides_the_request():
    assert "--device cuda" in device_problem("cuda", {}, cuda_available=False)
    assert device_problem("cpu", {"SLURM_GPUS_ON_NODE": "8"}, cuda_available=False) is None
    assert device_problem("cuda", {}, cuda_available=True) is None


def test_init_distributed_refuses_a_gpu_launch_on_this_cpu_machine(monkeypatch):
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")  # stands in for a GPU allocation
    with pytest.raises(DeviceError, match="SLURM_GPUS_ON_NODE=8"):
        init_distributed(ParallelConfig(), seed=0)


def test_device_flag_parses(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    config = parse_train_config(["--train-data-path", str(data), "--device", "cuda"], env={})
    assert config.training.device == "cuda"


# --- fusions --------------------------------------------------------------------------------

def _fusions(on_gpu=True, te=True, softmax=True, weight_grad=True, fusable=True):
    return fusion_settings(on_gpu, te, softmax_kernel=softmax, weight_grad_kernel=weight_grad,
                           fusable_activation=fusable)


def test_fusions_are_on_where_their_kernels_exist():
    assert _fusions() == dict(masked_softmax_fusion=True, bias_activation_fusion=True,
                              gradient_accumulation_fusion=True)
    # Without Apex: TE's GEMMs still fuse gradient accumulation; the local layers cannot,
    # and Megatron's masked softmax has no kernel.
    assert _fusions(softmax=False, weight_grad=False)["gradient_accumulation_fusion"]
    assert _fusions(te=False, softmax=False, weight_grad=False) == dict(
        masked_softmax_fusion=False, bias_activation_fusion=True,
        gradient_accumulation_fusion=False)


def test_fusions_are_off_on_cpus_and_bias_gelu_fusion_needs_a_bias():
    assert not any(_fusions(on_gpu=False).values())
    assert not _fusions(fusable=False)["bias_activation_fusion"]


# --- FP8 recipes ----------------------------------------------------------------------------

def test_fp8_recipe_defaults_are_megatron_lms():
    training = TrainingConfig()
    assert (training.fp8_recipe, training.fp8_param_gather) == ("delayed", False)
    assert (training.fp8_amax_history_len, training.fp8_amax_compute_algo) == (1, "most_recent")


def test_mxfp8_is_refused_on_hopper_with_the_recipes_that_run_there():
    problem = fp8_recipe_problem("mxfp8", HOPPER, "2.8.0")
    assert "Blackwell" in problem and "9.0" in problem and "tensorwise" in problem
    assert fp8_recipe_problem("mxfp8", BLACKWELL, "2.8.0") is None


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_hopper_runs_the_other_recipes(recipe):
    assert fp8_recipe_problem(recipe, HOPPER, "2.8.0+cu12") is None


def test_blockwise_needs_hopper_and_new_transformer_engine():
    assert "Hopper" in fp8_recipe_problem("blockwise", ADA, "2.8.0")
    assert "2.3" in fp8_recipe_problem("blockwise", HOPPER, "2.2.1")


@pytest.mark.parametrize("training, message", [
    (dict(fp8_recipe="tensorwise"), "--fp8-recipe tensorwise: must be left at its default "
                                    "without --fp8-format"),
    (dict(fp8_param_gather=True), "--fp8-param-gather: must be left at its default"),
    (dict(bf16=True, fp8_format="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=1024),
     "--fp8-amax-history-len 1024: must be left at its default unless --fp8-recipe delayed"),
])
def test_fp8_flag_combinations_are_validated(training, message):
    with pytest.raises(ConfigError, match=message):
        TrainingConfig(**training)


def test_fp8_param_gather_needs_the_distributed_optimizer():
    training = TrainingConfig(bf16=True, fp8_format="hybrid", fp8_param_gather=True)
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --use-distributed-optimizer"):
        TrainConfig(training=training)
    TrainConfig(training=training, parallel=ParallelConfig(use_distributed_optimizer=True))


def test_fp8_needs_transformer_engine_layers():
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine"):
        TrainConfig.from_dict({"model": {"transformer_impl": "local"},
                               "training": {"bf16": True, "fp8_format": "hybrid"}})


# --- megatron-core versions -----------------------------------------------------------------

@pytest.mark.parametrize("argument, value", [
    ("output_processor", print),  # megatron-core 0.18
    ("is_spec_decode", True),  # 0.17
    ("labels", torch.zeros(2, 3, dtype=torch.long)),
])
def test_fused_output_model_refuses_postprocess_arguments_it_cannot_honour(argument, value):
    last_stage = types.SimpleNamespace(post_process=True, mtp_process=False)
    with pytest.raises(NotImplementedError, match=argument):
        HiddenStatesGPTModel._postprocess(last_stage, torch.zeros(3, 2, 4), padding_mask=None,
                                          **{argument: value})


# --- the planner follows the FP8 choices ------------------------------------------------------

def _stage0(checkpoint=None, **training):
    from megatron_irl.planning.memory_estimate import estimate_memory

    cfg = TrainConfig.from_dict({
        "checkpoint": checkpoint or {},
        "model": {"num_layers": 4, "hidden_size": 1024, "num_attention_heads": 8, "swiglu": True,
                  "transformer_impl": "transformer_engine"},
        "parallel": {"use_distributed_optimizer": True},
        "training": {"bf16": True, "micro_batch_size": 1, "global_batch_size": 8, **training}})
    return estimate_memory(cfg, padded_vocab=32768, data_parallel=8)[0]


def test_plan_counts_fp8_weights_gathered_in_fp8_one_byte_smaller_each():
    from megatron_irl.planning.memory_estimate import _layer_linear_weights

    plain = _stage0(fp8_format="hybrid")
    gathered = _stage0(fp8_format="hybrid", fp8_param_gather=True)
    linear = 4 * _layer_linear_weights(ModelConfig(num_layers=4, hidden_size=1024,
                                                   num_attention_heads=8, swiglu=True), 1)
    assert plain.weights - gathered.weights == linear  # bf16 (2 bytes) -> FP8 (1 byte)
    assert plain.fp8_weight_cache - gathered.fp8_weight_cache == linear  # only the transpose
    assert plain.fp8_weight_cache == 2 * linear


def test_plan_counts_mxfp8_scales():
    delayed, mx = _stage0(fp8_format="hybrid"), _stage0(fp8_format="hybrid", fp8_recipe="mxfp8")
    assert mx.fp8_weight_cache == delayed.fp8_weight_cache + delayed.fp8_weight_cache // 32


# --- checkpoint I/O -------------------------------------------------------------------------

def test_plan_counts_the_host_memory_of_a_distributed_optimizer_save():
    stage = _stage0()  # --use-distributed-optimizer, bf16
    assert stage.save_host == stage.parameters * 12  # fp32 main weights + two Adam moments
    assert stage.save_host == stage.optimizer_replicated  # the whole state, not its DP shard


def test_plan_counts_one_data_parallel_shard_for_a_dp_reshardable_save():
    fully = _stage0()
    dp_shards = _stage0(checkpoint={"dist_ckpt_optim_fully_reshardable": False})
    assert dp_shards.save_host == dp_shards.optimizer_sharded  # this rank's shard only
    assert dp_shards.save_host * 8 == fully.save_host  # DP = 8


def test_plan_counts_the_host_copy_a_background_save_holds():
    synchronous = _stage0()
    background = _stage0(checkpoint={"async_save": True, "save": "ckpt"})
    assert background.save_host == synchronous.save_host + background.weights
    spread = _stage0(checkpoint={"async_save": True, "save": "ckpt",
                                 "ckpt_fully_parallel_save": True})
    assert spread.save_host == synchronous.save_host + -(-background.weights // 8)  # DP = 8


def test_plan_prints_the_host_memory_of_a_save_per_node(capsys, monkeypatch):
    from megatron_irl.commands import plan

    monkeypatch.chdir(REPO)
    assert plan.main(["--config", "examples/recipes/llama3-8b.yaml", "--nodes", "1",
                      "--gpus-per-node", "8", "--vocab-size", "128256"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("checkpoint"))
    per_gpu, per_node = (float(x) for x in re.findall(r"([\d.]+) GiB per (?:GPU|node)", line))
    assert per_node == pytest.approx(8 * per_gpu, abs=0.05) and per_gpu > 40  # 8B at TP 2 (rounded)


def test_plan_prints_a_quarter_of_the_save_memory_for_dp_reshardable_at_dp4(capsys, monkeypatch):
    from megatron_irl.commands import plan

    monkeypatch.chdir(REPO)
    per_gpu = {}
    for fully_reshardable in ("true", "false"):
        assert plan.main(["--config", "examples/recipes/llama3-8b.yaml", "--nodes", "1",
                          "--gpus-per-node", "8", "--vocab-size", "128256",
                          "--dist-ckpt-optim-fully-reshardable", fully_reshardable]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines()
                    if line.startswith("checkpoint"))
        per_gpu[fully_reshardable] = float(re.search(r"([\d.]+) GiB per GPU", line).group(1))
    # 8 GPUs at TP 2: DP 4.
    assert per_gpu["false"] == pytest.approx(per_gpu["true"] / 4, abs=0.01)


def test_distributed_timeout_reaches_the_process_group(monkeypatch):
    from megatron_irl.core import distributed

    seen = {}

    def record_and_stop(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stopped at init_process_group")

    monkeypatch.setattr(distributed.dist, "init_process_group", record_and_stop)
    with pytest.raises(RuntimeError, match="stopped at init_process_group"):
        distributed.init_distributed(ParallelConfig(distributed_timeout_minutes=45), seed=0)
    assert seen["timeout"].total_seconds() == 45 * 60


def test_train_command_reports_a_gpu_launch_without_cuda_as_an_error(monkeypatch, capsys, tmp_path):
    from megatron_irl.commands.train import main

    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # stands in for a launcher's GPU binding
    assert main(["--train-data-path", str(data)]) == 1
    assert "asked for GPUs (CUDA_VISIBLE_DEVICES=0,1)" in capsys.readouterr().err
