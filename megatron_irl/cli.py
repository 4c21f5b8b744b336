"""The ``megatron-irl`` console script: ``megatron-irl <command> [options]``."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("megatron_irl.train", "fine-tune a model (MLE or IRL) on Megatron-Core"),
    "plan": ("megatron_irl.plan", "check a config and estimate per-GPU memory, no model built"),
    "eval": ("megatron_irl.evaluate", "sample from a checkpoint; task metrics and diversity"),
    "rewards": ("megatron_irl.rewards", "per-token rewards and returns of a checkpoint"),
}


def _usage() -> str:
    lines = ["usage: megatron-irl <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
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
    module = __import__(COMMANDS[command][0], fromlist=["main"])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
