"""Hugging Face ``config.json`` <-> the project's ``model`` config section, per model family.

Supported: Llama (2, 3, 3.1, 3.2, 3.3), Mistral, Qwen2 / Qwen2.5 and Qwen3 (decoder-only,
RMSNorm, SwiGLU, RoPE, grouped-query attention, no linear biases except Qwen2's q/k/v
biases; Qwen3's per-head query/key RMSNorm). RoPE is plain or Llama 3.x-scaled
(``rope_type: llama3``). Megatron-Core's GPTModel takes only the scaling factor and fixes
the other Llama 3.x parameters (low/high frequency factors 1 and 4, original context 8192,
as every Llama 3.x release has them), so a config with other values, or any other RoPE
scaling (YaRN, linear, dynamic), is refused rather than converted into a model that
computes something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_irl.config import ConfigError


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, field or flag."""


@dataclass(frozen=True)
class Family:
    architecture: str  # config.json "architectures"[0]
    model_type: str
    qkv_bias: bool
    qk_layernorm: bool = False


FAMILIES = {
    family.model_type: family
    for family in (
        Family("LlamaForCausalLM", "llama", qkv_bias=False),
        Family("MistralForCausalLM", "mistral", qkv_bias=False),
        Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True),
        Family("Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_layernorm=True),
    )
}


def supported_text() -> str:
    return ", ".join(f"{f.architecture} (model_type {f.model_type})" for f in FAMILIES.values())


def family_of(hf_config: dict, source: str) -> Family:
    """The family of a config.json; ConversionError naming the supported ones otherwise."""
    architectures = hf_config.get("architectures") or []
    by_architecture = {f.architecture: f for f in FAMILIES.values()}
    family = by_architecture.get(architectures[0]) if architectures else None
    family = family or FAMILIES.get(hf_config.get("model_type"))
    if family is None:
        raise ConversionError(
            f"{source}: unsupported architecture {architectures or hf_config.get('model_type')!r}"
            f"; supported: {supported_text()}")
    return family


# Megatron-Core's Llama 3.x RoPE scaling (RotaryEmbedding._apply_scaling in 0.16.1) takes
# only the factor; these are its fixed values of the other parameters.
LLAMA3_FIXED_ROPE_PARAMETERS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}


def _rope_section(hf_config: dict, source: str) -> dict:
    """rotary_base and the RoPE scaling fields, from transformers 5's ``rope_parameters``
    or the older top-level ``rope_theta`` / ``rope_scaling``."""
    key = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
    parameters = hf_config.get(key) or {}
    rope_type = parameters.get("rope_type") or parameters.get("type") or "default"
    theta = parameters.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"{source}: rope_theta {theta} is not an integer (--rotary-base "
                              "takes an integer)")
    if rope_type == "default":
        return {"rotary_base": int(theta), "use_rope_scaling": False, "rope_scaling_factor": 8.0}
    if rope_type != "llama3":
        raise ConversionError(
            f"{source}: {key}.rope_type {rope_type!r} is not supported (Megatron-Core's GPTModel "
            "computes plain RoPE and Llama 3.x scaling); only 'default' and 'llama3' convert")
    for field, fixed in LLAMA3_FIXED_ROPE_PARAMETERS.items():
        value = parameters.get(field)
        if not isinstance(value, (int, float)) or float(value) != fixed:
            _refuse(source, f"{key}.{field}", value,
                    f"Megatron-Core's Llama 3 RoPE scaling fixes it at {fixed:g}")
    factor = parameters.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        _refuse(source, f"{key}.factor", factor, "the scaling factor must be a number >= 1")
    return {"rotary_base": int(theta), "use_rope_scaling": True,
            "rope_scaling_factor": float(factor)}


def rope_fields(model: dict) -> dict:
    """config.json's RoPE fields for the model section: ``rope_parameters`` (transformers
    >= 5) and ``rope_theta`` / ``rope_scaling`` (older releases)."""
    theta = float(model["rotary_base"])
    if not model.get("use_rope_scaling"):
        return {"rope_theta": theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    scaling = {"rope_type": "llama3", "factor": float(model["rope_scaling_factor"]),
               **LLAMA3_FIXED_ROPE_PARAMETERS}
    return {"rope_theta": theta, "rope_scaling": scaling,
            "rope_parameters": {**scaling, "rope_theta": theta}}


def _refuse(source: str, field: str, value, why: str) -> None:
    raise ConversionError(f"{source}: {field} {value!r} is not supported: {why}")


def model_section(hf_config: dict, source: str) -> dict:
    """The ``model`` config section (``TrainConfig`` keys) of a Hugging Face config.json.

    ``make_vocab_size_divisible_by`` is left out: it depends on the tokenizer and the
    tensor-parallel size (see :func:`vocab_divisor`).
    """
    family = family_of(hf_config, source)
    if hf_config.get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", hf_config["hidden_act"], "the MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf_config.get(field):
            _refuse(source, field, True, "only Qwen2's q/k/v biases are supported")
    if family.qk_layernorm and hf_config.get("attention_bias"):
        _refuse(source, "attention_bias", True, "Qwen3 has no q/k/v biases")
    if hf_config.get("use_sliding_window"):
        _refuse(source, "use_sliding_window", True, "attention is over the whole sequence")
    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    return {
        "num_layers": hf_config["num_hidden_layers"],
        "hidden_size": hidden,
        "ffn_hidden_size": hf_config["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf_config.get("num_key_value_heads") or heads,
        "kv_channels": hf_config.get("head_dim") or hidden // heads,
        "max_position_embeddings": hf_config["max_position_embeddings"],
        "normalization": "RMSNorm",
        "norm_epsilon": float(hf_config.get("rms_norm_eps", 1e-6)),
        "swiglu": True,
        "position_embedding_type": "rope",
        **_rope_section(hf_config, source),
        "rotary_percent": 1.0,
        "qk_layernorm": family.qk_layernorm,
        "untie_embeddings_and_output_weights": not hf_config.get("tie_word_embeddings", False),
        "add_bias_linear": False,
        "add_qkv_bias": family.qkv_bias,
        "init_method_std": float(hf_config.get("initializer_range", 0.02)),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }


def notes(hf_config: dict) -> list[str]:
    """Differences that convert but that the user should know about."""
    window = hf_config.get("sliding_window")
    if window and hf_config.get("use_sliding_window", True):  # Qwen2: off means unused
        return [f"sliding_window {window}: the converted model attends over the whole sequence; "
                f"it computes the same as the original for --seq-length <= {window}"]
    return []


def check_tensor_parallel(model: dict, tp: int) -> None:
    """ConfigError unless ``tp`` divides the heads and the query groups."""
    if tp < 1:
        raise ConfigError(f"--tensor-model-parallel-size {tp} must be >= 1")
    for field in ("num_attention_heads", "num_query_groups"):
        if model[field] % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} must divide {field} "
                              f"{model[field]} (--{field.replace('_', '-')})")


def vocab_divisor(tokenizer_vocab: int, hf_vocab: int, tp: int, requested: int | None) -> int:
    """``--make-vocab-size-divisible-by`` for training at tensor-parallel size ``tp``.

    The trainer pads the real vocabulary (the embedding rows, model.yaml's ``vocab_size``)
    to a multiple of lcm(divisor, TP); the divisor is chosen so that padding the *tokenizer's*
    vocabulary (which may be smaller than the embedding, e.g. Qwen2's) covers every embedding
    row too: both then give the same padded size.
    ``requested`` None: lcm(128, TP) (Megatron-LM's default divisor), doubled until it does;
    such a divisor gives the same padded size at every TP that divides it.
    """
    from megatron_irl.core.vocabulary import padded_vocab_size

    if requested is not None:
        padded = padded_vocab_size(tokenizer_vocab, requested, tp)
        if padded < hf_vocab:
            raise ConfigError(
                f"--make-vocab-size-divisible-by {requested} pads the tokenizer's "
                f"{tokenizer_vocab} tokens to {padded} rows at TP {tp}, fewer than the model's "
                f"vocab_size {hf_vocab}; leave it unset to pick one that fits")
        return requested
    divisor = math.lcm(128, tp)
    while padded_vocab_size(tokenizer_vocab, divisor, tp) < hf_vocab:
        divisor *= 2
    return divisor


def hf_config(model: dict, family: Family, vocab_size: int, dtype: str,
              special_ids: dict) -> dict:
    """config.json for the Megatron ``model`` section (``TrainConfig.to_dict()['model']``).

    ``special_ids``: bos_token_id / eos_token_id / pad_token_id (None when absent).
    """
    if (model["normalization"] != "RMSNorm" or not model["swiglu"]
            or model["position_embedding_type"] != "rope" or model["add_bias_linear"]
            or model["rotary_percent"] != 1.0 or model["add_qkv_bias"] != family.qkv_bias
            or model.get("qk_layernorm", False) != family.qk_layernorm):
        raise ConversionError(
            f"the checkpoint's model is not a {family.architecture}: it needs --normalization "
            f"RMSNorm, --swiglu, --position-embedding-type rope, --disable-bias-linear, "
            f"--rotary-percent 1.0, {'' if family.qkv_bias else 'no '}--add-qkv-bias and "
            f"{'' if family.qk_layernorm else 'no '}--qk-layernorm")
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        "hidden_size": model["hidden_size"],
        "intermediate_size": model["ffn_hidden_size"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model["num_query_groups"] or model["num_attention_heads"],
        "head_dim": model["kv_channels"],
        "hidden_act": "silu",
        "max_position_embeddings": model["max_position_embeddings"],
        "rms_norm_eps": model["norm_epsilon"],
        "initializer_range": model["init_method_std"],
        "tie_word_embeddings": not model["untie_embeddings_and_output_weights"],
        **rope_fields(model),
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
        **special_ids,
    }
    if family.model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:  # the trained model attends over the whole sequence
        config.update(sliding_window=None)
    if family.model_type in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, max_window_layers=model["num_layers"])
    if family.model_type == "qwen3":
        config.update(attention_bias=False)
    return config


def family_of_model(model: dict, requested: str | None, source_config: dict | None = None
                    ) -> Family:
    """``requested`` (a model_type); unset, the family of ``source_config`` (the config.json
    the checkpoint was imported from) when it has one, else qwen3 with query/key norms,
    qwen2 with q/k/v biases and llama otherwise."""
    if requested is not None:
        if requested not in FAMILIES:
            raise ConversionError(f"--family {requested!r} is not supported; supported: "
                                  f"{', '.join(FAMILIES)}")
        return FAMILIES[requested]
    if source_config is not None and source_config.get("model_type") in FAMILIES:
        return FAMILIES[source_config["model_type"]]
    if model.get("qk_layernorm"):
        return FAMILIES["qwen3"]
    return FAMILIES["qwen2" if model["add_qkv_bias"] else "llama"]
