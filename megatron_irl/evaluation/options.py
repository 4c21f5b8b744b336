"""Command-line options of ``megatron-irl eval`` and ``megatron-irl rewards``.

Each command's options are one dataclass, validated in ``__post_init__`` with messages that
name the flag; the parsers only map flags to fields (``--flag-name`` -> ``flag_name``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, dataclass, field, fields
from types import UnionType
from typing import Literal, Sequence, get_args, get_origin, get_type_hints


class OptionsError(ValueError):
    """An invalid command line; the message names the flag."""


def _option(default, help: str):
    """A field with its ``--help`` text (the flag is the name: ``max_new_tokens`` ->
    ``--max-new-tokens``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class InferenceOptions:
    """What both commands share: the checkpoint, the data and the layout to run at."""

    load: str = field(metadata={"help": "checkpoint directory (a --save directory of "
                                        "megatron-irl train)"})
    data: str = field(metadata={"help": "JSONL records: prompt/response or messages"})
    ckpt_step: int | None = _option(
        None, "load this iteration of --load; unset: the latest complete one")
    tensor_model_parallel_size: int = _option(1, "tensor-parallel size to run the model at")
    pipeline_model_parallel_size: int = _option(1, "pipeline stages to run the model at")
    tokenizer_model: str | None = _option(
        None, "tokenizer; unset: the one the checkpoint was trained with")
    chat_template: str | None = _option(
        None, "Jinja chat template file for chat records; unset: the one the checkpoint was "
              "trained with, else the tokenizer's own")
    micro_batch_size: int = _option(16, "sequences per forward pass")
    limit: int | None = _option(None, "use the first N records only")
    seed: int = _option(1234, "seed of the sampling (each sample has its own stream)")
    progress_bar: Literal["auto", "on", "off"] = _option(
        "auto", "progress bar; auto: on when stderr is a terminal")

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "micro_batch_size"):
            _require(getattr(self, name) >= 1, name, "be >= 1")
        _require(self.limit is None or self.limit >= 1, "limit", "be >= 1")
        _require(self.ckpt_step is None or self.ckpt_step >= 0, "ckpt_step", "be >= 0")
        _require(self.seed >= 0, "seed", "be >= 0")


@dataclass
class EvalOptions(InferenceOptions):
    """``megatron-irl eval``: sample, score and measure diversity."""

    output_dir: str = _option("eval", "where report.json, samples.jsonl and the plot go")
    samples: int = _option(4, "samples per prompt at each temperature (Self-BLEU needs >= 2)")
    temperature: tuple[float, ...] = _option(
        (1.0,), "sampling temperatures to sweep; 0 is greedy (one response per prompt)")
    top_k: int = _option(0, "sample from the k most likely tokens only; 0: off")
    top_p: float = _option(
        1.0, "sample from the smallest set of tokens with this probability; 1: off")
    beam_size: tuple[int, ...] = _option((), "beam sizes to sweep (one response per prompt each)")
    length_penalty: float = _option(1.0, "beam search ranks hypotheses by log-prob / "
                                         "length**this")
    max_new_tokens: int | None = _option(
        None, "longest response, in tokens (EOS included); unset: all the model's positions "
              "that the longest prompt leaves")
    answer_pattern: str | None = _option(
        None, "regex whose first group is the final answer; unset: '#### <number>'")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.samples >= 1, "samples", "be >= 1")
        _require(all(t >= 0 for t in self.temperature), "temperature", "be >= 0 (0: greedy)")
        _require(self.top_k >= 0, "top_k", "be >= 0 (0: off)")
        _require(0 < self.top_p <= 1, "top_p", "be in (0, 1]")
        _require(all(b >= 1 for b in self.beam_size), "beam_size", "be >= 1")
        _require(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens",
                 "be >= 1")
        _require(self.temperature or self.beam_size, "temperature",
                 "list at least one value, or give --beam-size")


@dataclass
class RewardsOptions(InferenceOptions):
    """``megatron-irl rewards``: per-token rewards and returns of (prompt, response) pairs."""

    output: str = _option("rewards.jsonl", "JSONL file of per-token rewards and returns")
    gamma: float | None = _option(
        None, "discount of the rewards; unset: the checkpoint's --irl-gamma")
    score_field: str = _option(
        "score", "record field holding a task score, for the Spearman correlation")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.gamma is None or 0 <= self.gamma <= 1, "gamma", "be in [0, 1]")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(condition: bool, name: str, what: str) -> None:
    if not condition:
        raise OptionsError(f"{_flag(name)} must {what}")


def _argument_kwargs(f, hint) -> dict:
    """argparse keywords for dataclass field ``f`` of resolved type ``hint``."""
    kwargs = {"dest": f.name, "help": f.metadata["help"]}
    if f.default is MISSING:
        kwargs["required"] = True
    elif f.default is not None:
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kwargs["help"] += f" (default: {shown})"
    # ``int | None`` and the like: the non-None member decides.
    kind = next((t for t in get_args(hint) if t is not type(None)), hint) \
        if isinstance(hint, UnionType) else hint
    if get_origin(kind) is Literal:
        kwargs["choices"] = get_args(kind)
    elif get_origin(kind) is tuple:
        kwargs.update(nargs="*", type=get_args(kind)[0])
    elif kind in (int, float):
        kwargs["type"] = kind
    return kwargs


def parse_options(cls: type, argv: Sequence[str], prog: str):
    """``cls`` built from ``argv``; raises OptionsError naming the flag."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    parser.error = _raise_options_error  # type: ignore[method-assign]
    hints = get_type_hints(cls)
    for f in fields(cls):
        parser.add_argument(_flag(f.name), metavar=f.name.split("_")[-1].upper(),
                            **_argument_kwargs(f, hints[f.name]))
    values = {k: v for k, v in vars(parser.parse_args(list(argv))).items() if v is not None}
    for name in ("temperature", "beam_size"):
        if name in values:
            values[name] = tuple(values[name])
    return cls(**values)


def _raise_options_error(message: str):
    raise OptionsError(message)


def run_command(prog: str, cls: type, argv: Sequence[str], action) -> int:
    """A command's ``main``: parse ``argv`` into ``cls``, run ``action(options)``.

    Exit status 2 for a bad command line or layout (before Megatron-Core is imported),
    1 for unusable data, checkpoint or lengths, 0 on success; errors go to stderr as
    ``<prog>: error: ...``.
    """
    try:
        options = parse_options(cls, argv, prog=prog)
    except OptionsError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    from megatron_irl.config import ConfigError
    from megatron_irl.core.checkpoint import CheckpointError
    from megatron_irl.data import DataError

    try:
        action(options)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    return 0
