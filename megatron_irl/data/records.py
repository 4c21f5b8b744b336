"""Reading and validating SFT JSONL records; rendering chat records to text segments.

Each non-blank line of the input is one JSON object, either
  {"prompt": str, "response": str}
or
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}.
Other keys are ignored. A record becomes alternating *segments* (text, is_response),
starting with a context segment; tokenization later prepends BOS to the first segment and
appends EOS to the last (response) segment.

Chat template (plain text, fixed). Each message is one line "<Header> <content>\\n" with
headers "System:", "User:", "Assistant:". The "Assistant:" header belongs to the context;
the assistant's " <content>\\n" (leading space included) is a response segment, so the
model also learns to end a turn. The document ends after the last assistant turn: that turn
has no trailing newline (EOS follows) and later messages are ignored (counted). Example:

    System: Be brief.\\nUser: 2+2?\\nAssistant:   <- context
     4\\n                                          <- response (trained)
    User: and 3+3?\\nAssistant:                   <- context
     6                                            <- response (trained), then EOS
"""

import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megatron_irl.data.report import DataError, DataReport

CHAT_HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}

Segment = tuple[str, bool]  # (text, is_response)


@dataclass(frozen=True)
class Record:
    """One usable input record: its 1-based line number, its alternating segments and the
    parsed JSON object (evaluation reads fields such as "answer" or "score" from it)."""

    line: int
    segments: tuple[Segment, ...]
    fields: dict = field(default_factory=dict, compare=False, repr=False)


def render_chat(messages: list[dict]) -> list[Segment]:
    """Alternating (context, response) segments of a validated chat; [] without assistant turn.

    Messages after the last assistant turn are not rendered.
    """
    last_assistant = max(
        (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None
    )
    if last_assistant is None:
        return []
    segments: list[Segment] = []
    context = ""
    for i, message in enumerate(messages[: last_assistant + 1]):
        header = CHAT_HEADERS[message["role"]]
        if message["role"] != "assistant":
            context += f"{header} {message['content']}\n"
            continue
        segments.append((context + header, False))
        ending = "" if i == last_assistant else "\n"
        segments.append((f" {message['content']}{ending}", True))
        context = ""
    return segments


def _check_chat(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: messages[{k}] must be an object, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: messages[{k}] is missing its '{key}' field")
        if message["role"] not in CHAT_HEADERS:
            raise DataError(
                f"{where}: messages[{k}] has role {message['role']!r}; "
                f"expected one of {sorted(CHAT_HEADERS)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: messages[{k}].content must be a string, "
                f"got {type(message['content']).__name__}"
            )


def record_segments(obj, where: str, report: DataReport) -> Optional[list[Segment]]:
    """Validate one parsed record; its segments, or None when it is dropped (and counted).

    Raises DataError on a malformed record; records problems in `report` (mutated).
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise DataError(f"{where}: record has both 'messages' and 'prompt'/'response'")
        messages = obj["messages"]
        _check_chat(messages, where)
        segments = render_chat(messages)
        if not segments:
            report.add_problem("no_assistant_turn", where)
            return None
        if messages[-1]["role"] != "assistant":
            report.add_problem("trailing_messages", where)
        responses = [m["content"] for m in messages if m["role"] == "assistant"]
    else:
        if "prompt" not in obj and "response" not in obj:
            raise DataError(
                f"{where}: record needs 'prompt' and 'response' strings or a 'messages' list"
            )
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(f"{where}: record is missing its '{key}' field")
            if not isinstance(obj[key], str):
                raise DataError(
                    f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}"
                )
        segments = [(obj["prompt"], False), (obj["response"], True)]
        responses = [obj["response"]]
    if not "".join(responses).strip():
        report.add_problem("empty_response", where)
    return segments


def read_records(path: str, report: DataReport) -> Iterator[Record]:
    """Yield the usable records of a JSONL file in file order; blank lines are skipped.

    Raises DataError naming `path:line` for unreadable lines or malformed records, and when
    the file holds no record at all. Mutates `report` (record count, problems).
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"data file {path}: cannot open: {e.strerror}") from e
    with f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from e
            if not text.strip():
                continue
            line = text.rstrip("\r\n")  # so that errors count columns on this line
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                cut = " (the end of the line: the record is cut short)" \
                    if e.pos >= len(line) else ""
                raise DataError(f"{where}: malformed JSON at column {e.colno}{cut}: {e.msg}") \
                    from e
            segments = record_segments(obj, where, report)
            report.num_records += 1
            if segments is not None:
                yield Record(line_number, tuple(segments), obj)
    if report.num_records == 0:
        raise DataError(f"data file {path}: contains no records")
