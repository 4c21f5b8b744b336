"""Scoring a decoding setting's samples: task metrics and diversity (docs/method.md section 6).

A *sample* is one dict per generated response (the lines of ``samples.jsonl``); this
module groups them by prompt and turns them into the report's numbers. Pure functions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from megatron_irl.evaluation import metrics
from megatron_irl.evaluation.plots import TradeoffPoint


@dataclass(frozen=True)
class Decoding:
    """One decoding setting of a sweep: sampling at a temperature, or beam search."""

    temperature: float | None = None
    beam_size: int | None = None

    @property
    def name(self) -> str:
        if self.beam_size is not None:
            return f"beam={self.beam_size}"
        return "greedy" if self.temperature == 0 else f"T={self.temperature:g}"

    def as_dict(self) -> dict:
        if self.beam_size is not None:
            return {"decoding": "beam", "beam_size": self.beam_size}
        return {"decoding": "greedy" if self.temperature == 0 else "sample",
                "temperature": self.temperature}


def score_setting(samples: list[dict], answer_pattern: str | None = None) -> dict:
    """Metrics of one setting's samples (each with "line", "response", "reference",
    "answer", "entropy", "num_tokens").

    - exact_match: over samples whose prompt has a gold answer (None when none has);
    - rouge1/rouge2/rougeLsum, bleu, chrf: the samples against their references;
    - self_bleu: docs/method.md's Self-BLEU averaged over prompts (None with one sample each);
    - distinct: distinct responses / samples per prompt, averaged over prompts;
    - distinct_correct: the number of distinct correct responses per prompt, averaged over
      prompts with a gold answer (None when none has): diversity among valid answers;
    - entropy: the policy's mean per-token entropy over all generated tokens (nats);
    - mean_tokens: mean response length in tokens.
    """
    responses = [s["response"] for s in samples]
    references = [s["reference"] for s in samples]
    answered = [s for s in samples if s["answer"] is not None]
    by_prompt = defaultdict(list)
    for sample in samples:
        by_prompt[sample["line"]].append(sample["response"])
    groups = list(by_prompt.values())
    correct_by_prompt = {sample["line"]: set() for sample in answered}
    for sample in answered:
        if metrics.exact_match([sample["response"]], [sample["answer"]], answer_pattern):
            correct_by_prompt[sample["line"]].add(sample["response"])
    tokens = sum(s["num_tokens"] for s in samples)
    result = {
        "exact_match": (metrics.exact_match([s["response"] for s in answered],
                                            [s["answer"] for s in answered], answer_pattern)
                        if answered else None),
        **metrics.rouge(responses, references),
        "bleu": metrics.bleu(responses, references),
        "chrf": metrics.chrf(responses, references),
        "self_bleu": (metrics.mean_self_bleu(groups)
                      if min(len(g) for g in groups) >= 2 else None),
        "distinct": sum(metrics.distinct_fraction(g) for g in groups) / len(groups),
        "distinct_correct": (sum(map(len, correct_by_prompt.values())) / len(correct_by_prompt)
                             if answered else None),
        "entropy": sum(s["entropy"] * s["num_tokens"] for s in samples) / max(tokens, 1),
        "mean_tokens": tokens / len(samples),
    }
    return result


def task_score_name(settings: list[dict]) -> str:
    """The headline task metric: exact match when the data has answers, else ROUGE-1."""
    has_answers = any(s["metrics"]["exact_match"] is not None for s in settings)
    return "exact_match" if has_answers else "rouge1"


def format_table(settings: list[dict]) -> str:
    """The report's settings as an aligned text table."""
    columns = ["exact_match", "rouge1", "bleu", "chrf", "self_bleu", "distinct",
               "distinct_correct", "entropy", "mean_tokens"]
    widths = [max(12, len(name) + 2) for name in columns]
    header = f"{'setting':<10}" + "".join(f"{name:>{w}}" for name, w in zip(columns, widths))
    lines = [header]
    for setting in settings:
        values = setting["metrics"]
        cells = "".join(f"{'-':>{w}}" if values[name] is None else f"{values[name]:>{w}.3f}"
                        for name, w in zip(columns, widths))
        lines.append(f"{setting['name']:<10}{cells}")
    return "\n".join(lines)


def tradeoff_points(report: dict, label: str) -> list[TradeoffPoint]:
    """The sampled settings of an eval ``report`` with a Self-BLEU, as points of the
    score-vs-diversity plot under run ``label``."""
    return [TradeoffPoint(label, s["metrics"][report["task_score"]], s["metrics"]["self_bleu"],
                          temperature=s["temperature"])
            for s in report["settings"]
            if s["decoding"] == "sample" and s["metrics"]["self_bleu"] is not None]
