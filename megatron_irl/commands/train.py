"""``megatron-irl train``: the training job (``training/loop.py``).

Runs the same under a single process, ``torchrun --nproc-per-node N -m megatron_irl train``
and ``srun python -m megatron_irl train`` (one task per GPU). An invalid configuration is
reported before any process group is created, with exit status 2.
"""

from __future__ import annotations

import sys

from megatron_irl.arguments import parse_train_config
from megatron_irl.config import ConfigError
from megatron_irl.training.signals import install_stop_handlers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # First thing: a pre-emption signal during the slow start-up must not kill the job.
    install_stop_handlers()
    try:
        cfg = parse_train_config(argv, prog="megatron-irl train")
    except ConfigError as error:
        print(f"megatron-irl train: error: {error}", file=sys.stderr)
        return 2
    # Imports Megatron-Core: only after the configuration is known to be valid.
    from megatron_irl.core.checkpoint import CheckpointError
    from megatron_irl.core.distributed import DeviceError
    from megatron_irl.data import DataError
    from megatron_irl.training.loop import train
    from megatron_irl.training.nonfinite import NonFiniteTrainingError

    try:
        train(cfg)
    except ConfigError as error:  # a check that needs the data or checkpoint: still a flag
        print(f"megatron-irl train: error: {error}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, DeviceError, NonFiniteTrainingError) as error:
        print(f"megatron-irl train: error: {error}", file=sys.stderr)
        return 1
    return 0
