"""Which checkpoint to load, checked before loading; which old ones to delete.

A checkpoint's ``manifest.json`` lists every file of its iteration directory with its size,
written by rank 0 after all ranks' files and before the ``latest`` marker moves. Checking
it costs one ``stat`` per file, so a truncated, missing or overwritten file (a full disk, a
copy cut short, a crash of the file system) is found before a long job starts, and the
error names the iteration, the file and the newest usable checkpoint to fall back to.
Contents are not hashed (reading terabytes would not be cheap): a file corrupted in place
at its saved size passes this check and fails later, inside the loader.

Checkpoints saved without a manifest (older versions) are checked for their training state
only. Everything here is local file access on the calling rank; no collectives.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

log = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
STATE_FILENAME = "training_state.json"
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1  # of training_state.json
_ITERATION_DIR = re.compile(r"iter_(\d{7})")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def iteration_dir(root: str, iteration: int) -> str:
    """``<root>/iter_0000123``: Megatron-LM's name for one checkpoint."""
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(load_dir: str) -> int | None:
    """The iteration named by ``<load_dir>/latest_checkpointed_iteration.txt``; None if the
    marker (or the directory) does not exist."""
    path = os.path.join(load_dir, TRACKER_FILENAME)
    try:
        with open(path, encoding="utf-8") as marker:
            text = marker.read()
    except FileNotFoundError:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def write_manifest(directory: str) -> None:
    """List the files of ``directory`` with their sizes in its manifest (fsynced)."""
    files = {entry.name: entry.stat().st_size for entry in os.scandir(directory)
             if entry.is_file() and entry.name != MANIFEST_FILENAME}
    text = json.dumps({"format_version": 1, "files": dict(sorted(files.items()))}, indent=1)
    write_file_synced(os.path.join(directory, MANIFEST_FILENAME), text)


def checkpoint_problem(directory: str) -> str | None:
    """What makes the checkpoint in ``directory`` unusable ("<file>: <what>"), or None."""
    if not os.path.isdir(directory):
        return "the directory does not exist"
    manifest_path = os.path.join(directory, MANIFEST_FILENAME)
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as file:
                expected = json.load(file)["files"]
        except (ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST_FILENAME}: unreadable ({exc})"
        for name, size in expected.items():
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                return f"{name}: missing"
            actual = os.path.getsize(path)
            if actual != size:
                return (f"{name}: {actual} bytes, {size} when saved (truncated or overwritten)")
    try:
        with open(os.path.join(directory, STATE_FILENAME), encoding="utf-8") as file:
            json.load(file)
    except FileNotFoundError:
        return f"{STATE_FILENAME}: missing (the save did not finish)"
    except ValueError as exc:
        return f"{STATE_FILENAME}: not valid JSON ({exc})"
    return None


def saved_iterations(root: str) -> list[int]:
    """The iterations that have an ``iter_*`` directory under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    matches = (_ITERATION_DIR.fullmatch(name) for name in os.listdir(root))
    return sorted((int(match.group(1)) for match in matches if match), reverse=True)


def newest_usable_iteration(root: str, before: int | None = None) -> int | None:
    """The newest iteration under ``root`` (older than ``before``) that passes the check."""
    for iteration in saved_iterations(root):
        if (before is None or iteration < before) and \
                checkpoint_problem(iteration_dir(root, iteration)) is None:
            return iteration
    return None


def choose_iteration(load_dir: str, ckpt_step: int | None = None) -> int:
    """The iteration to load: ``ckpt_step`` (``--ckpt-step``) or the marker's, once its
    files pass :func:`checkpoint_problem`. Raises CheckpointError naming the broken
    iteration and file and the newest usable checkpoint."""
    if ckpt_step is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            reason = ("does not exist" if not os.path.isdir(load_dir)
                      else f"has no {TRACKER_FILENAME} (no complete checkpoint)")
            raise CheckpointError(
                f"--load {load_dir}: nothing to load, the directory {reason}; point --load at "
                f"a directory that a run saved to with --save, or leave --load unset")
    else:
        iteration = ckpt_step
    directory = iteration_dir(load_dir, iteration)
    problem = checkpoint_problem(directory)
    if problem is None:
        return iteration
    fallback = newest_usable_iteration(load_dir, before=None if ckpt_step is not None
                                       else iteration)
    advice = (f"the newest usable checkpoint is iteration {fallback}: load it with "
              f"--ckpt-step {fallback}" if fallback is not None
              else f"no other checkpoint under {load_dir} is usable")
    chosen = f"--ckpt-step {ckpt_step}" if ckpt_step is not None else TRACKER_FILENAME
    raise CheckpointError(f"checkpoint {directory} (iteration {iteration}, chosen by {chosen}) "
                          f"is unusable: {problem}; {advice}")


def read_training_state(directory: str) -> dict:
    """The training-state JSON of the checkpoint in ``directory`` (iteration, config, model
    architecture, ...). Raises CheckpointError."""
    path = os.path.join(directory, STATE_FILENAME)
    try:
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing, although {TRACKER_FILENAME} names this checkpoint: the "
            f"checkpoint was moved or deleted in part") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); load an older iteration with "
                              f"--ckpt-step N") from None
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {saved.get('format_version')!r}; this "
                              f"version of megatron_irl reads {FORMAT_VERSION}")
    return saved


def read_saved_state(load_dir: str, ckpt_step: int | None = None) -> dict:
    """The training-state JSON (iteration, config, model architecture, ...) of the latest
    complete checkpoint under ``load_dir`` (or of iteration ``ckpt_step``), once its files
    pass the manifest check; local, no collectives. Raises CheckpointError."""
    return read_training_state(iteration_dir(load_dir, choose_iteration(load_dir, ckpt_step)))


def remove_old_checkpoints(root: str, keep_last: int) -> list[str]:
    """Delete the ``iter_*`` directories older than the ``keep_last`` newest usable ones at
    or below the marker; returns the directories removed. The newest usable checkpoint is
    always kept, and directories newer than the marker (a save in progress) are not touched."""
    marked = latest_iteration(root)
    if marked is None:
        return []
    candidates = [i for i in saved_iterations(root) if i <= marked]
    usable = [i for i in candidates if checkpoint_problem(iteration_dir(root, i)) is None]
    if len(usable) <= keep_last:
        return []
    oldest_kept = usable[keep_last - 1]
    removed = []
    for iteration in candidates:
        if iteration < oldest_kept:
            directory = iteration_dir(root, iteration)
            try:
                shutil.rmtree(directory)
            except OSError as error:  # the new checkpoint is saved: do not fail the save
                log.warning("could not remove %s: %s", directory, error)
                continue
            removed.append(directory)
    return removed


# ------------------------------------------------------------ durable writes


def write_file_synced(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def fsync_files_in(directory: str) -> None:
    """Flush the files directly in ``directory``, and its entries, to disk."""
    for entry in os.scandir(directory):
        if entry.is_file():
            fsync_path(entry.path)
    fsync_path(directory)


def fsync_path(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_file_atomically(path: str, text: str) -> None:
    """Readers see the old or the new content of ``path``, never a mix, even after a crash."""
    temporary = path + ".tmp"
    write_file_synced(temporary, text)
    os.replace(temporary, path)
    fsync_path(os.path.dirname(path) or ".")  # persist the rename itself
