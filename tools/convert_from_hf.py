"""Convert a local Hugging Face Llama / Mistral / Qwen2 directory into a megatron-irl checkpoint.

    python tools/convert_from_hf.py --hf-dir HF_DIR --output OUT [--tensor-model-parallel-size T]
    torchrun --nproc-per-node N tools/convert_from_hf.py --hf-dir HF_DIR --output OUT \\
        --tensor-model-parallel-size T          # N = T x pipeline stages

OUT then holds a weights-only checkpoint (iteration 0), the tokenizer files, hf_config.json
and model.yaml (the model section to train with). Fine-tune it with

    megatron-irl train --config OUT/model.yaml --train-data-path ... [--seq-length ...]

(model.yaml sets --load OUT --finetune --tokenizer-model OUT). The checkpoint loads at any
PP and at any TP that divides model.yaml's make_vocab_size_divisible_by. Under torchrun
the conversion runs at TP = gcd(T, N), PP = N / that, and each rank holds 1/N of the model
(its tensor-parallel slice of its pipeline stage's layers): use enough ranks for large
models. CPU only (CUDA is hidden from this process).
"""

import argparse
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion is CPU work; gloo, no GPU memory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_irl.config import ConfigError  # noqa: E402
from megatron_irl.convert.families import ConversionError  # noqa: E402
from megatron_irl.data import DataError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        print(f"convert_from_hf: error: {error}", file=sys.stderr)
        return 2

    from megatron_irl.config import ParallelConfig
    from megatron_irl.convert import import_checkpoint
    from megatron_irl.core.distributed import init_distributed, shutdown_distributed

    init_distributed(ParallelConfig(**plan.config["parallel"]), seed=0)
    try:
        directory = import_checkpoint(plan, args.output)
    except ConversionError as error:
        print(f"convert_from_hf: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if launch_environment()[0] == 0:
        for note in plan.notes:
            print(f"note: {note}")
        print(f"wrote {directory}; model config: {os.path.join(args.output, 'model.yaml')}")
    return 0


# The guard matters: checkpoint saving starts a helper process that re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
