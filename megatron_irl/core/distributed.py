"""Process-group set-up for torchrun, srun or a single process, and the run's seeding."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_irl.config import ParallelConfig
from megatron_irl.cpu_support import device_problem, enable_cpu_support


def launch_environment(env=os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's, else one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


class DeviceError(RuntimeError):
    """The run cannot use the device it asked for (``--device``, or the launch's GPUs)."""


def init_distributed(parallel: ParallelConfig, seed: int, device: str = "auto") -> None:
    """Join the default process group (NCCL on GPUs, gloo on CPUs) and Megatron's groups.

    MASTER_ADDR / MASTER_PORT come from the launcher (torchrun, or the Slurm batch script);
    a single process needs neither. ``device`` is --device: a launch that asked for GPUs
    (``cpu_support.requested_gpus``) where CUDA is missing raises DeviceError rather than
    falling back to the CPU.
    """
    problem = device_problem(device, os.environ, torch.cuda.is_available())
    if problem:
        raise DeviceError(problem)
    rank, world_size, local_rank = launch_environment()
    if torch.cuda.is_available():
        # Modulo: tasks bound to one GPU each see it as device 0.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        enable_cpu_support()
        backend = "gloo"
    timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
    if world_size == 1:  # no rendezvous, so no port to collide with other jobs' on the host
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Megatron-LM's seeding: each pipeline stage its own seed; TP ranks share initialisation
    and get distinct dropout streams through Megatron's RNG tracker."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def is_logging_rank() -> bool:
    """The last rank: it is on the last pipeline stage, where the loss is."""
    return dist.get_rank() == dist.get_world_size() - 1


def shutdown_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
