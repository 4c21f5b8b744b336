"""Megatron-Core GPTModel from a ``TrainConfig``: Llama-style options, one chunk per virtual stage.

The layer spec is Transformer Engine's when TE is importable on a GPU (or asked for with
``--transformer-impl transformer_engine``), Megatron-Core's local spec otherwise. Packed rows
hold several documents: training with TE feeds them to attention as THD sequences with
cu_seqlens (``uses_thd``, ``data/packed_attention.py``); otherwise attention takes the
block-causal mask the data gives (``AttnMaskType.arbitrary``). The model is placed on the
rank's device in the precision's dtype (``place_model``); fusions are on where their kernels
exist (``fusion_settings``).

With ``--fused-output-loss`` the chunks are ``HiddenStatesGPTModel``: the last stage skips the
output layer's matmul and returns the final hidden states with the output weight, which the
objective passes to ``fused_output_soft_q_loss_sum`` (the ``[tokens, v/tp]`` logits never exist).
Parameters, state dicts and checkpoints are GPTModel's, unchanged.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_irl.config import TrainConfig
from megatron_irl.config_online import SAMPLING_LOSSES
from megatron_irl.core.vocabulary import padded_vocab_size
from megatron_irl.cpu_support import current_device, transformer_engine_problem


def half_precision_dtype(training) -> torch.dtype:
    """The parameter dtype: bfloat16 with --bf16, float16 with --fp16, else float32."""
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def uses_transformer_engine(cfg: TrainConfig) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "auto":
        return transformer_engine_problem() is None
    return impl == "transformer_engine"


def transformer_config(cfg: TrainConfig) -> TransformerConfig:
    """Megatron-Core's TransformerConfig for the model, parallelism and precision chosen."""
    model, parallel, training = cfg.model, cfg.parallel, cfg.training
    params_dtype = half_precision_dtype(training)
    on_gpu = torch.cuda.is_available()
    fp8 = {}
    if training.fp8_format is not None:
        fp8 = dict(
            fp8=training.fp8_format,
            fp8_recipe=training.fp8_recipe,
            fp8_amax_history_len=training.fp8_amax_history_len,
            fp8_amax_compute_algo=training.fp8_amax_compute_algo,
            # Megatron-LM's --fp8-param-gather: TE creates the GEMM weights in FP8.
            fp8_param=training.fp8_param_gather,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # Interleaving with 2 stages sends activations and gradients both ways between the
        # same two ranks; batched p2p then pairs a gradient send with an activation receive
        # (silently wrong on gloo). Unbatched p2p orders them by rank parity.
        batch_p2p_comm=not (parallel.virtual_pipeline_model_parallel_size
                            and parallel.pipeline_model_parallel_size == 2),
        bf16=training.bf16,
        fp16=training.fp16,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        # Sums of per-token losses and token counts go to the schedule, which divides by the
        # token count of the whole global batch (all micro-batches, all data-parallel ranks).
        calculate_per_token_loss=True,
        recompute_granularity=training.recompute_granularity,
        recompute_method=training.recompute_method,
        recompute_num_layers=training.recompute_num_layers,
        # CPU runs need CPU-side init; on GPU Megatron initialises each shard on its device.
        use_cpu_initialization=not on_gpu,
        **fusion_settings(
            on_gpu, uses_transformer_engine(cfg),
            softmax_kernel=on_gpu and cuda_extension_importable("scaled_masked_softmax_cuda"),
            weight_grad_kernel=on_gpu and cuda_extension_importable(
                "fused_weight_gradient_mlp_cuda"),
            fusable_activation=model.swiglu or model.add_bias_linear),
        **fp8,
    )


def cuda_extension_importable(name: str) -> bool:
    """Whether a CUDA extension module (Apex's fused kernels) imports."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def fusion_settings(on_gpu: bool, transformer_engine: bool, *, softmax_kernel: bool,
                    weight_grad_kernel: bool, fusable_activation: bool) -> dict:
    """Megatron-LM's fusion defaults where their kernels exist, off on CPUs.

    The masked-softmax fusion (the local spec's unfused attention; TE has its own softmax)
    needs Apex's ``scaled_masked_softmax_cuda``; the bias-activation fusion is a fused torch
    function, needing only CUDA and SwiGLU or a bias (Megatron-LM turns it off for a bias-free
    GeLU MLP, which has nothing to fuse); gradient accumulation fusion writes weight gradients
    straight into the fp32 main-grad buffers with TE's GEMMs, or Apex's
    ``fused_weight_gradient_mlp_cuda`` for the local layers.
    """
    return dict(
        masked_softmax_fusion=on_gpu and softmax_kernel,
        bias_activation_fusion=on_gpu and fusable_activation,
        gradient_accumulation_fusion=on_gpu and (transformer_engine or weight_grad_kernel),
    )


def uses_thd(cfg: TrainConfig) -> bool:
    """Whether training feeds packed rows to attention as THD sequences (``PackedSeqParams``
    with cu_seqlens: TE's flash / cuDNN attention) instead of the block-causal mask.

    With Transformer Engine, for the losses that do not sample: the sampling losses
    (online, gail) also generate with the training model, which passes masks.
    """
    return uses_transformer_engine(cfg) and cfg.irl.loss not in SAMPLING_LOSSES


def layer_spec(cfg: TrainConfig, thd: bool = False) -> ModuleSpec:
    """The layer spec; attention takes the data's block-causal mask (``arbitrary``), or with
    ``thd`` the causal mask within each cu_seqlens segment (TE: padding_causal)."""
    if uses_transformer_engine(cfg):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.model.qk_layernorm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(normalization=cfg.model.normalization,
                                        qk_layernorm=cfg.model.qk_layernorm)
    spec.submodules.self_attention.params["attn_mask_type"] = (
        AttnMaskType.causal if thd else AttnMaskType.arbitrary)
    return spec


class HiddenStatesAndWeight(NamedTuple):
    """The last stage's output with ``--fused-output-loss`` (instead of logits)."""

    hidden: torch.Tensor  # [b, s, h] after the final norm, whole sequence
    weight: torch.Tensor  # [v/tp, h] this rank's output weight (the embedding's when tied)


# GPTModel._postprocess arguments that ask for something other than the logits' inputs.
UNSUPPORTED_POSTPROCESS_ARGUMENTS = ("labels", "inference_context", "is_spec_decode",
                                     "output_processor")


class HiddenStatesGPTModel(GPTModel):
    """GPTModel whose last pipeline stage returns ``HiddenStatesAndWeight``, not logits.

    Only ``_postprocess``, the step after the decoder's final norm, is replaced, and only on
    the last stage (megatron-core 0.16-0.19 call it with keyword arguments only; 0.17 added
    ``is_spec_decode``, 0.18 ``padding_mask`` and ``output_processor``, which this accepts
    through ``**kwargs``): GPTModel there would call ``self.output_layer(hidden,
    weight=output_weight)``; this returns the hidden states in the batch-major layout of the
    labels and the weight that call would have used, so the loss can run the output layer
    itself. With sequence parallelism the ``[s/tp, b, h]`` hidden states are all-gathered first
    as the output layer does, but with a backward that splits the gradient (instead of a
    reduce-scatter): the fused loss returns it already summed over the TP group.
    Multi-token prediction, labels passed to the model, inference and output processors
    (speculative decoding, megatron-core 0.18's ``output_processor``) are not supported.
    """

    def _postprocess(self, hidden_states, **kwargs):
        if not self.post_process:
            return super()._postprocess(hidden_states, **kwargs)
        asked = [name for name in UNSUPPORTED_POSTPROCESS_ARGUMENTS
                 if kwargs.get(name) is not None and kwargs.get(name) is not False]
        if self.mtp_process or asked:
            raise NotImplementedError(
                "--fused-output-loss supports training and evaluation without multi-token "
                f"prediction, labels, inference or output processors (got {asked or 'MTP'})")
        if self.config.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp
            )
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        return HiddenStatesAndWeight(hidden_states.transpose(0, 1).contiguous(), weight)


def place_model(chunk: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move every parameter and buffer of ``chunk`` to ``device`` and, with --bf16 / --fp16,
    cast the floating-point ones to ``dtype`` (in place).

    What Megatron-LM's ``get_model`` does with ``.cuda()`` and ``Float16Module``: layers that
    Megatron builds through plain torch (the local spec's ``WrappedTorchNorm``) take neither
    the device nor ``params_dtype``.
    """
    chunk.to(device=device)
    if dtype != torch.float32:
        chunk.to(dtype=dtype)


def build_model_chunks(cfg: TrainConfig, vocab_size: int, device: torch.device | None = None,
                       thd: bool = False) -> list[GPTModel]:
    """This rank's model: one GPTModel per virtual pipeline stage (one without interleaving),
    every parameter and buffer on ``device`` (default: ``current_device()``) in the dtype of
    --bf16 / --fp16 (float32 otherwise). ``thd``: attention for THD inputs (``uses_thd``);
    otherwise for block-causal masks (inference, the local spec).

    ``vocab_size`` is the real vocabulary (``core.vocabulary.real_vocab_size``); the embedding and
    output layer get it padded to equal TP shards. Each chunk records it as
    ``real_vocab_size`` (the checkpoint stores it with the architecture).
    """
    device = device or current_device()
    config = transformer_config(cfg)
    spec = layer_spec(cfg, thd)
    padded = padded_vocab_size(
        vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
    )
    num_chunks = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    model_class = HiddenStatesGPTModel if cfg.irl.fused_output_loss else GPTModel
    chunks = []
    for vp_stage in range(num_chunks):
        vp = vp_stage if num_chunks > 1 else None
        chunks.append(model_class(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
            position_embedding_type=cfg.model.position_embedding_type,
            rotary_percent=cfg.model.rotary_percent,
            rotary_base=cfg.model.rotary_base,
            rope_scaling=cfg.model.use_rope_scaling,
            rope_scaling_factor=cfg.model.rope_scaling_factor,
            vp_stage=vp,
        ))
        place_model(chunks[-1], device, config.params_dtype)
        chunks[-1].real_vocab_size = vocab_size
    return chunks


def wrap_data_parallel(cfg: TrainConfig, chunks: list[GPTModel]) -> list[DistributedDataParallel]:
    """Megatron-Core DDP around each chunk; gradients reduce in fp32 buckets."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's first bucket may be delayed (Megatron-LM's rule).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
