"""Every random state of a process (Python, NumPy, torch CPU/CUDA, Megatron's RNG tracker),
as the sharded entries a checkpoint saves and restores: a resumed run draws what the
uninterrupted one would have."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_irl.core.checkpoint_files import CheckpointError

RNG_PREFIX = "rng_state."


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's random states as 1-D CPU tensors of fixed length, by name."""
    _, python_words, python_gauss = random.getstate()  # 624 words + position, cached gauss
    _, numpy_words, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    states = {
        "python_mt": torch.tensor(python_words, dtype=torch.int64),
        "python_gauss": torch.tensor([python_gauss is not None, python_gauss or 0.0],
                                     dtype=torch.float64),
        "numpy_mt": torch.tensor([*numpy_words.tolist(), numpy_pos], dtype=torch.int64),
        "numpy_gauss": torch.tensor([numpy_has_gauss, numpy_gauss], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    for name, tracker_state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        if not isinstance(tracker_state, torch.Tensor):
            raise CheckpointError(f"RNG tracker state {name!r} is a {type(tracker_state)}, not a "
                                  "tensor (CUDA-graph-safe RNG states are not checkpointed)")
        states[f"tracker.{name}"] = tracker_state.clone()
    return states


def rng_sharded_state_dict(rank_coordinates) -> dict[str, ShardedTensor]:
    """Each RNG state as a ShardedTensor: local [n] at (pp_rank, tp_rank, dp_rank) of a
    global [pp, tp, dp*cp, n] tensor; every rank owns its shard (replica 0).
    ``rank_coordinates``: ((rank, size) for pp, tp, dp*cp), this rank's place in the layout."""
    offsets = [(axis, rank, size) for axis, (rank, size) in enumerate(rank_coordinates)]
    return {
        RNG_PREFIX + name: ShardedTensor.from_rank_offsets(
            RNG_PREFIX + name, state, *offsets, replica_id=0, prepend_axis_num=len(offsets))
        for name, state in _rng_states().items()
    }


def restore_rng(loaded: dict) -> None:
    """Set this process's random states from the ``rng_state.*`` entries of ``loaded``."""
    states = {k[len(RNG_PREFIX):]: v.clone() for k, v in loaded.items()
              if k.startswith(RNG_PREFIX)}
    python_gauss = states["python_gauss"].tolist()
    random.setstate((3, tuple(states["python_mt"].tolist()),
                     python_gauss[1] if python_gauss[0] else None))
    numpy_mt = states["numpy_mt"]
    numpy_has_gauss, numpy_gauss = states["numpy_gauss"].tolist()
    np.random.set_state(("MT19937", numpy_mt[:-1].numpy().astype(np.uint32), int(numpy_mt[-1]),
                         int(numpy_has_gauss), numpy_gauss))
    torch.set_rng_state(states["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"])
    tracker_prefix = "tracker."
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k[len(tracker_prefix):]: v for k, v in states.items() if k.startswith(tracker_prefix)})
