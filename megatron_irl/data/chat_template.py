"""Chat records rendered with a model's own Jinja chat template, as Hugging Face renders it.

The template is the tokenizer's (``chat_template.jinja``, else ``chat_template`` in
``tokenizer_config.json``: a string, or a list of named templates of which "default" is
used) or a file given with ``--chat-template``. It is rendered as ``transformers``'
``apply_chat_template`` does: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension, the ``tojson`` / ``raise_exception`` /
``strftime_now`` helpers, the tokenizer's special-token strings (``bos_token``, ...) as
variables, and the rendered text tokenized whole, without special tokens added (a template
writes its own BOS).

Trained tokens: those of the assistant turns. A template that marks them with
``{% generation %}...{% endgeneration %}`` is followed as transformers'
``return_assistant_tokens_mask`` follows it. Otherwise each assistant turn is found by
rendering the conversation up to it: the conversation before the turn rendered with
``add_generation_prompt`` (ending where the model's turn begins) must be a prefix of the
conversation rendered through the turn, and the difference is the turn (its content and
the end-of-turn token the template writes; whitespace the template writes after its last
special token, such as ChatML's newline after ``<|im_end|>``, belongs to the context). A
template for which that does not hold (one that rewrites earlier turns, as Qwen3's drops
their reasoning) is refused for multi-turn records, naming the record: give it generation
tags through ``--chat-template``.

A token is trained when it overlaps an assistant span (transformers' rule). The document
ends with the last assistant turn's last token; later text and messages are not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from megatron_irl.data.report import DataError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
BUILT_IN = "built-in (System:/User:/Assistant: lines)"


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(jinja2.ext.Extension):
        """``{% generation %}`` blocks: each appends its character span to the tracker.

        Rendering goes through ``generate()``, whose caller appends each yielded block to
        ``tracker.blocks``, so when a block is evaluated the text before it is complete
        (transformers' AssistantTracker works the same way)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            tracker = jinja2.nodes.Name(_TRACKER, "load")
            return jinja2.nodes.CallBlock(self.call_method("_span", [tracker]), [], [],
                                          body).set_lineno(lineno)

        def _span(self, tracker, caller):
            text = caller()
            if isinstance(tracker, _Tracker):
                start = sum(len(block) for block in tracker.blocks)
                tracker.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationSpans, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special-token strings it is rendered with."""

    text: str
    source: str  # where it was read from, for reports and errors
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, token string) pairs

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.source} (sha256 {self.digest})"

    @property
    def has_generation_tags(self) -> bool:
        return bool(_GENERATION_TAG.search(self.text))

    @cached_property
    def _compiled(self):
        import jinja2

        try:
            return _environment().from_string(self.text)
        except jinja2.TemplateError as error:
            raise DataError(f"chat template {self.source}: {error}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for ``messages``."""
        return self._generate(messages, add_generation_prompt, _Tracker())

    def render_with_generation_spans(self, messages: list[dict]
                                     ) -> tuple[str, list[tuple[int, int]]]:
        """The text of ``messages`` and the (start, end) character span of each
        ``{% generation %}`` block in it."""
        tracker = _Tracker()
        return self._generate(messages, False, tracker), tracker.spans

    def _generate(self, messages: list[dict], add_generation_prompt: bool,
                  tracker: "_Tracker") -> str:
        import jinja2

        variables = dict(self.special_tokens, messages=messages, tools=None, documents=None,
                         add_generation_prompt=add_generation_prompt, **{_TRACKER: tracker})
        try:
            for block in self._compiled.generate(**variables):
                tracker.blocks.append(block)
        except jinja2.TemplateError as error:
            raise DataError(f"chat template {self.source}: {error}") from None
        return "".join(tracker.blocks)


_TRACKER = "_generation_tracker"


class _Tracker:
    """Blocks rendered so far and the spans of the generation blocks among them."""

    def __init__(self):
        self.blocks: list[str] = []
        self.spans: list[tuple[int, int]] = []


# ------------------------------------------------------------------ where templates come from


def read_chat_template_file(path: str, special_tokens: tuple) -> ChatTemplate:
    """``--chat-template FILE``: a Jinja template file."""
    try:
        with open(path, encoding="utf-8") as file:
            return ChatTemplate(file.read(), os.path.abspath(path), special_tokens)
    except OSError as error:
        raise DataError(f"--chat-template {path}: cannot read: {error.strerror}") from None


def tokenizer_chat_template(directory: str, config: dict, special_tokens: tuple
                            ) -> ChatTemplate | None:
    """A tokenizer directory's template: ``chat_template.jinja``, else ``chat_template`` of
    ``tokenizer_config.json`` (``config``; a list of named ones: "default"); None if none."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        return read_chat_template_file(jinja_path, special_tokens)
    template = config.get("chat_template")
    source = os.path.abspath(os.path.join(directory, "tokenizer_config.json"))
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template
                 if isinstance(entry, dict)}
        if "default" not in named:
            raise DataError(f"{source}: chat_template has no template named 'default' (it has "
                            f"{sorted(map(str, named))}); pass one with --chat-template")
        template, source = named["default"], source + " (default)"
    if template is None:
        return None
    if not isinstance(template, str):
        raise DataError(f"{source}: chat_template must be a string or a list of named "
                        f"templates, got {type(template).__name__}")
    return ChatTemplate(template, source, special_tokens)


def describe_rendering(tokenizer) -> str:
    """How chat records are rendered with ``tokenizer`` (for the data report)."""
    template = tokenizer.chat_template
    return f"chat template {template.describe()}" if template else BUILT_IN


# ------------------------------------------------------------------ rendering and tokenizing


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, message in enumerate(messages) if message["role"] == "assistant")


def _end_of_turn(text: str, start: int, special_tokens: set[str]) -> int:
    """End of the turn text[start:]: without the whitespace after its last special token."""
    stripped = len(text.rstrip())
    tail = text[start:stripped]
    if stripped < len(text) and any(tail.endswith(token) for token in special_tokens if token):
        return stripped
    return len(text)


def assistant_spans(template: ChatTemplate, messages: list[dict], special_tokens: set[str],
                    where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation through its last assistant turn, rendered, and the character span
    of every assistant turn in it (see the module docstring)."""
    messages = messages[:_last_assistant(messages) + 1]
    if template.has_generation_tags:
        text, spans = template.render_with_generation_spans(messages)
        if not spans:
            raise DataError(f"{where}: chat template {template.source} renders no "
                            "{% generation %} block for this record's assistant turns")
        return text, spans
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[:i + 1], add_generation_prompt=False)
        end = _end_of_turn(through, len(prompt), special_tokens)
        if not (through.startswith(prompt) and text.startswith(through[:end])
                and len(prompt) >= (spans[-1][1] if spans else 0)):
            raise DataError(
                f"{where}: chat template {template.source} does not render messages[{i}] "
                "(assistant) as the continuation of the conversation before it (rendered with "
                "add_generation_prompt) that the rest of the conversation keeps, so its "
                "tokens cannot be told apart; pass a template that marks assistant turns "
                "with {% generation %} ... {% endgeneration %} with --chat-template")
        spans.append((len(prompt), end))
    return text, spans


def tokenize_chat(template: ChatTemplate, messages: list[dict], tokenizer, where: str
                  ) -> tuple[list[int], list[int]]:
    """(token ids, segment lengths) of a chat record rendered with ``template``: the text
    tokenized whole, tokens overlapping an assistant span are response tokens, the document
    ends with the last of them. Segments alternate context / response, context first (it
    may be empty)."""
    text, spans = assistant_spans(template, messages, tokenizer.special_tokens, where)
    ids, offsets = tokenizer.encode_with_offsets(text)
    in_span = [any(start < span_end and end > span_start for span_start, span_end in spans)
               for start, end in offsets]
    if not any(in_span):
        raise DataError(f"{where}: chat template {template.source} gives the assistant turns "
                        "no tokens")
    last = max(k for k, response in enumerate(in_span) if response)
    lengths, current, count = [], False, 0
    for response in in_span[:last + 1]:
        if response != current:
            lengths.append(count)
            current, count = response, 0
        count += 1
    lengths.append(count)
    return ids[:last + 1], lengths


def chat_prompt(template: ChatTemplate, messages: list[dict], tokenizer) -> tuple[str, list[int]]:
    """The text and tokens of the conversation before its last assistant turn, rendered with
    ``add_generation_prompt`` (ending where the model's turn begins)."""
    text = template.render(messages[:_last_assistant(messages)], add_generation_prompt=True)
    return text, tokenizer.encode(text)
