"""Confidence intervals for evaluation metrics: Wilson score intervals and percentile bootstraps.

* :func:`wilson_interval` is the interval for a binomial proportion (refusal rates, accuracies over
  independent items): Wilson (1927), the interval recommended by Brown, Cai and DasGupta (2001) over
  the normal ("Wald") one, which collapses to a point at 0 and 1. With ``z`` the normal quantile,
  ``p = k / n``::

      centre = (p + z^2 / 2n) / (1 + z^2 / n)
      half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

* :func:`bootstrap_interval` is the percentile bootstrap of a mean (Efron & Tibshirani 1993, ch. 13)
  for per-item values that are not 0/1 (per-row NLL, per-prompt KL): resample the items with
  replacement ``n_resamples`` times and take the ``alpha/2`` and ``1 - alpha/2`` quantiles of the
  resampled means. Seeded, so the same values give the same interval.

:class:`Estimate` carries a value with its interval, the number of items and the method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

METHODS = ("wilson", "bootstrap", "none")


@dataclass(frozen=True)
class Estimate:
    """A metric value with its 95% interval.

    Attributes:
        value: the point estimate (a mean over items).
        low, high: interval bounds (equal to ``value`` when ``method == "none"``).
        n: number of items the value is a mean over.
        method: ``"wilson"`` (0/1 outcomes), ``"bootstrap"`` (other per-item values) or ``"none"``.
    """

    value: float
    low: float
    high: float
    n: int
    method: str

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        if self.n < 0:
            raise ValueError(f"n={self.n} must be >= 0.")

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain-dict form (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Estimate:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["value"]), float(d["low"]), float(d["high"]), int(d["n"]), str(d["method"]))


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be strictly between 0 and 1, e.g. 0.95.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n`` Bernoulli trials (module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer (the number of trials).")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes!r} must be between 0 and n={n}.")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    values: Sequence[float],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (module docstring)."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("values must hold at least one value to bootstrap.")
    if not np.all(np.isfinite(data)):
        raise ValueError("values must all be finite to bootstrap (found nan or inf).")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r} must be a positive integer.")
    _z(confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_resamples, data.size))
    means = data[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def estimate(
    values: Sequence[float], *, binary: bool | None = None, seed: int = 0, confidence: float = 0.95
) -> Estimate:
    """The mean of per-item ``values`` with a Wilson interval (0/1 outcomes) or a bootstrap one.

    ``binary=None`` picks Wilson when every value is 0 or 1; ``binary=True`` insists on it (and
    refuses other values), ``binary=False`` always bootstraps. One non-binary item gives
    ``method="none"`` (no spread to resample).
    """
    data = [float(v) for v in values]
    if not data:
        raise ValueError("values is empty: a metric needs at least one item.")
    mean = float(sum(data) / len(data))
    is01 = all(v in (0.0, 1.0) for v in data)
    if binary and not is01:
        raise ValueError("binary=True but values are not all 0 or 1.")
    if is01 if binary is None else binary:
        low, high = wilson_interval(int(sum(data)), len(data), confidence)
        return Estimate(mean, low, high, len(data), "wilson")
    if len(data) == 1:
        return Estimate(mean, mean, mean, 1, "none")
    low, high = bootstrap_interval(data, seed=seed, confidence=confidence)
    return Estimate(mean, low, high, len(data), "bootstrap")
