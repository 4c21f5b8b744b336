"""Task, diversity and correlation metrics on plain strings and numbers (no model, no Megatron).

Scales: ``exact_match`` and ``distinct_fraction`` are fractions in [0, 1]; ROUGE, BLEU, chrF and
Self-BLEU are on the 0-100 scale their packages report. ``rouge_score`` and ``sacrebleu`` are
imported on first use so that importing this module stays cheap.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Optional, Sequence

import numpy as np

GSM8K_ANSWER_MARKER = "#### "
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def normalize_answer(answer: str) -> str:
    """Canonical form of an answer string, so that equal numbers compare equal as strings.

    Strips surrounding whitespace; if what remains, without ``,`` and ``$`` and one trailing
    ``.``, is a decimal number, returns it without thousands separators, leading ``+``,
    redundant leading zeros or trailing fractional zeros: ``"$1,000.00"`` -> ``"1000"``,
    ``"12.0"`` -> ``"12"``, ``"-.50"`` -> ``"-0.5"``. Any other text is returned stripped only.
    """
    text = answer.strip()
    candidate = text.replace(",", "").replace("$", "")
    if candidate.endswith("."):
        candidate = candidate[:-1]
    if not _NUMBER.fullmatch(candidate):
        return text
    sign = "-" if candidate.startswith("-") else ""
    integer, _, fraction = candidate.lstrip("+-").partition(".")
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    if integer == "0" and not fraction:
        sign = ""  # "-0" and "0" are the same answer
    return sign + integer + ("." + fraction if fraction else "")


def compile_answer_pattern(pattern: str) -> re.Pattern:
    """``re.compile(pattern)``, raising ValueError that names the pattern if it does not compile."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"answer pattern {pattern!r} is not a valid regular expression: {error}") from None


def extract_answer(text: str, pattern: Optional[str | re.Pattern] = None) -> Optional[str]:
    """The final answer in a generated ``text``, normalised with :func:`normalize_answer`.

    ``pattern=None`` follows the GSM8k convention: the rest of the line after the last
    ``"#### "``. Otherwise the last match of the regex ``pattern`` gives the answer: its first
    capture group if it has groups, else the whole match. Returns None when there is no marker
    or match, or the answer is empty. A pattern that does not compile raises ValueError.
    """
    if pattern is None:
        start = text.rfind(GSM8K_ANSWER_MARKER)
        if start < 0:
            return None
        answer = text[start + len(GSM8K_ANSWER_MARKER):].split("\n", 1)[0]
    else:
        regex = pattern if isinstance(pattern, re.Pattern) else compile_answer_pattern(pattern)
        last = None
        for last in regex.finditer(text):
            pass
        if last is None:
            return None
        answer = last.group(1) if regex.groups else last.group(0)
        if answer is None:  # an optional group that did not take part in the match
            return None
    answer = normalize_answer(answer)
    return answer or None


def _check_pairs(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("got no predictions to score")


def exact_match(
    predictions: Sequence[str], references: Sequence[str], pattern: Optional[str] = None
) -> float:
    """Fraction in [0, 1] of predictions whose extracted answer equals the gold answer.

    ``predictions`` are generated texts, read with ``extract_answer(text, pattern)``; a prediction
    with no answer counts as wrong. ``references`` are gold answers (``"1,000"``, not a whole
    GSM8k solution: pass ``extract_answer(solution)`` for those), compared after
    :func:`normalize_answer`.
    """
    _check_pairs(predictions, references)
    regex = None if pattern is None else compile_answer_pattern(pattern)
    correct = sum(
        extract_answer(prediction, regex) == normalize_answer(reference)
        for prediction, reference in zip(predictions, references)
    )
    return correct / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/Lsum F-measure (x100, Porter stemming) over prediction-reference pairs.

    Returns ``{"rouge1", "rouge2", "rougeLsum"}``. ``rougeLsum`` treats each line as a sentence,
    as ``rouge-score`` does, so texts should hold one sentence per line.
    """
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    keys = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # score(target, prediction)
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams), one reference per prediction."""
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), one reference per prediction."""
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


@functools.cache
def _sentence_bleu_metric():
    from sacrebleu.metrics import BLEU

    # effective_order: a sample shorter than 4 tokens is scored on the n-gram orders it has
    # instead of 0. 'exp' smoothing (Chen & Cherry 2014, method 3; sacrebleu's default)
    # gives an unmatched order k-th in a row a precision of 1 / (2^k * count) instead of 0.
    return BLEU(smooth_method="exp", effective_order=True)


def self_bleu(samples: Sequence[str]) -> float:
    """Self-BLEU (x100) of the K samples drawn for one prompt; lower means more diverse.

    Each sample is scored by sentence-level BLEU (sacrebleu, 13a tokenisation, 4-grams,
    'exp' smoothing, effective order) against the other K-1 samples as references, and the
    K scores are averaged. K identical samples give 100. Raises ValueError for K < 2.
    """
    if len(samples) < 2:
        raise ValueError(f"Self-BLEU needs at least 2 samples per prompt, got {len(samples)}")
    metric = _sentence_bleu_metric()
    scores = [
        metric.sentence_score(sample, [other for j, other in enumerate(samples) if j != i]).score
        for i, sample in enumerate(samples)
    ]
    return float(np.mean(scores))


def mean_self_bleu(groups: Sequence[Sequence[str]]) -> float:
    """:func:`self_bleu` averaged over prompts; ``groups[p]`` holds the samples for prompt p."""
    if not groups:
        raise ValueError("got no sample groups for Self-BLEU")
    return float(np.mean([self_bleu(samples) for samples in groups]))


def distinct_fraction(samples: Sequence[str]) -> float:
    """Number of distinct samples (exact string identity) divided by the number of samples."""
    if not samples:
        raise ValueError("got no samples")
    return len(set(samples)) / len(samples)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` [n]; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2  # mean of ranks start+1 .. end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share their mean rank).

    Returns NaN when either side is constant (correlation undefined). Raises ValueError on
    unequal lengths, empty input or NaN values.
    """
    x_values, y_values = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_values.shape != y_values.shape or x_values.ndim != 1:
        raise ValueError(
            f"spearman needs two 1-d sequences of equal length, got {x_values.shape} and {y_values.shape}"
        )
    if x_values.size == 0:
        raise ValueError("spearman got empty sequences")
    if np.isnan(x_values).any() or np.isnan(y_values).any():
        raise ValueError("spearman got NaN values, which have no rank")
    x_centred = _average_ranks(x_values) - (x_values.size + 1) / 2  # mean rank is (n + 1) / 2
    y_centred = _average_ranks(y_values) - (y_values.size + 1) / 2
    denominator = math.sqrt(float(x_centred @ x_centred) * float(y_centred @ y_centred))
    if denominator == 0.0:
        return float("nan")
    return float(x_centred @ y_centred) / denominator


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with n-1 over sqrt(n)); stderr is NaN for n = 1."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("mean_and_stderr got no values")
    if array.size == 1:
        return float(array[0]), float("nan")
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


def score_gap_at_matched_diversity(
    curve: Sequence[tuple[float, float]], baseline: Sequence[tuple[float, float]]
) -> Optional[tuple[float, float, float]]:
    """Mean task-score difference ``curve - baseline`` over the Self-BLEU range both cover.

    Each curve is ``(self_bleu, score)`` points of one run's sampling sweep (e.g. its
    temperatures), joined by straight lines in Self-BLEU order. The result is the area between
    the two lines over the Self-BLEU interval where both are defined, divided by that
    interval's width: how much more (or, negative, less) the run scores than the baseline at
    the same diversity. Returns ``(gap, low, high)`` with the interval, or None when the
    curves' ranges do not overlap (or meet in a single point).
    """
    if len(curve) < 2 or len(baseline) < 2:
        raise ValueError("score_gap_at_matched_diversity needs at least 2 points per curve")
    xs_a, ys_a = zip(*sorted(curve))
    xs_b, ys_b = zip(*sorted(baseline))
    low, high = max(xs_a[0], xs_b[0]), min(xs_a[-1], xs_b[-1])
    if high <= low:
        return None
    # Both lines are linear between the union of their knots, so the trapezoid rule on that
    # union is exact.
    knots = np.unique([x for x in (*xs_a, *xs_b) if low <= x <= high] + [low, high])
    difference = np.interp(knots, xs_a, ys_a) - np.interp(knots, xs_b, ys_b)
    area = float(np.sum((difference[1:] + difference[:-1]) / 2 * np.diff(knots)))
    return area / (high - low), float(low), float(high)
