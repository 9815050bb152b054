"""Nested bootstrap over pretraining seeds, training seeds and prompts (issue 11 §3).

Every arena number is a grand mean of per-prompt outcomes over a grid of runs: pretraining seeds
``p`` (the lab model is rebuilt per seed; a real model has one), training seeds ``s`` within each,
and prompts within each run. Its 95% interval comes from a three-level nested bootstrap: resample
pretraining seeds, then training seeds within each drawn pretraining seed, then prompts within each
drawn run (independently per draw), and take the mean of the resampled grid. The percentile
interval of those replicates is reported.

The resampling indices are held by a :class:`BootstrapPlan` and shared by every method and metric
with the same shape, so differences and ratios between methods are *paired*: computed replicate by
replicate from the same seeds and prompts. Each metric (stratum) draws its prompt indices from its
own stream, so two tasks' prompt draws are independent.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Grid = np.ndarray
"""Per-prompt outcomes as an array of shape (pretraining seeds, training seeds, prompts)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% bootstrap interval.

    Attributes:
        value: the grand mean (point estimate, not the bootstrap mean).
        low, high: 2.5th and 97.5th percentiles of the bootstrap replicates.
        n: number of per-prompt outcomes behind the estimate (all runs together).
    """

    value: float
    low: float
    high: float
    n: int = 0

    def to_dict(self) -> dict[str, float | int]:
        """Plain-JSON form."""
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, float | int]) -> Interval:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["value"]), float(d["low"]), float(d["high"]), int(d.get("n", 0)))

    def excludes_zero(self) -> int:
        """+1 if the interval lies above zero, -1 if below, 0 if it contains zero."""
        if self.low > 0:
            return 1
        if self.high < 0:
            return -1
        return 0

    def fmt(self, spec: str = "+.3f") -> str:
        """``+0.123 [+0.050, +0.200]``; ``n/a`` for a missing value."""
        if not math.isfinite(self.value):
            return "n/a"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def as_grid(cells: Sequence[Sequence[Sequence[float]]], name: str = "values") -> Grid:
    """Stack nested lists ``[pretraining seed][training seed][prompt]`` into a (P, S, N) array.

    Raises:
        ValueError: if the grid is empty or ragged (every run must score the same prompts), naming ``name``.
    """
    if not cells or not all(cells):
        raise ValueError(f"{name}: empty grid; every pretraining seed needs at least one run.")
    sizes = {len(s) for s in cells}
    prompts = {len(run) for s in cells for run in s}
    if len(sizes) != 1 or len(prompts) != 1:
        raise ValueError(
            f"{name}: ragged grid (training seeds per pretraining seed {sorted(sizes)}, prompts per run "
            f"{sorted(prompts)}); run every method at the same seeds on the same prompts."
        )
    if 0 in prompts:
        raise ValueError(f"{name}: runs with no prompts; check the evaluation limit.")
    return np.asarray(cells, dtype=np.float64)


@dataclass
class BootstrapPlan:
    """Shared resampling indices for nested bootstrap replicates of (P, S, N) grids.

    Args:
        pretrain_seeds: P, number of pretraining seeds in every grid.
        train_seeds: S, training seeds per pretraining seed.
        replicates: B, bootstrap replicates.
        seed: seed of the seed-level draws; each stratum's prompt draws are seeded from it and
            the stratum's name.
    """

    pretrain_seeds: int
    train_seeds: int
    replicates: int = 2000
    seed: int = 0
    _prompt_idx: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.pretrain_seeds < 1 or self.train_seeds < 1 or self.replicates < 10:
            raise ValueError(
                f"BootstrapPlan(pretrain_seeds={self.pretrain_seeds}, train_seeds={self.train_seeds}, "
                f"replicates={self.replicates}): need >= 1 seed at each level and >= 10 replicates."
            )
        rng = np.random.default_rng(self.seed)
        B, P, S = self.replicates, self.pretrain_seeds, self.train_seeds
        # level 1: which pretraining seed fills each of the P slots; level 2: which training seed
        # fills each of the S sub-slots of each slot (a single seed level is not resampled).
        self.p_idx = rng.integers(0, P, size=(B, P)) if P > 1 else np.zeros((B, P), dtype=np.int64)
        self.s_idx = rng.integers(0, S, size=(B, P, S)) if S > 1 else np.zeros((B, P, S), dtype=np.int64)

    def _prompts(self, stratum: str, n: int) -> np.ndarray:
        key = (stratum, n)
        if key not in self._prompt_idx:
            digest = hashlib.sha256(f"{self.seed}:{stratum}:{n}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            shape = (self.replicates, self.pretrain_seeds, self.train_seeds, n)
            self._prompt_idx[key] = rng.integers(0, n, size=shape)
        return self._prompt_idx[key]

    def replicates_of(self, grid: Grid, stratum: str) -> np.ndarray:
        """Bootstrap replicates (shape (B,)) of the grand mean of ``grid`` (P, S, N).

        Each drawn run's prompts are resampled with their own indices (a fresh draw per slot), so
        a run drawn twice contributes two independent prompt resamples, as nested resampling asks.
        """
        grid = np.asarray(grid, dtype=np.float64)
        P, S, N = grid.shape
        if (self.pretrain_seeds, self.train_seeds) != (P, S):
            raise ValueError(
                f"{stratum}: grid has {P} pretraining x {S} training seeds, the plan {self.pretrain_seeds} x "
                f"{self.train_seeds}; every method must run at the same seeds."
            )
        pi = self.p_idx[:, :, None, None]
        si = self.s_idx[:, :, :, None]
        ni = self._prompts(stratum, N)
        return grid[pi, si, ni].mean(axis=(1, 2, 3))

    def interval(self, grid: Grid, stratum: str) -> Interval:
        """Point estimate and 95% percentile interval of the grand mean of ``grid``."""
        return summarise(float(np.mean(grid)), self.replicates_of(grid, stratum), n=int(np.size(grid)))


def summarise(value: float, replicates: np.ndarray, n: int = 0) -> Interval:
    """An :class:`Interval` from a point estimate and its bootstrap replicates (NaNs dropped)."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0 or not math.isfinite(value):
        return Interval(float(value), math.nan, math.nan, n)
    low, high = np.percentile(reps, [2.5, 97.5])
    return Interval(float(value), float(low), float(high), n)


def ratio(
    num_value: float, num_reps: np.ndarray, den_value: float, den_reps: np.ndarray, n: int = 0
) -> Interval:
    """Interval of ``num / den`` from paired replicates (replicates with a zero denominator dropped)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = np.where(den_reps != 0, num_reps / den_reps, np.nan)
    value = num_value / den_value if den_value != 0 else math.nan
    return summarise(value, reps, n)


def combine(
    parts: Sequence[tuple[float, np.ndarray]], fn: Callable[[Sequence[np.ndarray]], np.ndarray], n: int = 0
) -> Interval:
    """Interval of a function of several paired estimates: ``fn`` maps values and replicates alike."""
    value = float(fn([np.asarray(v, dtype=np.float64) for v, _ in parts]))
    reps = fn([r for _, r in parts])
    return summarise(value, reps, n)
