"""The ``model:`` section of the configuration: the transformer architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_irl.config_schema import _opt, _Section


def _swiglu_ffn_hidden_size(hidden_size: int) -> int:
    # Megatron-LM's rule: two input projections, so 2/3 of 4h, rounded down to a multiple
    # of 64; never below 64 so that tiny test models stay valid.
    return max(64, int(4 * hidden_size * 2 / 3 / 64) * 64)


@dataclass
class ModelConfig(_Section):
    """Transformer architecture (Megatron-Core GPTModel)."""

    num_layers: int = _opt(2, "--num-layers", "Number of transformer layers.")
    hidden_size: int = _opt(64, "--hidden-size", "Transformer hidden size.")
    ffn_hidden_size: int | None = _opt(
        None, "--ffn-hidden-size",
        "MLP hidden size; unset: 4*hidden, or with --swiglu 8/3*hidden rounded down to 64.")
    num_attention_heads: int = _opt(4, "--num-attention-heads", "Number of attention heads.")
    num_query_groups: int | None = _opt(
        None, "--num-query-groups",
        "Key/value groups for grouped-query attention; unset: one per head.")
    kv_channels: int | None = _opt(
        None, "--kv-channels", "Per-head dimension; unset: hidden/heads.")
    seq_length: int = _opt(128, "--seq-length", "Training sequence length in tokens.")
    max_position_embeddings: int | None = _opt(
        None, "--max-position-embeddings", "Positions the model supports; unset: --seq-length.")
    normalization: Literal["LayerNorm", "RMSNorm"] = _opt(
        "LayerNorm", "--normalization", "Normalisation layer type.")
    norm_epsilon: float = _opt(1e-5, "--norm-epsilon", "Epsilon of the normalisation layers.")
    swiglu: bool = _opt(False, "--swiglu", "Use a SwiGLU MLP instead of GeLU.")
    position_embedding_type: Literal["learned_absolute", "rope"] = _opt(
        "learned_absolute", "--position-embedding-type", "Position embedding type.")
    rotary_base: int = _opt(10000, "--rotary-base", "Base of the rotary embedding frequencies.")
    rotary_percent: float = _opt(1.0, "--rotary-percent", "Fraction of head dims that get rotary.")
    use_rope_scaling: bool = _opt(
        False, "--use-rope-scaling",
        "Llama 3.x RoPE frequency scaling (Megatron-Core's: low/high frequency factors 1 and 4, "
        "original context 8192 positions).")
    rope_scaling_factor: float = _opt(
        8.0, "--rope-scaling-factor", "Factor of --use-rope-scaling (Llama 3.1: 8, 3.2: 32).")
    qk_layernorm: bool = _opt(
        False, "--qk-layernorm", "Normalise each head's queries and keys (Qwen3).")
    untie_embeddings_and_output_weights: bool = _opt(
        False, "--untie-embeddings-and-output-weights",
        "Separate input embedding and output layer.")
    add_bias_linear: bool = _opt(
        True, "--disable-bias-linear", "Omit biases in linear layers.", inverse=True)
    add_qkv_bias: bool = _opt(False, "--add-qkv-bias", "Add biases to the QKV projection only.")
    init_method_std: float = _opt(0.02, "--init-method-std", "Std of the normal weight init.")
    hidden_dropout: float = _opt(0.1, "--hidden-dropout", "Dropout after attention and MLP.")
    attention_dropout: float = _opt(
        0.1, "--attention-dropout", "Dropout of attention probabilities.")
    make_vocab_size_divisible_by: int = _opt(
        128, "--make-vocab-size-divisible-by",
        "Pad the vocabulary to a multiple of this (times TP).")
    vocab_size: int | None = _opt(
        None, "--vocab-size",
        "Real vocabulary size: token ids below it are the actions, the padding rows above it "
        "get no probability; unset: the tokenizer's size (an imported model's model.yaml "
        "sets its embedding rows).")
    transformer_impl: Literal["auto", "local", "transformer_engine"] = _opt(
        "auto", "--transformer-impl",
        "Layer implementation; auto: Transformer Engine when it can run, else local.")

    def _validate(self) -> None:
        self._require_at_least(1, "num_layers", "hidden_size", "ffn_hidden_size",
                               "num_attention_heads", "num_query_groups", "kv_channels",
                               "seq_length", "max_position_embeddings",
                               "make_vocab_size_divisible_by", "vocab_size", "rotary_base")
        for name in ("norm_epsilon", "init_method_std"):
            self._require(getattr(self, name) > 0, name, "be > 0")
        for name in ("hidden_dropout", "attention_dropout"):
            self._require(0 <= getattr(self, name) < 1, name, "be in [0, 1)")
        self._require(0 < self.rotary_percent <= 1, "rotary_percent", "be in (0, 1]")
        self._require(self.rope_scaling_factor >= 1, "rope_scaling_factor", "be >= 1")
        if self.num_query_groups is not None:
            self._require(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
                          f"divide {self.flag('num_attention_heads')} {self.num_attention_heads}")
        if self.kv_channels is None:
            self._require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                          f"be divisible by {self.flag('num_attention_heads')} "
                          f"{self.num_attention_heads} (or set {self.flag('kv_channels')})")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = (_swiglu_ffn_hidden_size(self.hidden_size) if self.swiglu
                                    else 4 * self.hidden_size)
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.position_embedding_type == "learned_absolute":
            self._require(self.max_position_embeddings >= self.seq_length,
                          "max_position_embeddings",
                          f"be >= {self.flag('seq_length')} {self.seq_length} with learned "
                          "absolute position embeddings")
