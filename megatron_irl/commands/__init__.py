"""The ``megatron-irl`` command line (also ``python -m megatron_irl``): one thin module per
command, which parses its flags and calls the library.

    megatron-irl train | eval | rewards | plan | convert from-hf | convert to-hf | preprocess

A command module imports Megatron-Core (and torch) only once its flags are known to be valid,
so that ``--help`` and bad flags answer at once. Exit status: 0 success, 1 unusable data,
checkpoint or result, 2 a bad command line or configuration.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "fine-tune a model (MLE or IRL) on Megatron-Core",
    "eval": "sample from a checkpoint; task metrics and diversity",
    "rewards": "per-token rewards and returns of a checkpoint",
    "plan": "check a config for a launch and estimate per-GPU memory, no model built",
    "convert": "from-hf: Hugging Face model -> checkpoint; to-hf: checkpoint -> Hugging Face",
    "preprocess": "tokenize a JSONL file once into memory-mapped training data",
}


def _usage() -> str:
    lines = ["usage: megatron-irl <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {summary}" for name, summary in COMMANDS.items()]
    lines.append("\n`megatron-irl <command> --help` lists a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"megatron-irl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"megatron_irl.commands.{command}").main(rest)
