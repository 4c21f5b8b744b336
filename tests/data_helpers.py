"""Helpers for the data-pipeline tests: a character tokenizer with predictable ids."""

import json

PAD, BOS, EOS = 0, 1, 2
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII


class CharTokenizer:
    """One id per character: id = 3 + ALPHABET.index(c); 0/1/2 = pad/bos/eos."""

    def __init__(self, bos: bool = True):
        self.eos_id, self.pad_id = EOS, PAD
        self.bos_id = BOS if bos else None
        self.vocab_size = 3 + len(ALPHABET)
        self.chat_template = None  # chat records: the built-in rendering

    def encode(self, text: str) -> list[int]:
        return [3 + ALPHABET.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(ALPHABET[i - 3] for i in ids if i >= 3)


def ids(text: str) -> list[int]:
    """The CharTokenizer ids of `text`."""
    return CharTokenizer().encode(text)


def write_jsonl(path, records) -> str:
    """Write records (dicts, or raw strings written as-is) one per line; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)
