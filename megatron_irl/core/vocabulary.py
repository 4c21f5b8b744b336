"""The vocabulary the model is built with: the real one (the policy's actions) and its padding
to equal tensor-parallel shards (rows that are no token)."""

from __future__ import annotations

import math
import os

from megatron_irl.config import ConfigError, ModelConfig, TrainConfig
from megatron_irl.core.checkpoint_files import read_saved_state


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """The vocabulary padded to a multiple of ``lcm(divisible_by, tp)``: equal TP shards.

    Megatron-LM pads to ``divisible_by * tp``, so its padded size, and with it every
    checkpoint, depends on the TP size. With the lcm, any TP that divides ``divisible_by``
    (TP 1, 2, 4, 8 with the default 128) gives the same padded size, and checkpoints move
    between those layouts.
    """
    multiple = math.lcm(divisible_by, tp_size)
    return -(-vocab_size // multiple) * multiple


def real_vocab_size(model: ModelConfig, tokenizer_vocab: int) -> int:
    """The real vocabulary: ``--vocab-size``, else the tokenizer's ``tokenizer_vocab`` tokens.

    Token ids below it are the model's actions; the rows that pad it to equal TP shards
    (``padded_vocab_size``) get no probability in any loss, value, metric or sample. An
    imported model's is its embedding rows, which may exceed the tokenizer's size (Qwen2).
    Raises ConfigError when ``--vocab-size`` leaves some of the tokenizer's ids out.
    """
    if model.vocab_size is None:
        return tokenizer_vocab
    if model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"{model.flag('vocab_size')} {model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab} tokens (--tokenizer-model): its ids would have no probability; "
            f"set {model.flag('vocab_size')} >= {tokenizer_vocab} or leave it unset")
    return model.vocab_size


def saved_padded_vocab_size(load_dir: str, ckpt_step: int | None = None) -> int | None:
    """The padded vocabulary rows of the checkpoint ``--load`` (``--ckpt-step``) chooses,
    from its training_state.json; None for a checkpoint that does not record them. Raises
    CheckpointError when there is no usable checkpoint."""
    return read_saved_state(load_dir, ckpt_step).get("model_architecture", {}).get(
        "padded_vocab_size")


def check_vocab_padding(cfg: TrainConfig, vocab_size: int) -> None:
    """With ``--load``: this TP's padding of the ``vocab_size`` real tokens must give the
    checkpoint's embedding rows, or the model would not load (or would be built wrong).

    The rows are the checkpoint's own (``saved_padded_vocab_size``) where the ``--load``
    directory exists; otherwise (``megatron-irl plan`` before the import has run) the
    checkpoint is taken to be padded at a TP that divides ``--make-vocab-size-divisible-by``,
    as the Hugging Face import pads. ``megatron-irl plan`` and the trainer's start both run
    this. Raises ConfigError naming the flags, CheckpointError for an unusable checkpoint.
    """
    load = cfg.checkpoint.load
    if load is None:
        return
    checkpoint_rows = (saved_padded_vocab_size(load, cfg.checkpoint.ckpt_step)
                       if os.path.isdir(load) else None)
    m, p = cfg.model, cfg.parallel
    divisor, tp = m.make_vocab_size_divisible_by, p.tensor_model_parallel_size
    here = padded_vocab_size(vocab_size, divisor, tp)
    expected = (checkpoint_rows if checkpoint_rows is not None
                else padded_vocab_size(vocab_size, divisor, 1))
    if here == expected:
        return
    advice = (f"use a TP size that divides {divisor}" if expected == padded_vocab_size(
        vocab_size, divisor, 1) else f"use the TP size the checkpoint was trained at, or one "
                                     f"whose lcm with {divisor} pads to {expected} rows")
    raise ConfigError(
        f"{p.flag('tensor_model_parallel_size')} {tp} with "
        f"{m.flag('make_vocab_size_divisible_by')} {divisor} pads the {vocab_size}-token "
        f"vocabulary to {here} rows (a multiple of lcm({divisor}, {tp})), but the checkpoint "
        f"--load {load} has {expected}: {advice}")
