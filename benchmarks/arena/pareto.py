"""Pareto fronts and interval-based dominance verdicts between methods (issue 11 §3).

A method is a point (with 95% intervals) in each objective plane: (refusal gain, capability
change) and (refusal, over-refusal). The *front* is the set of methods whose point estimates no
other method beats in both coordinates. The *verdict* of one of ours against a baseline uses the
paired bootstrap intervals of the differences, objective by objective, oriented so that positive
means "ours is better":

* ``dominates``: no objective significantly worse and at least one significantly better;
* ``dominated``: no objective significantly better and at least one significantly worse;
* ``crosses``: significantly better on one objective and significantly worse on another;
* ``indistinguishable``: every difference's interval contains zero.

"Significantly" means the 95% interval of the difference excludes zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .stats import Interval

VERDICTS = ("dominates", "dominated", "crosses", "indistinguishable")


@dataclass(frozen=True)
class Objective:
    """A metric key of the per-method summary and whether larger is better."""

    key: str
    label: str
    maximise: bool = True


PLANES: dict[str, tuple[Objective, Objective]] = {
    "gain_vs_capability": (
        Objective("refusal_gain", "refusal gain (held-out harmful)"),
        Objective("capability_change", "capability change (mean over tasks)"),
    ),
    "refusal_vs_over_refusal": (
        Objective("refusal", "refusal rate (held-out harmful)"),
        Objective("over_refusal_lookalike", "over-refusal rate (benign look-alikes)", maximise=False),
    ),
}
"""The two planes issue 11 §3 asks for; the second uses the look-alike set (the sharper test)."""

VERDICT_OBJECTIVES: tuple[Objective, ...] = (
    Objective("refusal_gain", "refusal gain"),
    Objective("capability_change", "capability change"),
    Objective("over_refusal_lookalike_change", "look-alike over-refusal change", maximise=False),
)
"""Objectives of the overall verdict: safety gained, capability kept, over-refusal avoided."""


def dominates_point(a: Sequence[float], b: Sequence[float], maximise: Sequence[bool]) -> bool:
    """Whether point ``a`` Pareto-dominates ``b``: no worse everywhere, strictly better somewhere."""
    better = [(x > y) if m else (x < y) for x, y, m in zip(a, b, maximise, strict=True)]
    worse = [(x < y) if m else (x > y) for x, y, m in zip(a, b, maximise, strict=True)]
    return any(better) and not any(worse)


def pareto_front(points: Mapping[str, Sequence[float]], maximise: Sequence[bool]) -> list[str]:
    """Names of the non-dominated points, sorted by the first coordinate."""
    front = [
        name
        for name, p in points.items()
        if not any(dominates_point(q, p, maximise) for other, q in points.items() if other != name)
    ]
    return sorted(front, key=lambda n: points[n][0])


def verdict(differences: Mapping[str, Interval]) -> str:
    """One of :data:`VERDICTS` from per-objective differences oriented so that > 0 favours ours."""
    signs = [d.excludes_zero() for d in differences.values()]
    if not signs:
        raise ValueError("verdict: no objectives to compare; pass at least one difference.")
    if any(s > 0 for s in signs) and any(s < 0 for s in signs):
        return "crosses"
    if any(s > 0 for s in signs):
        return "dominates"
    if any(s < 0 for s in signs):
        return "dominated"
    return "indistinguishable"


def evidence(differences: Mapping[str, Interval]) -> str:
    """The differences behind a verdict, as text (positive favours ours)."""
    return "; ".join(f"{k} {d.fmt()}" for k, d in differences.items())


def plot_plane(
    summaries: Mapping[str, Mapping[str, Interval]],
    plane: str,
    path: Path,
    ours: Sequence[str] = (),
    title: str = "",
) -> Path:
    """Scatter every method in a plane with its 95% intervals as error bars; the front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_obj, y_obj = PLANES[plane]
    names = [n for n, s in summaries.items() if x_obj.key in s and y_obj.key in s]
    fig, ax = plt.subplots(figsize=(6.8, 5.0))
    for name in names:
        x, y = summaries[name][x_obj.key], summaries[name][y_obj.key]
        ax.errorbar(
            x.value,
            y.value,
            xerr=[[x.value - x.low], [x.high - x.value]],
            yerr=[[y.value - y.low], [y.high - y.value]],
            fmt="s" if name in ours else "o",
            capsize=3,
            label=name,
        )
        ax.annotate(name, (x.value, y.value), textcoords="offset points", xytext=(5, 4), fontsize=7)
    points = {n: (summaries[n][x_obj.key].value, summaries[n][y_obj.key].value) for n in names}
    front = pareto_front(points, (x_obj.maximise, y_obj.maximise))
    if len(front) > 1:
        ax.plot(
            [points[n][0] for n in front],
            [points[n][1] for n in front],
            "--",
            color="gray",
            lw=0.8,
            label="Pareto front (point estimates)",
        )
    ax.set_xlabel(x_obj.label + ("" if x_obj.maximise else " (lower is better)"))
    ax.set_ylabel(y_obj.label + ("" if y_obj.maximise else " (lower is better)"))
    ax.set_title(title or plane, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
