"""Benchmark: output layer + soft-Q loss, fused (chunked) vs unfused (matmul + loss).

Forward+backward (gradients w.r.t. the hidden states and the output weight) of

- ``unfused``: ``copy_to_tensor_model_parallel_region(hidden) @ weight.T`` (Megatron's
  ColumnParallelLinear: the hidden gradient is all-reduced over TP) followed by
  ``vocab_parallel_soft_q_loss``, which holds the ``[tokens, v/tp]`` logits;
- ``fused``: ``fused_output_soft_q_loss`` with ``--chunk-size`` tokens per chunk,

at TP = 1 and 2 (gloo ranks on this machine), printed as a table of ratios against unfused.

- Time: both variants run round-robin in the same processes, ``--repeats`` times after one
  warm-up each; the median per variant is reported (the slowest rank counts, collectives keep
  ranks in step).
- Peak memory: each (variant, TP) runs once in fresh processes; the peak resident set size
  during one forward+backward minus the resident size just before it (inputs already
  allocated), the largest over ranks. The weight gradient (``[v/tp, h]`` fp32) is part of both
  peaks. glibc returns large freed blocks to the system, so the resident high-water mark sees
  every large buffer.

    python tools/bench_fused_output_loss.py --tokens 4096 --vocab 131072 --hidden 1024
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VARIANTS = ("unfused", "fused")


def _run_variant(name, hidden, weight, labels, loss_mask, terminal, group, args):
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from megatron_irl.loss import vocab_parallel_soft_q_loss
    from megatron_irl.loss.fused_output import fused_output_soft_q_loss

    options = dict(lam=args.lam, gamma=args.gamma, tp_group=group)
    if name == "unfused":
        logits = copy_to_tensor_model_parallel_region(hidden, group=group) @ weight.t()
        out = vocab_parallel_soft_q_loss(logits, labels, loss_mask, terminal, **options)
    else:
        out = fused_output_soft_q_loss(hidden, weight, labels, loss_mask, terminal,
                                       chunk_size=args.chunk_size, **options)
    (out.loss.sum() / loss_mask.sum()).backward()


def _inputs(args, tp, rank):
    """hidden ``[4, tokens/4, h]`` (the same on every rank) and this rank's weight shard,
    generated shard by shard so that no transient buffer raises the resident high-water mark."""
    generator = torch.Generator().manual_seed(1234)
    b = 4
    s = args.tokens // b
    hidden = torch.randn(b, s, args.hidden, generator=generator).to(args.dtype)
    labels = torch.randint(0, args.vocab, (b, s), generator=generator)
    loss_mask = (torch.rand(b, s, generator=generator) > 0.2).float()
    terminal = torch.rand(b, s, generator=generator) > 0.95
    labels[loss_mask == 0] = -100
    shard_generator = torch.Generator().manual_seed(5678 + rank)
    weight = torch.randn(args.vocab // tp, args.hidden, generator=shard_generator)
    weight = weight.mul_(3.0 / args.hidden ** 0.5).to(args.dtype)  # logits of std ~3
    return hidden.requires_grad_(), weight.requires_grad_(), labels, loss_mask, terminal


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank, tp, args, mode, variant, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    hidden, weight, *per_token = _inputs(args, tp, rank)

    def one_step(name):
        hidden.grad = weight.grad = None
        dist.barrier()
        start = time.perf_counter()
        _run_variant(name, hidden, weight, *per_token, group, args)
        dist.barrier()
        return time.perf_counter() - start

    if mode == "memory":
        before = _current_rss_bytes()
        one_step(variant)
        results.put((rank, _max_rss_bytes() - before))
    else:
        times = {name: [] for name in VARIANTS}
        for name in VARIANTS:  # warm-up
            one_step(name)
        for _ in range(args.repeats):
            for name in VARIANTS:
                times[name].append(one_step(name))
        results.put((rank, {name: statistics.median(t) for name, t in times.items()}))
    dist.destroy_process_group()


def _launch(tp, args, mode, variant=None):
    context = mp.get_context("spawn")
    results = context.Queue()
    args.port += 1
    procs = [
        context.Process(target=_worker, args=(rank, tp, args, mode, variant, results))
        for rank in range(tp)
    ]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=128, help="tokens per fused chunk")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=29750)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)

    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} "
          f"chunk_size={args.chunk_size} dtype={args.dtype} lam={args.lam} gamma={args.gamma} "
          f"repeats={args.repeats} cores={os.cpu_count()}", flush=True)
    print(f"{'TP':>3} {'variant':<8} {'fwd+bwd ms':>11} {'time ratio':>11} "
          f"{'peak MiB':>9} {'memory ratio':>13}", flush=True)
    for tp in args.tp:
        per_rank_times = _launch(tp, args, "time")
        times = {name: max(rank[name] for rank in per_rank_times) for name in VARIANTS}
        peaks = {name: max(_launch(tp, args, "memory", name)) for name in VARIANTS}
        for name in VARIANTS:
            print(f"{tp:>3} {name:<8} {times[name] * 1e3:>11.1f} "
                  f"{times[name] / times['unfused']:>11.3f} {peaks[name] / 2**20:>9.1f} "
                  f"{peaks[name] / peaks['unfused']:>13.3f}", flush=True)


if __name__ == "__main__":
    main()
