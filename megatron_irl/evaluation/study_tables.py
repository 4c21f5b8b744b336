"""Markdown tables of a multi-seed method comparison (``tools/run_experiment.py``).

Every table takes ``results``: method name -> one dict per seed (in the same seed order for
every method) with
  ``report``        the ``megatron-irl eval`` report of the run's selected checkpoint;
  ``rewards``       ``{"own" | "gamma=<g>": spearman_vs_score}`` of ``megatron-irl rewards``;
  ``selected_step`` the iteration evaluated; ``selection`` {iteration: valid greedy score};
  ``valid_nll``     {iteration: the trainer's validation NLL}.
Cells are mean ± standard error over seeds (docs/results.md).
"""

from __future__ import annotations

from megatron_irl.evaluation.metrics import mean_and_stderr, score_gap_at_matched_diversity
from megatron_irl.evaluation.report import tradeoff_points

_TEST_METRICS = ("exact_match", "self_bleu", "distinct_correct", "entropy")


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, stderr = mean_and_stderr(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {stderr:.3f}"


def _settings(runs: list) -> list[list[dict]]:
    """Per decoding setting, that setting of every seed's report."""
    return [list(per_seed) for per_seed in zip(*(run["report"]["settings"] for run in runs))]


def validation_table(results: dict, selection: dict) -> str:
    """Greedy validation accuracy and validation NLL per saved iteration; the selected one."""
    steps = sorted(set.union(*(set(run["selection"]) for runs in results.values()
                               for run in runs)))
    lines = [f"## Checkpoint selection on the validation split\n\nGreedy accuracy on the first "
             f"{selection['limit']} records of `{selection['data']}` at each saved iteration; "
             f"each run evaluates its best (ties: the earliest).\n",
             "| method | selected iteration | " + " | ".join(f"acc @ {s}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for method, runs in results.items():
        lines.append(f"| {method} | {_cell([run['selected_step'] for run in runs])} | "
                     + " | ".join(_cell([run["selection"].get(s) for run in runs])
                                  for s in steps) + " |")
    nll_steps = sorted(set.union(*(set(run["valid_nll"]) for runs in results.values()
                                   for run in runs)))
    lines += ["\nValidation NLL (the trainer's, per token) at each evaluation:\n",
              "| method | " + " | ".join(f"NLL @ {s}" for s in nll_steps) + " |",
              "|---|" + "---|" * len(nll_steps)]
    for method, runs in results.items():
        lines.append(f"| {method} | " + " | ".join(_cell([run["valid_nll"].get(s) for run in runs])
                                                  for s in nll_steps) + " |")
    return "\n".join(lines) + "\n"


def test_split_table(results: dict) -> str:
    """Test metrics of each method's evaluated checkpoint, per decoding setting."""
    lines = ["## Test split, evaluated checkpoint\n",
             "| method | setting | accuracy | Self-BLEU | distinct correct | entropy |",
             "|---|---|---|---|---|---|"]
    for method, runs in results.items():
        for setting in _settings(runs):
            cells = [_cell([s["metrics"][name] for s in setting]) for name in _TEST_METRICS]
            lines.append(f"| {method} | {setting[0]['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sampling_curve(run: dict) -> list[tuple[float, float]]:
    """(Self-BLEU, task score) of a run's sampled settings."""
    return [(point.self_bleu, point.score) for point in tradeoff_points(run["report"], "")]


def matched_diversity_table(results: dict) -> str:
    """Accuracy gap to the first method at matched Self-BLEU, seed by seed."""
    baseline_name, baseline = next(iter(results.items()))
    lines = [f"## Accuracy at matched diversity, against {baseline_name}\n\n"
             f"Mean accuracy difference to {baseline_name} over the Self-BLEU range both "
             f"temperature sweeps cover (the area between the accuracy-vs-Self-BLEU lines over "
             f"the range's width; seed k against {baseline_name}'s seed k). Positive: more "
             f"accurate at the same diversity.\n",
             "| method | accuracy gap | Self-BLEU range (low - high) | seeds with overlap |",
             "|---|---|---|---|"]
    for method, runs in list(results.items())[1:]:
        gaps = [score_gap_at_matched_diversity(_sampling_curve(run), _sampling_curve(base))
                for run, base in zip(runs, baseline)]
        gaps = [gap for gap in gaps if gap is not None]
        if not gaps:
            lines.append(f"| {method} | - | no overlap | 0/{len(runs)} |")
            continue
        lines.append(f"| {method} | {_cell([g[0] for g in gaps])} | "
                     f"{_cell([g[1] for g in gaps])} - {_cell([g[2] for g in gaps])} | "
                     f"{len(gaps)}/{len(runs)} |")
    return "\n".join(lines) + "\n"


def rewards_table(results: dict) -> str:
    """Spearman correlations of extracted rewards with correctness, per setting and discount."""
    lines = ["## Extracted rewards vs correctness (Spearman)\n\n"
             "`megatron-irl rewards` on the evaluated samples, per decoding setting; discount "
             "`own` is the run's `--irl-gamma`. Within prompt: mean over prompts of the "
             "correlation among one prompt's samples; across prompts: over every sample.\n",
             "| method | discount | setting | within: return / log pi | "
             "across: return / log pi / V(s_0) |",
             "|---|---|---|---|---|"]
    for method, runs in results.items():
        for label in runs[0]["rewards"]:
            for setting in _settings(runs):
                name = setting[0]["name"]
                correlations = [run["rewards"][label].get(name, {}) for run in runs]
                lines.append(f"| {method} | {label} | {name} | "
                             f"{_correlations(correlations, 'within_prompt', 2)} | "
                             f"{_correlations(correlations, 'across_prompts', 3)} |")
    return "\n".join(lines) + "\n"


def _correlations(correlations: list[dict], kind: str, count: int) -> str:
    """``return / log pi (/ V(s_0))`` Spearman of one kind, each over the seeds."""
    names = ("return", "log_prob", "value_initial")[:count]
    return " / ".join(_cell([c.get(kind, {}).get(name) for c in correlations])
                      for name in names)
