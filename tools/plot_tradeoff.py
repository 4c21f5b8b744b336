"""Task score vs Self-BLEU of several evaluated runs in one plot (the paper's trade-off view).

    python tools/plot_tradeoff.py runs/mle/eval/report.json runs/irl/eval/report.json \
        --labels MLE IQ-Learn --output tradeoff.png

Each REPORT.json is the ``report.json`` that ``megatron-irl eval`` wrote; every sampled
temperature with a Self-BLEU becomes a point of its run's series.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_irl.evaluation.plots import plot_score_vs_self_bleu  # noqa: E402
from megatron_irl.evaluation.report import tradeoff_points  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="report.json files of megatron-irl eval")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per report; unset: each report's checkpoint name")
    parser.add_argument("--output", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.reports):
        parser.error(f"--labels has {len(args.labels)} labels for {len(args.reports)} reports")
    points, task_scores = [], set()
    for index, path in enumerate(args.reports):
        try:
            with open(path, encoding="utf-8") as file:
                report = json.load(file)
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"{path}: not a readable report.json ({error})")
        label = (args.labels[index] if args.labels
                 else os.path.basename(os.path.normpath(report["checkpoint"])))
        task_scores.add(report["task_score"])
        points += tradeoff_points(report, label)
    if len(task_scores) > 1:
        parser.error(f"the reports score different metrics ({', '.join(sorted(task_scores))})")
    if not points:
        parser.error("no report has a sampled setting with a Self-BLEU (needs --samples >= 2)")
    plot_score_vs_self_bleu(points, args.output, score_label=task_scores.pop())
    print(f"wrote {args.output} ({len(points)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
