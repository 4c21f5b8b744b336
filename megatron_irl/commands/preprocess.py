"""``megatron-irl preprocess``: tokenize an SFT JSONL file once into memory-mapped binaries.

    megatron-irl preprocess --input train.jsonl --tokenizer TOKENIZER --output-prefix data/train

writes data/train.bin, .idx, .lines.npy and .meta.json (see megatron_irl.data.indexed);
pass data/train as the training data path. TOKENIZER is a Hugging Face tokenizer directory
or a sentencepiece .model file. Bad records stop it with file:line; data problems (empty
responses, ...) are counted and printed, or stop it with --strict.
"""

from __future__ import annotations

import argparse
import sys

from megatron_irl.data import DataError, load_tokenizer, preprocess_jsonl
from megatron_irl.data.report import PROBLEMS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-irl preprocess", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="SFT JSONL file")
    parser.add_argument(
        "--tokenizer", required=True, help="Hugging Face tokenizer dir or sentencepiece .model"
    )
    parser.add_argument(
        "--chat-template", default=None,
        help="Jinja chat template file for chat records; unset: the tokenizer's own, else the "
             "built-in rendering (train with the same --chat-template)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--strict", action="store_true", help="fail on any data problem")
    args = parser.parse_args(argv)
    try:
        report = preprocess_jsonl(
            args.input, load_tokenizer(args.tokenizer, args.chat_template), args.output_prefix,
            strict=args.strict
        )
    except DataError as e:
        print(f"megatron-irl preprocess: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.{{bin,idx,lines.npy,meta.json}}: {report.num_documents} "
          f"documents from {report.num_records} records")
    for kind, count in sorted(report.problem_counts.items()):
        print(f"  {count} x {PROBLEMS[kind]} (e.g. {', '.join(report.problem_examples[kind])})")
    return 0
