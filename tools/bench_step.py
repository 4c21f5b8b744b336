"""Benchmark: training-step time of IRL (lambda > 0) over MLE (lambda = 0), same model and data.

One process builds one Megatron-Core GPTModel with the trainer's own components and runs
``train_step`` with three objectives round-robin on the same micro-batches, ``--repeats``
times; the median step time of each is reported with its ratio to MLE:

- ``mle``: the soft-Q objective with lambda = 0 (plain cross entropy through the same code);
- ``irl``: the soft-Q objective with ``--irl-lambda``;
- ``mle_megatron``: Megatron-Core's ``vocab_parallel_cross_entropy``, for reference.

The data are synthetic: token ids drawn uniformly from the vocabulary, rows packed with
documents of ``--document-length`` tokens whose first quarter is prompt (not trained).
On a GPU each step is timed between device synchronisations and its peak allocated memory
is recorded (``bench/gpu_check.py`` derives throughput and MFU from ``measure``).

    python tools/bench_step.py --vocab 32768 --seq-length 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=4)
    parser.add_argument("--ffn-hidden-size", type=int, default=None,
                        help="unset: the SwiGLU rule (8/3 x hidden, rounded down to 64)")
    parser.add_argument("--tie-embeddings", action="store_true",
                        help="share the input embedding with the output layer")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                        help="FP8 GEMMs through Transformer Engine (with --bf16)")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--document-length", type=int, default=64)
    parser.add_argument("--irl-lambda", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    return parser


def step_config(args):
    """The trainer's configuration of the benchmarked model (Llama-style, dropout off)."""
    from megatron_irl.config import (
        IRLConfig, ModelConfig, OptimizerConfig, TrainConfig, TrainingConfig,
    )

    return TrainConfig(
        model=ModelConfig(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size,
            seq_length=args.seq_length, normalization="RMSNorm", swiglu=True,
            position_embedding_type="rope", add_bias_linear=False,
            untie_embeddings_and_output_weights=not args.tie_embeddings, hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
        optimizer=OptimizerConfig(lr=1e-4, lr_warmup_iters=0, clip_grad=1.0),
        training=TrainingConfig(micro_batch_size=args.micro_batch_size,
                                global_batch_size=args.micro_batch_size * args.micro_batches,
                                train_iters=1000, bf16=args.bf16, fp8_format=args.fp8_format),
        irl=IRLConfig(irl_lambda=args.irl_lambda),
    )


def synthetic_micro_batches(args) -> list[dict]:
    """``--micro-batches`` batches of ``[micro_batch_size, seq_length]`` CPU tensors in the
    layout of ``megatron_irl.data`` (the trainer moves them to the GPU)."""
    generator = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_length)
    doc = args.document_length
    batches = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, args.vocab, shape, generator=generator)
        positions = torch.arange(args.seq_length).expand(shape)
        batches.append({
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, dims=1),
            "loss_mask": (positions % doc >= doc // 4).float(),  # the first quarter is prompt
            "terminal": positions % doc == doc - 1,  # each document's last transition
            "next_position": positions + 1,  # single-turn documents
            "position_ids": positions % doc,
            "document_ids": positions // doc,
        })
    return batches


class MegatronCrossEntropy:
    """Megatron-Core's cross entropy with the objective's contract (sums, token count)."""

    def __call__(self, logits, batch):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        loss_mask = batch["loss_mask"]
        per_token = vocab_parallel_cross_entropy(logits, batch["labels"]) * loss_mask
        tokens = (loss_mask > 0).sum()
        return per_token.sum(), tokens.to(torch.int), {"loss": per_token.detach().sum()}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_objectives(trainable, cfg, micro_batches, objectives, repeats, deadline=None):
    """``train_step`` with each objective in turn, one warm-up round then ``repeats`` rounds.

    A round is not started if the previous one, started now, would end after ``deadline``
    (``time.monotonic()`` seconds; None: no limit), so fewer rounds may run. Returns
    ``{name: {"seconds": [...], "losses": [...], "peak_bytes": int | None}}``: each timed
    step's wall time, each step's (warm-up included) loss per trained token, and on a GPU the
    largest ``torch.cuda.max_memory_allocated`` over the steps. Mutates the model and optimizer.
    """
    from megatron_irl.training.loop import train_step

    trained = float(sum(batch["loss_mask"].sum() for batch in micro_batches))
    results = {name: {"seconds": [], "loss_sums": [], "peak_bytes": None} for name in objectives}
    round_seconds = 0.0
    for repeat in range(repeats + 1):  # the first round warms up
        if repeat and deadline is not None and time.monotonic() + round_seconds > deadline:
            break
        round_start = time.monotonic()
        for name, objective in objectives.items():
            result = results[name]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            _synchronize()
            start = time.perf_counter()
            metric_sums, _, _ = train_step(trainable.model, trainable.optimizer,
                                           trainable.scheduler, micro_batches, objective, cfg)
            _synchronize()
            if repeat:
                result["seconds"].append(time.perf_counter() - start)
            result["loss_sums"].append(metric_sums["loss"])  # read after the timing: a device sync
            if torch.cuda.is_available():
                result["peak_bytes"] = max(result["peak_bytes"] or 0,
                                           torch.cuda.max_memory_allocated())
        round_seconds = time.monotonic() - round_start
    for result in results.values():
        result["losses"] = [float(loss_sum) / trained for loss_sum in result.pop("loss_sums")]
    return results


def matmul_parameters(chunk) -> int:
    """Parameters that multiply activations: all but the input embedding table (a lookup);
    with tied embeddings the table is the output layer's weight and counts once."""
    total = sum(p.numel() for p in chunk.parameters())
    if chunk.share_embeddings_and_output_weights or not chunk.pre_process:
        return total
    return total - chunk.embedding.word_embeddings.weight.numel()


def core_attention_name(chunk) -> str:
    """Module path and class of the first layer's attention kernel module."""
    kernel = type(chunk.decoder.layers[0].self_attention.core_attention)
    return f"{kernel.__module__}.{kernel.__qualname__}"


def measure(args, deadline=None) -> dict:
    """Build the model (one process, its own process group), time the objectives, tear down.

    Returns ``time_objectives``' results under "objectives", plus "matmul_parameters",
    "core_attention" and "tokens_per_step".
    """
    from megatron_irl.config import IRLConfig
    from megatron_irl.core.distributed import init_distributed, shutdown_distributed
    from megatron_irl.training.loop import build_trainable
    from megatron_irl.training.objectives import SoftQObjective

    os.environ.setdefault("MASTER_PORT", "29710")
    cfg = step_config(args)
    init_distributed(cfg.parallel, seed=1234)
    try:
        trainable = build_trainable(cfg, args.vocab)
        objectives = {
            "mle": SoftQObjective(IRLConfig(irl_lambda=0.0), iteration=0),
            "irl": SoftQObjective(IRLConfig(irl_lambda=args.irl_lambda), iteration=0),
            "mle_megatron": MegatronCrossEntropy(),
        }
        results = time_objectives(trainable, cfg, synthetic_micro_batches(args), objectives,
                                  args.repeats, deadline)
        chunk = trainable.chunks[0]
        return {
            "objectives": results,
            "matmul_parameters": matmul_parameters(chunk),
            "core_attention": core_attention_name(chunk),
            "tokens_per_step": args.micro_batch_size * args.micro_batches * args.seq_length,
        }
    finally:
        shutdown_distributed()


def main() -> None:
    args = build_parser().parse_args()
    measured = measure(args)
    print(f"vocab={args.vocab} seq={args.seq_length} hidden={args.hidden_size} "
          f"layers={args.num_layers} tokens/step={measured['tokens_per_step']} "
          f"lambda={args.irl_lambda} repeats={args.repeats} cores={os.cpu_count()}")
    print(f"{'objective':<14} {'step ms':>9} {'ratio to mle':>13}")
    base = statistics.median(measured["objectives"]["mle"]["seconds"])
    for name, result in measured["objectives"].items():
        median = statistics.median(result["seconds"])
        print(f"{name:<14} {median * 1e3:>9.1f} {median / base:>13.3f}")


if __name__ == "__main__":
    main()
