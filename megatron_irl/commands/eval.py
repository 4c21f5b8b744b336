"""``megatron-irl eval``: sample from a checkpoint, score the samples, measure diversity.

    megatron-irl eval --load runs/tiny/checkpoints --data examples/data/valid.jsonl \\
        --samples 8 --temperature 0.7 1.0 --beam-size 4 --output-dir runs/tiny/eval

For every decoding setting (each temperature; each beam size) every prompt gets
``--samples`` samples (one for greedy and beam search). Writes to ``--output-dir``:
``report.json`` (settings and their metrics), ``samples.jsonl`` (every response with its
prompt, reference, answer, log-prob and entropy: input for ``megatron-irl rewards``) and
``tradeoff.png`` (task score vs Self-BLEU per temperature). Runs under one process,
torchrun or srun; data-parallel replicas split the prompts (``evaluation/evaluate.py``).
"""

from __future__ import annotations

import sys

from megatron_irl.evaluation.evaluate import evaluate
from megatron_irl.evaluation.options import EvalOptions, run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("megatron-irl eval", EvalOptions, sys.argv[1:] if argv is None else argv,
                       evaluate)
