"""Evaluation inputs from the training data format (prompt/response or chat JSONL).

A record's context (everything before its last response) is the prompt; its last response
is the reference. With a tokenizer chat template, a chat record's prompt is the template's
text of the messages before the last assistant turn with ``add_generation_prompt`` (ending
where the model's turn begins), and whole documents are rendered as training renders them.
Records the training pipeline would drop (no assistant turn, empty response) are dropped
here too and counted in the returned ``DataReport``; malformed ones raise ``DataError``
naming ``file:line``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from megatron_irl.data import DataError, DataReport, Tokenizer
from megatron_irl.data.chat_template import chat_prompt, describe_rendering
from megatron_irl.data.documents import tokenize_record, tokenize_segments
from megatron_irl.data.records import Record, read_records
from megatron_irl.evaluation.metrics import extract_answer, normalize_answer


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to sample from, with what its samples are scored against."""

    line: int
    prompt: str  # the context text
    prompt_tokens: list[int]  # BOS + context
    reference: str  # the record's last response
    answer: str | None  # the "answer" field, else the reference's extracted answer


@dataclass(frozen=True)
class ScoredPair:
    """One (prompt, response) document for reward extraction."""

    line: int
    tokens: list[int]  # BOS + context + response + EOS
    segment_lengths: list[int]
    score: float | None  # the record's task score, when it has one


def _records(path: str, limit: int | None, tokenizer: Tokenizer
             ) -> tuple[list[Record], DataReport]:
    report = DataReport(source=path, chat_rendering=describe_rendering(tokenizer))
    return list(itertools.islice(read_records(path, report), limit)), report


def read_eval_prompts(path: str, tokenizer: Tokenizer, limit: int | None = None,
                      answer_pattern: str | None = None) -> tuple[list[EvalPrompt], DataReport]:
    """The first ``limit`` usable records of ``path`` as prompts (all when None)."""
    records, report = _records(path, limit, tokenizer)
    prompts = []
    for record in records:
        context = record.segments[:-1]
        reference = record.segments[-1][0]
        if tokenizer.chat_template is not None and "messages" in record.fields:
            messages = record.fields["messages"]
            prompt, prompt_tokens = chat_prompt(tokenizer.chat_template, messages, tokenizer)
            reference = [m for m in messages if m["role"] == "assistant"][-1]["content"]
        else:
            prompt = "".join(text for text, _ in context)
            prompt_tokens, _ = tokenize_segments(context, tokenizer)
            # tokenize_segments closes its last segment with EOS: a prompt must stay open.
            prompt_tokens = prompt_tokens[:-1]
        answer = record.fields.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(f"{path}:{record.line}: 'answer' must be a string or a number, "
                            f"got {type(answer).__name__}")
        answer = (normalize_answer(str(answer)) if answer is not None
                  else extract_answer(reference, answer_pattern))
        prompts.append(EvalPrompt(record.line, prompt, prompt_tokens, reference, answer))
    return prompts, report


def read_scored_pairs(path: str, tokenizer: Tokenizer, score_field: str,
                      limit: int | None = None) -> tuple[list[ScoredPair], DataReport]:
    """The first ``limit`` usable records of ``path`` as whole documents.

    Scores are all-or-nothing: when any record has ``score_field``, every record must
    have a number there (else DataError naming the line), so that a correlation is never
    computed over a silently smaller set.
    """
    records, report = _records(path, limit, tokenizer)
    scored = [score_field in record.fields for record in records]
    pairs = []
    for record in records:
        score = record.fields.get(score_field)
        if any(scored) and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise DataError(f"{path}:{record.line}: '{score_field}' must be a number (other "
                            f"records have one), got {score!r}")
        tokens, lengths = tokenize_record(record, tokenizer, path)
        pairs.append(ScoredPair(record.line, tokens, lengths,
                                float(score) if score is not None else None))
    return pairs, report
