"""Packing tokenized documents into rows of exactly `seq_length` positions.

A document of n tokens x[0..n-1] contributes n-1 positions: inputs x[0..n-2], labels
x[1..n-1]. Positions of different documents never mix, so no position predicts across a
document boundary. Rules, in document order (next-fit):
- a document that does not fit in the current row starts a new row (documents are never
  split across rows);
- a document with more than seq_length positions is truncated to seq_length (it fills a row
  of its own); its last position is then not terminal: the loss treats a row's non-terminal
  last position as truncated (no TD term there);
- a document none of whose first seq_length positions predicts a response token is dropped;
- the rest of a row is padding: pad tokens, loss_mask 0, terminal False, document_id -1.
Per position: loss_mask = 1 iff the label is a response token (so the position that predicts
the first response token counts); terminal = True only where the label is the document's
final EOS; position_ids restart at 0 for each document; document_ids is the document's index
in its store (the same id over one document's positions); next_position is the row position
of the state the TD term at that position bootstraps from: the next position, except at the
last token of a non-final response (a chat's assistant turn), where it is the position that
predicts the next response's first token (the user's turn in between is the environment's
move, docs/method.md section 1), or seq_length when that position is cut off by truncation.
"""

from dataclasses import dataclass

import numpy as np
import torch

from megatron_irl.data.documents import response_mask, trained_positions_in_window
from megatron_irl.data.report import DataReport

ROW_FIELDS = ("tokens", "labels", "loss_mask", "terminal", "position_ids", "document_ids",
              "next_position")


@dataclass(frozen=True)
class PackPlan:
    """Which documents fill which row: row r holds entries row_offsets[r]:row_offsets[r+1]."""

    seq_length: int
    row_offsets: np.ndarray  # int64 [num_rows + 1]
    doc_indices: np.ndarray  # int64 [num_entries]: document index in the store
    doc_positions: np.ndarray  # int64 [num_entries]: positions the document fills (<= seq_length)

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1


def plan_rows(documents, seq_length: int, report: DataReport) -> PackPlan:
    """Place every usable document; truncations and drops are counted in `report` (mutated).

    Reads only segment lengths, never tokens.
    """
    row_offsets, doc_indices, doc_positions = [0], [], []
    fill, trained_total = 0, 0
    for index in range(len(documents)):
        lengths = documents.segment_lengths(index)
        positions = int(lengths.sum()) - 1
        window = min(positions, seq_length)
        trained = trained_positions_in_window(lengths, window)
        if trained == 0:
            report.add_problem("no_response_in_window", documents.where(index))
            continue
        if positions > seq_length:
            report.add_problem("truncated", documents.where(index))
        if fill + window > seq_length:
            row_offsets.append(len(doc_indices))
            fill = 0
        doc_indices.append(index)
        doc_positions.append(window)
        fill += window
        trained_total += trained
    if doc_indices:
        row_offsets.append(len(doc_indices))
    report.seq_length = seq_length
    report.num_rows = len(row_offsets) - 1
    report.num_packed_documents = len(doc_indices)
    report.num_trained_positions = trained_total
    return PackPlan(
        seq_length=seq_length,
        row_offsets=np.asarray(row_offsets, dtype=np.int64),
        doc_indices=np.asarray(doc_indices, dtype=np.int64),
        doc_positions=np.asarray(doc_positions, dtype=np.int64),
    )


def padding_row(seq_length: int, pad_id: int) -> dict:
    """A row of padding only: numpy arrays [seq_length] per ROW_FIELDS entry."""
    return {
        "tokens": np.full(seq_length, pad_id, dtype=np.int64),
        "labels": np.full(seq_length, pad_id, dtype=np.int64),
        "loss_mask": np.zeros(seq_length, dtype=np.float32),
        "terminal": np.zeros(seq_length, dtype=bool),
        "position_ids": np.zeros(seq_length, dtype=np.int64),
        "document_ids": np.full(seq_length, -1, dtype=np.int64),
        "next_position": np.arange(1, seq_length + 1, dtype=np.int64),
    }


def document_next_positions(segment_lengths, positions: int) -> np.ndarray:
    """int64 [positions]: the next-state position of each of a document's first ``positions``
    positions, relative to its first one (``positions`` or more: not in the window).

    ``t + 1``, except at the position predicting a non-final response's last token, which
    bootstraps from the position predicting the next response's first token.
    """
    next_positions = np.arange(1, positions + 1, dtype=np.int64)
    ends = np.cumsum(segment_lengths)  # segment k ends before token ends[k]
    for k in range(1, len(segment_lengths) - 2, 2):  # the non-final responses
        last_token, next_first = int(ends[k]) - 1, int(ends[k + 1])
        if segment_lengths[k] == 0 or last_token - 1 >= positions:
            continue
        # Position i predicts token i + 1.
        next_positions[last_token - 1] = min(next_first - 1, positions)
    return next_positions


def build_row(documents, plan: PackPlan, row: int, pad_id: int) -> dict:
    """Row `row` of the plan as numpy arrays [seq_length] (see ROW_FIELDS for dtypes)."""
    out = padding_row(plan.seq_length, pad_id)
    offset = 0
    for entry in range(plan.row_offsets[row], plan.row_offsets[row + 1]):
        index, positions = int(plan.doc_indices[entry]), int(plan.doc_positions[entry])
        tokens = documents.tokens(index)  # [n]
        is_response = response_mask(documents.segment_lengths(index))  # [n]
        end = offset + positions
        out["tokens"][offset:end] = tokens[:positions]
        out["labels"][offset:end] = tokens[1 : positions + 1]
        out["loss_mask"][offset:end] = is_response[1 : positions + 1]
        # Only a complete document's last label is its final EOS; a truncated one has none.
        out["terminal"][end - 1] = positions == len(tokens) - 1
        out["position_ids"][offset:end] = np.arange(positions)
        out["document_ids"][offset:end] = index
        next_positions = document_next_positions(documents.segment_lengths(index), positions)
        # Past the document's window is past the row: only a truncated document (alone in
        # its row) has one.
        out["next_position"][offset:end] = np.where(next_positions < positions,
                                                    offset + next_positions, plan.seq_length)
        offset = end
    return out


def block_causal_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """bool [b, 1, s, s] from document_ids int64 [b, s]; True = masked out (Megatron convention).

    Query i may attend key j iff j <= i and both belong to the same document. A padding
    position (id -1) attends only itself: its output is never trained, and a fully masked
    row would turn into NaN in softmax implementations that do not clamp.
    """
    seq_length = document_ids.shape[-1]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [b, s_q, s_k]
    real_key = (document_ids >= 0)[:, None, :]  # [b, 1, s_k]
    diagonal = torch.eye(seq_length, dtype=torch.bool, device=document_ids.device)
    allowed = (same_doc & causal & real_key) | diagonal
    return (~allowed).unsqueeze(1)
