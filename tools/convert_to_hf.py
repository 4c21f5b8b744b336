"""Export a megatron-irl checkpoint (any TP / PP) as a Hugging Face model directory.

    python tools/convert_to_hf.py --load CKPT_DIR --output HF_DIR [--tokenizer TOK_DIR_OR_MODEL]

HF_DIR gets config.json, generation_config.json, the tokenizer files and safetensors
weights (padded vocabulary rows removed), loadable with
``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)``. The latest checkpoint under
CKPT_DIR is exported; one process, memory for about one layer at a time. CPU only.
"""

import argparse
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_irl.convert.families import ConversionError  # noqa: E402
from megatron_irl.data import DataError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory (a run's --save)")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
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
        print(f"convert_to_hf: error: --output {args.output} exists and is not empty",
              file=sys.stderr)
        return 2
    from megatron_irl.convert import convert_to_hf
    from megatron_irl.core.checkpoint import CheckpointError

    try:
        files = convert_to_hf(args.load, args.output, tokenizer=args.tokenizer,
                              family=args.family, vocab_size=args.vocab_size, dtype=args.dtype,
                              max_shard_bytes=int(args.max_shard_size_gb * 1024**3))
    except (ConversionError, CheckpointError, DataError) as error:
        print(f"convert_to_hf: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
