"""``megatron-irl plan``: check a training configuration for a launch and estimate per-GPU memory.

    megatron-irl plan --config run.yaml --nodes 2 --gpus-per-node 8 [--vocab-size N] [--flag ...]

Takes everything ``megatron-irl train`` takes (the same ``--config`` file and flag table), plus
the launch: ``--world-size N`` or ``--nodes N --gpus-per-node G`` (default: the launch
environment's WORLD_SIZE / SLURM_NTASKS, else 1). It builds and validates the whole
configuration as the trainer would, except for what needs the training machine: input paths
that do not exist yet are listed, not refused, and Transformer Engine / FP8 are assumed to be
there. Then it prints the parallel layout (which ranks hold which layers and vocabulary
rows), the parameter count, and the memory of each pipeline stage's GPUs
(``planning/``), and exits without building the model or importing Megatron.

The vocabulary size is the real one, as training takes it: ``--vocab-size N`` (the training
flag), else the tokenizer's, read from ``--tokenizer-model`` when it exists (it need not: a
recipe names the directory the Hugging Face import will create).

Exit status: 0 when the largest stage fits in ``--gpu-memory-gib``, 1 when it does not,
2 for an invalid configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

from megatron_irl.arguments import (
    _RaisingParser,
    build_parser,
    load_train_config,
    world_size_from_env,
)
from megatron_irl.config import ConfigError
from megatron_irl.planning.launch_report import (DEFAULT_GPU_MEMORY_GIB, PlanRequest,
                                                 format_plan)

PROG = "megatron-irl plan"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan (the launch to check; not in the YAML file)")
    group.add_argument("--world-size", type=_positive_int, metavar="N",
                       help="Ranks (GPUs) in all; default: WORLD_SIZE or SLURM_NTASKS, else 1.")
    group.add_argument("--nodes", type=_positive_int, metavar="N",
                       help="Nodes, instead of --world-size (world = nodes x GPUs per node).")
    group.add_argument("--gpus-per-node", type=_positive_int, metavar="G",
                       help="GPUs per node (default with --nodes: 8).")
    group.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                       default=DEFAULT_GPU_MEMORY_GIB,
                       help=f"Memory of one GPU (default: {DEFAULT_GPU_MEMORY_GIB}, an H100 "
                            "80GB).")


def parse_plan_args(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> PlanRequest:
    """The plan's own flags, then the training configuration from the rest (no launch checks).

    Raises ConfigError naming the flag; ``--help`` prints both flag sets and exits 0.
    """
    if "-h" in argv or "--help" in argv:
        parser = build_parser(PROG)
        parser.description = ("Check a training configuration for a launch and estimate the "
                               "memory of each GPU, without building the model. Takes every "
                               "flag of megatron-irl train, and the plan's own (last group).")
        _add_plan_flags(parser)
        parser.print_help()
        raise SystemExit(0)
    own = _RaisingParser(prog=PROG, add_help=False, allow_abbrev=False)
    _add_plan_flags(own)
    flags, rest = own.parse_known_args(list(argv))
    config = load_train_config(rest, PROG)
    if flags.world_size is not None and (flags.nodes or flags.gpus_per_node):
        raise ConfigError("--world-size cannot be combined with --nodes / --gpus-per-node")
    gpus_per_node = flags.gpus_per_node or (8 if flags.nodes else None)
    if gpus_per_node is not None:
        world_size = (flags.nodes or 1) * gpus_per_node
    else:
        world_size = flags.world_size or world_size_from_env(env)
    if flags.gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory-gib {flags.gpu_memory_gib}: must be > 0")
    return PlanRequest(config, world_size, gpus_per_node, config.model.vocab_size,
                       flags.gpu_memory_gib)



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        request = parse_plan_args(argv)
        config_label = _config_label(argv)
        report, fits = format_plan(request, f"{PROG}: {config_label}")
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0 if fits else 1


def _config_label(argv: Sequence[str]) -> str:
    argv = list(argv)
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return "(no --config: defaults and flags)"
