"""PNG plots of evaluation results: the task-score vs diversity trade-off, and extracted returns vs score.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module
neither changes the global backend nor needs a display, and no figure outlives its call.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_irl.evaluation.metrics import spearman as spearman_rho


@dataclasses.dataclass(frozen=True)
class TradeoffPoint:
    """One decoding setting of one run: exactly one of ``temperature`` and ``beam_size`` is set."""

    label: str  # run label, e.g. "IQ-Learn lambda=0.1" or "MLE"; one marker series each
    score: float  # task score (accuracy, ROUGE, BLEU, ...)
    self_bleu: float  # Self-BLEU, 0-100; lower = more diverse
    temperature: Optional[float] = None
    beam_size: Optional[int] = None

    def __post_init__(self):
        if (self.temperature is None) == (self.beam_size is None):
            raise ValueError(
                f"trade-off point of run {self.label!r} needs exactly one of temperature and beam_size, "
                f"got temperature={self.temperature}, beam_size={self.beam_size}"
            )

    @property
    def setting(self) -> str:
        """Annotation text: ``"T=0.7"`` or ``"beam=4"``."""
        return f"T={self.temperature:g}" if self.temperature is not None else f"beam={self.beam_size}"


def _as_point(point: TradeoffPoint | Mapping) -> TradeoffPoint:
    if isinstance(point, TradeoffPoint):
        return point
    fields = {field.name for field in dataclasses.fields(TradeoffPoint)}
    unknown = set(point) - fields
    if unknown:
        raise ValueError(
            f"trade-off point has unknown keys {sorted(unknown)}; expected keys from {sorted(fields)}"
        )
    return TradeoffPoint(**point)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)  # attaches itself to the figure
    figure.savefig(path, format="png", dpi=120)
    return path


def plot_score_vs_self_bleu(
    points: Iterable[TradeoffPoint | Mapping],
    path: str | Path,
    title: str = "Task score vs diversity",
    score_label: str = "task score",
) -> Path:
    """Scatter task score (y) against Self-BLEU (x) for every run and decoding setting; returns ``path``.

    ``points`` are :class:`TradeoffPoint` or mappings with its fields (``label``, ``score``,
    ``self_bleu`` and ``temperature`` or ``beam_size``). Each run label gets one marker series
    (its temperatures joined by a line), each point annotated with its setting. Better runs sit
    up and to the left.
    """
    points = [_as_point(point) for point in points]
    if not points:
        raise ValueError("plot_score_vs_self_bleu got no points")
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    markers = "osD^v<>ph*"
    labels = list(dict.fromkeys(point.label for point in points))  # first-seen order
    for index, label in enumerate(labels):
        run = [point for point in points if point.label == label]
        # A line joins the temperature sweep in temperature order; beam-search points are not on
        # that axis, so they share the run's marker and colour without a line.
        sweep = sorted((p for p in run if p.temperature is not None), key=lambda p: p.temperature)
        beams = [p for p in run if p.beam_size is not None]
        marker = markers[index % len(markers)]
        (line,) = axes.plot(
            [p.self_bleu for p in sweep], [p.score for p in sweep], marker=marker, linewidth=0.8, label=label
        )
        axes.plot(
            [p.self_bleu for p in beams], [p.score for p in beams],
            marker=marker, linestyle="none", color=line.get_color(),
        )
        for p in run:
            axes.annotate(
                p.setting, (p.self_bleu, p.score), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    axes.set_xlabel("Self-BLEU (lower = more diverse)")
    axes.set_ylabel(score_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_return_vs_score(
    returns: Sequence[float],
    scores: Sequence[float],
    path: str | Path,
    spearman: Optional[float] = None,
    score_label: str = "task score",
) -> Path:
    """Scatter per-sample task score (y) against the sample's extracted return ``R = sum_t r_t`` (x).

    The title shows Spearman's rho, computed from the data when ``spearman`` is None. Returns ``path``.
    """
    if len(returns) != len(scores):
        raise ValueError(f"got {len(returns)} returns but {len(scores)} scores")
    if not returns:
        raise ValueError("plot_return_vs_score got no points")
    rho = spearman_rho(returns, scores) if spearman is None else spearman
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    axes.scatter(returns, scores, s=12, alpha=0.6)
    axes.set_xlabel("return (sum of extracted per-token rewards)")
    axes.set_ylabel(score_label)
    axes.set_title("Spearman rho = " + ("undefined (constant input)" if math.isnan(rho) else f"{rho:.3f}"))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_curves(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    path: str | Path,
    xlabel: str = "iteration",
) -> Path:
    """Line plots side by side: ``panels[y_label][series_label]`` is that series' ``(x, y)``
    points (e.g. a validation metric per training iteration, one series per method)."""
    if not panels:
        raise ValueError("plot_curves got no panels")
    figure = Figure(figsize=(5.2 * len(panels), 4.2))
    for index, (ylabel, series) in enumerate(panels.items(), start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for label, points in series.items():
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3,
                      linewidth=0.9, label=label)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)
