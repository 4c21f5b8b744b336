"""The ``megatron-irl`` command line: one dispatcher over the commands package, flags with help,
and the layout rule ``megatron-irl plan`` and the trainer's start share."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from megatron_irl.commands import COMMANDS, convert
from megatron_irl.config import ConfigError, TrainConfig
from megatron_irl.core.checkpoint_files import (FORMAT_VERSION, STATE_FILENAME,
                                                TRACKER_FILENAME, iteration_dir)
from megatron_irl.core.vocabulary import check_vocab_padding, padded_vocab_size
from megatron_irl.evaluation.options import EvalOptions, RewardsOptions
from helpers import REPO, train_command, train_env


def _megatron_irl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_irl", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_including_convert_and_preprocess():
    result = _megatron_irl("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "rewards", "plan", "convert", "preprocess"):
        assert f"\n  {command} " in result.stdout, command
    assert set(COMMANDS) == {"train", "eval", "rewards", "plan", "convert", "preprocess"}


def test_unknown_command_exits_2_naming_it():
    result = _megatron_irl("fine-tune")
    assert result.returncode == 2
    assert "unknown command 'fine-tune'" in result.stderr


def test_convert_needs_a_direction(capsys):
    assert convert.main([]) == 2
    assert "from-hf" in capsys.readouterr().err
    assert convert.main(["--help"]) == 0


def test_convert_to_hf_exports_the_iteration_ckpt_step_names(tmp_path, capsys):
    assert convert.main(["to-hf", "--load", str(tmp_path), "--output", str(tmp_path / "hf"),
                         "--ckpt-step", "5"]) == 1
    error = capsys.readouterr().err
    assert "iteration 5, chosen by --ckpt-step 5" in error


@pytest.mark.parametrize("options", [EvalOptions, RewardsOptions])
def test_every_eval_and_rewards_option_has_help_text(options):
    for field in dataclasses.fields(options):
        assert field.metadata.get("help"), field.name


# --- the vocabulary padding rule of plan and train --------------------------------------------


def _checkpoint(directory, padded_rows: int) -> str:
    """A --load directory whose one checkpoint records ``padded_rows`` embedding rows."""
    os.makedirs(iteration_dir(str(directory), 10))
    with open(os.path.join(iteration_dir(str(directory), 10), STATE_FILENAME), "w") as file:
        json.dump({"format_version": FORMAT_VERSION,
                   "model_architecture": {"padded_vocab_size": padded_rows}}, file)
    (directory / TRACKER_FILENAME).write_text("10")
    return str(directory)


def _config(tp: int, load: str | None, divisor: int = 32) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"num_layers": 2, "hidden_size": 96, "num_attention_heads": 6,
                  "make_vocab_size_divisible_by": divisor},
        "parallel": {"tensor_model_parallel_size": tp}, "checkpoint": {"load": load}})


def test_resume_at_the_tp_a_checkpoint_was_padded_at_passes_even_if_it_does_not_divide(tmp_path):
    load = _checkpoint(tmp_path, padded_vocab_size(1000, 32, 3))  # trained at TP 3
    check_vocab_padding(_config(3, load), 1000)


def test_tp_whose_padding_differs_from_the_checkpoint_is_refused_naming_the_flags(tmp_path):
    load = _checkpoint(tmp_path, padded_vocab_size(1000, 32, 1))
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 3 with "
                                          "--make-vocab-size-divisible-by 32 pads"):
        check_vocab_padding(_config(3, load), 1000)
    check_vocab_padding(_config(2, load), 1000)  # 2 divides 32: the same rows


def test_a_load_directory_that_does_not_exist_yet_is_taken_as_portably_padded(tmp_path):
    missing = str(tmp_path / "import-to-come")
    check_vocab_padding(_config(2, missing), 1000)
    with pytest.raises(ConfigError, match="use a TP size that divides 32"):
        check_vocab_padding(_config(3, missing), 1000)


def test_ffn_width_that_tp_does_not_divide_is_refused_by_the_configuration():
    with pytest.raises(ConfigError, match="--ffn-hidden-size 100 must be divisible by "
                                          "--tensor-model-parallel-size 8"):
        TrainConfig.from_dict({"model": {"num_layers": 2, "hidden_size": 64,
                                         "num_attention_heads": 8, "ffn_hidden_size": 100},
                               "parallel": {"tensor_model_parallel_size": 8}})


def test_training_start_applies_the_plans_vocabulary_rule_before_building_the_model(tmp_path):
    # The tiny tokenizer's vocabulary padded at TP 1 is not what this checkpoint holds.
    load = _checkpoint(tmp_path / "ckpt", padded_rows=4096)
    result = subprocess.run(train_command(1, ["--load", load, "--finetune"]), cwd=REPO,
                            env=train_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--tensor-model-parallel-size 1 with --make-vocab-size-divisible-by 32" in result.stderr
    assert "has 4096" in result.stderr
