"""Benchmark: training-step time of IRL (lambda > 0) over MLE (lambda = 0), same model and data.

One process builds one Megatron-Core GPTModel with the trainer's own components and runs
``train_step`` with three objectives round-robin on the same micro-batches, ``--repeats``
times; the median step time of each is reported with its ratio to MLE:

- ``mle``: the soft-Q objective with lambda = 0 (plain cross entropy through the same code);
- ``irl``: the soft-Q objective with ``--irl-lambda``;
- ``mle_megatron``: Megatron-Core's ``vocab_parallel_cross_entropy``, for reference.

    python tools/bench_step.py --vocab 32768 --seq-length 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _config(args):
    from megatron_irl.config import (
        IRLConfig, ModelConfig, OptimizerConfig, TrainConfig, TrainingConfig,
    )

    return TrainConfig(
        model=ModelConfig(
            num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
            num_query_groups=4, seq_length=args.seq_length, normalization="RMSNorm",
            swiglu=True, position_embedding_type="rope", add_bias_linear=False,
            untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
        optimizer=OptimizerConfig(lr=1e-4, lr_warmup_iters=0, clip_grad=1.0),
        training=TrainingConfig(micro_batch_size=args.micro_batch_size,
                                global_batch_size=args.micro_batch_size * args.micro_batches,
                                train_iters=1000),
        irl=IRLConfig(irl_lambda=args.irl_lambda),
    )


def _micro_batches(args):
    generator = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_length)
    batches = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, args.vocab, shape, generator=generator)
        # Documents of 64 positions: a terminal at each document's end.
        positions = torch.arange(args.seq_length).expand(shape)
        batches.append({
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, dims=1),
            "loss_mask": (positions % 64 >= 16).float(),  # the first 16 of 64 are prompt
            "terminal": positions % 64 == 63,
            "position_ids": positions % 64,
            "document_ids": positions // 64,
        })
    return batches


class _MegatronCrossEntropy:
    def __call__(self, logits, batch):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        loss_mask = batch["loss_mask"]
        per_token = vocab_parallel_cross_entropy(logits, batch["labels"]) * loss_mask
        tokens = (loss_mask > 0).sum()
        return per_token.sum(), tokens.to(torch.int), per_token.detach().sum().reshape(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--irl-lambda", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from megatron_irl.config import IRLConfig
    from megatron_irl.training.distributed import init_distributed, shutdown_distributed
    from megatron_irl.training.loop import build_trainable, train_step
    from megatron_irl.training.objective import Objective

    os.environ.setdefault("MASTER_PORT", "29710")
    cfg = _config(args)
    init_distributed(cfg.parallel, seed=1234)
    trainable = build_trainable(cfg, args.vocab)
    micro_batches = _micro_batches(args)
    objectives = {
        "mle": Objective(IRLConfig(irl_lambda=0.0), iteration=0),
        "irl": Objective(IRLConfig(irl_lambda=args.irl_lambda), iteration=0),
        "mle_megatron": _MegatronCrossEntropy(),
    }
    times = {name: [] for name in objectives}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, objective in objectives.items():
            start = time.perf_counter()
            train_step(trainable.model, trainable.optimizer, trainable.scheduler,
                       micro_batches, objective, cfg)
            if repeat:
                times[name].append(time.perf_counter() - start)
    shutdown_distributed()

    tokens = args.micro_batch_size * args.micro_batches * args.seq_length
    print(f"vocab={args.vocab} seq={args.seq_length} hidden={args.hidden_size} "
          f"layers={args.num_layers} tokens/step={tokens} lambda={args.irl_lambda} "
          f"repeats={args.repeats} cores={os.cpu_count()}")
    print(f"{'objective':<14} {'step ms':>9} {'ratio to mle':>13}")
    base = statistics.median(times["mle"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<14} {median * 1e3:>9.1f} {median / base:>13.3f}")


if __name__ == "__main__":
    main()
