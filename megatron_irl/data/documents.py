"""Tokenized documents: token ids plus the lengths of their alternating segments.

A document is [bos?] + context_0 + response_0 + context_1 + response_1 + ... + EOS, where
the EOS closes the last response segment. `segment_lengths` (always an even count, context
first; a context may be empty) says which tokens are response tokens. Two stores share one
read interface, used by packing:
  len(store), store.segment_lengths(i) -> int64 [k], store.tokens(i) -> int64 [n],
  store.where(i) -> "file:line", store.source, store.report.
`InMemoryDocuments` tokenizes a JSONL file; `indexed.IndexedDocuments` reads preprocessed ones.
Chat records of a tokenizer with a chat template are the template's text instead (the
template writes BOS and the end-of-turn tokens; see `megatron_irl.data.chat_template`).
"""

import numpy as np

from megatron_irl.data.chat_template import describe_rendering, tokenize_chat
from megatron_irl.data.records import Record, Segment, read_records
from megatron_irl.data.report import DataReport
from megatron_irl.data.tokenizer import Tokenizer


def tokenize_segments(segments: tuple[Segment, ...], tokenizer: Tokenizer) -> tuple[list, list]:
    """(token ids, segment lengths) of one record: BOS (if any) first, EOS after the last.

    A text that starts with the BOS token already (an eval sample's prompt rendered with a
    chat template that writes it) does not get a second one."""
    ids, lengths = [], []
    for k, (text, _is_response) in enumerate(segments):
        piece = tokenizer.encode(text)
        if k == 0 and tokenizer.bos_id is not None and piece[:1] != [tokenizer.bos_id]:
            piece = [tokenizer.bos_id] + piece
        if k == len(segments) - 1:
            piece = piece + [tokenizer.eos_id]
        ids.extend(piece)
        lengths.append(len(piece))
    return ids, lengths


def tokenize_record(record: Record, tokenizer: Tokenizer, source: str) -> tuple[list, list]:
    """(token ids, segment lengths) of a record of the file ``source``: a chat record with
    the tokenizer's chat template when it has one, else its segments."""
    if tokenizer.chat_template is not None and "messages" in record.fields:
        return tokenize_chat(tokenizer.chat_template, record.fields["messages"], tokenizer,
                             f"{source}:{record.line}")
    return tokenize_segments(record.segments, tokenizer)


def response_mask(segment_lengths) -> np.ndarray:
    """bool [n]: True at response tokens (the odd-numbered segments, EOS included)."""
    is_response = np.arange(len(segment_lengths)) % 2 == 1
    return np.repeat(is_response, segment_lengths)


def trained_positions_in_window(segment_lengths, window: int) -> int:
    """How many of positions 0..window-1 predict a response token.

    Position i predicts token i+1, so this counts response tokens at indices 1..window.
    """
    count, start = 0, 0
    for k, length in enumerate(segment_lengths):
        end = start + int(length)
        if k % 2 == 1:
            count += max(0, min(end, window + 1) - max(start, 1))
        start = end
    return count


def prompt_tokens_of(tokens: np.ndarray, segment_lengths) -> np.ndarray:
    """The tokens before the last response segment: the prompt for generating that response."""
    return tokens[: int(np.sum(segment_lengths[:-1]))]


class InMemoryDocuments:
    """All documents of one JSONL file, tokenized into memory.

    `report` (a DataReport) holds the record count and read-time problems.
    """

    def __init__(self, path: str, tokenizer: Tokenizer, strict: bool = False):
        self.source = path
        self.report = DataReport(source=path, strict=strict,
                                 chat_rendering=describe_rendering(tokenizer))
        self._tokens, self._lengths, lines = [], [], []
        for record in read_records(path, self.report):
            ids, lengths = tokenize_record(record, tokenizer, path)
            self._tokens.append(np.asarray(ids, dtype=np.int64))
            self._lengths.append(np.asarray(lengths, dtype=np.int64))
            lines.append(record.line)
        self.lines = np.asarray(lines, dtype=np.int64)
        self.report.num_documents = len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def segment_lengths(self, index: int) -> np.ndarray:
        return self._lengths[index]

    def tokens(self, index: int) -> np.ndarray:
        return self._tokens[index]

    def where(self, index: int) -> str:
        return f"{self.source}:{self.lines[index]}"
