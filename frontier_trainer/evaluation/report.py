"""The evaluation :class:`Report`: flat metrics with intervals, per-item samples, judge agreement, provenance.

Metric names are flat strings (``"safety/refusal"``, ``"capability/arc_easy"``, ``"nll/gsm8k"``,
``"kl_to_base"``); ``samples`` holds the per-item outcomes behind each metric under the same key, so a
caller can pool items over several runs (seeds) and bootstrap over prompts and seeds together.

:meth:`Report.write` writes ``report.json`` (everything, :meth:`Report.to_dict`) and ``report.csv``
(one row per metric: ``metric,value,low,high,n,method``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frontier_trainer.evaluation.stats import Estimate

FORMAT_VERSION = 1
CSV_FIELDS = ("metric", "value", "low", "high", "n", "method")


@dataclass
class Report:
    """What :func:`frontier_trainer.evaluation.evaluate_model` returns.

    Attributes:
        metrics: metric name -> :class:`Estimate`.
        samples: metric name -> per-item values (0/1 refusals, per-document accuracy, per-row NLL,
            per-prompt KL), same keys as ``metrics`` (pooled metrics such as ``safety/over_refusal``
            hold the concatenation of their parts).
        judge: the refusal judge's measured agreement with labelled responses
            (``accuracy``, ``precision``, ``recall``, ``n`` and where they come from).
        provenance: suite, split, sizes, data SHA-256s, package versions, model fingerprint, timing.
    """

    metrics: dict[str, Estimate]
    samples: dict[str, list[float]] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        extra = sorted(set(self.samples) - set(self.metrics))
        if extra:
            raise ValueError(
                f"samples has keys {extra} that are not in metrics; every sample needs a metric."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inverse: :meth:`from_dict`)."""
        return {
            "format_version": FORMAT_VERSION,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "samples": {k: [float(x) for x in v] for k, v in self.samples.items()},
            "judge": self.judge,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output (or a loaded ``report.json``)."""
        if "metrics" not in d:
            raise ValueError("report dict has no 'metrics' field; pass the output of Report.to_dict().")
        return cls(
            metrics={k: Estimate.from_dict(v) for k, v in d["metrics"].items()},
            samples={k: [float(x) for x in v] for k, v in d.get("samples", {}).items()},
            judge=dict(d.get("judge", {})),
            provenance=dict(d.get("provenance", {})),
        )

    @classmethod
    def read(cls, path: str | Path) -> Report:
        """Load a ``report.json`` (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"report file {path} does not exist; pass a report.json or its directory."
            )
        return cls.from_dict(json.loads(path.read_text()))

    def write(self, out_dir: str | Path) -> Path:
        """Write ``report.json`` and ``report.csv`` into ``out_dir`` (created); return the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")
        with open(out / "report.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for name, est in self.metrics.items():
                writer.writerow({"metric": name, **est.to_dict()})
        return out

    def table(self) -> str:
        """A fixed-width text table: metric, value, 95% interval, n, method; then the judge's agreement."""
        width = max([len("metric"), *(len(k) for k in self.metrics)])
        lines = [f"{'metric':<{width}}  {'value':>8}  {'95% interval':>19}  {'n':>5}  method"]
        lines.append("-" * len(lines[0]))
        for name, est in self.metrics.items():
            interval = f"[{_fmt(est.low)}, {_fmt(est.high)}]"
            lines.append(f"{name:<{width}}  {_fmt(est.value):>8}  {interval:>19}  {est.n:>5}  {est.method}")
        if self.judge:
            keys = ("accuracy", "precision", "recall", "n")
            parts = [
                f"{k} {_fmt(self.judge[k]) if k != 'n' else self.judge[k]}" for k in keys if k in self.judge
            ]
            lines.append(f"refusal judge vs labels: {', '.join(parts)} ({self.judge.get('source', '')})")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4f}"


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
