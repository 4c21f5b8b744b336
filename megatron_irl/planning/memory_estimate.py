"""Sizing a training run without building it: parameters per pipeline stage, memory per GPU.

Pure functions of a ``TrainConfig``, the padded vocabulary and the data-parallel size: no
torch, no process groups. ``megatron-irl plan`` prints what they return.

Layout (Megatron-Core's default rank order "tp-cp-ep-dp-pp", no context or expert
parallelism): global rank = tp + TP * (dp + DP * pp). Pipeline stage ``pp`` holds the layers
``pipeline_layers`` gives it; its chunk ``c`` (interleaved schedule) holds layers
``[(c * PP + pp) * L_c, ... + L_c)`` with ``L_c = L / (PP * VPP)``. TP rank ``r`` holds rows
``[r * V/TP, (r + 1) * V/TP)`` of the padded vocabulary and 1/TP of every attention head group
and MLP column; norms and row-parallel biases are replicated.

Memory per GPU, in bytes, is the sum of these terms (the trainer's choices, ``training/``):

* weights: the parameters in the parameter dtype (bf16: 2 bytes, else 4; the trainer casts
  every parameter, as Megatron-LM's Float16Module does); with ``--fp8-param-gather`` the
  linear-layer weights are FP8 (1 byte);
* gradients: Megatron-Core DDP's buffers, fp32 (``grad_reduce_in_fp32``): 4 bytes a parameter;
* optimizer: Adam's two fp32 moments (8 bytes) plus, for bf16 weights, an fp32 main copy
  (4 bytes); the distributed optimizer divides them by the data-parallel size;
* FP8 weight cache: Transformer Engine's FP8 copy of each linear weight and its transpose,
  kept across micro-batches (2 bytes a linear-layer weight, plus one 1-byte scale per 32
  values of each with ``--fp8-recipe mxfp8``); with ``--fp8-param-gather`` the weight is
  that FP8 copy, so only the transpose is cached;
* activations: what backward needs, per layer and micro-batch (``layer_activation_bytes``),
  times the micro-batches in flight at the stage's peak (``in_flight_chunks``), with the
  recomputation chosen, plus one layer's attention scores and their gradient (working set);
  with THD packing (``packs_as_thd``) flash attention keeps no scores, only their softmax
  statistics;
* logits and loss (last stage, one micro-batch): the ``[tokens, V/TP]`` logits and the fp32
  softmax the loss keeps for backward; with ``--fused-output-loss`` a ``[chunk, V/TP]`` fp32
  buffer and the fp32 gradient of the ``[V/TP, h]`` output weight instead.

Host memory of a checkpoint save (``save_host``): with ``--use-distributed-optimizer`` the
checkpoint's default optimizer format (``fully_reshardable``, loadable at any TP / PP / DP)
gathers the fp32 main weights and Adam moments of the rank's model-parallel shard, i.e. its
unsharded optimizer state, in host memory on every rank at once; the ``dp_reshardable``
format (``--dist-ckpt-optim-fully-reshardable false``) stages only the rank's own shard of
them (1/DP). Without the distributed optimizer the tensors are copied to the host one at a
time as they are written (counted as 0). With ``--async-save`` the background writer holds a
host copy of every tensor the rank writes until the write ends: on top of the above, the
weights and (without the distributed optimizer) the optimizer state, which data-parallel rank
0 writes for its replicas (``--ckpt-fully-parallel-save``: 1/DP of them on each rank).

Not counted: the CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation and
transient buffers of backward other than those above; ``plan`` keeps a margin for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_irl.config import ModelConfig, TrainConfig
from megatron_irl.config_online import SAMPLING_LOSSES

GIB = 1024 ** 3
_FP32 = 4
_ADAM_MOMENT_BYTES = 2 * _FP32
_FP8_WEIGHT_COPY_BYTES = 2  # e4m3 data and its transpose (Hopper GEMMs take both layouts)
_MXFP8_BLOCK = 32  # values per 1-byte shared exponent (E8M0) of an MXFP8 tensor


def _dtype_bytes(cfg: TrainConfig) -> int:
    """Bytes of a parameter and of an activation: 2 with --bf16 or --fp16, else 4
    (``core.model.half_precision_dtype``)."""
    return 2 if cfg.training.bf16 or cfg.training.fp16 else _FP32


def pipeline_layers(num_layers: int, pp: int, vpp: int | None) -> list[list[range]]:
    """Per pipeline stage, per model chunk: the (global) layer indices it holds."""
    chunks = vpp or 1
    per_chunk = num_layers // (pp * chunks)
    return [[range((c * pp + stage) * per_chunk, (c * pp + stage + 1) * per_chunk)
             for c in range(chunks)] for stage in range(pp)]


def _norm_parameters(m: ModelConfig) -> int:
    return m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)  # weight (+ bias)


def _layer_linear_weights(m: ModelConfig, tp: int) -> int:
    """Weights (no biases) of one layer's four linear layers on one TP rank."""
    h, d = m.hidden_size, m.kv_channels
    query = m.num_attention_heads * d
    groups = m.num_query_groups or m.num_attention_heads
    qkv = h * (query + 2 * groups * d) // tp
    proj = query // tp * h
    fc1 = h * m.ffn_hidden_size * (2 if m.swiglu else 1) // tp
    fc2 = m.ffn_hidden_size // tp * h
    return qkv + proj + fc1 + fc2


def layer_parameters(m: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank: Megatron-Core's GPT layer, whose
    Transformer Engine spec has the same parameters as the local one (its norms are fused
    into the linear layers that follow them)."""
    h, d = m.hidden_size, m.kv_channels
    groups = m.num_query_groups or m.num_attention_heads
    biases = 0
    if m.add_bias_linear or m.add_qkv_bias:
        biases += (m.num_attention_heads + 2 * groups) * d // tp
    if m.add_bias_linear:
        # Column-parallel biases are split; row-parallel ones (proj, fc2) are replicated.
        biases += h + m.ffn_hidden_size * (2 if m.swiglu else 1) // tp + h
    query_key_norms = 2 * d if m.qk_layernorm else 0  # replicated, one per head dim
    return 2 * _norm_parameters(m) + _layer_linear_weights(m, tp) + biases + query_key_norms


def embedding_parameters(m: ModelConfig, padded_vocab: int, tp: int) -> int:
    """The first stage's word (and learned position) embeddings on one TP rank."""
    positions = m.max_position_embeddings * m.hidden_size \
        if m.position_embedding_type == "learned_absolute" else 0
    return padded_vocab // tp * m.hidden_size + positions


def stage_parameters(cfg: TrainConfig, padded_vocab: int) -> list[int]:
    """Parameters on each TP rank of each pipeline stage (all its model chunks).

    Tied embeddings at PP > 1 have a copy of the word embeddings as the last stage's output
    layer (kept equal by an all-reduce of their gradients), counted on both stages.
    """
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    counts = []
    for stage, chunks in enumerate(pipeline_layers(m.num_layers, pp,
                                                   p.virtual_pipeline_model_parallel_size)):
        count = sum(len(chunk) for chunk in chunks) * layer_parameters(m, tp)
        if stage == 0:
            count += embedding_parameters(m, padded_vocab, tp)
        if stage == pp - 1:
            count += _norm_parameters(m)
            if m.untie_embeddings_and_output_weights or pp > 1:
                count += padded_vocab // tp * m.hidden_size
        counts.append(count)
    return counts


def model_parameters(m: ModelConfig, padded_vocab: int) -> int:
    """Parameters of the whole model, each counted once (the padded vocabulary's rows too)."""
    output = padded_vocab * m.hidden_size if m.untie_embeddings_and_output_weights else 0
    return (embedding_parameters(m, padded_vocab, 1) + m.num_layers * layer_parameters(m, 1)
            + _norm_parameters(m) + output)


def assumes_transformer_engine(cfg: TrainConfig) -> bool:
    """Whether the estimate counts Transformer Engine's layer spec rather than the local one:
    ``auto`` is counted as TE (the GPUs a plan is made for are expected to have it)."""
    return cfg.model.transformer_impl != "local"


def fp8_weight_cache_bytes(recipe: str, linear_weights: int) -> int:
    """Bytes of Transformer Engine's FP8 copies (data and transpose) of ``linear_weights``
    weights: 1 byte a value each, plus MXFP8's per-32-value scales; the per-tensor (delayed,
    tensorwise) and 128x128-block (blockwise) scales are negligible."""
    cache = linear_weights * _FP8_WEIGHT_COPY_BYTES
    if recipe == "mxfp8":
        cache += -(-cache // _MXFP8_BLOCK)
    return cache


def packs_as_thd(cfg: TrainConfig) -> bool:
    """Whether training gives attention its packed rows as THD sequences (flash / cuDNN
    attention, no ``[s, s]`` scores) rather than a block-causal mask: with Transformer
    Engine, for the losses that do not sample (``core.model.uses_thd``)."""
    return assumes_transformer_engine(cfg) and cfg.irl.loss not in SAMPLING_LOSSES


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one layer keeps for backward, per micro-batch, on one rank."""

    stored: int  # everything kept without recomputation
    checkpoint_input: int  # the layer input alone (full recomputation keeps only this)
    core_attention: int  # of ``stored``: what selective recomputation drops (scores, K/V copies)
    attention_scores: int  # the softmax probabilities alone


def layer_activation_bytes(cfg: TrainConfig) -> LayerActivations:
    """Activations of one transformer layer for one micro-batch on one rank.

    Tokens T = micro-batch x sequence; residual-stream tensors ``[T, h]`` are split over TP
    with sequence parallelism, the rest ``[T, x/TP]`` always. Kept for backward: the inputs
    of both norms and of the four linear layers (FP8: linear inputs as 1-byte copies, the
    attention output in both forms), Q/K/V with K and V expanded to every head (the
    unfused attention repeats them for grouped-query attention), the softmax probabilities
    ``[b, heads/TP, s, s]``, the MLP's fc1 output and activation output (SwiGLU: silu's
    output too), and 1-byte dropout masks where dropout is on.
    """
    m, t, p = cfg.model, cfg.training, cfg.parallel
    tp = p.tensor_model_parallel_size
    act = _dtype_bytes(cfg)
    fp8 = t.fp8_format is not None
    linear_in = 1 if fp8 else act
    tokens = t.micro_batch_size * m.seq_length
    residual = tokens * m.hidden_size // (tp if p.sequence_parallel else 1)
    heads = m.num_attention_heads // tp
    query = tokens * heads * m.kv_channels
    ffn = tokens * m.ffn_hidden_size // tp
    groups = (m.num_query_groups or m.num_attention_heads) // tp
    key_value = 2 * tokens * groups * m.kv_channels  # K and V as the QKV layer gives them
    if packs_as_thd(cfg):
        # Flash / cuDNN attention on THD sequences keeps only the softmax statistics
        # [b, heads/TP, s] in fp32, takes grouped K/V as they are and regenerates dropout.
        scores = t.micro_batch_size * heads * m.seq_length * _FP32
        core_attention = scores
    else:
        score_elements = t.micro_batch_size * heads * m.seq_length ** 2
        # A block-causal mask (the local spec, or sampling losses) keeps Transformer Engine
        # off flash and cuDNN attention: the [b, heads/TP, s, s] scores exist. TE's softmax
        # keeps them in the activation dtype; the local spec's runs in fp32 and keeps both.
        score_bytes = act if assumes_transformer_engine(cfg) or act == _FP32 else _FP32 + act
        scores = score_elements * score_bytes
        if m.attention_dropout > 0:
            scores += score_elements * (1 + act)  # the mask and the dropped-out probabilities
        core_attention = scores + (2 * query - key_value) * act  # + K, V repeated per head
    norms_and_linear_inputs = 2 * residual * act + 2 * residual * linear_in
    attention = (query + key_value + query) * act + (query if fp8 else 0)  # Q, K, V, output
    mlp = ffn * act * (3 if m.swiglu else 1) + ffn * linear_in
    dropout_masks = 2 * residual if m.hidden_dropout > 0 else 0
    stored = norms_and_linear_inputs + attention + core_attention + mlp + dropout_masks
    return LayerActivations(stored, residual * act, core_attention, scores)


def in_flight_chunks(stage: int, pp: int, vpp: int | None, num_microbatches: int) -> int:
    """Model-chunk micro-batches whose activations stage ``stage`` holds at its peak.

    No pipelining: one. 1F1B: the warm-up forwards plus one, ``PP - stage``. Interleaved
    (Megatron-Core's schedule): ``2 (PP - stage - 1) + (VPP - 1) PP + 1`` chunk passes.
    """
    if pp == 1:
        return 1
    if not vpp:
        return min(pp - stage, num_microbatches)
    return min(num_microbatches * vpp, 2 * (pp - stage - 1) + (vpp - 1) * pp + 1)


def _chunk_activations(cfg: TrainConfig, layers: int, per_layer: LayerActivations) -> int:
    """Bytes a model chunk of ``layers`` layers keeps per micro-batch, with the recompute."""
    t = cfg.training
    if t.recompute_granularity == "selective":  # core attention recomputed: keep Q, K, V
        return layers * (per_layer.stored - per_layer.core_attention)
    if t.recompute_granularity == "full":
        n = min(t.recompute_num_layers, layers)
        if t.recompute_method == "uniform":  # one checkpoint per group of n layers
            return -(-layers // n) * per_layer.checkpoint_input
        return n * per_layer.checkpoint_input + (layers - n) * per_layer.stored  # block
    return layers * per_layer.stored


def _backward_working_set(cfg: TrainConfig, per_layer: LayerActivations) -> int:
    """Bytes that exist only during one layer's backward: the gradient of its attention
    scores, plus what recomputation re-materialises (the core attention, one layer, or a
    group of ``--recompute-num-layers`` layers for full uniform recomputation)."""
    t = cfg.training
    recomputed = 0
    if t.recompute_granularity == "selective":
        recomputed = per_layer.core_attention
    elif t.recompute_granularity == "full":
        layers = t.recompute_num_layers if t.recompute_method == "uniform" else 1
        recomputed = layers * per_layer.stored
    return recomputed + per_layer.attention_scores


def logits_and_loss_bytes(cfg: TrainConfig, padded_vocab: int) -> int:
    """The last stage's output-layer and loss buffers for one micro-batch.

    Unfused: the ``[T, V/TP]`` logits in the activation dtype and the fp32 copy the soft-Q
    loss turns into the softmax for backward (fp32 logits are that buffer themselves).
    Fused (``--fused-output-loss``): one ``[chunk, V/TP]`` fp32 buffer, the fp32
    accumulator of the output weight's gradient ``[V/TP, h]`` (and its cast), and the
    hidden states' gradient.
    """
    m, t, p = cfg.model, cfg.training, cfg.parallel
    act = _dtype_bytes(cfg)
    shard = padded_vocab // p.tensor_model_parallel_size
    tokens = t.micro_batch_size * m.seq_length
    if cfg.irl.fused_output_loss:
        chunk = min(cfg.irl.fused_output_chunk_size, tokens)
        weight_grad = shard * m.hidden_size * (_FP32 + (act if act != _FP32 else 0))
        return chunk * shard * _FP32 + weight_grad + tokens * m.hidden_size * act
    return tokens * shard * (_FP32 + (act if act != _FP32 else 0))


@dataclass(frozen=True)
class StageMemory:
    """One TP rank of one pipeline stage: its parameters and the memory terms, in bytes."""

    stage: int
    layers: list[range]  # per model chunk
    parameters: int
    weights: int
    gradients: int
    optimizer_sharded: int  # with --use-distributed-optimizer (over the data-parallel ranks)
    optimizer_replicated: int  # without
    fp8_weight_cache: int
    activations: int
    logits_and_loss: int
    in_flight: int  # model-chunk micro-batches held at the peak
    save_host: int  # host memory a checkpoint save takes on this GPU's rank (all at once)
    kl_reference: int = 0  # GAIL's frozen copy of the weights (--gail-kl-weight > 0)

    def total(self, distributed_optimizer: bool) -> int:
        optimizer = self.optimizer_sharded if distributed_optimizer else self.optimizer_replicated
        return (self.weights + self.gradients + optimizer + self.fp8_weight_cache
                + self.activations + self.logits_and_loss + self.kl_reference)


def _save_host_bytes(cfg: TrainConfig, weights: int, optimizer: int, data_parallel: int) -> int:
    """Host memory a checkpoint save takes on the busiest rank of a stage, given its weights
    and unsharded optimizer state (``save_host`` in the module docstring)."""
    distributed = cfg.parallel.use_distributed_optimizer
    staged = 0
    if distributed:
        staged = (optimizer if cfg.checkpoint.dist_ckpt_optim_fully_reshardable
                  else -(-optimizer // data_parallel))
    if not cfg.checkpoint.async_save:
        return staged
    replicated = weights + (0 if distributed else optimizer)
    if cfg.checkpoint.ckpt_fully_parallel_save:
        replicated = -(-replicated // data_parallel)
    return staged + replicated


def has_kl_reference(cfg: TrainConfig) -> bool:
    """Whether the run keeps GAIL's frozen reference model (``training/reference.py``)."""
    return cfg.irl.loss == "gail" and cfg.gail.kl_weight > 0


def estimate_memory(cfg: TrainConfig, padded_vocab: int, data_parallel: int) -> list[StageMemory]:
    """Per pipeline stage: parameters and memory of one of its GPUs (all TP ranks are alike)."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    tp, pp, vpp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                   p.virtual_pipeline_model_parallel_size)
    param_bytes = _dtype_bytes(cfg)
    main_copy = _FP32 if param_bytes < _FP32 else 0  # fp32 main weights of bf16 / fp16 ones
    num_microbatches = t.global_batch_size // (t.micro_batch_size * data_parallel)
    per_layer = layer_activation_bytes(cfg)
    residual = t.micro_batch_size * m.seq_length * m.hidden_size \
        // (tp if p.sequence_parallel else 1)
    stages = []
    for stage, (chunks, params) in enumerate(zip(pipeline_layers(m.num_layers, pp, vpp),
                                                 stage_parameters(cfg, padded_vocab))):
        layers = sum(len(chunk) for chunk in chunks)
        linear_weights = layers * _layer_linear_weights(m, tp)
        weights, fp8_cache = params * param_bytes, 0
        if t.fp8_format:
            fp8_cache = fp8_weight_cache_bytes(t.fp8_recipe, linear_weights)
            if t.fp8_param_gather:  # the FP8 copy is the weight: 1 byte instead of bf16's 2
                weights -= linear_weights * (param_bytes - 1)
                fp8_cache -= linear_weights
        optimizer = params * (_ADAM_MOMENT_BYTES + main_copy)
        in_flight = in_flight_chunks(stage, pp, vpp, num_microbatches)
        activations = (in_flight * _chunk_activations(cfg, len(chunks[0]), per_layer)
                       + _backward_working_set(cfg, per_layer))
        logits = 0
        if stage == pp - 1:
            activations += 2 * residual * param_bytes  # final norm, output layer inputs
            logits = logits_and_loss_bytes(cfg, padded_vocab)
        stages.append(StageMemory(
            stage=stage, layers=chunks, parameters=params,
            weights=weights, gradients=params * _FP32,
            optimizer_sharded=-(-optimizer // data_parallel), optimizer_replicated=optimizer,
            fp8_weight_cache=fp8_cache, activations=activations, logits_and_loss=logits,
            in_flight=in_flight,
            save_host=_save_host_bytes(cfg, weights, optimizer, data_parallel),
            # The reference is built like the trained model: the same weights' bytes.
            kl_reference=weights if has_kl_reference(cfg) else 0))
    return stages
