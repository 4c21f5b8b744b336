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
    tokens: list[int]  # BOS + context + response (+ EOS when finished)
    segment_lengths: list[int]
    score: float | None  # the record's task score, when it has one
    finished: bool = True  # False: the response was cut by the token budget (no EOS)
    prompt: str = ""  # the context text: samples of one prompt share it
    setting: str | None = None  # the decoding setting that drew it (``eval``'s "setting")


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


def response_budget(prompts: list[EvalPrompt], path: str, positions: int,
                    max_new_tokens: int | None) -> int:
    """``max_new_tokens``, or (None) the positions that the longest prompt leaves; raises
    DataError naming ``path:line`` of a prompt that leaves no room for it."""
    wanted = max_new_tokens or 1
    for prompt in prompts:
        if len(prompt.prompt_tokens) + wanted > positions:
            raise DataError(
                f"{path}:{prompt.line}: the prompt has {len(prompt.prompt_tokens)} tokens, which "
                f"with {wanted} new token(s) exceeds the model's {positions} positions; shorten "
                f"it" + (" or lower --max-new-tokens" if max_new_tokens else ""))
    if max_new_tokens is not None:
        return max_new_tokens
    return positions - max((len(prompt.prompt_tokens) for prompt in prompts), default=0)


def read_scored_pairs(path: str, tokenizer: Tokenizer, score_field: str,
                      limit: int | None = None) -> tuple[list[ScoredPair], DataReport]:
    """The first ``limit`` usable records of ``path`` as whole documents.

    Scores are all-or-nothing: when any record has ``score_field``, every record must
    have a number there (else DataError naming the line), so that a correlation is never
    computed over a silently smaller set. A record with ``"finished": false`` (``eval``'s
    samples cut by ``--max-new-tokens``) is tokenized without the closing EOS: it did not end.
    """
    records, report = _records(path, limit, tokenizer)
    scored = [score_field in record.fields for record in records]
    pairs = []
    for record in records:
        score = record.fields.get(score_field)
        if any(scored) and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise DataError(f"{path}:{record.line}: '{score_field}' must be a number (other "
                            f"records have one), got {score!r}")
        finished = record.fields.get("finished", True)
        if not isinstance(finished, bool):
            raise DataError(f"{path}:{record.line}: 'finished' must be true or false, "
                            f"got {finished!r}")
        setting = record.fields.get("setting")
        tokens, lengths = tokenize_record(record, tokenizer, path)
        if not finished:
            tokens, lengths = tokens[:-1], lengths[:-1] + [lengths[-1] - 1]
            if lengths[-1] == 0:
                raise DataError(f"{path}:{record.line}: an unfinished response must have at "
                                "least one token")
        pairs.append(ScoredPair(record.line, tokens, lengths,
                                float(score) if score is not None else None, finished,
                                "".join(text for text, _ in record.segments[:-1]),
                                None if setting is None else str(setting)))
    return pairs, report
