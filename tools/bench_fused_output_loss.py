"""Benchmark: output layer + soft-Q loss sum, fused (chunked) vs unfused (matmul + loss).

Forward+backward (gradients w.r.t. the hidden states and the output weight) of the loss sum
divided by the trained-token count, as training backpropagates it, with

- ``unfused``: ``copy_to_tensor_model_parallel_region(hidden) @ weight.T`` (Megatron's
  ColumnParallelLinear: the hidden gradient is all-reduced over TP) followed by
  ``vocab_parallel_soft_q_loss``, which holds the ``[tokens, v/tp]`` logits;
- ``fused``: ``fused_output_soft_q_loss_sum`` with ``--chunk-size`` tokens per chunk,

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

import torch
from bench_ranks import measure_peak, measure_times

VARIANTS = ("unfused", "fused")


def _run_variant(name, hidden, weight, labels, loss_mask, terminal, group, args):
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from megatron_irl.loss import vocab_parallel_soft_q_loss
    from megatron_irl.loss.fused_output import fused_output_soft_q_loss_sum

    options = dict(lam=args.lam, gamma=args.gamma, tp_group=group, vocab_size=args.real_vocab)
    if name == "unfused":
        logits = copy_to_tensor_model_parallel_region(hidden, group=group) @ weight.t()
        loss_sum = vocab_parallel_soft_q_loss(logits, labels, loss_mask, terminal,
                                              **options).loss.sum()
    else:
        loss_sum, _ = fused_output_soft_q_loss_sum(hidden, weight, labels, loss_mask, terminal,
                                                   chunk_size=args.chunk_size, **options)
    (loss_sum / loss_mask.sum()).backward()


def _inputs(args, tp, rank):
    """hidden ``[4, tokens/4, h]`` (the same on every rank) and this rank's weight shard,
    generated shard by shard so that no transient buffer raises the resident high-water mark."""
    generator = torch.Generator().manual_seed(1234)
    b = 4
    s = args.tokens // b
    hidden = torch.randn(b, s, args.hidden, generator=generator).to(args.dtype)
    labels = torch.randint(0, args.real_vocab or args.vocab, (b, s), generator=generator)
    loss_mask = (torch.rand(b, s, generator=generator) > 0.2).float()
    terminal = torch.rand(b, s, generator=generator) > 0.95
    labels[loss_mask == 0] = -100
    shard_generator = torch.Generator().manual_seed(5678 + rank)
    weight = torch.randn(args.vocab // tp, args.hidden, generator=shard_generator)
    weight = weight.mul_(3.0 / args.hidden ** 0.5).to(args.dtype)  # logits of std ~3
    return hidden.requires_grad_(), weight.requires_grad_(), labels, loss_mask, terminal


def _setup(rank, tp, args, group):
    """This rank's inputs; returns one forward+backward of a named variant."""
    hidden, weight, *per_token = _inputs(args, tp, rank)

    def one_step(name):
        hidden.grad = weight.grad = None
        _run_variant(name, hidden, weight, *per_token, group, args)

    return one_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--real-vocab", type=int, default=None,
                        help="real vocabulary, the rest of --vocab is padding that both "
                             "variants mask (vocab_size); default: no padding")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=128, help="tokens per fused chunk")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=1.0)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)

    print(f"tokens={args.tokens} vocab={args.vocab} real_vocab={args.real_vocab} "
          f"hidden={args.hidden} "
          f"chunk_size={args.chunk_size} dtype={args.dtype} lam={args.lam} gamma={args.gamma} "
          f"repeats={args.repeats} cores={os.cpu_count()}", flush=True)
    print(f"{'TP':>3} {'variant':<8} {'fwd+bwd ms':>11} {'time ratio':>11} "
          f"{'peak MiB':>9} {'memory ratio':>13}", flush=True)
    for tp in args.tp:
        load_before = os.getloadavg()[0]
        times = measure_times(tp, _setup, args, VARIANTS, args.repeats)
        peaks = {name: measure_peak(tp, _setup, args, name) for name in VARIANTS}
        for name in VARIANTS:
            print(f"{tp:>3} {name:<8} {times[name] * 1e3:>11.1f} "
                  f"{times[name] / times['unfused']:>11.3f} {peaks[name] / 2**20:>9.1f} "
                  f"{peaks[name] / peaks['unfused']:>13.3f}", flush=True)
        # A shared machine: the load says how far the absolute times can be trusted.
        print(f"    1-minute load average {load_before:.1f} before TP={tp}, "
              f"{os.getloadavg()[0]:.1f} after", flush=True)


if __name__ == "__main__":
    main()
