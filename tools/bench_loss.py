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

import torch
from bench_ranks import measure_peak, measure_times

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


def run_loss(name, logits, labels, loss_mask, terminal, tp_group, lam, gamma, vocab_size=None):
    """One forward+backward of the loss ``name`` (one of ``LOSSES``), mean over trained tokens;
    ``logits.grad`` receives the gradient (fp32 logits are overwritten in place). The soft-Q
    loss masks the padded columns from ``vocab_size`` on (None: no padding)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_irl import vocab_parallel_soft_q_loss

    if name == "megatron_cross_entropy":
        per_token = vocab_parallel_cross_entropy(logits, labels.clamp(min=0)) * loss_mask
    elif name == "soft_q":
        per_token = vocab_parallel_soft_q_loss(
            logits, labels, loss_mask, terminal, lam=lam, gamma=gamma, tp_group=tp_group,
            vocab_size=vocab_size,
        ).loss
    else:
        per_token = _naive_composition(logits, labels, loss_mask, terminal, tp_group, lam, gamma)
    (per_token.sum() / loss_mask.sum()).backward()


def loss_inputs(args, tp, device="cpu"):
    """One rank's ``[4, tokens/4, vocab/tp]`` logits (in ``args.dtype``) and ``[4, tokens/4]``
    labels, loss mask (20% masked, label -100 there) and terminal flags (5%), on ``device``."""
    generator = torch.Generator(device=device).manual_seed(1234)
    b = 4
    s = args.tokens // b
    shard = args.vocab // tp
    options = {"generator": generator, "device": device}
    pristine = (torch.randn(b, s, shard, **options) * 3.0).to(args.dtype)
    labels = torch.randint(0, args.real_vocab or args.vocab, (b, s), **options)
    loss_mask = (torch.rand(b, s, **options) > 0.2).float()
    terminal = torch.rand(b, s, **options) > 0.95
    labels[loss_mask == 0] = -100
    return pristine, labels, loss_mask, terminal


def _setup(rank, tp, args, group):
    """This rank's inputs; returns one forward+backward of a named loss."""
    pristine, labels, loss_mask, terminal = loss_inputs(args, tp)
    logits = torch.empty_like(pristine, requires_grad=True)

    def one_step(name):
        with torch.no_grad():
            logits.copy_(pristine)  # the losses overwrite fp32 logits in place
        logits.grad = None
        run_loss(name, logits, labels, loss_mask, terminal, group, args.lam, args.gamma,
                 args.real_vocab)

    return one_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--real-vocab", type=int, default=None,
                        help="real vocabulary, the rest of --vocab is padding that the soft-Q "
                             "loss masks (vocab_size); default: no padding")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=1.0)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)

    print(f"tokens={args.tokens} vocab={args.vocab} real_vocab={args.real_vocab} "
          f"dtype={args.dtype} lam={args.lam} "
          f"gamma={args.gamma} repeats={args.repeats} cores={os.cpu_count()}")
    header = f"{'TP':>3} {'loss':<24} {'fwd+bwd ms':>11} {'time ratio':>11} " \
             f"{'peak MiB':>9} {'memory ratio':>13}"
    print(header)
    for tp in args.tp:
        times = measure_times(tp, _setup, args, LOSSES, args.repeats)
        peaks = {name: measure_peak(tp, _setup, args, name) for name in LOSSES}
        base = "megatron_cross_entropy"
        for name in LOSSES:
            print(f"{tp:>3} {name:<24} {times[name] * 1e3:>11.1f} "
                  f"{times[name] / times[base]:>11.3f} {peaks[name] / 2**20:>9.1f} "
                  f"{peaks[name] / peaks[base]:>13.3f}")


if __name__ == "__main__":
    main()
