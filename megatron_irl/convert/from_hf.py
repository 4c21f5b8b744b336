"""Hugging Face model directory -> megatron-irl checkpoint (weights only, iteration 0).

Two steps:

* :func:`plan_import` (local, cheap): reads config.json and the tokenizer, checks that the
  architecture is supported and that the tensor-parallel size fits, and derives the
  ``model`` config section. Everything that can be refused is refused here, before any
  tensor is read.
* :func:`import_checkpoint` (collective over the world group, under the Megatron parallel
  layout of the caller): builds this rank's model chunks exactly as the trainer does, but
  on the meta device, then gives them uninitialised CPU storage (no random init) and fills
  each of the chunks' sharded-state-dict tensors from the Hugging Face tensors. Each rank
  reads only the tensors of its own pipeline stage, one at a time, and keeps only its
  tensor-parallel slice, so a rank's memory is its share of the model plus one full
  Hugging Face tensor. The checkpoint is saved with the trainer's ``save_checkpoint``;
  torch_dist checkpoints reshard on load, so the conversion layout only sets the memory
  per rank, not the layouts the checkpoint loads into.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import yaml

from megatron_irl.config import ConfigError, TrainConfig
from megatron_irl.convert import families
from megatron_irl.convert.families import ConversionError
from megatron_irl.convert.hf_files import (
    SafetensorsReader,
    copy_tokenizer_files,
    read_json,
    write_json,
)
from megatron_irl.convert.mapping import RULES_BY_MEGATRON_KEY, Dims

MODEL_YAML = "model.yaml"
HF_CONFIG_COPY = "hf_config.json"  # the source config.json, read back by the export


@dataclass
class ImportPlan:
    """What the conversion will produce."""

    hf_dir: str
    model: dict  # the model config section to train with (model.yaml)
    config: dict  # the whole ``TrainConfig.to_dict()`` to build, at the conversion layout
    tensor_parallel_size: int  # the TP size to train with
    hf_vocab_size: int  # embedding rows of the Hugging Face model
    tokenizer_vocab_size: int  # the tokenizer's tokens (``--tokenizer-model``), <= hf_vocab_size
    notes: list[str] = field(default_factory=list)


def tokenizer_path(hf_dir: str, directory: str | None = None) -> str:
    """What ``--tokenizer-model`` takes for ``hf_dir``'s tokenizer (copied into ``directory``,
    default ``hf_dir``): the directory (tokenizer.json) or its sentencepiece tokenizer.model."""
    directory = directory or hf_dir
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return directory
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        return os.path.join(directory, "tokenizer.model")
    raise ConversionError(f"{hf_dir}: no tokenizer.json or tokenizer.model; the trainer needs "
                          "the model's tokenizer (--tokenizer-model)")


def plan_import(hf_dir: str, tensor_parallel_size: int = 1, *, world_size: int = 1,
                make_vocab_size_divisible_by: int | None = None,
                dtype: str | None = None) -> ImportPlan:
    """Check ``hf_dir`` and derive the model config; local, reads only JSON and the tokenizer.

    ``tensor_parallel_size`` is the TP size to train with (checked against the heads; sets
    the vocabulary padding). The conversion itself runs on ``world_size`` ranks at TP =
    gcd(tensor_parallel_size, world_size) and PP = the rest, which gives the same padded
    vocabulary (checked here).

    Raises ConversionError (unsupported architecture or files) or ConfigError (a parallel
    size that does not fit the model; the message names the flag).
    """
    from megatron_irl.core.vocabulary import padded_vocab_size
    from megatron_irl.data.tokenizer import load_tokenizer

    source = os.path.join(hf_dir, "config.json")
    hf_config = read_json(source)
    model = families.model_section(hf_config, source)
    families.check_tensor_parallel(model, tensor_parallel_size)
    tokenizer_vocab = load_tokenizer(tokenizer_path(hf_dir)).vocab_size
    hf_vocab = hf_config["vocab_size"]
    divisor = families.vocab_divisor(tokenizer_vocab, hf_vocab, tensor_parallel_size,
                                     make_vocab_size_divisible_by)
    model["make_vocab_size_divisible_by"] = divisor
    if tokenizer_vocab > hf_vocab:
        raise ConversionError(
            f"{source}: the tokenizer has {tokenizer_vocab} tokens, more than the "
            f"{hf_vocab} embedding rows (vocab_size); its ids beyond them have no weights")
    # The real vocabulary is the embedding's rows (more than the tokenizer's tokens for
    # Qwen2, and transformers' softmax covers them all); the padding above gets no probability.
    model["vocab_size"] = hf_vocab
    conversion_tp = math.gcd(tensor_parallel_size, world_size)
    if (padded_vocab_size(tokenizer_vocab, divisor, conversion_tp)
            != padded_vocab_size(tokenizer_vocab, divisor, tensor_parallel_size)):
        raise ConfigError(
            f"--make-vocab-size-divisible-by {divisor} must be a multiple of "
            f"--tensor-model-parallel-size {tensor_parallel_size} (or run the conversion on a "
            f"multiple of {tensor_parallel_size} processes)")
    dtype_name = dtype or ("bfloat16" if hf_config.get("torch_dtype", hf_config.get("dtype"))
                           == "bfloat16" else "float32")
    if dtype_name not in ("bfloat16", "float32"):
        raise ConversionError(f"--dtype {dtype_name}: must be bfloat16 or float32")
    config = TrainConfig.from_dict({
        "model": model,
        "parallel": {"tensor_model_parallel_size": conversion_tp,
                     "pipeline_model_parallel_size": world_size // conversion_tp},
        "training": {"bf16": dtype_name == "bfloat16"},
    }, source=source).to_dict()
    return ImportPlan(hf_dir, model, config, tensor_parallel_size, hf_vocab, tokenizer_vocab,
                      families.notes(hf_config))


def import_checkpoint(plan: ImportPlan, output_dir: str) -> str:
    """Convert ``plan.hf_dir`` into ``output_dir`` (a ``--load`` / ``--tokenizer-model``
    directory). Collective over the world group; Megatron's parallel state must match
    ``plan.config["parallel"]``. Returns the iteration directory.

    Writes ``output_dir/iter_0000000`` and its marker (through ``save_checkpoint``), and on
    rank 0 the tokenizer files, ``model.yaml`` and ``hf_config.json``.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron_irl.core.checkpoint import TrainingState, save_checkpoint
    from megatron_irl.core.model import build_model_chunks

    config = {**plan.config, "data": {**plan.config["data"],
                                      "tokenizer_model": os.path.abspath(
                                          tokenizer_path(plan.hf_dir, output_dir))}}
    cfg = TrainConfig.from_dict(config)
    with torch.device("meta"):
        chunks = build_model_chunks(cfg, plan.hf_vocab_size, device=torch.device("meta"))
    reader = SafetensorsReader(plan.hf_dir)
    dims = Dims(cfg.model.num_attention_heads, cfg.model.num_query_groups or
                cfg.model.num_attention_heads, cfg.model.kv_channels, plan.hf_vocab_size,
                chunks[0].vocab_size)

    # One tensor at a time; cached because SwiGLU's fc1 arrives as two pieces.
    @functools.lru_cache(maxsize=1)
    def megatron_tensor(key: str, layer: int | None) -> torch.Tensor:
        rule = RULES_BY_MEGATRON_KEY[key]
        return rule.transform.to_megatron([reader.get(n) for n in rule.hf_names(layer)], dims)

    for chunk in chunks:
        chunk.to_empty(device="cpu")  # storage without the random initialisation
        for value in chunk.sharded_state_dict().values():
            pieces = value.build() if isinstance(value, ShardedTensorFactory) else [value]
            for piece in pieces:
                if isinstance(piece, ShardedTensor):  # not an _extra_state ShardedObject
                    _fill(piece, megatron_tensor, plan.hf_dir)
    # Weights only: the checkpoint is loaded with --finetune.
    directory = save_checkpoint(output_dir, TrainingState(0, 0, config), chunks,
                                optimizer=None, scheduler=None)
    if dist.get_rank() == 0:
        _write_companions(plan, output_dir)
    dist.barrier()
    return directory


def _fill(piece, megatron_tensor: Callable[[str, int | None], torch.Tensor],
          source: str) -> None:
    """Copy this rank's slice of the Megatron tensor ``piece.key`` into ``piece.data``
    (a view of a model parameter); ``megatron_tensor(key, layer)`` gives the whole tensor."""
    rule = RULES_BY_MEGATRON_KEY.get(piece.key)
    if rule is None:
        raise ConversionError(f"no conversion rule for the Megatron tensor {piece.key!r}")
    prepended = piece.prepend_axis_num
    layer = piece.global_offset[0] if rule.per_layer else None
    full = megatron_tensor(rule.megatron, layer)
    expected = tuple(piece.global_shape[prepended:])
    if tuple(full.shape) != expected:
        raise ConversionError(
            f"{source}: {', '.join(rule.hf_names(layer))} give a {rule.megatron} of shape "
            f"{tuple(full.shape)}, the model config asks for {expected}; config.json does "
            "not match the weights")
    index = tuple(slice(offset, offset + size)
                  for offset, size in zip(piece.global_offset[prepended:], piece.data.shape))
    with torch.no_grad():
        piece.data.copy_(full[index])


def _write_companions(plan: ImportPlan, output_dir: str) -> None:
    copy_tokenizer_files(plan.hf_dir, output_dir)
    write_json(os.path.join(output_dir, HF_CONFIG_COPY),
               read_json(os.path.join(plan.hf_dir, "config.json")))
    divisor = plan.model["make_vocab_size_divisible_by"]
    header = (
        f"# Converted from {os.path.abspath(plan.hf_dir)}: use as --config, adding the data,\n"
        f"# training and --seq-length settings, or copy its sections into your config.\n"
        f"# The vocabulary is padded to a multiple of lcm(make_vocab_size_divisible_by, TP):\n"
        f"# the checkpoint loads at any TP size that divides {divisor}.\n")
    if plan.notes:
        header += "".join(f"# Note: {note}\n" for note in plan.notes)
    body = {
        "model": plan.model,
        "data": {"tokenizer_model": os.path.abspath(tokenizer_path(plan.hf_dir, output_dir))},
        "parallel": {"tensor_model_parallel_size": plan.tensor_parallel_size},
        "checkpoint": {"load": os.path.abspath(output_dir), "finetune": True},
    }
    with open(os.path.join(output_dir, MODEL_YAML), "w", encoding="utf-8") as file:
        file.write(header + yaml.safe_dump(body, sort_keys=False))
