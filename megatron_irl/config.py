"""Configuration of a training run: one dataclass per concern, validated on construction.

Every field carries its command-line flag and help text in its dataclass metadata; that
metadata is the single table of flag names (``field_specs()``), used for error messages,
``--help`` and the parser in ``megatron_irl.arguments``. A field documented as "unset:
derived" is replaced by the derived value in ``__post_init__``, so a constructed config
(and its ``to_dict()``, which checkpoints store) holds concrete values.

Checks that need one section run in that section's ``__post_init__``; checks that relate
sections run in ``TrainConfig.__post_init__``; checks that need the launch (world size,
Transformer Engine, CUDA, input paths) run in ``TrainConfig.validate_for_world``. All of
them raise ``ConfigError`` with a message that names the flag(s) to change.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from megatron_irl.config_model import ModelConfig
from megatron_irl.config_online import GailConfig, OnlineConfig, check_sampling_config
from megatron_irl.config_schema import (
    ConfigError,
    FieldSpec,
    _hints,
    _opt,
    _Section,
    close_match_hint,
    value_problem,
)

SECTIONS = ("model", "data", "parallel", "optimizer", "training", "irl", "online", "gail",
            "checkpoint", "logging")


def _field_default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class DataConfig(_Section):
    """Training and validation data."""

    train_data_path: str | None = _opt(
        None, "--train-data-path", "Training data (required to train).")
    valid_data_path: str | None = _opt(
        None, "--valid-data-path", "Validation data; unset: no evaluation.")
    tokenizer_model: str | None = _opt(
        None, "--tokenizer-model", "HF tokenizer directory or sentencepiece .model file.")
    chat_template: str | None = _opt(
        None, "--chat-template",
        "Jinja chat template file for chat records; unset: the tokenizer's own "
        "(tokenizer_config.json), else the built-in User:/Assistant: rendering.")
    data_seed: int = _opt(1234, "--data-seed", "Seed of the data shuffling.")
    strict: bool = _opt(False, "--strict-data",
                        "Treat bad samples as errors (else: skip, count and report them).")

    def _validate(self) -> None:
        self._require_at_least(0, "data_seed")


@dataclass
class ParallelConfig(_Section):
    """Model parallelism; the data-parallel size is world size / (TP * PP)."""

    tensor_model_parallel_size: int = _opt(
        1, "--tensor-model-parallel-size", "Tensor-parallel size.")
    pipeline_model_parallel_size: int = _opt(
        1, "--pipeline-model-parallel-size", "Pipeline stages.")
    virtual_pipeline_model_parallel_size: int | None = _opt(
        None, "--virtual-pipeline-model-parallel-size",
        "Model chunks per pipeline stage (interleaved schedule); unset: not interleaved.")
    sequence_parallel: bool = _opt(False, "--sequence-parallel",
                                   "Split activations along the sequence over the TP group.")
    use_distributed_optimizer: bool = _opt(False, "--use-distributed-optimizer",
                                           "Shard optimizer state over the data-parallel group.")
    overlap_grad_reduce: bool = _opt(False, "--overlap-grad-reduce",
                                     "Overlap the gradient reduction with the backward pass.")
    distributed_timeout_minutes: int = _opt(
        30, "--distributed-timeout-minutes",
        "Timeout of the process groups' collectives: a rank that waits longer (a hung or dead "
        "peer) fails instead of hanging the job. Megatron-Core's default (Megatron-LM's is "
        "10), since ranks wait in a barrier while a large checkpoint is written.")

    def _validate(self) -> None:
        self._require_at_least(1, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                               "distributed_timeout_minutes")
        self._require_at_least(2, "virtual_pipeline_model_parallel_size")
        if self.virtual_pipeline_model_parallel_size is not None:
            self._require(self.pipeline_model_parallel_size > 1,
                          "virtual_pipeline_model_parallel_size",
                          f"be unset unless {self.flag('pipeline_model_parallel_size')} > 1")
        if self.sequence_parallel:
            self._require(self.tensor_model_parallel_size > 1, "sequence_parallel",
                          f"be off unless {self.flag('tensor_model_parallel_size')} > 1")


@dataclass
class OptimizerConfig(_Section):
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adam"] = _opt(
        "adam", "--optimizer", "Optimizer (Adam with decoupled weight decay).")
    lr: float = _opt(1e-5, "--lr", "Peak learning rate.")
    min_lr: float = _opt(0.0, "--min-lr", "Learning rate at the end of the decay.")
    weight_decay: float = _opt(0.01, "--weight-decay", "Weight decay coefficient.")
    adam_beta1: float = _opt(0.9, "--adam-beta1", "Adam beta1.")
    adam_beta2: float = _opt(0.999, "--adam-beta2", "Adam beta2.")
    adam_eps: float = _opt(1e-8, "--adam-eps", "Adam epsilon.")
    clip_grad: float = _opt(
        1.0, "--clip-grad", "Clip the global gradient norm to this; 0: no clipping.")
    lr_warmup_iters: int = _opt(0, "--lr-warmup-iters", "Iterations of linear warm-up.")
    lr_decay_style: Literal["cosine", "linear", "constant"] = _opt(
        "linear", "--lr-decay-style", "Learning-rate decay after the warm-up.")
    lr_decay_iters: int | None = _opt(
        None, "--lr-decay-iters", "Iterations over which the rate decays; unset: --train-iters.")
    use_checkpoint_opt_param_scheduler: bool = _opt(
        False, "--use-checkpoint-opt_param-scheduler",
        "On resume, keep the checkpoint's learning-rate schedule (--lr, --min-lr, warm-up, "
        "decay) instead of this run's flags (the default, Megatron-LM's "
        "--override-opt_param-scheduler).")

    def _validate(self) -> None:
        self._require(self.lr > 0, "lr", "be > 0")
        self._require(0 <= self.min_lr <= self.lr, "min_lr",
                      f"be in [0, {self.flag('lr')} {self.lr}]")
        self._require_at_least(0, "weight_decay", "clip_grad", "lr_warmup_iters")
        self._require_at_least(1, "lr_decay_iters")
        for name in ("adam_beta1", "adam_beta2"):
            self._require(0 <= getattr(self, name) < 1, name, "be in [0, 1)")
        self._require(self.adam_eps > 0, "adam_eps", "be > 0")


@dataclass
class TrainingConfig(_Section):
    """Batch sizes, iterations, precision, recomputation and evaluation cadence."""

    micro_batch_size: int = _opt(
        2, "--micro-batch-size", "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int = _opt(
        8, "--global-batch-size", "Sequences per optimizer step, all ranks.")
    train_iters: int = _opt(100, "--train-iters", "Optimizer steps to train.")
    seed: int = _opt(1234, "--seed", "Seed of initialisation and dropout.")
    bf16: bool = _opt(False, "--bf16", "Train in bfloat16 mixed precision.")
    fp16: bool = _opt(False, "--fp16", "Train in float16 mixed precision with loss scaling.")
    fp8_format: Literal["hybrid", "e4m3"] | None = _opt(
        None, "--fp8-format", "FP8 GEMMs through Transformer Engine (needs --bf16); unset: no FP8.")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = _opt(
        "delayed", "--fp8-recipe",
        "FP8 scaling (with --fp8-format): delayed (per-tensor scales from an amax history), "
        "tensorwise (per-tensor current scaling), blockwise (1x128/128x128 blocks; Hopper), "
        "mxfp8 (MX block scaling; Blackwell only).")
    fp8_param_gather: bool = _opt(
        False, "--fp8-param-gather",
        "Keep the GEMM weights in FP8 and all-gather them in FP8 (needs --fp8-format and "
        "--use-distributed-optimizer); saves a bf16 weight copy per GPU.")
    fp8_amax_history_len: int = _opt(
        1, "--fp8-amax-history-len",
        "Amax history length of --fp8-recipe delayed (Megatron-LM's H100 examples: 1024).")
    fp8_amax_compute_algo: Literal["most_recent", "max"] = _opt(
        "most_recent", "--fp8-amax-compute-algo",
        "How --fp8-recipe delayed computes the scale from the amax history (examples: max).")
    device: Literal["auto", "cuda", "cpu"] = _opt(
        "auto", "--device",
        "auto: the GPUs when CUDA is there, else the CPU unless the launch asked for GPUs "
        "(Slurm GPU allocation, CUDA_VISIBLE_DEVICES), which is an error; cuda: GPUs or an "
        "error; cpu: the CPU whatever the launch asked for (only where CUDA is absent).")
    recompute_granularity: Literal["full", "selective"] | None = _opt(
        None, "--recompute-granularity", "Activation recomputation; unset: none.")
    recompute_method: Literal["uniform", "block"] | None = _opt(
        None, "--recompute-method", "How full recomputation divides the layers (needs full).")
    recompute_num_layers: int | None = _opt(
        None, "--recompute-num-layers",
        "Layers per recompute unit (uniform) or recomputed (block).")
    eval_interval: int = _opt(
        100, "--eval-interval", "Evaluate every this many steps (with --valid-data-path).")
    eval_iters: int = _opt(10, "--eval-iters", "Global batches per evaluation.")
    exit_interval: int | None = _opt(
        None, "--exit-interval",
        "Save (with --save) and exit after a step whose number is a multiple of this.")
    max_nonfinite_steps: int = _opt(
        3, "--max-nonfinite-steps",
        "Stop the run (exit status 1, no save) after this many steps in a row whose loss or "
        "gradient norm is not finite; each such step is skipped (no update) and counted.")

    def _validate(self) -> None:
        self._require_at_least(1, "micro_batch_size", "global_batch_size", "train_iters",
                               "fp8_amax_history_len", "eval_interval", "eval_iters",
                               "max_nonfinite_steps")
        if self.exit_interval is not None:
            self._require_at_least(1, "exit_interval")
        self._require_at_least(0, "seed")
        self._require(not (self.bf16 and self.fp16), "fp16",
                      f"not be combined with {self.flag('bf16')}")
        if self.fp8_format is not None:
            self._require(self.bf16, "fp8_format", f"be used with {self.flag('bf16')}")
        else:
            for name in ("fp8_recipe", "fp8_param_gather"):
                self._require(getattr(self, name) == _field_default(type(self), name), name,
                              f"be left at its default without {self.flag('fp8_format')}")
        if self.fp8_recipe != "delayed":
            for name in ("fp8_amax_history_len", "fp8_amax_compute_algo"):
                self._require(getattr(self, name) == _field_default(type(self), name), name,
                              f"be left at its default unless {self.flag('fp8_recipe')} delayed "
                              "(the other recipes keep no amax history)")
        if self.recompute_granularity == "full":
            self._require(self.recompute_method is not None, "recompute_method",
                          f"be set with {self.flag('recompute_granularity')} full")
            self._require(self.recompute_num_layers is not None, "recompute_num_layers",
                          f"be set with {self.flag('recompute_granularity')} full")
            self._require_at_least(1, "recompute_num_layers")
        else:
            for name in ("recompute_method", "recompute_num_layers"):
                self._require(getattr(self, name) is None, name,
                              f"be unset unless {self.flag('recompute_granularity')} is full")


# The objectives --irl-loss chooses from; training/objectives/ registers one class for each name
# (configuration does not import training: tests/test_objective.py checks the two agree).
OBJECTIVE_NAMES = ("soft_q", "mle_entropy", "online", "gail")


@dataclass
class IRLConfig(_Section):
    """The fine-tuning objective (docs/method.md sections 2 and 4)."""

    loss: Literal[OBJECTIVE_NAMES] = _opt(
        "soft_q", "--irl-loss",
        "soft_q: MLE + lambda * TD^2 (inverse soft-Q); mle_entropy: MLE - coef * entropy baseline; "
        "online: soft_q with the policy's samples mixed in (--online-*); gail: GAIL (--gail-*).")
    irl_lambda: float = _opt(
        0.1, "--irl-lambda", "Weight of the TD regulariser; 0 is plain MLE (soft_q).")
    irl_lambda_warmup_iters: int = _opt(
        0, "--irl-lambda-warmup-iters",
        "Ramp lambda linearly from 0 over this many steps (pre-trained logits carry an offset "
        "the TD term pulls on hard at first); 0: full lambda from the start.")
    irl_gamma: float = _opt(
        1.0, "--irl-gamma",
        "Discount in the TD term (soft_q, online) and of GAIL's returns; the paper does not "
        "state it: LM reproductions use 1.0.")
    irl_stop_value_grad: bool = _opt(
        False, "--irl-stop-value-grad",
        "Ablation: no gradient through V(s_t+1) in the TD term (soft_q, online).")
    entropy_coef: float = _opt(
        0.0, "--irl-entropy-coef", "Entropy bonus weight (mle_entropy only).")
    fused_output_loss: bool = _opt(
        False, "--fused-output-loss",
        "Fuse the output layer into the soft-Q loss, chunked over tokens, so the [tokens, "
        "vocab/TP] logits are never held whole (same losses and gradients; soft_q only).")
    fused_output_chunk_size: int = _opt(
        256, "--fused-output-chunk-size",
        "Tokens per chunk of --fused-output-loss; its buffer is chunk x vocab/TP fp32.")

    def _validate(self) -> None:
        self._require_at_least(0, "irl_lambda", "entropy_coef", "irl_lambda_warmup_iters")
        self._require_at_least(1, "fused_output_chunk_size")
        if self.fused_output_loss:
            self._require(self.loss == "soft_q", "fused_output_loss",
                          f"be off unless {self.flag('loss')} soft_q (the others need logits)")
        self._require(0 <= self.irl_gamma <= 1, "irl_gamma", "be in [0, 1]")
        if self.loss != "mle_entropy":
            self._require(self.entropy_coef == 0, "entropy_coef",
                          f"be 0 unless {self.flag('loss')} mle_entropy")
        if self.loss not in ("soft_q", "online"):
            self._require(not self.irl_stop_value_grad, "irl_stop_value_grad",
                          f"be off unless {self.flag('loss')} soft_q or online")


@dataclass
class CheckpointConfig(_Section):
    """Saving and loading (Megatron distributed checkpoints)."""

    save: str | None = _opt(None, "--save", "Directory to save checkpoints to; unset: no saving.")
    load: str | None = _opt(None, "--load", "Directory to load a checkpoint from.")
    save_interval: int | None = _opt(
        None, "--save-interval",
        "Save every this many steps; unset: only at the end (with --save).")
    no_load_optim: bool = _opt(False, "--no-load-optim", "Do not load the optimizer state.")
    no_load_rng: bool = _opt(
        False, "--no-load-rng", "Do not load the random-number-generator state.")
    finetune: bool = _opt(False, "--finetune", "Load the weights only; start at iteration 0.")
    ckpt_step: int | None = _opt(
        None, "--ckpt-step",
        "Load this iteration of --load (its iter_<N> directory); unset: the latest complete one.")
    keep_last_checkpoints: int | None = _opt(
        None, "--keep-last-checkpoints",
        "After each save, delete the checkpoints older than the newest this-many complete "
        "ones (the newest complete one is never deleted); unset: keep all.")
    dist_ckpt_optim_fully_reshardable: bool = _opt(
        True, "--dist-ckpt-optim-fully-reshardable",
        "With --use-distributed-optimizer: save its state in Megatron-Core's fully_reshardable "
        "format (true: loadable at any TP / PP / DP, but each rank gathers its model-parallel "
        "shard's fp32 weights and Adam moments in host memory while saving) or dp_reshardable "
        "(false: each data-parallel rank writes its own shard, 1/DP of that memory, and the "
        "optimizer state then loads only in the same TP / PP / DP layout). Megatron-LM's "
        "default is false.")
    ckpt_fully_parallel_save: bool = _opt(
        False, "--ckpt-fully-parallel-save",
        "Spread the writing of tensors replicated over the data-parallel ranks (the weights) "
        "across those ranks instead of writing them from data-parallel rank 0 "
        "(Megatron-Core's FullyParallelSaveStrategyWrapper; on by default in Megatron-LM, "
        "where --no-ckpt-fully-parallel-save turns it off).")
    async_save: bool = _opt(
        False, "--async-save",
        "Write the checkpoints' tensors in a background process (one forked per save) while "
        "training goes on; the save completes (training_state.json, manifest, "
        "latest_checkpointed_iteration.txt) once every rank's writer has ended, checked after "
        "each step and waited for before the next save and at the end of the run. Needs --save.")

    def _validate(self) -> None:
        self._require_at_least(1, "save_interval", "keep_last_checkpoints")
        self._require_at_least(0, "ckpt_step")
        if self.ckpt_step is not None:
            self._require(self.load is not None, "ckpt_step", f"come with {self.flag('load')}")
        if self.keep_last_checkpoints is not None:
            self._require(self.save is not None, "keep_last_checkpoints",
                          f"come with {self.flag('save')}")
        if self.save_interval is not None:
            self._require(self.save is not None, "save_interval", f"come with {self.flag('save')}")
        if self.async_save:
            self._require(self.save is not None, "async_save", f"come with {self.flag('save')}")
        if self.finetune:
            self._require(self.load is not None, "finetune", f"come with {self.flag('load')}")


@dataclass
class LoggingConfig(_Section):
    """Console and TensorBoard logging."""

    log_interval: int = _opt(10, "--log-interval", "Log every this many steps.")
    tensorboard_dir: str | None = _opt(
        None, "--tensorboard-dir", "TensorBoard directory; unset: none.")
    progress_bar: Literal["auto", "on", "off"] = _opt(
        "auto", "--progress-bar", "Progress bar; auto: on when stderr is a terminal.")
    metrics_file: str | None = _opt(
        None, "--metrics-file", "Append each step's scalars to this JSONL file; unset: none.")

    def _validate(self) -> None:
        self._require_at_least(1, "log_interval")


@dataclass
class TrainConfig:
    """The whole run; ``to_dict()`` / ``from_dict()`` give its YAML-able form."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    irl: IRLConfig = field(default_factory=IRLConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    gail: GailConfig = field(default_factory=GailConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.optimizer.lr_decay_iters is None:
            self.optimizer.lr_decay_iters = self.training.train_iters
        self._check_sections_agree()

    def _check_sections_agree(self) -> None:
        """Checks between sections that do not need the world size."""
        check_sampling_config(self)
        m, p, o, t = self.model, self.parallel, self.optimizer, self.training
        tp, pp, vpp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.virtual_pipeline_model_parallel_size or 1)
        tp_flag = p.flag("tensor_model_parallel_size")
        if m.num_attention_heads % tp:
            raise ConfigError(f"{m.flag('num_attention_heads')} {m.num_attention_heads} must be "
                              f"divisible by {tp_flag} {tp}")
        if m.num_query_groups is not None and m.num_query_groups % tp:
            raise ConfigError(f"{m.flag('num_query_groups')} {m.num_query_groups} must be "
                              f"divisible by {tp_flag} {tp}")
        if m.ffn_hidden_size % tp:
            raise ConfigError(f"{m.flag('ffn_hidden_size')} {m.ffn_hidden_size} must be "
                              f"divisible by {tp_flag} {tp}")
        if m.num_layers % (pp * vpp):
            divisor = f"{p.flag('pipeline_model_parallel_size')} {pp}"
            if vpp > 1:
                divisor += (f" x {p.flag('virtual_pipeline_model_parallel_size')} {vpp}"
                            f" (= {pp * vpp})")
            raise ConfigError(
                f"{m.flag('num_layers')} {m.num_layers} must be divisible by {divisor}")
        if t.fp8_format is not None and m.transformer_impl == "local":
            raise ConfigError(f"{t.flag('fp8_format')} runs through Transformer Engine: set "
                              f"{m.flag('transformer_impl')} transformer_engine (or auto)")
        if t.fp8_param_gather and not p.use_distributed_optimizer:
            raise ConfigError(f"{t.flag('fp8_param_gather')} needs "
                              f"{p.flag('use_distributed_optimizer')} (as in Megatron-LM)")
        layers_per_chunk = m.num_layers // (pp * vpp)
        if t.recompute_num_layers is not None and t.recompute_num_layers > layers_per_chunk:
            raise ConfigError(f"{t.flag('recompute_num_layers')} {t.recompute_num_layers} must be "
                              f"<= the layers per pipeline model chunk ({layers_per_chunk})")
        if o.lr_warmup_iters > t.train_iters:
            raise ConfigError(f"{o.flag('lr_warmup_iters')} {o.lr_warmup_iters} must be <= "
                              f"{t.flag('train_iters')} {t.train_iters}")
        if o.lr_warmup_iters >= o.lr_decay_iters:
            # Megatron-Core's OptimizerParamScheduler asserts warm-up < decay.
            raise ConfigError(f"{o.flag('lr_warmup_iters')} {o.lr_warmup_iters} must be < "
                              f"{o.flag('lr_decay_iters')} {o.lr_decay_iters} (which defaults to "
                              f"{t.flag('train_iters')})")

    def validate_for_world(self, world_size: int) -> int:
        """Checks that need the launch; returns the data-parallel size.

        Run it before creating any process group: it checks the world size against the
        parallel layout and batch sizes, that the input paths exist, and that Transformer
        Engine and CUDA are there when --fp8-format or --transformer-impl transformer_engine
        asks for them. Mutates nothing.
        """
        self._check_sections_agree()
        p, t, d = self.parallel, self.training, self.data
        if world_size < 1:
            raise ConfigError(f"world size {world_size} must be >= 1 (WORLD_SIZE / SLURM_NTASKS)")
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} must be divisible by "
                f"{p.flag('tensor_model_parallel_size')} "
                f"{tp} x {p.flag('pipeline_model_parallel_size')} {pp} (= {tp * pp})")
        dp = world_size // (tp * pp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"{t.flag('global_batch_size')} {t.global_batch_size} must be divisible by "
                f"{t.flag('micro_batch_size')} {t.micro_batch_size} x data-parallel size {dp} "
                f"(= {t.micro_batch_size * dp}; world size {world_size} / TP {tp} / PP {pp})")
        if d.train_data_path is None:
            raise ConfigError(f"{d.flag('train_data_path')} is required to train")
        for name in ("train_data_path", "valid_data_path", "tokenizer_model", "chat_template"):
            path = getattr(d, name)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"{d.flag(name)} {path}: no such file or directory")
        from megatron_irl.cpu_support import transformer_engine_problem  # imports torch

        if t.fp8_format is not None:
            problem = transformer_engine_problem(fp8_recipe=t.fp8_recipe)
            if problem:
                raise ConfigError(f"{t.flag('fp8_format')} {t.fp8_format} with "
                                  f"{t.flag('fp8_recipe')} {t.fp8_recipe} cannot run here: "
                                  f"{problem}")
        if self.model.transformer_impl == "transformer_engine":
            problem = transformer_engine_problem()
            if problem:
                raise ConfigError(f"{self.model.flag('transformer_impl')} transformer_engine "
                                  f"cannot run here: {problem}")
        return dp

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {field: value}} of plain Python scalars (YAML-able)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a (possibly partial) ``to_dict()``-shaped mapping; missing keys take defaults.

        Unknown sections/keys and ill-typed values raise ConfigError naming ``source`` and the key.
        """
        problem = find_dict_problem(data)
        if problem:
            key_path, what = problem
            raise ConfigError(f"{source}: {'.'.join(key_path)}: {what}")
        classes = _section_classes()
        return cls(**{s: classes[s](**(data.get(s) or {})) for s in SECTIONS})


def _section_classes() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


def find_dict_problem(data: Any) -> tuple[tuple[str, ...], str] | None:
    """The first structural or type problem of a ``to_dict()``-shaped mapping.

    Returns (key path, description), e.g. (("model", "num_layers"), "expected int, got str
    'two'"), or None. A section may be null (empty). Range checks are left to the dataclasses.
    """
    if not isinstance(data, Mapping):
        return (), (f"expected a mapping of sections {', '.join(SECTIONS)}, "
                    f"got {type(data).__name__}")
    classes = _section_classes()
    for section, values in data.items():
        if section not in classes:
            return (str(section),), f"unknown section{close_match_hint(str(section), SECTIONS)}"
        if values is None:
            continue
        if not isinstance(values, Mapping):
            return (section,), f"expected a mapping of keys, got {type(values).__name__}"
        hints = _hints(classes[section])
        for key, value in values.items():
            if key not in hints:
                return (section, str(key)), (f"unknown key in section '{section}'"
                                             f"{close_match_hint(str(key), hints)}")
            problem = value_problem(hints[key], value)
            if problem:
                return (section, key), problem
    return None


def field_specs() -> list[FieldSpec]:
    """The flag table: every configurable field, in section order then field order."""
    specs = []
    for section, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            specs.append(FieldSpec(section, f.name, f.metadata["flag"], f.metadata["help"],
                                   f.metadata["inverse"], _hints(cls)[f.name], f.default))
    return specs
