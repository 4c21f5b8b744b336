"""Train a small sentencepiece BPE tokenizer on the text of SFT JSONL files.

Trains on the same text pieces the data pipeline tokenizes (prompts and responses; for chat
records the rendered context and response segments), single-threaded so the model file
depends only on the input. Ids: unk 0, bos 1, eos 2, pad 3; "\\n" is a piece of its own
(the chat template uses newlines) and no Unicode normalization is applied.

    python tools/train_tokenizer.py --input examples/data/train.jsonl \\
        --output examples/data/tokenizer.model --vocab-size 320
"""

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_irl.data.records import read_records  # noqa: E402
from megatron_irl.data.report import DataReport  # noqa: E402


def segment_texts(paths: list[str]) -> list[str]:
    """Every non-empty segment text of every record, in file order."""
    texts = []
    for path in paths:
        for record in read_records(path, DataReport(source=path)):
            texts.extend(text for text, _ in record.segments if text)
    return texts


def train_tokenizer(
    paths: list[str], output_model: str, vocab_size: int, split_digits: bool = False
) -> None:
    """Write a sentencepiece model trained on `paths` to `output_model` (a .model path).

    `split_digits`: every digit is a piece of its own (no multi-digit pieces), so numbers
    are spelled digit by digit, as arithmetic tasks want.
    """
    import sentencepiece

    if not output_model.endswith(".model"):
        raise ValueError(f"--output {output_model} must end with .model")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(segment_texts(paths)),
        model_writer=model,  # in memory: no temporary path ends up inside the model file
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        user_defined_symbols=["\n"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
        # Only when asked: an option passed at its default is still written into the model's
        # trainer spec, which would change the bytes of models made without it.
        **({"split_digits": True} if split_digits else {}),
    )
    os.makedirs(os.path.dirname(os.path.abspath(output_model)), exist_ok=True)
    with open(output_model, "wb") as f:
        f.write(model.getvalue())


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="SFT JSONL file(s)")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=320)
    parser.add_argument("--split-digits", action="store_true",
                        help="make every digit a piece of its own (for arithmetic)")
    args = parser.parse_args()
    train_tokenizer(args.input, args.output, args.vocab_size, args.split_digits)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
