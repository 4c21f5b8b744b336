"""Command-line options of ``megatron-irl eval`` and ``megatron-irl rewards``.

Each command's options are one dataclass, validated in ``__post_init__`` with messages that
name the flag; the parsers only map flags to fields (``--flag-name`` -> ``flag_name``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, dataclass, fields
from types import UnionType
from typing import Literal, Sequence, get_args, get_origin, get_type_hints


class OptionsError(ValueError):
    """An invalid command line; the message names the flag."""


@dataclass
class InferenceOptions:
    """What both commands share: the checkpoint, the data and the layout to run at."""

    load: str
    data: str
    ckpt_step: int | None = None  # unset: the latest complete checkpoint
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    tokenizer_model: str | None = None  # unset: the checkpoint's --tokenizer-model
    chat_template: str | None = None  # unset: the checkpoint's --chat-template
    micro_batch_size: int = 16  # sequences per forward
    limit: int | None = None  # first N records only
    seed: int = 1234
    progress_bar: Literal["auto", "on", "off"] = "auto"

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

    output_dir: str = "eval"
    samples: int = 4  # per prompt and temperature
    temperature: tuple[float, ...] = (1.0,)  # 0: greedy, one sample per prompt
    top_k: int = 0
    top_p: float = 1.0
    beam_size: tuple[int, ...] = ()  # beam searches, one response per prompt each
    length_penalty: float = 1.0
    max_new_tokens: int | None = None  # unset: the positions the longest prompt leaves
    answer_pattern: str | None = None  # unset: GSM8k's "#### <number>"

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

    output: str = "rewards.jsonl"
    gamma: float | None = None  # unset: the checkpoint's --irl-gamma
    score_field: str = "score"  # records' task score, for the rank correlation

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.gamma is None or 0 <= self.gamma <= 1, "gamma", "be in [0, 1]")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(condition: bool, name: str, what: str) -> None:
    if not condition:
        raise OptionsError(f"{_flag(name)} must {what}")


_HELP = {
    "load": "checkpoint directory (a --save directory of megatron-irl train)",
    "data": "JSONL records: prompt/response or messages",
    "ckpt_step": "load this iteration of --load; unset: the latest complete one",
    "tokenizer_model": "tokenizer; unset: the one the checkpoint was trained with",
    "chat_template": "Jinja chat template file for chat records; unset: the one the "
                     "checkpoint was trained with, else the tokenizer's own",
    "tensor_model_parallel_size": "tensor-parallel size to run the model at",
    "pipeline_model_parallel_size": "pipeline stages to run the model at",
    "micro_batch_size": "sequences per forward pass",
    "seed": "seed of the sampling (each sample has its own stream)",
    "progress_bar": "progress bar; auto: on when stderr is a terminal",
    "top_k": "sample from the k most likely tokens only; 0: off",
    "top_p": "sample from the smallest set of tokens with this probability; 1: off",
    "length_penalty": "beam search ranks hypotheses by log-prob / length**this",
    "max_new_tokens": "longest response, in tokens (EOS included); unset: all the model's "
                      "positions that the longest prompt leaves",
    "limit": "use the first N records only",
    "output_dir": "where report.json, samples.jsonl and the plot go",
    "samples": "samples per prompt at each temperature (Self-BLEU needs >= 2)",
    "temperature": "sampling temperatures to sweep; 0 is greedy (one response per prompt)",
    "beam_size": "beam sizes to sweep (one response per prompt each)",
    "answer_pattern": "regex whose first group is the final answer; unset: '#### <number>'",
    "output": "JSONL file of per-token rewards and returns",
    "gamma": "discount of the rewards; unset: the checkpoint's --irl-gamma",
    "score_field": "record field holding a task score, for the Spearman correlation",
}


def _argument_kwargs(f, hint) -> dict:
    """argparse keywords for dataclass field ``f`` of resolved type ``hint``."""
    kwargs = {"dest": f.name, "help": _HELP.get(f.name, "")}
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
