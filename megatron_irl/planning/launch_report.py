"""The launch plan of ``megatron-irl plan`` (``commands/plan.py``): a training configuration
checked for a launch, its parallel layout, parameter count and the memory of each pipeline
stage's GPUs (``memory_estimate.py``), as a text report. No model is built and Megatron-Core
is not imported.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Sequence

from megatron_irl.config import ConfigError, TrainConfig
from megatron_irl.core.checkpoint_files import CheckpointError
from megatron_irl.core.vocabulary import check_vocab_padding, padded_vocab_size, real_vocab_size
from megatron_irl.planning import memory_estimate
from megatron_irl.planning.memory_estimate import GIB, StageMemory

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
    if memory_estimate.has_kl_reference(cfg):
        lines.append("  KL ref: GAIL's frozen copy of the starting weights (--gail-kl-weight), "
                     "in the weights' dtype, without gradients or optimizer state")
    per_layer = memory_estimate.layer_activation_bytes(cfg)
    lines.append(
        f"  activations: stage 0 holds {stages[0].in_flight} (chunk) micro-batches at its peak; "
        f"a layer keeps {per_layer.stored / 2**20:,.0f} MiB per micro-batch without "
        f"recomputation, of which {per_layer.attention_scores / 2**20:,.0f} MiB are attention "
        f"scores (recompute: {t.recompute_granularity or 'none'})")
    return lines


def _save_lines(cfg: TrainConfig, stages: list[StageMemory], gpus_per_node: int | None
                ) -> list[str]:
    """The host memory a checkpoint save needs (``memory_estimate.StageMemory.save_host``)."""
    per_gpu = max(s.save_host for s in stages)
    if not per_gpu:
        return ["checkpoint  saving copies tensors to the host one at a time as it writes them"]
    node = (f", {_gib(per_gpu * gpus_per_node)} GiB per node of {gpus_per_node} GPUs"
            if gpus_per_node else "")
    if cfg.checkpoint.async_save:
        what = ("keeps a host copy of every tensor each rank writes until the background write "
                "ends (--async-save)")
    elif cfg.checkpoint.dist_ckpt_optim_fully_reshardable:
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


def format_plan(request: PlanRequest, title: str) -> tuple[str, bool]:
    """The report under the line ``title`` and whether the largest stage fits; raises
    ConfigError for a bad config."""
    cfg = request.config
    dp = check_launch(cfg, request.world_size)
    vocab, vocab_source, notes = resolve_vocab_size(cfg, request.vocab_size)
    try:
        check_vocab_padding(cfg, vocab)
    except CheckpointError as error:  # training stops on it; a plan may precede the fix
        notes.append(str(error))
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, tp)
    stages = memory_estimate.estimate_memory(cfg, padded, dp)
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
    spec = "Transformer Engine" if memory_estimate.assumes_transformer_engine(cfg) else "local"
    lines = [
        title,
        f"model       {_describe_model(cfg, memory_estimate.model_parameters(m, padded))}",
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
         "cuDNN attention; no [s, s] scores" if memory_estimate.packs_as_thd(cfg) else
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


