"""Benchmark: this tree's soft-Q losses (unfused and fused) against an earlier git revision.

One process, one thread, TP = 1: the variants run interleaved in a shuffled order each repeat
and each call is timed in CPU time of the process (``time.process_time``), which a busy
machine disturbs far less than wall-clock time. Printed: the median CPU time per variant and
the median over repeats of each variant's time divided by the earlier revision's in the same
repeat (paired ratios), with their quartiles.

    python tools/bench_loss_revisions.py --revision c942a8d --tokens 1024 --vocab 32768 \
        --padded 768 --repeats 201 [--fused --hidden 512 --chunk-size 128]

Variants: ``earlier`` (the revision's ``megatron_irl/loss/soft_q.py``, or with ``--fused``
its ``fused_output.py``, loaded from git), ``current`` (no padding), ``current_padded`` (the
last ``--padded`` vocabulary rows are padding, masked), and without ``--fused`` Megatron's
``vocab_parallel_cross_entropy`` for reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_module_at(revision: str, name: str):
    """The module ``megatron_irl/loss/<name>.py`` as it was at ``revision``."""
    source = subprocess.run(["git", "-C", REPO, "show", f"{revision}:megatron_irl/loss/{name}.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"{name}_earlier.py")
    with open(path, "w", encoding="utf-8") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(f"{name}_earlier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_losses_at(revision: str):
    """``(vocab_parallel_soft_q_loss, fused_output_soft_q_loss_sum)`` as at ``revision``; the
    earlier fused module imports the earlier soft-Q module's helpers."""
    soft_q = _load_module_at(revision, "soft_q")
    current = sys.modules["megatron_irl.loss.soft_q"]
    sys.modules["megatron_irl.loss.soft_q"] = soft_q
    try:
        fused = _load_module_at(revision, "fused_output")
    finally:
        sys.modules["megatron_irl.loss.soft_q"] = current
    return soft_q.vocab_parallel_soft_q_loss, fused.fused_output_soft_q_loss_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--padded", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--fused", action="store_true", help="compare the fused output loss")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Megatron's cross entropy reads its tensor-parallel group from parallel_state: one rank.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(1, 1)

    from megatron_irl import vocab_parallel_soft_q_loss
    from megatron_irl.loss.fused_output import fused_output_soft_q_loss_sum

    earlier, earlier_fused = load_losses_at(args.revision)
    generator = torch.Generator().manual_seed(0)
    if args.fused:
        hidden = torch.randn(1, args.tokens, args.hidden, generator=generator)
        weight = torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden ** 0.5
    else:
        base = torch.randn(1, args.tokens, args.vocab, generator=generator) * 3
    real = args.vocab - args.padded
    labels = torch.randint(0, real, (1, args.tokens), generator=generator)
    loss_mask = (torch.rand(1, args.tokens, generator=generator) < 0.8).float()
    terminal = torch.rand(1, args.tokens, generator=generator) < 0.05
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def soft_q(loss, **extra):
        return lambda logits: loss(logits, labels, loss_mask, terminal, lam=0.1, gamma=1.0,
                                   tp_group=tp_group, **extra).loss

    def fused(loss, **extra):
        return lambda inputs: loss(*inputs, labels, loss_mask, terminal, lam=0.1, gamma=1.0,
                                   chunk_size=args.chunk_size, tp_group=tp_group,
                                   **extra).loss_sum

    if args.fused:
        variants = {
            "earlier": fused(earlier_fused),
            "current": fused(fused_output_soft_q_loss_sum),
            "current_padded": fused(fused_output_soft_q_loss_sum, vocab_size=real),
        }
    else:
        variants = {
            "earlier": soft_q(earlier),
            "current": soft_q(vocab_parallel_soft_q_loss),
            "current_padded": soft_q(vocab_parallel_soft_q_loss, vocab_size=real),
            "megatron_cross_entropy": lambda logits: vocab_parallel_cross_entropy(logits, labels)
            * loss_mask,
        }
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            # Fresh leaves each call (the unfused loss overwrites fp32 logits in place).
            inputs = ((hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))
                      if args.fused else base.clone().requires_grad_(True))
            start = time.process_time()
            (variants[name](inputs).sum() / loss_mask.sum()).backward()
            times[name].append(time.process_time() - start)
            del inputs

    print(f"{'fused' if args.fused else 'unfused'} loss: "
          f"tokens {args.tokens}, vocab {args.vocab} ({args.padded} padded), "
          f"{args.repeats} repeats, CPU seconds per forward+backward, one thread")
    print(f"{'variant':<24}{'median s':>10}{'ratio to earlier':>18}{'quartiles':>20}")
    for name, values in times.items():
        ratios = sorted(v / e for v, e in zip(values, times["earlier"]))
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        print(f"{name:<24}{statistics.median(values):>10.3f}{median:>18.4f}"
              f"{f'{q1:.4f}-{q3:.4f}':>20}")


if __name__ == "__main__":
    sys.exit(main())
