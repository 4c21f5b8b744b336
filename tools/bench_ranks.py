"""Shared machinery of the side-by-side benchmarks: TP ranks as spawned gloo processes.

A benchmark supplies ``setup(rank, tp, args, group) -> one_step`` where ``one_step(name)`` runs
one forward+backward of variant ``name`` (the ranks are in step: barriers around it). Then
``measure_times`` runs the variants round-robin in the same processes, the order reversed
every other round, and returns the median per variant (the slowest rank's), and
``measure_peak`` runs one variant once in fresh processes and returns the largest rank's peak
resident memory above the resident size before the step.
glibc returns large freed blocks to the system, so the high-water mark sees every big buffer.
"""

from __future__ import annotations

import os
import queue
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(one_step):
    """Wrap a step so that it returns its wall time, all ranks starting together."""
    def run(name):
        dist.barrier()
        start = time.perf_counter()
        one_step(name)
        dist.barrier()
        return time.perf_counter() - start
    return run


def _worker(rank, tp, port, setup, args, names, repeats, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    step = timed(setup(rank, tp, args, parallel_state.get_tensor_model_parallel_group()))
    if repeats is None:  # peak memory of one step of names[0]
        before = _current_rss_bytes()
        step(names[0])
        results.put((rank, _max_rss_bytes() - before))
    else:
        times = {name: [] for name in names}
        for name in names:  # warm-up
            step(name)
        for repeat in range(repeats):
            # Alternating the order (ABBA) keeps a drifting machine load off any one variant.
            for name in names if repeat % 2 == 0 else names[::-1]:
                times[name].append(step(name))
        results.put((rank, {name: statistics.median(t) for name, t in times.items()}))
    dist.destroy_process_group()


_next_port = [29650]


def _launch(tp, setup, args, names, repeats):
    context = mp.get_context("spawn")
    results = context.Queue()
    _next_port[0] += 1
    procs = [context.Process(target=_worker, args=(rank, tp, _next_port[0], setup, args, names,
                                                   repeats, results))
             for rank in range(tp)]
    for proc in procs:
        proc.start()
    per_rank = []
    while len(per_rank) < tp:
        try:
            per_rank.append(results.get(timeout=1.0))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"a benchmark rank exited with code {failed[0]}")
    for proc in procs:
        proc.join()
    return [value for _, value in sorted(per_rank, key=lambda item: item[0])]


def measure_times(tp, setup, args, names, repeats) -> dict[str, float]:
    per_rank = _launch(tp, setup, args, names, repeats)
    return {name: max(rank[name] for rank in per_rank) for name in names}


def measure_peak(tp, setup, args, name) -> int:
    return max(_launch(tp, setup, args, [name], None))
