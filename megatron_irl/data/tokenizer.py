"""Tokenizers behind one small interface: a local Hugging Face directory or a sentencepiece model.

Interface (`Tokenizer`): `encode(text) -> list[int]` (raw pieces, no special tokens added),
`decode(ids) -> str` (special tokens skipped), `eos_id`, `bos_id` (None when documents get no
BOS), `pad_id`, `vocab_size`, `chat_template` (a `ChatTemplate` chat records are rendered
with, None for the built-in rendering; see `megatron_irl.data.chat_template`).

Special tokens:
- Hugging Face directory (`tokenizer.json`, read with the `tokenizers` package): EOS/BOS/PAD
  token strings come from `tokenizer_config.json`, then `special_tokens_map.json`.
  EOS is required. BOS is used when `tokenizer_config.json` says `"add_bos_token": true`;
  without that key, when a BOS token is declared and differs from EOS (Llama/Mistral/Gemma
  style yes, GPT-2/Qwen style no). PAD falls back to EOS when none is declared: padding
  positions are never trained, so the id only has to be valid.
- sentencepiece `.model`: the model's own bos/eos/pad ids; pad falls back to EOS.
"""

import json
import os
from typing import Optional, Protocol

from megatron_irl.data.chat_template import (
    SPECIAL_TOKEN_NAMES,
    ChatTemplate,
    read_chat_template_file,
    tokenizer_chat_template,
)
from megatron_irl.data.report import DataError


class Tokenizer(Protocol):
    eos_id: int
    bos_id: Optional[int]
    pad_id: int
    vocab_size: int
    chat_template: Optional[ChatTemplate]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _token_string(value) -> Optional[str]:
    """A special-token entry is a string or an AddedToken-like dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """Tokenizer from a Hugging Face directory holding `tokenizer.json`; its chat template is
    the file `chat_template` when given, else the directory's own (None without one)."""

    def __init__(self, directory: str, chat_template: Optional[str] = None):
        from tokenizers import Tokenizer as _RustTokenizer

        json_path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(json_path):
            raise DataError(
                f"tokenizer directory {directory} has no tokenizer.json (only fast Hugging Face "
                "tokenizers are supported; for sentencepiece pass the .model file path)"
            )
        try:
            self._tok = _RustTokenizer.from_file(json_path)
        except Exception as error:  # tokenizers raises a bare Exception naming no file
            raise DataError(f"{json_path}: not a readable tokenizer ({error}); the file is "
                            "damaged or cut short: copy it again") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = self._read_special_tokens(directory)

        eos = _token_string(config.get("eos_token"))
        if eos is None:
            raise DataError(
                f"{directory}: no eos_token in tokenizer_config.json or special_tokens_map.json; "
                "documents must end with EOS"
            )
        self.eos_id = self._id_of(eos, "eos_token", directory)
        bos = _token_string(config.get("bos_token"))
        use_bos = config.get("add_bos_token", bos is not None and bos != eos)
        self.bos_id = self._id_of(bos, "bos_token", directory) if use_bos and bos else None
        pad = _token_string(config.get("pad_token"))
        self.pad_id = self._id_of(pad, "pad_token", directory) if pad else self.eos_id
        special = tuple((name, _token_string(config[name])) for name in SPECIAL_TOKEN_NAMES
                        if _token_string(config.get(name)))
        self.chat_template = (read_chat_template_file(chat_template, special) if chat_template
                              else tokenizer_chat_template(directory, config, special))
        self.special_tokens = {token.content for token in
                               self._tok.get_added_tokens_decoder().values() if token.special}

    @staticmethod
    def _read_special_tokens(directory: str) -> dict:
        """Merge special_tokens_map.json under tokenizer_config.json (the config wins)."""
        merged = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    try:
                        merged.update(json.load(f))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: not valid JSON: {e}") from e
        return merged

    def _id_of(self, token: str, key: str, directory: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(f"{directory}: {key} {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens added) and each token's character span."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer:
    """Tokenizer from a sentencepiece `.model` file."""

    def __init__(self, model_path: str):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{model_path}: not a loadable sentencepiece model: {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise DataError(f"{model_path}: the sentencepiece model defines no EOS id")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str, chat_template: Optional[str] = None) -> Tokenizer:
    """A Hugging Face directory (or its tokenizer.json) or a sentencepiece `.model` file;
    `chat_template`: a Jinja file that replaces the tokenizer's own (`--chat-template`)."""
    if os.path.isdir(path):
        return HFTokenizer(path, chat_template)
    if os.path.isfile(path) and os.path.basename(path) == "tokenizer.json":
        return HFTokenizer(os.path.dirname(path) or ".", chat_template)
    if os.path.isfile(path) and path.endswith(".model"):
        if chat_template:
            raise DataError(f"--chat-template {chat_template}: needs a Hugging Face tokenizer "
                            f"(tokenizer.json), not the sentencepiece model {path}")
        return SentencePieceTokenizer(path)
    if not os.path.exists(path):
        raise DataError(f"--tokenizer-model {path}: no such file or directory")
    raise DataError(
        f"--tokenizer-model {path}: expected a Hugging Face tokenizer directory "
        "(with tokenizer.json) or a sentencepiece .model file"
    )


def describe_tokenizer(tokenizer: Tokenizer) -> dict:
    """The ids that preprocessed data depends on; compared when preprocessed data is loaded."""
    return {
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "pad_id": tokenizer.pad_id,
        "chat_template": tokenizer.chat_template.digest if tokenizer.chat_template else None,
    }
