"""Specification of the run configuration (megatron_irl.config) and its command line
(megatron_irl.arguments). Pure Python: no processes, no Megatron."""

import re
import textwrap

import pytest
import yaml

from megatron_irl.arguments import build_parser, parse_train_config, world_size_from_env
from megatron_irl.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    IRLConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    TrainingConfig,
    field_specs,
)
from megatron_irl.cpu_support import transformer_engine_problem


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("{}\n")
    return str(path)


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "run.yaml"
        path.write_text(textwrap.dedent(text))
        return str(path)
    return write


def parse(argv, data_file, env=None):
    return parse_train_config(["--train-data-path", data_file, *argv], env=env or {})


# --- precedence: defaults < YAML < flags ---------------------------------------------------

def test_defaults_apply_without_config_or_flags(data_file):
    config = parse([], data_file)
    assert config.model == ModelConfig() and config.training == TrainingConfig()
    assert config.data.train_data_path == data_file


def test_yaml_values_override_defaults(data_file, write_yaml):
    path = write_yaml("""
        model: {num_layers: 4}
        optimizer: {lr: 3.0e-4}
    """)
    config = parse(["--config", path], data_file)
    assert (config.model.num_layers, config.optimizer.lr) == (4, 3e-4)


def test_flags_override_yaml(data_file, write_yaml):
    path = write_yaml("model: {num_layers: 4, hidden_size: 128}\n")
    config = parse(["--config", path, "--num-layers", "6"], data_file)
    assert (config.model.num_layers, config.model.hidden_size) == (6, 128)


def test_flag_order_does_not_matter_relative_to_config(data_file, write_yaml):
    path = write_yaml("model: {num_layers: 4}\n")
    config = parse(["--num-layers", "6", "--config", path], data_file)
    assert config.model.num_layers == 6


def test_yaml_reads_exponent_without_dot_as_float_and_off_as_string(data_file, write_yaml):
    path = write_yaml("""
        optimizer: {lr: 1e-5}
        logging: {progress_bar: off}
    """)
    config = parse(["--config", path], data_file)
    assert (config.optimizer.lr, config.logging.progress_bar) == (1e-5, "off")


def test_int_is_accepted_for_float_field_and_stored_as_float(data_file, write_yaml):
    config = parse(["--config", write_yaml("optimizer: {clip_grad: 2}\n")], data_file)
    assert config.optimizer.clip_grad == 2.0 and type(config.optimizer.clip_grad) is float


def test_empty_yaml_section_means_defaults(data_file, write_yaml):
    assert parse(["--config", write_yaml("model:\n")], data_file).model == ModelConfig()


# --- boolean flags -------------------------------------------------------------------------

def test_bool_flag_without_value_sets_true(data_file):
    assert parse(["--swiglu"], data_file).model.swiglu is True


def test_bool_flag_false_overrides_yaml_true(data_file, write_yaml):
    path = write_yaml("training: {bf16: true}\n")
    assert parse(["--config", path, "--bf16", "false"], data_file).training.bf16 is False


def test_disable_bias_linear_clears_add_bias_linear(data_file):
    assert parse(["--disable-bias-linear"], data_file).model.add_bias_linear is False


def test_bool_flag_rejects_other_words(data_file):
    with pytest.raises(ConfigError, match="--bf16"):
        parse(["--bf16", "yes"], data_file)


# --- derived fields ------------------------------------------------------------------------

def test_unset_sizes_are_derived():
    model = ModelConfig(hidden_size=64, num_attention_heads=4, seq_length=32)
    derived = (model.ffn_hidden_size, model.kv_channels, model.max_position_embeddings)
    assert derived == (256, 16, 32)


def test_swiglu_ffn_size_follows_megatron_rule():
    assert ModelConfig(hidden_size=768, num_attention_heads=12, swiglu=True).ffn_hidden_size == 2048


def test_lr_decay_iters_defaults_to_train_iters():
    config = TrainConfig(training=TrainingConfig(train_iters=50))
    assert config.optimizer.lr_decay_iters == 50


# --- validation: one case each; the message names the flag(s) to change -------------------

SECTION_CASES = {
    "num_layers_positive": (lambda: ModelConfig(num_layers=0), ["--num-layers"]),
    "hidden_divisible_by_heads": (lambda: ModelConfig(hidden_size=30, num_attention_heads=4),
                                  ["--hidden-size", "--num-attention-heads", "--kv-channels"]),
    "heads_divisible_by_groups": (lambda: ModelConfig(num_attention_heads=4, num_query_groups=3),
                                  ["--num-query-groups", "--num-attention-heads"]),
    "dropout_below_one": (lambda: ModelConfig(hidden_dropout=1.0), ["--hidden-dropout"]),
    "rotary_percent_positive": (lambda: ModelConfig(rotary_percent=0.0), ["--rotary-percent"]),
    "learned_positions_cover_sequence": (
        lambda: ModelConfig(seq_length=64, max_position_embeddings=32),
        ["--max-position-embeddings", "--seq-length"]),
    "normalization_choice_with_suggestion": (lambda: ModelConfig(normalization="rmsnorm"),
                                             ["--normalization", "did you mean RMSNorm"]),
    "field_type_checked": (lambda: ModelConfig(num_layers="2"), ["--num-layers", "expected int"]),
    "bool_is_not_int": (lambda: TrainingConfig(train_iters=True), ["--train-iters"]),
    "seed_non_negative": (lambda: DataConfig(data_seed=-1), ["--data-seed"]),
    "vpp_needs_pipeline": (lambda: ParallelConfig(virtual_pipeline_model_parallel_size=2),
                           ["--virtual-pipeline-model-parallel-size",
                            "--pipeline-model-parallel-size"]),
    "vpp_at_least_two": (lambda: ParallelConfig(pipeline_model_parallel_size=2,
                                                virtual_pipeline_model_parallel_size=1),
                         ["--virtual-pipeline-model-parallel-size"]),
    "sequence_parallel_needs_tp": (lambda: ParallelConfig(sequence_parallel=True),
                                   ["--sequence-parallel", "--tensor-model-parallel-size"]),
    "lr_positive": (lambda: OptimizerConfig(lr=0.0), ["--lr"]),
    "min_lr_at_most_lr": (lambda: OptimizerConfig(lr=1e-4, min_lr=1e-3), ["--min-lr", "--lr"]),
    "beta_below_one": (lambda: OptimizerConfig(adam_beta2=1.0), ["--adam-beta2"]),
    "eps_positive": (lambda: OptimizerConfig(adam_eps=0.0), ["--adam-eps"]),
    "bf16_and_fp16_exclusive": (lambda: TrainingConfig(bf16=True, fp16=True), ["--fp16", "--bf16"]),
    "fp8_needs_bf16": (lambda: TrainingConfig(fp8_format="hybrid"), ["--fp8-format", "--bf16"]),
    "full_recompute_needs_method": (
        lambda: TrainingConfig(recompute_granularity="full", recompute_num_layers=1),
        ["--recompute-method", "--recompute-granularity"]),
    "full_recompute_needs_num_layers": (
        lambda: TrainingConfig(recompute_granularity="full", recompute_method="uniform"),
        ["--recompute-num-layers"]),
    "selective_recompute_takes_no_num_layers": (
        lambda: TrainingConfig(recompute_granularity="selective", recompute_num_layers=1),
        ["--recompute-num-layers", "--recompute-granularity"]),
    "irl_lambda_non_negative": (lambda: IRLConfig(irl_lambda=-0.1), ["--irl-lambda"]),
    "irl_gamma_at_most_one": (lambda: IRLConfig(irl_gamma=1.5), ["--irl-gamma"]),
    "entropy_coef_only_for_mle_entropy": (lambda: IRLConfig(entropy_coef=0.1),
                                          ["--irl-entropy-coef", "--irl-loss"]),
    "stop_value_grad_only_for_soft_q": (
        lambda: IRLConfig(loss="mle_entropy", irl_stop_value_grad=True),
        ["--irl-stop-value-grad", "--irl-loss"]),
    "save_interval_needs_save": (lambda: CheckpointConfig(save_interval=10),
                                 ["--save-interval", "--save"]),
    "finetune_needs_load": (lambda: CheckpointConfig(finetune=True), ["--finetune", "--load"]),
    "async_save_needs_save": (lambda: CheckpointConfig(async_save=True),
                              ["--async-save: must come with --save"]),
    "log_interval_positive": (lambda: LoggingConfig(log_interval=0), ["--log-interval"]),
}

CROSS_SECTION_CASES = {
    "heads_divisible_by_tp": (
        lambda: TrainConfig(model=ModelConfig(hidden_size=48, num_attention_heads=3),
                            parallel=ParallelConfig(tensor_model_parallel_size=2)),
        ["--num-attention-heads", "--tensor-model-parallel-size"]),
    "query_groups_divisible_by_tp": (
        lambda: TrainConfig(model=ModelConfig(num_attention_heads=4, num_query_groups=1),
                            parallel=ParallelConfig(tensor_model_parallel_size=2)),
        ["--num-query-groups", "--tensor-model-parallel-size"]),
    "layers_divisible_by_pp": (
        lambda: TrainConfig(model=ModelConfig(num_layers=3),
                            parallel=ParallelConfig(pipeline_model_parallel_size=2)),
        ["--num-layers", "--pipeline-model-parallel-size"]),
    "layers_divisible_by_pp_times_vpp": (
        lambda: TrainConfig(model=ModelConfig(num_layers=4),
                            parallel=ParallelConfig(pipeline_model_parallel_size=2,
                                                    virtual_pipeline_model_parallel_size=4)),
        ["--num-layers", "--virtual-pipeline-model-parallel-size"]),
    "recompute_layers_fit_a_chunk": (
        lambda: TrainConfig(model=ModelConfig(num_layers=2),
                            training=TrainingConfig(recompute_granularity="full",
                                                    recompute_method="block",
                                                    recompute_num_layers=3)),
        ["--recompute-num-layers"]),
    "warmup_within_train_iters": (
        lambda: TrainConfig(optimizer=OptimizerConfig(lr_warmup_iters=20),
                            training=TrainingConfig(train_iters=10)),
        ["--lr-warmup-iters", "--train-iters"]),
    "warmup_within_decay_iters": (
        lambda: TrainConfig(optimizer=OptimizerConfig(lr_warmup_iters=20, lr_decay_iters=10)),
        ["--lr-warmup-iters", "--lr-decay-iters"]),
}


@pytest.mark.parametrize("case", list(SECTION_CASES) + list(CROSS_SECTION_CASES))
def test_invalid_value_raises_config_error_naming_flag(case):
    build, expected = {**SECTION_CASES, **CROSS_SECTION_CASES}[case]
    with pytest.raises(ConfigError) as error:
        build()
    for text in expected:
        assert text in str(error.value)


def world_config(data_file, **sections):
    return TrainConfig(data=DataConfig(train_data_path=data_file), **sections)


def test_validate_for_world_returns_data_parallel_size(data_file):
    config = world_config(data_file, parallel=ParallelConfig(tensor_model_parallel_size=2),
                          model=ModelConfig(num_attention_heads=4))
    assert config.validate_for_world(8) == 4


def test_world_must_divide_by_tp_times_pp(data_file):
    config = world_config(data_file, parallel=ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 2"):
        config.validate_for_world(3)


def test_global_batch_must_divide_by_micro_batch_times_dp(data_file):
    training = TrainingConfig(micro_batch_size=2, global_batch_size=8)
    with pytest.raises(ConfigError) as error:
        world_config(data_file, training=training).validate_for_world(3)
    assert "--global-batch-size 8" in str(error.value)
    assert "--micro-batch-size 2" in str(error.value)


def test_train_data_path_is_required_to_train():
    with pytest.raises(ConfigError, match="--train-data-path"):
        TrainConfig().validate_for_world(1)


def test_missing_input_path_names_flag(data_file, tmp_path):
    config = world_config(data_file)
    config.data.tokenizer_model = str(tmp_path / "absent.model")
    with pytest.raises(ConfigError, match="--tokenizer-model .*absent.model"):
        config.validate_for_world(1)


@pytest.mark.skipif(transformer_engine_problem(fp8_recipe="delayed") is None,
                    reason="FP8 can run here")
def test_fp8_without_transformer_engine_says_what_is_missing(data_file):
    config = world_config(data_file, training=TrainingConfig(bf16=True, fp8_format="hybrid"))
    with pytest.raises(ConfigError) as error:
        config.validate_for_world(1)
    assert "--fp8-format hybrid" in str(error.value)
    assert transformer_engine_problem(fp8_recipe="delayed") in str(error.value)


@pytest.mark.skipif(transformer_engine_problem() is None, reason="Transformer Engine can run here")
def test_transformer_engine_impl_needs_transformer_engine(data_file):
    config = world_config(data_file, model=ModelConfig(transformer_impl="transformer_engine"))
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine"):
        config.validate_for_world(1)


def test_world_size_comes_from_world_size_then_slurm_ntasks():
    assert world_size_from_env({"WORLD_SIZE": "4", "SLURM_NTASKS": "8"}) == 4
    assert world_size_from_env({"SLURM_NTASKS": "8"}) == 8
    assert world_size_from_env({}) == 1


def test_bad_world_size_variable_is_named():
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        world_size_from_env({"WORLD_SIZE": "two"})


def test_parse_validates_against_world_size_from_env(data_file):
    with pytest.raises(ConfigError, match="--global-batch-size"):
        parse(["--micro-batch-size", "2", "--global-batch-size", "8"], data_file,
              env={"WORLD_SIZE": "3"})


# --- unknown names, YAML errors --------------------------------------------------------------

def test_unknown_flag_suggests_close_match(data_file):
    with pytest.raises(ConfigError, match="unknown flag --hiden-size; did you mean --hidden-size"):
        parse(["--hiden-size", "64"], data_file)


def test_invalid_choice_names_flag(data_file):
    with pytest.raises(ConfigError, match="--lr-decay-style"):
        parse(["--lr-decay-style", "exponential"], data_file)


def test_unknown_yaml_key_names_file_line_section_and_suggestion(data_file, write_yaml):
    path = write_yaml("""
        model:
          num_layers: 2
          hiden_size: 64
    """)
    with pytest.raises(ConfigError) as error:
        parse(["--config", path], data_file)
    message = str(error.value)
    assert f"{path}:4: model.hiden_size" in message
    assert "section 'model'" in message and "did you mean hidden_size" in message


def test_unknown_yaml_section_suggests_close_match(data_file, write_yaml):
    with pytest.raises(ConfigError, match="optimiser: unknown section; did you mean optimizer"):
        parse(["--config", write_yaml("optimiser: {lr: 1.0e-4}\n")], data_file)


def test_yaml_string_for_int_names_file_line_and_key(data_file, write_yaml):
    path = write_yaml("""
        training:
          train_iters: ten
    """)
    expected = f"{path}:3: training.train_iters: expected int, got str 'ten'"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse(["--config", path], data_file)


def test_yaml_bool_for_int_is_rejected(data_file, write_yaml):
    with pytest.raises(ConfigError, match="training.seed: expected int, got bool"):
        parse(["--config", write_yaml("training: {seed: true}\n")], data_file)


def test_yaml_top_level_must_be_a_mapping(data_file, write_yaml):
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        parse(["--config", write_yaml("- model\n")], data_file)


def test_repeated_yaml_key_is_an_error(data_file, write_yaml):
    path = write_yaml("""
        model:
          num_layers: 2
          num_layers: 4
    """)
    expected = f"{path}:4: model.num_layers: repeats the key of line 3"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse(["--config", path], data_file)


def test_malformed_yaml_names_file(data_file, write_yaml):
    path = write_yaml("model: {num_layers: 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {path}: not valid YAML")):
        parse(["--config", path], data_file)


def test_missing_config_file_names_flag(data_file, tmp_path):
    with pytest.raises(ConfigError, match="--config .*absent.yaml"):
        parse(["--config", str(tmp_path / "absent.yaml")], data_file)


# --- dict form --------------------------------------------------------------------------------

def test_to_dict_from_dict_round_trips_through_yaml():
    config = TrainConfig(model=ModelConfig(num_layers=4, swiglu=True, num_query_groups=2),
                         training=TrainingConfig(bf16=True, recompute_granularity="selective"),
                         irl=IRLConfig(irl_lambda=0.5, irl_gamma=0.99),
                         checkpoint=CheckpointConfig(save="/ckpt", save_interval=5),
                         logging=LoggingConfig(progress_bar="off"))
    restored = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert restored == config


def test_from_dict_unknown_key_names_key_and_section():
    with pytest.raises(ConfigError, match="ckpt.json: irl.lambda: unknown key in section 'irl'"):
        TrainConfig.from_dict({"irl": {"lambda": 0.1}}, source="ckpt.json")


# --- the flag table and --help ------------------------------------------------------------------

def test_every_field_has_a_unique_flag():
    flags = [spec.flag for spec in field_specs()]
    assert len(flags) == len(set(flags)) and all(f.startswith("--") for f in flags)


def test_help_lists_flags_grouped_by_section_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(["--help"], env={})
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.index("model (YAML section model:)") < text.index("--num-layers") \
        < text.index("irl (YAML section irl:)") < text.index("--irl-lambda")
    assert "(default: 0.1)" in text and "--disable-bias-linear" in text


def test_parser_only_holds_given_flags():
    namespace = build_parser().parse_args(["--lr", "0.5"])
    assert vars(namespace) == {"optimizer.lr": 0.5}


@pytest.mark.parametrize("value", ["-1e-3", "-0.5", "-2"])
def test_negative_number_reaches_the_validation_message(data_file, value):
    with pytest.raises(ConfigError, match=r"--lr -[\d.e-]+: must be > 0"):
        parse(["--lr", value], data_file)
