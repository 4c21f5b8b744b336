"""Preprocessed documents in Megatron-Core's memory-mapped indexed format.

`preprocess_jsonl` tokenizes a JSONL file once and writes, for an output prefix P:
- P.bin / P.idx: a `megatron.core.datasets.indexed_dataset` dataset in which every document
  is one Megatron "document" whose sequences are its alternating context/response segments
  (so the per-document segment lengths, hence the loss mask, live in the index);
- P.lines.npy: int64 [num_documents], the source line of each document (for file:line reports);
- P.meta.json: format tag, source file, the tokenizer's ids and chat template digest, and the
  read-time data report.
  It is written last: its presence marks a complete preprocessing run.
`IndexedDocuments` reads them back with the same interface as `InMemoryDocuments`.
"""

import json
import os

import numpy as np

from megatron_irl.data.chat_template import describe_rendering
from megatron_irl.data.documents import tokenize_record
from megatron_irl.data.records import read_records
from megatron_irl.data.report import DataError, DataReport
from megatron_irl.data.tokenizer import Tokenizer, describe_tokenizer

FORMAT = "megatron-irl-sft-v1"


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def lines_path(prefix: str) -> str:
    return prefix + ".lines.npy"


def is_preprocessed(prefix: str) -> bool:
    return all(os.path.isfile(p) for p in (meta_path(prefix), prefix + ".bin", prefix + ".idx"))


def preprocess_jsonl(
    input_path: str, tokenizer: Tokenizer, output_prefix: str, strict: bool = False
) -> DataReport:
    """Tokenize `input_path` into the files above; returns the read-time report.

    Raises DataError on malformed records (and, with `strict`, on any data problem).
    """
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    report = DataReport(source=input_path, strict=strict,
                        chat_rendering=describe_rendering(tokenizer))
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    if os.path.exists(meta_path(output_prefix)):
        os.remove(meta_path(output_prefix))  # an interrupted rewrite must not look complete
    builder = IndexedDatasetBuilder(
        get_bin_path(output_prefix), dtype=DType.optimal_dtype(tokenizer.vocab_size)
    )
    lines = []
    try:
        for record in read_records(input_path, report):
            ids, lengths = tokenize_record(record, tokenizer, input_path)
            builder.add_document(ids, lengths)
            lines.append(record.line)
    finally:
        builder.data_file.close()
    builder.finalize(get_idx_path(output_prefix))
    np.save(lines_path(output_prefix), np.asarray(lines, dtype=np.int64))
    report.num_documents = len(lines)
    meta = {
        "format": FORMAT,
        "source": input_path,
        "tokenizer": describe_tokenizer(tokenizer),
        "num_records": report.num_records,
        "num_documents": report.num_documents,
        "problem_counts": report.problem_counts,
        "problem_examples": report.problem_examples,
    }
    with open(meta_path(output_prefix), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return report


class IndexedDocuments:
    """Documents of a preprocessed prefix, memory-mapped (nothing is loaded up front)."""

    def __init__(self, prefix: str, tokenizer: Tokenizer, strict: bool = False):
        if not is_preprocessed(prefix):
            raise DataError(
                f"data path {prefix}: neither a .jsonl file nor a complete preprocessed prefix "
                f"(expected {prefix}.bin, {prefix}.idx and {meta_path(prefix)})"
            )
        with open(meta_path(prefix), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise DataError(
                f"{meta_path(prefix)}: format {meta.get('format')!r}, expected {FORMAT!r}"
            )
        expected = describe_tokenizer(tokenizer)
        if meta["tokenizer"] != expected:
            raise DataError(
                f"{prefix}: preprocessed with a different tokenizer ({meta['tokenizer']}) than the "
                f"one given ({expected}); rerun megatron-irl preprocess with this tokenizer"
            )
        self.source = meta["source"]
        self.report = DataReport(source=self.source, strict=strict,
                                 chat_rendering=describe_rendering(tokenizer))
        self.report.num_records = meta["num_records"]
        self.report.num_documents = meta["num_documents"]
        self.report.merge_problems(meta["problem_counts"], meta["problem_examples"])
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self._data = IndexedDataset(prefix, mmap=True)
        self._doc_starts = np.asarray(self._data.document_indices, dtype=np.int64)  # [D + 1]
        self.lines = np.load(lines_path(prefix), mmap_mode="r")
        if len(self.lines) != len(self):
            raise DataError(
                f"{lines_path(prefix)}: {len(self.lines)} lines for {len(self)} documents"
            )

    def __len__(self) -> int:
        return len(self._doc_starts) - 1

    def segment_lengths(self, index: int) -> np.ndarray:
        start, stop = self._doc_starts[index], self._doc_starts[index + 1]
        return self._data.sequence_lengths[start:stop].astype(np.int64)

    def tokens(self, index: int) -> np.ndarray:
        start, stop = self._doc_starts[index], self._doc_starts[index + 1]
        return np.concatenate(self._data[int(start) : int(stop)]).astype(np.int64)

    def where(self, index: int) -> str:
        return f"{self.source}:{self.lines[index]}"
