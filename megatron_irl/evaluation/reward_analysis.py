"""How well extracted rewards rank responses by their task score, without the confounders.

Pooling every sample into one rank correlation mixes decoding settings (temperature moves both
the score and the return) and prompts (easy prompts get high scores and confident values), and
with gamma = 1 the return is ``log pi + V(s_0)``, so a correlation may be only the model's
confidence. Hence, per decoding setting and for each quantity (the return, ``log pi`` alone,
``V(s_0)`` alone):

* ``within_prompt``: the mean over prompts of the Spearman correlation among that prompt's
  samples (prompts with fewer than two samples, or where either side is constant, have none
  and are not counted; ``<quantity>_num_prompts`` says how many were). ``V(s_0)`` is one
  number per prompt, so it has none: it cannot rank a prompt's samples.
* ``across_prompts``: the Spearman correlation of the per-prompt means over the prompts.

A correlation that cannot be computed is None.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from megatron_irl.evaluation.metrics import spearman

QUANTITIES = ("return", "log_prob", "value_initial")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def within_prompt_spearman(groups: list[tuple[list[float], list[float]]]) -> tuple[float | None,
                                                                                    int]:
    """Mean Spearman over the ``(x, y)`` groups where it is defined, and their number."""
    rhos = [spearman(x, y) for x, y in groups if len(x) >= 2]
    rhos = [rho for rho in rhos if math.isfinite(rho)]
    return (float(np.mean(rhos)) if rhos else None), len(rhos)


def across_prompts_spearman(groups: list[tuple[list[float], list[float]]]) -> float | None:
    """Spearman of the groups' mean x against their mean y (None with fewer than 2 groups)."""
    if len(groups) < 2:
        return None
    return _finite_or_none(spearman([float(np.mean(x)) for x, _ in groups],
                                    [float(np.mean(y)) for _, y in groups]))


def rank_correlations(samples: list[dict]) -> dict:
    """Per decoding setting (``samples``' "setting", "all" when absent), the correlations of
    the module doc. Each sample is a dict with "setting", "prompt", "score", "return",
    "log_prob" and "value_initial"."""
    by_setting: dict = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        by_setting[sample["setting"] or "all"][sample["prompt"]].append(sample)
    report = {}
    for setting, prompts in by_setting.items():
        entry = {"num_samples": sum(len(group) for group in prompts.values()),
                 "num_prompts": len(prompts), "within_prompt": {}, "across_prompts": {}}
        for name in QUANTITIES:
            groups = [([s[name] for s in group], [s["score"] for s in group])
                      for group in prompts.values()]
            rho, counted = within_prompt_spearman(groups)
            entry["within_prompt"][name] = rho
            entry["within_prompt"][f"{name}_num_prompts"] = counted
            entry["across_prompts"][name] = across_prompts_spearman(groups)
        report[setting] = entry
    return report


def format_correlations(report: dict) -> str:
    """One line per setting for the console."""

    def shown(value):
        return "-" if value is None else f"{value:+.3f}"

    lines = ["Spearman with the score (within prompt | across prompts): return, log pi, V(s_0)"]
    for setting, entry in report.items():
        within, across = entry["within_prompt"], entry["across_prompts"]
        lines.append(
            f"  {setting}: within " + " ".join(shown(within[q]) for q in QUANTITIES)
            + f" ({within['return_num_prompts']} prompts) | across "
            + " ".join(shown(across[q]) for q in QUANTITIES)
            + f" ({entry['num_prompts']} prompts, {entry['num_samples']} samples)")
    return "\n".join(lines)
