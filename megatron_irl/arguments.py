"""Command line of a training run: ``--config FILE.yaml`` then Megatron-style ``--flag value``.

Precedence: dataclass defaults < the YAML file < flags on the command line. The YAML file
has one mapping per section (``model:``, ``data:``, ``parallel:``, ``optimizer:``,
``training:``, ``irl:``, ``checkpoint:``, ``logging:``) keyed by field name; the flags come
from the flag table in ``megatron_irl.config`` (``field_specs()``), the one place names live.
Boolean flags work as Megatron's store_true flags (``--bf16``) and also take an explicit
``true``/``false`` (``--bf16 false``) so that the command line can turn off what a YAML file
turned on.
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from typing import Any, Callable, Literal, Mapping, NoReturn, Sequence

import yaml

from megatron_irl.config import SECTIONS, TrainConfig, field_specs, find_dict_problem
from megatron_irl.config_schema import ConfigError, FieldSpec, close_match_hint, strip_optional


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: ``1e-5`` is a float; ``on``/``off``/``yes``/``no``
    stay strings (YAML 1.1 would make ``lr: 1e-5`` a string and ``progress_bar: off`` False)."""


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[0-9][0-9_]*[eE][-+]?[0-9]+
                        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                        |\.(?:inf|Inf|INF))
                     |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml_config(path: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a config file: (its mapping, 1-based line of each (section,) and (section, key)).

    Raises ConfigError naming the file when it cannot be read or parsed, or repeats a key
    (which YAML loaders otherwise resolve silently to the last value).
    """
    try:
        with open(path, encoding="utf-8") as stream:
            loader = _Yaml12Loader(stream)
            try:
                node = loader.get_single_node()
                data = loader.construct_document(node) if node is not None else {}
            finally:
                loader.dispose()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from exc
    lines: dict[tuple[str, ...], int] = {}

    def record(key_path: tuple[str, ...], key_node: yaml.Node) -> None:
        line = key_node.start_mark.line + 1
        if key_path in lines:
            raise ConfigError(f"{path}:{line}: {'.'.join(key_path)}: repeats the key of line "
                              f"{lines[key_path]}")
        lines[key_path] = line

    if isinstance(node, yaml.MappingNode):
        for section_node, values_node in node.value:
            record((section_node.value,), section_node)
            if isinstance(values_node, yaml.MappingNode):
                for key_node, _ in values_node.value:
                    record((section_node.value, key_node.value), key_node)
    return data, lines


def world_size_from_env(env: Mapping[str, str]) -> int:
    """WORLD_SIZE (torchrun), else SLURM_NTASKS (srun), else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if name in env:
            try:
                value = int(env[name])
            except ValueError:
                value = 0
            if value < 1:
                raise ConfigError(f"environment variable {name}={env[name]!r}: "
                                  "expected a positive integer")
            return value
    return 1


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ConfigError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered == "true"


def _format_default(spec: FieldSpec) -> str:
    if spec.default is None:
        return "unset"
    if isinstance(spec.default, bool):
        return str(spec.default != spec.inverse).lower()  # the flag's value, not the field's
    return str(spec.default)


def _empty_means_unset(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """For optional fields: ``--flag ""`` unsets a value that the YAML file set."""
    def parse_or_none(text: str) -> Any:
        return None if text == "" else parse(text)
    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse's error messages
    return parse_or_none


def _add_flag(group: argparse._ArgumentGroup, spec: FieldSpec) -> None:
    base, optional = strip_optional(spec.type)
    help_text = f"{spec.help} (default: {_format_default(spec)})"
    if optional:
        help_text += '; "" unsets it'
    dest = f"{spec.section}.{spec.name}"
    if base is bool:
        group.add_argument(spec.flag, dest=dest, nargs="?", const=True, type=_parse_bool,
                           metavar="true|false", help=help_text)
    elif typing.get_origin(base) is Literal:
        choices = typing.get_args(base) + ((None,) if optional else ())
        group.add_argument(spec.flag, dest=dest, choices=choices,
                           type=_empty_means_unset(str) if optional else str,
                           metavar="{" + ",".join(typing.get_args(base)) + "}", help=help_text)
    else:
        group.add_argument(spec.flag, dest=dest,
                           type=_empty_means_unset(base) if optional else base,
                           metavar=base.__name__.upper(), help=help_text)


def build_parser(prog: str = "megatron-irl") -> argparse.ArgumentParser:
    """The parser: ``--config`` plus one flag per config field, grouped by section.

    Absent flags are absent from the parsed namespace (defaults come from the dataclasses);
    each flag's dest is 'section.field'. Errors raise ConfigError; ``--help`` prints and exits 0.
    """
    parser = _RaisingParser(
        prog=prog, usage="%(prog)s [--config FILE.yaml] [--FLAG VALUE ...]",
        description="Fine-tune a language model by inverse soft-Q learning on Megatron-Core. "
                    "Flags override the YAML file, which overrides the defaults shown.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help=f"YAML file with sections {', '.join(s + ':' for s in SECTIONS)} "
                             "keyed by field name (e.g. model: {num_layers: 2}).")
    groups = {}
    for spec in field_specs():
        if spec.section not in groups:
            title = f"{spec.section} (YAML section {spec.section}:)"
            groups[spec.section] = parser.add_argument_group(title)
        _add_flag(groups[spec.section], spec)
    return parser


# A negative number such as -1e-3, which argparse (before Python 3.14) takes for a flag.
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def _attach_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--flag -1e-3`` as ``--flag=-1e-3``, so that argparse passes the value on to the
    config's validation (whose message names the flag) instead of reporting a missing one."""
    joined: list[str] = []
    for arg in argv:
        if (joined and joined[-1].startswith("--") and "=" not in joined[-1]
                and _NEGATIVE_NUMBER.fullmatch(arg)):
            joined[-1] += "=" + arg
        else:
            joined.append(arg)
    return joined


def _unknown_argument_error(leftover: str) -> ConfigError:
    if leftover.startswith("-"):
        flag = leftover.split("=", 1)[0]
        hint = close_match_hint(flag, ["--config", "--help"] + [s.flag for s in field_specs()])
        return ConfigError(f"unknown flag {flag}{hint}")
    return ConfigError(f"unexpected argument {leftover!r}: values follow their flag (--flag value)")


def parse_train_config(argv: Sequence[str], env: Mapping[str, str] = os.environ,
                       prog: str = "megatron-irl") -> TrainConfig:
    """Defaults < ``--config`` YAML < command-line flags, validated for the launch's world size.

    The world size comes from ``env`` (``world_size_from_env``) and is checked by
    ``TrainConfig.validate_for_world`` here, before any process group exists.
    Raises ConfigError (message names the flag, or file:line and key); ``--help`` prints
    the grouped flag list and raises SystemExit(0).
    """
    config = load_train_config(argv, prog)
    config.validate_for_world(world_size_from_env(env))
    return config


def load_train_config(argv: Sequence[str], prog: str = "megatron-irl") -> TrainConfig:
    """``parse_train_config`` without the launch checks (world size, input paths, GPUs).

    For commands that inspect a configuration away from the machines it will run on
    (``megatron-irl plan``). Raises ConfigError; ``--help`` raises SystemExit(0).
    """
    parser = build_parser(prog)
    namespace, leftovers = parser.parse_known_args(_attach_negative_numbers(argv))
    if leftovers:
        raise _unknown_argument_error(leftovers[0])
    overrides = vars(namespace)
    merged: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    config_path = overrides.pop("config", None)
    if config_path is not None:
        data, lines = load_yaml_config(config_path)
        problem = find_dict_problem(data)
        if problem:
            key_path, what = problem
            line = lines.get(key_path) or lines.get(key_path[:1])
            where = f"{config_path}:{line}" if line else config_path
            parts = [where, ".".join(key_path), what] if key_path else [where, what]
            raise ConfigError(": ".join(parts))
        for section, values in data.items():
            merged[section].update(values or {})
    specs = {f"{s.section}.{s.name}": s for s in field_specs()}
    for dest, value in overrides.items():
        spec = specs[dest]
        merged[spec.section][spec.name] = (not value) if spec.inverse else value
    return TrainConfig.from_dict(merged, source=config_path or "command line")
