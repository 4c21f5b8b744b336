"""``megatron-irl rewards``: per-token rewards and sequence returns from a checkpoint.

    megatron-irl rewards --load runs/tiny/checkpoints --data runs/tiny/eval/samples.jsonl \\
        --output runs/tiny/rewards.jsonl

Reads (prompt, response) records (``samples.jsonl`` of ``megatron-irl eval`` works as is:
its ``finished`` and ``setting`` fields are honoured) and writes one JSONL line per record: its
line number, per-token rewards ``delta_t`` over the response tokens, the return (their sum),
``V(s_0)`` and ``log pi(response | prompt)``. When the records carry a task score
(``--score-field``, default "score"), also prints and writes to ``<output>.summary.json`` the
Spearman rank correlations of the return, of ``log pi`` and of ``V(s_0)`` with the score, per
decoding setting, within and across prompts (``evaluation/reward_analysis.py``), with the
scatter plot of all samples ``<output>.return_vs_score.png``.
"""

from __future__ import annotations

import sys

from megatron_irl.evaluation.rewards import extract_and_analyse
from megatron_irl.evaluation.options import RewardsOptions, run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("megatron-irl rewards", RewardsOptions,
                       sys.argv[1:] if argv is None else argv, extract_and_analyse)
