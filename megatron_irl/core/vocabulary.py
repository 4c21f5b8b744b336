"""The vocabulary the model is built with: the real one (the policy's actions) and its padding
to equal tensor-parallel shards (rows that are no token)."""

from __future__ import annotations

import math

from megatron_irl.config import ConfigError, ModelConfig


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
