"""Files of a Hugging Face model directory: safetensors weights, config, tokenizer.

Only safetensors, JSON and sentencepiece models are read (no pickle, no ``transformers``).
Tensors are read one at a time from memory-mapped files, so a reader holds only the
tensors it asked for.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_irl.convert.families import ConversionError

INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"
SENTENCEPIECE_FILENAME = "tokenizer.model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON: {error}") from None


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, sort_keys=False)
        file.write("\n")


class SafetensorsReader:
    """Tensors of a model directory by name: ``model.safetensors.index.json`` shards or a
    single ``model.safetensors``. Only ``.safetensors`` files are ever opened."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILENAME)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index_path}: no 'weight_map' object")
            self._file_of = {name: os.path.join(directory, file)
                             for name, file in weight_map.items()}
        elif os.path.isfile(os.path.join(directory, SINGLE_FILENAME)):
            path = os.path.join(directory, SINGLE_FILENAME)
            with _open_safetensors(path) as handle:
                self._file_of = {name: path for name in handle.keys()}
        else:
            raise ConversionError(
                f"{directory}: no {INDEX_FILENAME} or {SINGLE_FILENAME} (only safetensors "
                "weights are read; convert .bin files with transformers' save_pretrained first)")
        for path in set(self._file_of.values()):
            if not path.endswith(".safetensors"):
                raise ConversionError(f"{index_path}: {path} is not a .safetensors file")
            if not os.path.isfile(path):
                raise ConversionError(f"{index_path}: names {os.path.basename(path)}, which is "
                                      f"not in {directory} (a download cut short?)")
        self.directory = directory
        self._handles: dict = {}

    def get(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise ConversionError(f"{self.directory}: the weights have no tensor {name!r}")
        if path not in self._handles:
            self._handles[path] = _open_safetensors(path)
        try:
            return self._handles[path].get_tensor(name)
        except SafetensorError as error:
            raise ConversionError(f"{path}: cannot read tensor {name!r} ({error}); the file is "
                                  "damaged or cut short: download it again") from None


def _open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error}); the file is "
                              "damaged or cut short: download it again") from None


class ShardWriter:
    """Writes named tensors into ``model-0000i-of-0000n.safetensors`` files of at most
    ``max_shard_bytes`` each (a single larger tensor gets a file of its own), then the
    index. Holds at most one shard's tensors in memory."""

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[list[str]] = []  # tensor names per shard file, in order
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        number = len(self._written) + 1
        save_file(self._pending, os.path.join(self.directory, f"shard-{number:05d}.tmp"),
                  metadata={"format": "pt"})
        self._written.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the files ``model-0000i-of-0000n.safetensors`` and write the index
        (a single file is named ``model.safetensors``, without index). Returns the files."""
        if self._pending:
            self._flush()
        count = len(self._written)
        names = ([SINGLE_FILENAME] if count == 1 else
                 [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
        for number, final in enumerate(names, start=1):
            os.replace(os.path.join(self.directory, f"shard-{number:05d}.tmp"),
                       os.path.join(self.directory, final))
        if count > 1:
            weight_map = {tensor: file for file, tensors in zip(names, self._written)
                          for tensor in tensors}
            write_json(os.path.join(self.directory, INDEX_FILENAME),
                       {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map})
        return names


def copy_tokenizer_files(source: str, destination: str) -> list[str]:
    """Copy the tokenizer (and generation config) files that ``source`` has; returns them."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(destination, name))
            copied.append(name)
    return copied


def special_token_ids(tokenizer_dir: str) -> dict:
    """bos/eos/pad token ids of a tokenizer directory (``tokenizer.json`` plus the token
    strings of ``special_tokens_map.json`` / ``tokenizer_config.json``, else a sentencepiece
    ``tokenizer.model``), None when absent."""
    from tokenizers import Tokenizer

    tokenizer_path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        return _sentencepiece_ids(tokenizer_dir)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    strings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        path = os.path.join(tokenizer_dir, name)
        if os.path.isfile(path):
            strings.update(read_json(path))

    def token_id(key: str):
        token = strings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return tokenizer.token_to_id(token) if token else None

    return {key + "_id": token_id(key) for key in ("bos_token", "eos_token", "pad_token")}


def _sentencepiece_ids(tokenizer_dir: str) -> dict:
    path = os.path.join(tokenizer_dir, SENTENCEPIECE_FILENAME)
    if not os.path.isfile(path):
        raise ConversionError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model (pass "
                              "--tokenizer with the model's tokenizer directory)")
    return sentencepiece_special_ids(path)


def _load_sentencepiece(model_path: str):
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as error:
        raise ConversionError(f"{model_path}: not a loadable sentencepiece model: "
                              f"{error}") from None


def sentencepiece_special_ids(model_path: str) -> dict:
    """bos/eos/pad token ids of a sentencepiece ``.model`` file, None when it defines none."""
    model = _load_sentencepiece(model_path)
    ids = {"bos_token_id": model.bos_id(), "eos_token_id": model.eos_id(),
           "pad_token_id": model.pad_id()}
    return {key: (value if value >= 0 else None) for key, value in ids.items()}


def write_sentencepiece_tokenizer(model_path: str, destination: str) -> list[str]:
    """Ship a bare sentencepiece model as a Hugging Face tokenizer; returns the files written.

    Writes ``tokenizer.model`` (a copy of ``model_path``), ``special_tokens_map.json`` and a
    ``tokenizer_config.json`` with which ``transformers.AutoTokenizer`` loads a
    ``LlamaTokenizer`` on the model, with the model's own unk/bos/eos/pad pieces (a special
    token the model does not define is null), BOS added to every sequence when the model
    defines one (as the trainer's data pipeline does) and no EOS.
    """
    model = _load_sentencepiece(model_path)

    def piece(token_id: int):
        return model.id_to_piece(token_id) if token_id >= 0 else None

    special = {"bos_token": piece(model.bos_id()), "eos_token": piece(model.eos_id()),
               "unk_token": piece(model.unk_id()), "pad_token": piece(model.pad_id())}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": model.bos_id() >= 0,
        "add_eos_token": False,
        # sentencepiece's add_dummy_prefix: then a text's first piece starts with U+2581.
        "add_prefix_space": model.encode("a", out_type=str)[0].startswith("\u2581"),
        # legacy=False: the prefix space goes before the text only, not after each special
        # or user-defined piece (such as the bundled models' "\n"), as sentencepiece does.
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    shutil.copyfile(model_path, os.path.join(destination, SENTENCEPIECE_FILENAME))
    write_json(os.path.join(destination, "tokenizer_config.json"), config)
    write_json(os.path.join(destination, "special_tokens_map.json"),
               {key: value for key, value in special.items() if value is not None})
    return [SENTENCEPIECE_FILENAME, "tokenizer_config.json", "special_tokens_map.json"]
