"""The tensor-parallel group the losses reduce over."""

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
