"""SIGTERM / SIGUSR1 (Slurm's pre-emption warning) ask the training job to save and stop.

The handlers are installed as the job starts, before the slow imports and set-up, so a
signal that arrives during start-up is remembered too; the loop acts on it after its first
step. This module imports nothing heavy.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _remember(signum: int, _frame) -> None:
    _received.append(signum)


def install_stop_handlers() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _remember)


def stop_signal_received() -> bool:
    """Whether this process got a stop signal since the handlers were installed."""
    return bool(_received)
