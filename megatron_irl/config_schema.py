"""The machinery under the configuration dataclasses: flag metadata, type checks, errors.

Each config field is declared with ``_opt(default, flag, help)``; ``_Section`` checks every
value against its annotation on construction and then runs the section's ``_validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """An invalid configuration; the message names the flag, key or variable to change."""


def _opt(default: Any, flag: str, help: str, *, inverse: bool = False) -> Any:
    """A dataclass field with its command-line flag; ``inverse``: the flag sets it to False."""
    return field(default=default, metadata={"flag": flag, "help": help, "inverse": inverse})


@dataclass(frozen=True)
class FieldSpec:
    """One row of the flag table: where a value lives and how the command line names it."""

    section: str
    name: str
    flag: str
    help: str
    inverse: bool  # a bool set to False by its flag (--disable-bias-linear)
    type: Any  # the resolved annotation, e.g. int, float | None, Literal["a", "b"]
    default: Any


def close_match_hint(word: str, candidates: typing.Iterable[str]) -> str:
    """'; did you mean X?' for the closest candidate (ignoring case), or '' when none is close."""
    by_lowered = {candidate.lower(): candidate for candidate in candidates}
    matches = difflib.get_close_matches(word.lower(), list(by_lowered), n=1)
    return f"; did you mean {by_lowered[matches[0]]}?" if matches else ""


def strip_optional(hint: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed): int | None -> (int, True)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def describe_type(hint: Any) -> str:
    """Human-readable annotation: 'int', 'float or null', "one of 'cosine', 'linear'"."""
    base, optional = strip_optional(hint)
    if typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(repr(c) for c in typing.get_args(base))
    else:
        text = base.__name__
    return text + " or null" if optional else text


def value_problem(hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit annotation ``hint`` (None when it fits).

    Strict on purpose: a bool is not an int, a string is not a number; an int is a float.
    """
    base, optional = strip_optional(hint)
    if value is None:
        return None if optional else f"expected {describe_type(hint)}, got null"
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if any(type(value) is type(c) and value == c for c in choices):
            return None
        hint_text = close_match_hint(value, choices) if isinstance(value, str) else ""
        return f"{value!r} is not {describe_type(hint)}{hint_text}"
    fits = type(value) in (int, float) if base is float else type(value) is base
    if fits:
        return None
    return f"expected {describe_type(hint)}, got {type(value).__name__} {value!r}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Section:
    """Base of the section dataclasses: type checks, then the section's own ``_validate``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = value_problem(_hints(type(self))[f.name], value)
            if problem:
                raise ConfigError(f"{self.flag(f.name)}: {problem}")
            if type(value) is int and strip_optional(_hints(type(self))[f.name])[0] is float:
                setattr(self, f.name, float(value))  # so that equal configs compare equal
        self._validate()

    def _validate(self) -> None:
        """Checks between this section's fields; derives unset fields."""

    def flag(self, name: str) -> str:
        """This section's flag for field ``name``: flag("num_layers") -> "--num-layers"."""
        return next(f.metadata["flag"] for f in dataclasses.fields(self) if f.name == name)

    def _require(self, ok: bool, name: str, what: str) -> None:
        """Raise '--flag VALUE: must <what>' unless ``ok`` (no VALUE for booleans and unset)."""
        if not ok:
            value = getattr(self, name)
            shown = "" if value is None or isinstance(value, bool) else f" {value}"
            raise ConfigError(f"{self.flag(name)}{shown}: must {what}")

    def _require_at_least(self, minimum: float, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._require(value is None or value >= minimum, name, f"be >= {minimum}")
