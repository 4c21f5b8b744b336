"""Run test bodies in N worker processes (gloo) with Megatron's parallel state set up.

:func:`run_distributed` calls a module-level function on every rank of a CPU gloo
world and returns each rank's return value. It is meant for tests: real Megatron-Core
code on CPU, with the CUDA-only call sites redirected by
:func:`megatron_irl.cpu_support.enable_cpu_support`.

Worker pools
------------
Importing torch + megatron.core costs several seconds of CPU per process, so workers
are started cheaply and kept in a pool per world size for reuse:

* Workers are started with multiprocessing's ``forkserver`` method: a clean server
  process (not the caller) imports ``megatron.core`` once and forks each worker from
  that state, so a pool of any size, or a replacement for a torn-down one, starts in
  about a second once the server is up (the first pool waits for its import).
* A pool is created on the first call for its world size: ``world_size`` workers.
  Each joins one gloo process group (rendezvous through a ``TCPStore`` on 127.0.0.1
  owned by the calling process), applies ``enable_cpu_support()`` and uses one
  intra-op thread (the ranks share the cores). Pools of other world sizes stay up
  (idle) alongside.
* Every call sends ``fn``, its arguments and the caller's ``sys.path`` (so that
  ``fn``'s module can be imported) to all ranks. A pool serves one layout: its workers
  run ``parallel_state.initialize_model_parallel(tp, pp, vpp)`` on their first call, and
  a call with another layout replaces the pool with a fresh one (about a second). Torch
  cannot free Megatron's old gloo groups, each of which keeps threads: re-initialising
  in place grew the workers to over a thousand threads in one test session. Every call
  seeds ``torch.manual_seed(seed)`` and ``model_parallel_cuda_manual_seed(seed)``.
* Other process-global state that ``fn`` changes (module globals, environment
  variables, Megatron caches) survives into later calls on the same pool.
* An exception on any rank is re-raised in the caller (its own type when it can be
  pickled, else ``RuntimeError``), chained from a :class:`RankTraceback` holding the
  rank's formatted traceback. The other ranks get a short grace period to finish:
  if all of them report back the pool is kept; otherwise it is torn down.
* A call that does not finish within ``timeout`` seconds, or a worker that dies,
  raises (``TimeoutError`` / ``RuntimeError``) and tears the pool down; the next
  call starts a fresh one.
* Pools are shut down by :func:`shutdown_pools`, which runs at interpreter exit and
  at the end of a pytest session (``tests/conftest.py``).

As with any multiprocessing start method but "fork", a script that calls
:func:`run_distributed` needs an ``if __name__ == "__main__":`` guard (pytest's
entry points have one). Workers are not daemonic because Megatron's checkpoint
saving starts processes of its own; each worker leads its own process group, and
tearing a pool down kills those groups. A worker whose caller has gone exits when it
next waits for work.
"""

import atexit
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["RankTraceback", "run_distributed", "shutdown_pools"]

_STARTUP_TIMEOUT_S = 300.0
# After one rank raised: how long the others may take to report before the pool is
# considered stuck (e.g. waiting in a collective for the failed rank) and torn down.
_GRACE_AFTER_ERROR_S = 5.0
_STOP_TIMEOUT_S = 10.0


class RankTraceback(Exception):
    """The formatted traceback of an exception raised on one worker rank."""

    def __init__(self, rank: int, formatted: str):
        super().__init__(rank, formatted)
        self.rank = rank
        self.formatted = formatted

    def __str__(self) -> str:
        return f"rank {self.rank} raised:\n{self.formatted}"


def run_distributed(
    fn: Callable,
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
    args: Sequence = (),
    kwargs: Optional[Dict[str, Any]] = None,
    timeout: float = 120.0,
) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on each rank of a ``world_size`` gloo world.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of ranks; a multiple of ``tp * pp``.
        tp, pp, vpp: tensor-, pipeline- and virtual-pipeline-parallel sizes passed to
            ``parallel_state.initialize_model_parallel``; data parallelism takes the rest.
        seed: seeds ``torch.manual_seed`` and ``model_parallel_cuda_manual_seed`` on
            every rank before ``fn`` runs.
        args, kwargs: picklable arguments, the same for every rank.
        timeout: seconds the call may take on all ranks (pool start-up not included).

    Returns:
        ``fn``'s return value from each rank, in rank order (sent back by pickling).

    Raises:
        ValueError: for a layout that does not fit ``world_size``.
        TimeoutError: when some rank did not finish in time (the pool is torn down).
        Exception: the exception raised on the lowest failing rank, chained from a
            :class:`RankTraceback` with that rank's traceback.
    """
    __tracebackhide__ = True  # pytest: show the rank's traceback, not the harness
    _check_layout(world_size, tp, pp, vpp)
    try:
        payload = pickle.dumps((fn, (tp, pp, vpp), seed, tuple(args), dict(kwargs or {})))
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(
            f"run_distributed needs a module-level function and picklable args/kwargs; "
            f"pickling {fn!r} failed: {error}"
        ) from error
    pool = _POOLS.get(world_size)
    if pool is not None and pool.owner_pid == os.getpid() and pool.layout != (tp, pp, vpp):
        _POOLS.pop(world_size)
        pool.close(force=False)
        pool = None
    if pool is None or pool.owner_pid != os.getpid():  # none yet, or a forked copy's
        pool = _POOLS[world_size] = _Pool(world_size, (tp, pp, vpp))
    try:
        return pool.run(getattr(fn, "__qualname__", repr(fn)), payload, timeout)
    finally:
        if pool.broken:
            _POOLS.pop(world_size, None)
            pool.close(force=True)


def shutdown_pools() -> None:
    """Stop every worker pool (they restart on demand). In a forked copy of the
    process that owns them, only forgets them: the workers are the owner's."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        if pool.owner_pid == os.getpid():
            pool.close(force=False)


def _check_layout(world_size: int, tp: int, pp: int, vpp: Optional[int]) -> None:
    if world_size < 1 or tp < 1 or pp < 1:
        raise ValueError(f"world_size ({world_size}), tp ({tp}) and pp ({pp}) must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(
            f"world_size ({world_size}) must be a multiple of tp * pp ({tp} * {pp})"
        )
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(f"vpp ({vpp}) needs pp >= 2 (got pp={pp}) and vpp >= 1")


_POOLS: Dict[int, "_Pool"] = {}
atexit.register(shutdown_pools)


class _Pool:
    """``world_size`` worker processes in one gloo world, each behind a duplex pipe."""

    def __init__(self, world_size: int, layout: Tuple[int, int, Optional[int]]):
        from torch.distributed import TCPStore

        self.world_size = world_size
        self.layout = layout  # (tp, pp, vpp): the only layout this pool's workers set up
        self.owner_pid = os.getpid()
        self.broken = False  # set when a call leaves the workers unusable
        # The caller owns the rendezvous store, so no port has to be agreed on beforehand.
        self._store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        context = multiprocessing.get_context("forkserver")
        # The fork server imports these once; every worker forked from it skips the
        # seconds-long import (a no-op if the fork server is already running).
        context.set_forkserver_preload(["megatron_irl.cpu_support", "megatron.core"])
        self._conns = []
        self._procs = []
        for rank in range(world_size):
            parent_end, child_end = context.Pipe(duplex=True)
            proc = context.Process(
                target=_worker_main,
                args=(rank, world_size, self._store.port, child_end),
                name=f"megatron-irl-rank{rank}",
            )
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
        try:
            replies = self._collect("worker start-up", _STARTUP_TIMEOUT_S)
        except BaseException:
            self.close(force=True)
            raise
        failed = [(rank, text) for rank, (ok, text) in enumerate(replies) if not ok]
        if failed:
            self.close(force=True)
            rank, (_, formatted) = failed[0]
            raise RuntimeError(
                f"the worker pool for world size {world_size} failed to start"
            ) from RankTraceback(rank, formatted)

    def run(self, name: str, payload: bytes, timeout: float) -> List[Any]:
        __tracebackhide__ = True
        message = (list(sys.path), payload)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(message)
            except OSError as error:
                self.broken = True
                raise RuntimeError(
                    f"rank {rank}'s worker is gone (exit code {self._procs[rank].exitcode}); "
                    f"the worker pool was torn down"
                ) from error
        replies = self._collect(name, timeout)
        errors = [(rank, reply) for rank, (ok, reply) in enumerate(replies) if not ok]
        if errors:
            _raise_rank_error(*errors[0], [rank for rank, _ in errors])
        return [pickle.loads(value) for _, value in replies]

    def _collect(self, name: str, timeout: float) -> List[Tuple[bool, Any]]:
        """Wait for one reply per rank: (True, value) or (False, error).

        On a timeout, a dead worker, or ranks still busy a grace period after another
        rank failed: marks the pool broken and raises (the failed rank's exception
        if there is one).
        """
        replies: List[Optional[Tuple[bool, Any]]] = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        failed_at = ""  # when a rank failed: the grace period the others got
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waitables = {self._conns[r]: r for r in pending}
            waitables.update({self._procs[r].sentinel: r for r in pending})
            for ready in multiprocessing.connection.wait(list(waitables), remaining):
                rank = waitables[ready]
                if rank not in pending:
                    continue
                if not self._conns[rank].poll():  # the sentinel: the process is gone
                    self._procs[rank].join(1.0)  # sets exitcode
                    self._raise_broken(
                        replies,
                        f"rank {rank} exited with code {self._procs[rank].exitcode} while "
                        f"running {name}; the worker pool was torn down",
                        RuntimeError,
                    )
                replies[rank] = self._conns[rank].recv()
                pending.discard(rank)
                if not replies[rank][0] and not failed_at:
                    failed_at = f"{_GRACE_AFTER_ERROR_S:.0f} s after rank {rank} failed"
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_ERROR_S)
        if pending:
            self._raise_broken(
                replies,
                f"ranks {sorted(pending)} of {self.world_size} were still running {name} "
                f"{failed_at or f'after the {timeout:.0f} s timeout'}; "
                f"the worker pool was torn down",
                TimeoutError,
            )
        return replies

    def _raise_broken(self, replies, message: str, error_type: type) -> None:
        """Mark the pool broken; raise the first failed rank's exception (noting
        ``message``) if a rank failed, else ``error_type(message)``."""
        self.broken = True
        failed = [(rank, reply[1]) for rank, reply in enumerate(replies) if reply and not reply[0]]
        if failed:
            _raise_rank_error(*failed[0], [rank for rank, _ in failed], also=message)
        raise error_type(message)

    def close(self, force: bool) -> None:
        """Stop the workers: ask them to exit unless ``force``, then kill stragglers."""
        if not force:
            for conn in self._conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            for proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            _kill_process_group(proc)
            proc.join()
        for conn in self._conns:
            conn.close()


def _kill_process_group(proc) -> None:
    """SIGKILL a worker and the processes it started (e.g. the manager process of
    Megatron's checkpoint saving), which would otherwise outlive a killed worker."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # each worker leads its own process group
    except (ProcessLookupError, PermissionError):  # gone, or killed before setpgrp
        if proc.is_alive():
            proc.kill()


def _raise_rank_error(rank: int, error: Tuple[Optional[bytes], str], failed_ranks, also=""):
    """Re-raise rank ``rank``'s exception, chained from its RankTraceback."""
    __tracebackhide__ = True  # pytest: show the rank's traceback, not this frame
    pickled_exception, formatted = error
    note = f" (ranks {failed_ranks} failed)" if len(failed_ranks) > 1 else ""
    cause = RankTraceback(rank, formatted + note + (f"\n{also}" if also else ""))
    exception = None
    if pickled_exception is not None:
        try:
            exception = pickle.loads(pickled_exception)
        except Exception:  # an exception class that cannot be rebuilt from its args
            exception = None
    if exception is None:
        last_line = formatted.strip().splitlines()[-1]
        exception = RuntimeError(f"rank {rank} raised {last_line}")
    raise exception from cause


# ----------------------------------------------------------------------------- worker side


def _worker_main(rank: int, world_size: int, store_port: int, conn) -> None:
    """Worker loop: join the gloo world, then run one payload per message until
    ``None`` arrives or the caller goes away. Replies with (ok, value|error)."""
    os.setpgrp()  # so that the caller can kill this worker with everything it started
    try:
        _join_world(rank, world_size, store_port)
        conn.send((True, None))
    except BaseException:
        conn.send((False, (None, traceback.format_exc())))
        return
    layout = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the caller has gone
            _exit_worker()
        if message is None:
            _exit_worker()
        caller_sys_path, payload = message
        sys.path.extend(p for p in caller_sys_path if p not in sys.path)
        try:
            fn, new_layout, seed, args, kwargs = pickle.loads(payload)
            if new_layout != layout:
                layout = None
                _set_layout(*new_layout)
                layout = new_layout
            _seed(seed)
            reply = (True, pickle.dumps(fn(*args, **kwargs)))
        except BaseException as error:  # reported to the caller, the worker lives on
            reply = (False, (_pickled_or_none(error), traceback.format_exc()))
        conn.send(reply)


def _exit_worker() -> None:
    """Exit at once: interpreter finalisation takes seconds here (torch, gloo, and the
    manager process that Megatron's checkpoint saving leaves running), and a worker has
    nothing to clean up beyond the processes it started, which are terminated first."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(1.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _join_world(rank: int, world_size: int, store_port: int) -> None:
    import torch
    import torch.distributed as dist

    from megatron_irl.cpu_support import enable_cpu_support

    torch.set_num_threads(1)
    # All ranks are local: gloo on loopback needs no resolvable host name.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", store_port, None, False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    enable_cpu_support()


def _set_layout(tp: int, pp: int, vpp: Optional[int]) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )


def _seed(seed: int) -> None:
    import torch
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _pickled_or_none(error: BaseException) -> Optional[bytes]:
    try:
        pickled = pickle.dumps(error)
        pickle.loads(pickled)  # some exception classes pickle but cannot be rebuilt
        return pickled
    except Exception:
        return None
