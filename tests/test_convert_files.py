"""Damaged Hugging Face model files give a message naming the file, not a raw traceback."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_irl.convert import ConversionError
from megatron_irl.convert.hf_files import SafetensorsReader


def _single_file_model(directory) -> str:
    save_file({"w": torch.arange(64.0).reshape(8, 8)}, str(directory / "model.safetensors"))
    return str(directory / "model.safetensors")


def test_truncated_safetensors_file_is_named(tmp_path):
    path = _single_file_model(tmp_path)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(ConversionError, match=f"{path}: .*damaged or cut short"):
        SafetensorsReader(str(tmp_path)).get("w")


def test_shard_missing_from_the_directory_names_the_index_and_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="model.safetensors.index.json: names "
                                              "model-00002-of-00002.safetensors, which is not in"):
        SafetensorsReader(str(tmp_path))
