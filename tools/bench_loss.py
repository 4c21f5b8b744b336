"""Benchmark: soft-Q loss vs Megatron's vocab-parallel cross entropy vs a naive composition.

Forward+backward time and peak extra memory of the loss alone, at TP = 1 and 2 (gloo ranks
on this machine), printed as a table of ratios against Megatron's cross entropy.

- Time: the three losses run round-robin in the same processes, ``--repeats`` times; the
  median per loss is reported (the slowest rank counts, collectives keep ranks in step).
- Peak memory: each (loss, TP) runs once in fresh processes; the peak resident set size during
  one forward+backward minus the resident size just before it (inputs already allocated),
  the largest over ranks. glibc returns large freed blocks to the system, so the resident
  high-water mark sees every ``[tokens, vocab]`` buffer.

    python tools/bench_loss.py --tokens 4096 --vocab 32768
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

LOSSES = ("megatron_cross_entropy", "soft_q", "naive_composition")


def _naive_composition(logits, labels, loss_mask, terminal, tp_group, lam, gamma):
    """log_softmax + gather + shifted logsumexp on the gathered full vocabulary (autograd)."""
    from torch.distributed.nn.functional import all_gather  # differentiable

    full = torch.cat(all_gather(logits.contiguous(), group=tp_group), dim=-1).float()  # [b, s, v]
    log_probs = torch.log_softmax(full, dim=-1)
    value = torch.logsumexp(full, dim=-1)
    safe = labels.clamp(min=0).unsqueeze(-1)
    nll = -log_probs.gather(-1, safe).squeeze(-1)
    target = full.gather(-1, safe).squeeze(-1)
    next_value = torch.cat([value[:, 1:], torch.zeros_like(value[:, :1])], dim=1)
    delta = target - gamma * (~terminal).float() * next_value
    return loss_mask * (nll + lam * delta.square())


def _run_loss(name, logits, labels, loss_mask, terminal, tp_group, lam, gamma):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_irl import vocab_parallel_soft_q_loss

    if name == "megatron_cross_entropy":
        per_token = vocab_parallel_cross_entropy(logits, labels.clamp(min=0)) * loss_mask
    elif name == "soft_q":
        per_token = vocab_parallel_soft_q_loss(
            logits, labels, loss_mask, terminal, lam=lam, gamma=gamma, tp_group=tp_group
        ).loss
    else:
        per_token = _naive_composition(logits, labels, loss_mask, terminal, tp_group, lam, gamma)
    (per_token.sum() / loss_mask.sum()).backward()


def _inputs(args, tp):
    generator = torch.Generator().manual_seed(1234)
    b = 4
    s = args.tokens // b
    shard = args.vocab // tp
    pristine = (torch.randn(b, s, shard, generator=generator) * 3.0).to(args.dtype)
    labels = torch.randint(0, args.vocab, (b, s), generator=generator)
    loss_mask = (torch.rand(b, s, generator=generator) > 0.2).float()
    terminal = torch.rand(b, s, generator=generator) > 0.95
    labels[loss_mask == 0] = -100
    return pristine, labels, loss_mask, terminal


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank, tp, args, mode, loss_name, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    pristine, labels, loss_mask, terminal = _inputs(args, tp)
    logits = torch.empty_like(pristine, requires_grad=True)
    run_args = (labels, loss_mask, terminal, group, args.lam, args.gamma)

    def one_step(name):
        with torch.no_grad():
            logits.copy_(pristine)  # the losses overwrite fp32 logits in place
        logits.grad = None
        dist.barrier()
        start = time.perf_counter()
        _run_loss(name, logits, *run_args)
        dist.barrier()
        return time.perf_counter() - start

    if mode == "memory":
        before = _current_rss_bytes()
        one_step(loss_name)
        logits.grad = None
        results.put((rank, _max_rss_bytes() - before))
    else:
        times = {name: [] for name in LOSSES}
        for name in LOSSES:  # warm-up
            one_step(name)
        for _ in range(args.repeats):
            for name in LOSSES:
                times[name].append(one_step(name))
        results.put((rank, {name: statistics.median(t) for name, t in times.items()}))
    dist.destroy_process_group()


def _launch(tp, args, mode, loss_name=None):
    context = mp.get_context("spawn")
    results = context.Queue()
    args.port += 1
    procs = [
        context.Process(target=_worker, args=(rank, tp, args, mode, loss_name, results))
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
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=29650)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)

    print(f"tokens={args.tokens} vocab={args.vocab} dtype={args.dtype} lam={args.lam} "
          f"gamma={args.gamma} repeats={args.repeats} cores={os.cpu_count()}")
    header = f"{'TP':>3} {'loss':<24} {'fwd+bwd ms':>11} {'time ratio':>11} " \
             f"{'peak MiB':>9} {'memory ratio':>13}"
    print(header)
    for tp in args.tp:
        per_rank_times = _launch(tp, args, "time")
        times = {name: max(rank[name] for rank in per_rank_times) for name in LOSSES}
        peaks = {name: max(_launch(tp, args, "memory", name)) for name in LOSSES}
        base = "megatron_cross_entropy"
        for name in LOSSES:
            print(f"{tp:>3} {name:<24} {times[name] * 1e3:>11.1f} "
                  f"{times[name] / times[base]:>11.3f} {peaks[name] / 2**20:>9.1f} "
                  f"{peaks[name] / peaks[base]:>13.3f}")


if __name__ == "__main__":
    main()
