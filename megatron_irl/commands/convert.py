"""``megatron-irl convert from-hf | to-hf``: Hugging Face models in and out (``convert/``).

    megatron-irl convert from-hf --hf-dir HF_DIR --output OUT [--tensor-model-parallel-size T]
    torchrun --nproc-per-node N -m megatron_irl convert from-hf --hf-dir HF_DIR --output OUT \\
        --tensor-model-parallel-size T          # N = T x pipeline stages
    megatron-irl convert to-hf --load CKPT_DIR --output HF_DIR [--ckpt-step N]

Both are CPU work (CUDA is hidden from the process): gloo, no GPU memory.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_irl.config import ConfigError
from megatron_irl.convert.families import ConversionError
from megatron_irl.core.checkpoint_files import CheckpointError
from megatron_irl.data import DataError

FROM_HF = """Convert a local Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory into a
megatron-irl checkpoint.

OUT then holds a weights-only checkpoint (iteration 0), the tokenizer files, hf_config.json
and model.yaml (the model section to train with). Fine-tune it with

    megatron-irl train --config OUT/model.yaml --train-data-path ... [--seq-length ...]

(model.yaml sets --load OUT --finetune --tokenizer-model OUT). The checkpoint loads at any
PP and at any TP that divides model.yaml's make_vocab_size_divisible_by. Under torchrun
the conversion runs at TP = gcd(T, N), PP = N / that, and each rank holds 1/N of the model
(its tensor-parallel slice of its pipeline stage's layers): use enough ranks for large
models."""

TO_HF = """Export a megatron-irl checkpoint (any TP / PP) as a Hugging Face model directory.

HF_DIR gets config.json, generation_config.json, the tokenizer files and safetensors
weights (padded vocabulary rows removed), loadable with
transformers.AutoModelForCausalLM.from_pretrained(HF_DIR). The latest checkpoint under
CKPT_DIR is exported (--ckpt-step: another); one process, memory for about one layer at a
time."""

SUBCOMMANDS = ("from-hf", "to-hf")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    asked_for_help = argv[:1] in (["-h"], ["--help"])
    if not argv or argv[0] not in SUBCOMMANDS:
        print("usage: megatron-irl convert {from-hf,to-hf} [options]\n"
              "  from-hf  Hugging Face model directory -> megatron-irl checkpoint\n"
              "  to-hf    megatron-irl checkpoint -> Hugging Face model directory\n"
              "`megatron-irl convert <subcommand> --help` lists its options.",
              file=sys.stdout if asked_for_help else sys.stderr)
        return 0 if asked_for_help else 2
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    return from_hf(argv[1:]) if argv[0] == "from-hf" else to_hf(argv[1:])


def from_hf(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-irl convert from-hf", description=FROM_HF,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True,
                        help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--output", required=True, help="new checkpoint directory")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size to train with (checked against the heads; sets the "
                             "vocabulary padding). The conversion runs at TP = gcd(this, "
                             "processes) and PP = the rest")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="vocabulary padding divisor; unset: lcm(128, TP), doubled until the "
                             "padded tokenizer vocabulary covers the embedding")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="stored dtype; unset: bfloat16 for bfloat16 weights, else float32")
    args = parser.parse_args(argv)

    from megatron_irl.core.distributed import launch_environment

    _, world_size, _ = launch_environment()
    try:
        if os.path.exists(args.output) and os.listdir(args.output):
            raise ConversionError(f"--output {args.output} exists and is not empty")
        from megatron_irl.convert import plan_import

        plan = plan_import(args.hf_dir, args.tensor_model_parallel_size, world_size=world_size,
                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                           dtype=args.dtype)
    except (ConfigError, ConversionError, DataError) as error:
        print(f"megatron-irl convert from-hf: error: {error}", file=sys.stderr)
        return 2

    from megatron_irl.config import ParallelConfig
    from megatron_irl.convert import import_checkpoint
    from megatron_irl.core.distributed import init_distributed, shutdown_distributed

    init_distributed(ParallelConfig(**plan.config["parallel"]), seed=0)
    try:
        directory = import_checkpoint(plan, args.output)
    except ConversionError as error:
        print(f"megatron-irl convert from-hf: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if launch_environment()[0] == 0:
        for note in plan.notes:
            print(f"note: {note}")
        print(f"wrote {directory}; model config: {os.path.join(args.output, 'model.yaml')}")
    return 0


def to_hf(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-irl convert to-hf", description=TO_HF,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory (a run's --save)")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--ckpt-step", type=int, default=None,
                        help="export this iteration of --load; unset: the latest complete one")
    parser.add_argument("--tokenizer", default=None,
                        help="Hugging Face tokenizer directory or sentencepiece .model file; "
                             "unset: the checkpoint's --tokenizer-model")
    parser.add_argument("--family", choices=("llama", "mistral", "qwen2", "qwen3"),
                        default=None,
                        help="architecture to write; unset: the family the checkpoint was "
                             "imported from, else qwen3 with query/key norms, qwen2 with "
                             "q/k/v biases, llama otherwise")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary rows to keep; unset: the converted model's original "
                             "vocab_size (hf_config.json), else the tokenizer's size")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights dtype; unset: as stored in the checkpoint")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0,
                        help="largest safetensors file (GiB)")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and os.listdir(args.output):
        print(f"megatron-irl convert to-hf: error: --output {args.output} exists and is not "
              "empty", file=sys.stderr)
        return 2
    from megatron_irl.convert import convert_to_hf

    try:
        files = convert_to_hf(args.load, args.output, ckpt_step=args.ckpt_step,
                              tokenizer=args.tokenizer, family=args.family,
                              vocab_size=args.vocab_size, dtype=args.dtype,
                              max_shard_bytes=int(args.max_shard_size_gb * 1024**3))
    except (ConversionError, CheckpointError, DataError) as error:
        print(f"megatron-irl convert to-hf: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {', '.join(files)}")
    return 0
