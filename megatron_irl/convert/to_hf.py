"""megatron-irl checkpoint (any TP / PP it was saved at) -> Hugging Face model directory.

Runs in one process, builds no model and needs no process group: the checkpoint's tensor
index (PyTorch Distributed Checkpoint metadata of the torch_dist format) gives every
tensor's global shape and where its saved pieces are, and :class:`CheckpointReader`
reads any slice of a tensor from the pieces that overlap it, however the saving run was
sharded. Tensors are read one layer at a time, so memory holds one layer (plus the
embeddings and at most one output shard).

What is unpickled: ``training_state.json`` is JSON; the ``.metadata`` tensor index is read
with plain ``pickle`` by PyTorch Distributed Checkpoint, and tensor pieces with
``torch.load(weights_only=True)``. torch_dist's ``common.pt`` and the model's
``_extra_state`` objects are not read. Convert only checkpoints you trust.
"""

from __future__ import annotations

import os

import torch

from megatron_irl.convert import families
from megatron_irl.convert.families import ConversionError
from megatron_irl.convert.from_hf import HF_CONFIG_COPY
from megatron_irl.convert.hf_files import (
    ShardWriter,
    copy_tokenizer_files,
    read_json,
    sentencepiece_special_ids,
    special_token_ids,
    write_json,
    write_sentencepiece_tokenizer,
)
from megatron_irl.convert.mapping import Dims, Rule, active_rules
from megatron_irl.core.checkpoint_files import choose_iteration, iteration_dir

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _slice_planner(offsets: dict[str, tuple[int, ...]]):
    """A DCP load planner that reads, for each key, the slice of the saved tensor that
    starts at ``offsets[key]`` and has the shape of the destination tensor."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SliceLoadPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, destination in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[key]),
                                             sizes=destination.size())
                items += create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):  # destinations are plain tensors, not shards
            return self.state_dict[index.fqn]

    return SliceLoadPlanner()


class CheckpointReader:
    """Global tensors (or one layer of a stacked tensor) of a torch_dist checkpoint."""

    def __init__(self, directory: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.directory = directory
        self._storage = FileSystemReader(directory)
        self._metadata = self._storage.read_metadata().state_dict_metadata

    def __contains__(self, key: str) -> bool:
        return key in self._metadata

    def dtype(self, key: str) -> torch.dtype:
        return self._metadata[key].properties.dtype

    def read(self, keys: list[str], layer: int | None = None) -> dict[str, torch.Tensor]:
        """{key: global tensor}; with ``layer``, each key's [layer] slice of its stacked
        [num_layers, ...] tensor. Local; no collectives."""
        from torch.distributed.checkpoint import load

        destinations, offsets = {}, {}
        for key in keys:
            shape = self._metadata[key].size
            stacked = layer is not None
            destinations[key] = torch.empty((1, *shape[1:]) if stacked else shape,
                                            dtype=self.dtype(key))
            offsets[key] = (layer,) + (0,) * (len(shape) - 1) if stacked else (0,) * len(shape)
        load(destinations, storage_reader=self._storage, planner=_slice_planner(offsets),
             no_dist=True)
        return {key: tensor[0] if layer is not None else tensor
                for key, tensor in destinations.items()}


def convert_to_hf(load_dir: str, output_dir: str, *, ckpt_step: int | None = None,
                  tokenizer: str | None = None, family: str | None = None,
                  vocab_size: int | None = None, dtype: str | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``output_dir`` with config.json, generation_config.json, the tokenizer files and
    safetensors shards of the latest complete checkpoint in ``load_dir`` (or of iteration
    ``ckpt_step``), once its files pass the manifest check; returns the weight files.

    Args:
        tokenizer: a Hugging Face tokenizer directory or a sentencepiece ``.model`` file;
            unset: the checkpoint's ``--tokenizer-model``. A directory's tokenizer files are
            copied; a ``.model`` file is shipped with the Hugging Face files that load it
            (see :func:`write_sentencepiece_tokenizer`), unless its directory has a
            tokenizer_config.json (a model imported from Hugging Face), whose files are
            copied instead.
        family: llama, mistral, qwen2 or qwen3; unset: the family of the config.json the
            checkpoint was imported from (hf_config.json next to the tokenizer), else
            qwen3 with query/key norms, qwen2 with q/k/v biases, llama otherwise.
        vocab_size: rows kept of the padded vocabulary; unset: the checkpoint's real
            vocabulary (``--vocab-size`` as training resolved it); for a checkpoint that
            does not record it, ``vocab_size`` of the tokenizer directory's hf_config.json
            (written by the import), else the tokenizer's vocabulary size (a sentencepiece
            model's piece count).
        dtype: float32 or bfloat16; unset: the embedding's stored dtype (a bf16
            checkpoint keeps its norm weights in fp32; they are cast with the rest).

    Local to this process; needs no process group.
    """
    checkpoint = iteration_dir(load_dir, choose_iteration(load_dir, ckpt_step))
    state = read_json(os.path.join(checkpoint, "training_state.json"))
    model = state["config"]["model"]
    padded_vocab = state["model_architecture"]["padded_vocab_size"]
    tokenizer = tokenizer or state["config"]["data"].get("tokenizer_model")
    tokenizer_dir, sentencepiece_model = _tokenizer_source(tokenizer)
    source_config = _source_config(tokenizer_dir)
    chosen_family = families.family_of_model(model, family, source_config)
    vocab_size = (vocab_size or state["model_architecture"].get("vocab_size")
                  or _source_vocab_size(tokenizer_dir, sentencepiece_model))
    if vocab_size > padded_vocab:
        raise ConversionError(f"--vocab-size {vocab_size} exceeds the checkpoint's "
                              f"{padded_vocab} embedding rows")
    os.makedirs(output_dir, exist_ok=True)

    reader = CheckpointReader(checkpoint)
    rules = active_rules(model)
    for rule in rules:
        if rule.megatron not in reader:
            raise ConversionError(f"{checkpoint}: no tensor {rule.megatron!r} (the checkpoint "
                                  "does not hold the model its config describes)")
    out_dtype = getattr(torch, dtype) if dtype else reader.dtype(rules[0].megatron)
    dims = Dims(model["num_attention_heads"], model["num_query_groups"] or
                model["num_attention_heads"], model["kv_channels"], vocab_size, padded_vocab)

    writer = ShardWriter(output_dir, max_shard_bytes)

    def emit(selected: list[Rule], layer: int | None) -> None:
        tensors = reader.read([rule.megatron for rule in selected], layer)
        for rule in selected:
            for name, tensor in zip(rule.hf_names(layer),
                                    rule.transform.to_hf(tensors[rule.megatron], dims)):
                writer.add(name, tensor.to(out_dtype))

    global_rules = [rule for rule in rules if not rule.per_layer]
    emit([rule for rule in global_rules if rule.megatron.startswith("embedding.")], None)
    for layer in range(model["num_layers"]):
        emit([rule for rule in rules if rule.per_layer], layer)
    emit([rule for rule in global_rules if not rule.megatron.startswith("embedding.")], None)
    files = writer.close()

    special_ids = (sentencepiece_special_ids(sentencepiece_model) if sentencepiece_model
                   else special_token_ids(tokenizer_dir))
    if source_config is not None:  # e.g. Llama 3.1 Instruct's several end-of-turn ids
        special_ids = {key: source_config.get(key, value) for key, value in special_ids.items()}
    dtype_name = str(out_dtype).removeprefix("torch.")
    write_json(os.path.join(output_dir, "config.json"),
               families.hf_config(model, chosen_family, vocab_size, dtype_name, special_ids))
    if sentencepiece_model:
        write_sentencepiece_tokenizer(sentencepiece_model, output_dir)
    else:
        copy_tokenizer_files(tokenizer_dir, output_dir)
    if not os.path.isfile(os.path.join(output_dir, "generation_config.json")):
        write_json(os.path.join(output_dir, "generation_config.json"),
                   {key: value for key, value in special_ids.items() if value is not None})
    return files


def _tokenizer_source(tokenizer: str | None) -> tuple[str, str | None]:
    """(directory, bare sentencepiece model or None) of ``--tokenizer`` / the checkpoint's
    ``--tokenizer-model``: a directory -> (it, None); a file -> (its directory, None), except
    a ``.model`` file whose directory has no Hugging Face tokenizer files to ship instead
    (tokenizer_config.json, as an import copies it) -> (its directory, the file)."""
    if tokenizer and os.path.isdir(tokenizer):
        return tokenizer, None
    if tokenizer and os.path.isfile(tokenizer):
        directory = os.path.dirname(tokenizer) or "."
        bare = (tokenizer.endswith(".model")
                and not os.path.isfile(os.path.join(directory, "tokenizer_config.json")))
        return directory, tokenizer if bare else None
    if not tokenizer:
        raise ConversionError("the checkpoint names no tokenizer; pass --tokenizer")
    raise ConversionError(f"the tokenizer {tokenizer} does not exist (a relative path is taken "
                          "from the current directory); pass --tokenizer with the tokenizer "
                          "directory or sentencepiece .model file")


def _source_config(tokenizer_dir: str) -> dict | None:
    """The config.json the checkpoint was imported from (the import's hf_config.json next
    to the tokenizer), None for a model that was not imported."""
    copy = os.path.join(tokenizer_dir, HF_CONFIG_COPY)
    return read_json(copy) if os.path.isfile(copy) else None


def _source_vocab_size(tokenizer_dir: str, sentencepiece_model: str | None) -> int:
    """The imported model's vocab_size (hf_config.json), else the tokenizer's size."""
    copy = os.path.join(tokenizer_dir, HF_CONFIG_COPY)
    if os.path.isfile(copy):
        return read_json(copy)["vocab_size"]
    from megatron_irl.data.tokenizer import load_tokenizer

    return load_tokenizer(sentencepiece_model or tokenizer_dir).vocab_size

