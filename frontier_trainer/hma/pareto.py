"""Two-dimensional Pareto fronts and hypervolume, for comparing merges (safety vs capability).

Both coordinates are maximised (e.g. refusal rate and mean capability accuracy). Used by the
HMA-versus-uniform comparison in ``make demo`` and ``benchmarks/hma_benchmark.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points (both coordinates maximised), sorted by the first."""
    pts = sorted(set(points), key=lambda p: (-p[0], -p[1]))
    front, best = [], -math.inf
    for x, y in pts:
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by ``points`` above ``ref`` (2-D, both coordinates maximised).

    Sweeps the front from the right: each point adds the strip between its x and the next x to
    its left, at the height of the best y seen so far (y grows leftwards along a front).
    """
    front = sorted((p for p in pareto(points) if p[0] > ref[0] and p[1] > ref[1]), key=lambda p: -p[0])
    xs = [p[0] for p in front] + [ref[0]]
    area, best_y = 0.0, ref[1]
    for i, (_, y) in enumerate(front):
        best_y = max(best_y, y)
        area += (front[i][0] - xs[i + 1]) * (best_y - ref[1])
    return area
