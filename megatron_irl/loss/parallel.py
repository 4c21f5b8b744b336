"""The tensor-parallel group the losses reduce over, and this rank's vocabulary shard."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def default_tp_group() -> Optional[dist.ProcessGroup]:
    """Megatron's tensor-parallel group when it is initialised, else none (a single rank)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, tp_group) -> None:
    """In-place all-reduce over ``tp_group``; nothing to do for a single rank (``None``)."""
    if tp_group is not None:
        dist.all_reduce(tensor, op=op, group=tp_group)


def vocab_shard(local_vocab: int, tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """``(start, end)``: the global token ids of this rank's ``local_vocab`` logit columns."""
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    return rank * local_vocab, (rank + 1) * local_vocab


def real_columns(local_vocab: int, vocab_size: Optional[int],
                 tp_group: Optional[dist.ProcessGroup]) -> int:
    """How many of this rank's ``local_vocab`` columns are real tokens (ids < ``vocab_size``).

    The vocabulary is padded with rows that are no token (``core.vocabulary.padded_vocab_size``);
    they sit at the end of the last shards, so this is ``local_vocab`` on the first ranks, a
    part on the rank where the padding starts, and 0 on a rank whose whole shard is padding.
    ``vocab_size`` None: every column is real.
    """
    start, end = vocab_shard(local_vocab, tp_group)
    if vocab_size is None:
        return local_vocab
    return max(0, min(end, vocab_size) - start)
