"""Packed SFT rows and the deterministic, resumable order in which training reads them.

Micro-batches are dicts of torch tensors, all [b, s] with b = micro_batch_size,
s = seq_length:
  tokens int64, labels int64, loss_mask float32, terminal bool, position_ids int64,
  document_ids int64 (-1 = padding; see packing.block_causal_attention_mask), next_position
  int64 (the state the TD term bootstraps from; see packing).

Training order: the rows are shuffled once per epoch with numpy's default_rng(seed + epoch),
and the epochs are concatenated into one endless stream. Global batch k is stream entries
[k * G, (k + 1) * G) with G = micro_batch_size * num_microbatches * data_parallel_size (a
global batch may span two epochs). Data-parallel rank r takes the contiguous share
[r * b * m, (r + 1) * b * m) of it, as m micro-batches of b rows. Everything is a function
of the iteration number, so resuming at iteration k needs no other state.
"""

import math
import os

import numpy as np
import torch

from megatron_irl.data.documents import InMemoryDocuments, prompt_tokens_of
from megatron_irl.data.indexed import IndexedDocuments
from megatron_irl.data.packing import ROW_FIELDS, build_row, padding_row, plan_rows
from megatron_irl.data.report import DataError
from megatron_irl.data.tokenizer import Tokenizer

PREPROCESSED_SUFFIXES = (".bin", ".idx", ".meta.json")


def open_documents(path: str, tokenizer: Tokenizer, strict: bool = False):
    """A JSONL file (tokenized into memory) or a preprocessed prefix (memory-mapped).

    A path naming one of the preprocessed files (P.bin, P.idx, P.meta.json) means prefix P.
    """
    for suffix in PREPROCESSED_SUFFIXES:
        if path.endswith(suffix):
            return IndexedDocuments(path[: -len(suffix)], tokenizer, strict)
    if os.path.isfile(path) or path.endswith(".jsonl"):
        return InMemoryDocuments(path, tokenizer, strict)
    return IndexedDocuments(path, tokenizer, strict)


def collate(rows: list[dict]) -> dict:
    """Stack numpy rows ([s] each) into torch tensors [len(rows), s]."""
    return {name: torch.from_numpy(np.stack([row[name] for row in rows])) for name in ROW_FIELDS}


def _check_batch_layout(micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int):
    if micro_batch_size < 1:
        raise ValueError(
            f"micro_batch_size must be >= 1, got {micro_batch_size} (set --micro-batch-size)"
        )
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(
            f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})"
        )


class SFTDataset:
    """The packed rows of one data file.

    Attributes: `documents` (the document store), `report` (DataReport: log
    `report.format()` at start), `plan` (PackPlan), `seq_length`, `pad_id`.
    Raises DataError for bad data (file:line) and when no row can be built.
    """

    def __init__(self, path: str, tokenizer: Tokenizer, seq_length: int, strict: bool = False):
        if seq_length < 1:
            raise DataError(f"seq_length must be >= 1, got {seq_length} (set --seq-length)")
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad_id
        self.documents = open_documents(path, tokenizer, strict)
        self.report = self.documents.report
        self.plan = plan_rows(self.documents, seq_length, self.report)
        if self.plan.num_rows == 0:
            raise DataError(f"data {path}: no usable document\n{self.report.format()}")

    def __len__(self) -> int:
        return self.plan.num_rows

    def row(self, index: int) -> dict:
        """Row `index` as numpy arrays [seq_length]."""
        return build_row(self.documents, self.plan, index, self.pad_id)

    def micro_batch(self, row_indices) -> dict:
        """Rows `row_indices` as a micro-batch dict of torch tensors [len(row_indices), s]."""
        return collate([self.row(int(i)) for i in row_indices])

    def prompt_tokens(self, document_index: int) -> np.ndarray:
        """int64 [p]: a document's tokens before its last response (BOS included)."""
        tokens = self.documents.tokens(document_index)
        return prompt_tokens_of(tokens, self.documents.segment_lengths(document_index))


class TrainingBatches:
    """This data-parallel rank's micro-batches for any training iteration (0-based).

    Ranks of one data-parallel replica (tensor/pipeline/context parallel peers) pass the
    same `data_parallel_rank` and get the same data.
    """

    def __init__(
        self,
        dataset: SFTDataset,
        micro_batch_size: int,
        num_microbatches: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        seed: int = 1234,
    ):
        _check_batch_layout(micro_batch_size, data_parallel_rank, data_parallel_size)
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed} (set --data-seed)")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self._permutations: dict = {}  # epoch -> row permutation; the last two are kept

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.data_parallel_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            rng = np.random.default_rng(self.seed + epoch)
            self._permutations[epoch] = rng.permutation(len(self.dataset))
        return self._permutations[epoch]

    def rows_for_iteration(self, iteration: int) -> np.ndarray:
        """int64 [num_microbatches, micro_batch_size]: this rank's row indices at `iteration`."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        share = self.micro_batch_size * self.num_microbatches
        first = iteration * self.global_batch_size + self.data_parallel_rank * share
        stream = np.arange(first, first + share, dtype=np.int64)  # positions in the endless stream
        epochs, offsets = np.divmod(stream, len(self.dataset))
        rows = np.empty_like(stream)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            rows[here] = self._permutation(int(epoch))[offsets[here]]
        return rows.reshape(self.num_microbatches, self.micro_batch_size)

    def batches_for_iteration(self, iteration: int) -> list[dict]:
        """This rank's `num_microbatches` micro-batches (dicts of tensors [b, s]) at `iteration`."""
        return [self.dataset.micro_batch(rows) for rows in self.rows_for_iteration(iteration)]


class EvalBatches:
    """Every row of `dataset` exactly once over all data-parallel ranks, in row order.

    Eval batch k holds rows [k * b * dp, (k + 1) * b * dp); rank r takes micro-batch
    [r * b, (r + 1) * b) of it. Past the last row, padding rows (loss_mask 0) fill in, so
    every rank yields `len(self)` micro-batches and collectives stay matched.
    """

    def __init__(
        self,
        dataset: SFTDataset,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
    ):
        _check_batch_layout(micro_batch_size, data_parallel_rank, data_parallel_size)
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / (self.micro_batch_size * self.data_parallel_size))

    def __iter__(self):
        per_batch = self.micro_batch_size * self.data_parallel_size
        for k in range(len(self)):
            first = k * per_batch + self.data_parallel_rank * self.micro_batch_size
            rows = [
                self.dataset.row(i)
                if i < len(self.dataset)
                else padding_row(self.dataset.seq_length, self.dataset.pad_id)
                for i in range(first, first + self.micro_batch_size)
            ]
            yield collate(rows)
