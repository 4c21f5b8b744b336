"""The one table between Hugging Face Llama-family tensors and Megatron checkpoint tensors.

Megatron names here are the keys of Megatron-Core's *sharded* (checkpoint) state dict,
which are the same for the local and the Transformer Engine layer spec: the local spec's
separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules are stored under the TE names
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` (the local spec's
``sharded_state_dict_keys_map``). Keys under ``decoder.layers.`` hold all layers stacked on
a leading axis ([num_layers, ...]); here a tensor is always one layer's slice of it.

Every tensor is described in its *global* (unsharded) layout, which does not depend on
the tensor- or pipeline-parallel layout:

* ``linear_qkv.weight`` [g * (q_per_g + 2) * d, h]: per query group g, its q_per_g query
  heads, then its key head, then its value head (d = kv_channels); the bias likewise.
  Tensor parallelism splits it by whole groups.
* ``q_layernorm.weight`` / ``k_layernorm.weight`` [d]: one RMSNorm weight shared by all
  heads (Qwen3's q_norm / k_norm), replicated over tensor-parallel ranks.
* ``linear_fc1.weight`` [2 * ffn, h]: the gate (SwiGLU W) rows, then the up (V) rows.
* ``embedding.word_embeddings.weight`` / ``output_layer.weight`` [padded_vocab, h]: the
  Hugging Face rows, then zero rows up to the padded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Dims:
    """The sizes the transforms need (from the Megatron model config)."""

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # Hugging Face rows (without padding)
    padded_vocab_size: int


@dataclass(frozen=True)
class Transform:
    """A pair of inverse functions between Hugging Face tensors and one Megatron tensor."""

    to_megatron: Callable[[Sequence[torch.Tensor], Dims], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Dims], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the Hugging Face tensor(s) it is made of.

    ``{layer}`` in a Hugging Face name stands for the layer number; ``when`` names the
    model-config field that must be true for the tensor to exist; None: always.
    """

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    when: str | None = None

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith("decoder.layers.")

    def applies(self, model_config: dict) -> bool:
        return self.when is None or bool(model_config.get(self.when))

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(name.format(layer=layer) for name in self.hf)


def _copy_to_megatron(tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
    return tensors[0]


def _copy_to_hf(tensor: torch.Tensor, dims: Dims) -> Sequence[torch.Tensor]:
    return (tensor,)


COPY = Transform(_copy_to_megatron, _copy_to_hf)


def _pad_vocab(tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
    """[v, h] -> [padded_v, h]: the padded rows are zero, so their logits are 0."""
    (table,) = tensors
    padding = table.new_zeros(dims.padded_vocab_size - table.shape[0], *table.shape[1:])
    return torch.cat([table, padding])


def _unpad_vocab(tensor: torch.Tensor, dims: Dims) -> Sequence[torch.Tensor]:
    return (tensor[:dims.vocab_size],)


VOCAB_ROWS = Transform(_pad_vocab, _unpad_vocab)


def _qkv_split_sizes(dims: Dims) -> tuple[int, int, int]:
    """Rows of one query group in the fused tensor: (queries, key, value)."""
    q_per_group = dims.num_attention_heads // dims.num_query_groups
    return q_per_group * dims.kv_channels, dims.kv_channels, dims.kv_channels


def _fuse_qkv(tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
    """q [heads*d, ...], k [groups*d, ...], v [groups*d, ...] -> [groups*(q_per_g+2)*d, ...]
    grouped as q-heads-of-g, k_g, v_g for each group g (weights and biases alike)."""
    q, k, v = tensors
    groups = dims.num_query_groups
    per_group = [t.reshape(groups, t.shape[0] // groups, *t.shape[1:]) for t in (q, k, v)]
    fused = torch.cat(per_group, dim=1)  # [groups, (q_per_g+2)*d, ...]
    return fused.reshape(-1, *q.shape[1:])


def _split_qkv(tensor: torch.Tensor, dims: Dims) -> Sequence[torch.Tensor]:
    groups = dims.num_query_groups
    grouped = tensor.reshape(groups, -1, *tensor.shape[1:])
    q, k, v = torch.split(grouped, _qkv_split_sizes(dims), dim=1)
    return tuple(t.reshape(-1, *tensor.shape[1:]).contiguous() for t in (q, k, v))


QKV = Transform(_fuse_qkv, _split_qkv)


def _concat_rows(tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
    return torch.cat(list(tensors))


def _split_halves(tensor: torch.Tensor, dims: Dims) -> Sequence[torch.Tensor]:
    return tuple(half.contiguous() for half in torch.chunk(tensor, 2))


GATE_UP = Transform(_concat_rows, _split_halves)

_ATTN = "model.layers.{layer}.self_attn."
_MLP = "model.layers.{layer}.mlp."

RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB_ROWS),
    Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
         ("model.layers.{layer}.input_layernorm.weight",), COPY),
    Rule("decoder.layers.self_attention.linear_qkv.weight",
         (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"), QKV),
    Rule("decoder.layers.self_attention.linear_qkv.bias",
         (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"), QKV,
         when="add_qkv_bias"),
    Rule("decoder.layers.self_attention.q_layernorm.weight", (_ATTN + "q_norm.weight",), COPY,
         when="qk_layernorm"),
    Rule("decoder.layers.self_attention.k_layernorm.weight", (_ATTN + "k_norm.weight",), COPY,
         when="qk_layernorm"),
    Rule("decoder.layers.self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",), COPY),
    Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight",
         ("model.layers.{layer}.post_attention_layernorm.weight",), COPY),
    Rule("decoder.layers.mlp.linear_fc1.weight",
         (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"), GATE_UP),
    Rule("decoder.layers.mlp.linear_fc2.weight", (_MLP + "down_proj.weight",), COPY),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), COPY),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB_ROWS,
         when="untie_embeddings_and_output_weights"),
)

RULES_BY_MEGATRON_KEY = {rule.megatron: rule for rule in RULES}


def active_rules(model_config: dict) -> list[Rule]:
    """The rules whose tensors exist for this model section (``TrainConfig.to_dict()['model']``)."""
    return [rule for rule in RULES if rule.applies(model_config)]
