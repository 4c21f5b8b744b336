"""``megatron-irl plan``: check a training configuration for a launch and estimate per-GPU memory.

    megatron-irl plan --config run.yaml --nodes 2 --gpus-per-node 8 [--vocab-size N] [--flag ...]

Takes everything ``megatron-irl train`` takes (the same ``--config`` file and flag table), plus
the launch: ``--world-size N`` or ``--nodes N --gpus-per-node G`` (default: the launch
environment's WORLD_SIZE / SLURM_NTASKS, else 1). It builds and validates the whole
configuration as the trainer would, except for what needs the training machine: input paths
that do not exist yet are listed, not refused, and Transformer Engine / FP8 are assumed to be
there. Then it prints the parallel layout (which ranks hold which layers and vocabulary
rows), the parameter count, and the memory of each pipeline stage's GPUs
(``megatron_irl.planning``), and exits without building the model or importing Megatron.

The vocabulary size is the real one, as training takes it: ``--vocab-size N`` (the training
flag), else the tokenizer's, read from ``--tokenizer-model`` when it exists (it need not: a
recipe names the directory the Hugging Face import will create).

Exit status: 0 when the largest stage fits in ``--gpu-memory-gib``, 1 when it does not,
2 for an invalid configuration.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from megatron_irl import planning
from megatron_irl.arguments import (
    _RaisingParser,
    build_parser,
    load_train_config,
    world_size_from_env,
)
from megatron_irl.config import ConfigError, TrainConfig
from megatron_irl.core.vocabulary import padded_vocab_size, real_vocab_size
from megatron_irl.planning import GIB, StageMemory

PROG = "megatron-irl plan"
# An H100 80GB as nvidia-smi reports it (81559 MiB).
DEFAULT_GPU_MEMORY_GIB = 79.6
# Left for what the estimate does not count: CUDA context, NCCL and cuBLAS buffers, allocator
# fragmentation, other transient buffers. Less than this free is reported as tight.
MARGIN_FRACTION = 0.1


@dataclass(frozen=True)
class PlanRequest:
    config: TrainConfig
    world_size: int
    gpus_per_node: int | None  # None: only the world size is known
    vocab_size: int | None  # --vocab-size (the training flag)
    gpu_memory_gib: float


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan (the launch to check; not in the YAML file)")
    group.add_argument("--world-size", type=_positive_int, metavar="N",
                       help="Ranks (GPUs) in all; default: WORLD_SIZE or SLURM_NTASKS, else 1.")
    group.add_argument("--nodes", type=_positive_int, metavar="N",
                       help="Nodes, instead of --world-size (world = nodes x GPUs per node).")
    group.add_argument("--gpus-per-node", type=_positive_int, metavar="G",
                       help="GPUs per node (default with --nodes: 8).")
    group.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                       default=DEFAULT_GPU_MEMORY_GIB,
                       help=f"Memory of one GPU (default: {DEFAULT_GPU_MEMORY_GIB}, an H100 "
                            "80GB).")


def parse_plan_args(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> PlanRequest:
    """The plan's own flags, then the training configuration from the rest (no launch checks).

    Raises ConfigError naming the flag; ``--help`` prints both flag sets and exits 0.
    """
    if "-h" in argv or "--help" in argv:
        parser = build_parser(PROG)
        parser.description = ("Check a training configuration for a launch and estimate the "
                               "memory of each GPU, without building the model. Takes every "
                               "flag of megatron-irl train, and the plan's own (last group).")
        _add_plan_flags(parser)
        parser.print_help()
        raise SystemExit(0)
    own = _RaisingParser(prog=PROG, add_help=False, allow_abbrev=False)
    _add_plan_flags(own)
    flags, rest = own.parse_known_args(list(argv))
    config = load_train_config(rest, PROG)
    if flags.world_size is not None and (flags.nodes or flags.gpus_per_node):
        raise ConfigError("--world-size cannot be combined with --nodes / --gpus-per-node")
    gpus_per_node = flags.gpus_per_node or (8 if flags.nodes else None)
    if gpus_per_node is not None:
        world_size = (flags.nodes or 1) * gpus_per_node
    else:
        world_size = flags.world_size or world_size_from_env(env)
    if flags.gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory-gib {flags.gpu_memory_gib}: must be > 0")
    return PlanRequest(config, world_size, gpus_per_node, config.model.vocab_size,
                       flags.gpu_memory_gib)


def resolve_vocab_size(cfg: TrainConfig, requested: int | None) -> tuple[int, str, list[str]]:
    """(vocabulary size, where it came from, notes): ``--vocab-size``, else the tokenizer's."""
    path = cfg.data.tokenizer_model
    exists = path is not None and os.path.exists(path)
    if requested is None and not exists:
        where = f"--tokenizer-model {path} does not exist" if path else "no --tokenizer-model"
        raise ConfigError(f"the vocabulary size is needed and {where}: pass --vocab-size N "
                          "(the tokenizer's size, e.g. 128256 for Llama 3)")
    if not exists:
        return requested, "--vocab-size", []
    from megatron_irl.data import DataError, load_tokenizer

    try:
        from_tokenizer = load_tokenizer(path).vocab_size
    except DataError as error:
        raise ConfigError(f"--tokenizer-model {path}: {error}") from error
    vocab = real_vocab_size(cfg.model, from_tokenizer)  # as training resolves it
    if requested is None:
        return vocab, f"--tokenizer-model {path}", []
    notes = [] if requested == from_tokenizer else [
        f"--vocab-size {requested} exceeds the {from_tokenizer} tokens of --tokenizer-model "
        f"{path}: the ids between are real (e.g. an imported model's extra embedding rows)"]
    return vocab, "--vocab-size", notes


def check_launch(cfg: TrainConfig, world_size: int) -> int:
    """``TrainConfig.validate_for_world`` without the checks that need the training machine
    (input paths exist, Transformer Engine and a GPU are there); returns the data-parallel
    size. The trainer's own method runs on a copy whose paths point at the current directory
    and which asks for no Transformer Engine, so that every other rule stays the trainer's."""
    probe = copy.deepcopy(cfg)
    for name in ("train_data_path", "valid_data_path", "tokenizer_model"):
        if getattr(probe.data, name) is not None:
            setattr(probe.data, name, os.curdir)
    probe.training.fp8_format = None
    probe.model.transformer_impl = "local"
    return probe.validate_for_world(world_size)


def machine_notes(cfg: TrainConfig) -> list[str]:
    """What the training machine must provide that this plan did not check."""
    notes = []
    for section, names in (("data", ("train_data_path", "valid_data_path", "tokenizer_model")),
                           ("checkpoint", ("load",))):
        values = getattr(cfg, section)
        for name in names:
            path = getattr(values, name)
            if path is not None and not os.path.exists(path):
                notes.append(f"{values.flag(name)} {path}: does not exist (yet)")
    if cfg.training.fp8_format or cfg.model.transformer_impl != "local":
        notes.append("Transformer Engine is assumed on the GPUs (--transformer-impl "
                     f"{cfg.model.transformer_impl}"
                     + (f", --fp8-format {cfg.training.fp8_format}" if cfg.training.fp8_format
                        else "") + "); not checked here")
    return notes


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _spans(ranges: Sequence[range]) -> str:
    return ", ".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else f"{r.start}" for r in ranges)


def _shard(size: int) -> str:
    """TP rank r's rows of a dimension split into shards of ``size``."""
    return f"[{size} r, {size} (r+1))"


def _describe_model(cfg: TrainConfig, params: int) -> str:
    m = cfg.model
    mlp = f"SwiGLU MLP {m.ffn_hidden_size}" if m.swiglu else f"GeLU MLP {m.ffn_hidden_size}"
    groups = m.num_query_groups or m.num_attention_heads
    position = (f"RoPE base {m.rotary_base}" if m.position_embedding_type == "rope"
                else "learned positions")
    if m.position_embedding_type == "rope" and m.use_rope_scaling:
        position += f" (Llama 3.x scaling, factor {m.rope_scaling_factor:g})"
    if m.qk_layernorm:
        position += ", query/key norms"
    output = "untied output layer" if m.untie_embeddings_and_output_weights else "tied embeddings"
    return (f"{m.num_layers} layers, hidden {m.hidden_size}, {mlp}, {m.num_attention_heads} "
            f"heads x {m.kv_channels} ({groups} query groups), {m.normalization}, {position}, "
            f"{output}; {params:,} parameters ({params / 1e9:.2f} B)")


def _layout_lines(cfg: TrainConfig, stages: list[StageMemory], dp: int, padded_vocab: int,
                  gpus_per_node: int | None) -> list[str]:
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    lines = [f"layout (global rank = tp + {tp} x (dp + {dp} x pp)):"]
    for stage in stages:
        first, last = stage.stage * tp * dp, (stage.stage + 1) * tp * dp - 1
        where = f"ranks {first}-{last}" if last > first else f"rank {first}"
        if gpus_per_node:
            nodes = range(first // gpus_per_node, last // gpus_per_node + 1)
            where += f" ({'nodes' if len(nodes) > 1 else 'node'} {_spans([nodes])})"
        holds = [f"layers {_spans(stage.layers)}"]
        if stage.stage == 0:
            holds.append("embedding")
        if stage.stage == pp - 1:
            holds.append("final norm")
            if m.untie_embeddings_and_output_weights:
                holds.append("output layer")
            elif pp > 1:
                holds.append("output layer (a copy of the embedding)")
        lines.append(f"  stage {stage.stage}: {where}: {', '.join(holds)}")
    if tp > 1:
        groups = m.num_query_groups or m.num_attention_heads
        lines.append(f"  TP rank r = rank % {tp}: vocabulary rows {_shard(padded_vocab // tp)}, "
                     f"query heads {_shard(m.num_attention_heads // tp)}, query groups "
                     f"{_shard(groups // tp)}, MLP columns {_shard(m.ffn_hidden_size // tp)}")
    return lines


def _weight_dtype(training) -> str:
    return "bf16" if training.bf16 else "fp16" if training.fp16 else "fp32"


def _memory_lines(cfg: TrainConfig, stages: list[StageMemory], gpu_bytes: int) -> list[str]:
    t = cfg.training
    distributed = cfg.parallel.use_distributed_optimizer
    half = t.bf16 or t.fp16
    lines = [f"memory per GPU, GiB (weights {_weight_dtype(t)}, gradients fp32, "
             f"Adam fp32{' with fp32 main weights' if half else ''}):",
             f"  {'stage':>5} {'params/GPU':>15} {'weights':>8} {'grads':>8} {'optim dist':>10} "
             f"{'optim repl':>10} {'fp8 cache':>9} {'activations':>11} {'logits+loss':>11} "
             f"{'KL ref':>8} {'total':>8} {'free':>8}"]
    for s in stages:
        total = s.total(distributed)
        lines.append(
            f"  {s.stage:>5} {s.parameters:>15,} {_gib(s.weights):>8} {_gib(s.gradients):>8} "
            f"{_gib(s.optimizer_sharded):>10} {_gib(s.optimizer_replicated):>10} "
            f"{_gib(s.fp8_weight_cache):>9} {_gib(s.activations):>11} "
            f"{_gib(s.logits_and_loss):>11} {_gib(s.kl_reference):>8} {_gib(total):>8} "
            f"{_gib(gpu_bytes - total):>8}")
    other = max(s.total(not distributed) for s in stages)
    lines.append(f"  total counts the optimizer {'with' if distributed else 'without'} "
                 f"--use-distributed-optimizer; {'without' if distributed else 'with'} it the "
                 f"largest stage needs {_gib(other)} GiB")
    if planning.has_kl_reference(cfg):
        lines.append("  KL ref: GAIL's frozen copy of the starting weights (--gail-kl-weight), "
                     "in the weights' dtype, without gradients or optimizer state")
    per_layer = planning.layer_activation_bytes(cfg)
    lines.append(
        f"  activations: stage 0 holds {stages[0].in_flight} (chunk) micro-batches at its peak; "
        f"a layer keeps {per_layer.stored / 2**20:,.0f} MiB per micro-batch without "
        f"recomputation, of which {per_layer.attention_scores / 2**20:,.0f} MiB are attention "
        f"scores (recompute: {t.recompute_granularity or 'none'})")
    return lines


def _save_lines(cfg: TrainConfig, stages: list[StageMemory], gpus_per_node: int | None
                ) -> list[str]:
    """The host memory a checkpoint save needs (``planning.StageMemory.save_host``)."""
    per_gpu = max(s.save_host for s in stages)
    if not per_gpu:
        return ["checkpoint  saving copies tensors to the host one at a time as it writes them"]
    node = (f", {_gib(per_gpu * gpus_per_node)} GiB per node of {gpus_per_node} GPUs"
            if gpus_per_node else "")
    if cfg.checkpoint.dist_ckpt_optim_fully_reshardable:
        what = ("gathers each rank's fp32 main weights and Adam moments in host memory (the "
                "distributed optimizer's fully_reshardable format; "
                "--dist-ckpt-optim-fully-reshardable false writes 1/DP of it, loadable only in "
                "the same layout)")
    else:
        what = ("stages each rank's own shard of the fp32 main weights and Adam moments in host "
                "memory (the distributed optimizer's dp_reshardable format: loadable only in "
                "the same TP / PP / DP layout)")
    return [f"checkpoint  saving {what}, all ranks at once: {_gib(per_gpu)} GiB per GPU{node}; "
            "ask Slurm for that much (sbatch --mem) on top of the data loaders' and the "
            "model's own"]


def format_plan(request: PlanRequest, config_label: str) -> tuple[str, bool]:
    """The report and whether the largest stage fits; raises ConfigError for a bad config."""
    cfg = request.config
    dp = check_launch(cfg, request.world_size)
    vocab, vocab_source, notes = resolve_vocab_size(cfg, request.vocab_size)
    planning.check_layout(cfg, vocab)
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, tp)
    stages = planning.estimate_memory(cfg, padded, dp)
    gpu_bytes = int(request.gpu_memory_gib * GIB)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    launch = f"{request.world_size} GPUs"
    if request.gpus_per_node:
        nodes = request.world_size // request.gpus_per_node
        launch += f" = {nodes} node{'s' if nodes > 1 else ''} x {request.gpus_per_node} GPUs"
        if tp > request.gpus_per_node:
            notes.append(f"--tensor-model-parallel-size {tp} spans nodes (more than "
                         f"{request.gpus_per_node} GPUs per node): TP traffic crosses the network")
    options = [name for name, on in (("sequence parallel", p.sequence_parallel),
                                     ("distributed optimizer", p.use_distributed_optimizer),
                                     ("fused output loss", cfg.irl.fused_output_loss)) if on]
    precision = _weight_dtype(t) + (
        f" + FP8 {t.fp8_format}, recipe {t.fp8_recipe}"
        + (f" (amax history {t.fp8_amax_history_len}, {t.fp8_amax_compute_algo})"
           if t.fp8_recipe == "delayed" else "")
        + (", FP8 weights gathered in FP8" if t.fp8_param_gather else "")
        if t.fp8_format else "")
    spec = "Transformer Engine" if planning.assumes_transformer_engine(cfg) else "local"
    lines = [
        f"{PROG}: {config_label}",
        f"model       {_describe_model(cfg, planning.model_parameters(m, padded))}",
        f"vocabulary  {vocab} tokens ({vocab_source}), padded to {padded} (a multiple of "
        f"lcm({m.make_vocab_size_divisible_by}, TP {tp})): {padded // tp} rows per TP rank",
        f"launch      {launch}: TP {tp} x PP {pp} x DP {dp}"
        + (f", {p.virtual_pipeline_model_parallel_size} model chunks per stage"
           if p.virtual_pipeline_model_parallel_size else ""),
        f"batch       {t.micro_batch_size} x {m.seq_length} tokens per micro-batch; global batch "
        f"{t.global_batch_size} = {microbatches} micro-batches per DP rank per step "
        f"({t.global_batch_size * m.seq_length:,} tokens)",
        f"precision   {precision}; recompute {t.recompute_granularity or 'none'}"
        + (f" ({t.recompute_method}, {t.recompute_num_layers} layers)" if t.recompute_method
           else "") + (f"; {', '.join(options)}" if options else ""),
        (f"attention   {spec}: packed documents as THD sequences (cu_seqlens) on flash / "
         "cuDNN attention; no [s, s] scores" if planning.packs_as_thd(cfg) else
         f"attention   {spec} unfused attention (the block-causal mask rules out flash "
         "attention): the scores [b, heads/TP, s, s] are materialised"),
        "",
        *_layout_lines(cfg, stages, dp, padded, request.gpus_per_node),
        "",
        *_memory_lines(cfg, stages, gpu_bytes),
    ]
    lines += ["", *_save_lines(cfg, stages, request.gpus_per_node)]
    notes += machine_notes(cfg)
    if notes:
        lines += ["", "notes:", *(f"  {note}" for note in notes)]
    peak = max(stages, key=lambda s: s.total(p.use_distributed_optimizer))
    need = peak.total(p.use_distributed_optimizer)
    free = gpu_bytes - need
    fits = free >= 0
    verdict = "fits" if free >= MARGIN_FRACTION * gpu_bytes else "tight" if fits else \
        "does not fit"
    lines += ["", f"verdict: {verdict}: stage {peak.stage} needs {_gib(need)} of "
                  f"{request.gpu_memory_gib} GiB ({_gib(free)} GiB left for the CUDA context, "
                  "communication buffers and fragmentation; keep at least "
                  f"{MARGIN_FRACTION:.0%})"]
    return "\n".join(lines), fits


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        request = parse_plan_args(argv)
        config_label = _config_label(argv)
        report, fits = format_plan(request, config_label)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0 if fits else 1


def _config_label(argv: Sequence[str]) -> str:
    argv = list(argv)
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return "(no --config: defaults and flags)"


if __name__ == "__main__":
    sys.exit(main())
