"""The end of a checkpoint save, and saves whose tensors are written in the background.

A save (``checkpoint.save_checkpoint``) has two parts. First every rank hands its tensors to
dist_checkpointing (rank 0 also writes ``common.pt``) and adds the files of ``write_extra``.
Then, once every rank's files are on disk, rank 0 runs :func:`complete_checkpoint`: the
training state, ``config.yaml``, fsync, the manifest, the atomic move of the marker and the
``--keep-last-checkpoints`` deletions. Synchronously both parts run inside the save.

With ``--async-save`` the tensors are written by a process forked from the rank (megatron-core's
``TemporalAsyncCaller``; the fork takes a copy-on-write snapshot of the tensors, copied to host
memory first on a GPU, so training may change them at once), and the second part runs in the
request's finalisation: :class:`BackgroundSaves` runs it, collectively, once every rank's
writer has ended. Megatron-Core's own finalisation (the torch_dist ``.metadata`` index and
``metadata.json``) comes first, so the marker never names a checkpoint whose tensors are still
being written, and a save killed before its finalisation leaves the previous checkpoint in
charge exactly as a synchronous save killed after its shards does.
"""

from __future__ import annotations

import logging
import os

from megatron.core.dist_checkpointing.strategies.async_utils import (
    AsyncCallsQueue,
    AsyncRequest,
)
from torch.distributed.checkpoint.api import CheckpointException

from megatron_irl.core.checkpoint_files import (
    STATE_FILENAME,
    TRACKER_FILENAME,
    CheckpointError,
    fsync_files_in,
    fsync_path,
    iteration_dir,
    remove_old_checkpoints,
    replace_file_atomically,
    write_file_synced,
    write_manifest,
)

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.yaml"


def complete_checkpoint(save_dir: str, iteration: int, state_json: str, config_yaml: str,
                        keep_last: int | None) -> int:
    """Rank 0, once every rank's files of ``iteration`` are written: make it the latest
    complete checkpoint of ``save_dir``; returns 0 (for ``checkpoint._on_rank0``).

    Writes ``training_state.json`` and ``config.yaml``, fsyncs every file of the iteration
    directory, writes the manifest of their sizes, then replaces the marker atomically and,
    with ``keep_last``, deletes the checkpoints older than the ``keep_last`` newest usable
    ones. No collectives.
    """
    directory = iteration_dir(save_dir, iteration)
    write_file_synced(os.path.join(directory, STATE_FILENAME), state_json)
    write_file_synced(os.path.join(directory, CONFIG_FILENAME), config_yaml)
    fsync_files_in(directory)  # also the shards, rank 0's common.pt and metadata.json
    write_manifest(directory)
    fsync_path(directory)
    replace_file_atomically(os.path.join(save_dir, TRACKER_FILENAME), f"{iteration}\n")
    if keep_last is not None:
        for removed in remove_old_checkpoints(save_dir, keep_last):
            log.info("removed %s (--keep-last-checkpoints %d)", removed, keep_last)
    return 0


class BackgroundSaves:
    """The saves whose tensors are being written in the background (``--async-save``).

    ``save_checkpoint(..., background=saves)`` schedules a save here; :meth:`finalize` completes
    the saves whose writers have ended on every rank. Megatron-Core's ``AsyncCallsQueue``
    underneath forks one writer process per save. Every rank must make the same calls in the
    same order: :meth:`schedule` and :meth:`finalize` are collective over the world group
    while a save is pending (all-reduces of the writers' state, then the finalisation's own
    collectives); :meth:`finalize` with nothing pending returns at once, without collectives.
    """

    def __init__(self):
        self._queue = AsyncCallsQueue(persistent=False)
        self._pending: dict[int, tuple[int, str]] = {}  # call index -> (iteration, directory)

    @property
    def pending_iterations(self) -> list[int]:
        """The iterations scheduled and not finalised yet, oldest first."""
        return [iteration for iteration, _ in self._pending.values()]

    def schedule(self, request: AsyncRequest, iteration: int, directory: str) -> None:
        """Start the background write of ``request`` (the save of ``iteration`` into
        ``directory``, its completion among the request's finalize functions)."""
        self._pending[self._queue.schedule_async_request(request)] = (iteration, directory)

    def finalize(self, blocking: bool) -> list[tuple[int, str]]:
        """Complete the pending saves whose writers have ended on every rank (with
        ``blocking``: wait for all of them); returns their (iteration, directory), oldest
        first.

        Raises:
            CheckpointError: a background write failed on some rank (a writer that raised or
                was killed), or the completion failed; on every rank. The save's directory is
                then not a complete checkpoint and the marker still names the previous one.
        """
        if not self._pending:
            return []
        try:
            finalized = self._queue.maybe_finalize_async_calls(blocking=blocking)
        # A writer's failure comes as torch's CheckpointException, a BaseException, on every
        # rank (state_dict_saver.save_state_dict_async_finalize broadcasts it).
        except (Exception, CheckpointException) as exc:
            iteration, directory = next(iter(self._pending.values()))
            self._pending.clear()
            raise CheckpointError(
                f"the background save of iteration {iteration} to {directory} (--async-save) "
                f"failed: {type(exc).__name__}: {exc}; it is not a complete checkpoint, and "
                f"{TRACKER_FILENAME} still names the previous one") from exc
        return [self._pending.pop(index) for index in finalized]
