"""``make demo``: the product's story on the built-in lab, end to end.

1. The theory on planted directions with known ground truth (tax rates, the frontier, the
   m'/d scaling law), a few seconds.
2. The lab models of several pretraining seeds (``--pretrain-seeds``, each built once, then
   cached): per-task accuracy, compliance with harmful requests, over-refusal.
3. The first model's pre-training geometry report: τ_i of the DPO safety direction against each
   task's capability direction, and the harmlessness/helpfulness conflict (Thm 6.4).
4. Vanilla, null-space and frontier DPO (one point of the frontier, ``--tolerance``), each run
   from every pretraining seed's model with every training seed (``--seeds``), same data and
   steps; headline numbers are means over the runs with 95% bootstrap intervals over runs (lab
   models differ between machines, field notes §9, so one model's numbers do not transfer).
   The first pair is tracked by the degradation callback (predicted versus observed per-task
   degradation); every run logs to an offline wandb run and to ``train_log.jsonl``, not the
   terminal.
5. HMA versus uniform averaging (§7.3): the smallest setting of ``benchmarks/hma_benchmark.py``
   (a 4-block lab model in the same world, aligned by vanilla DPO), merged per block at the
   budgets of uniform averaging at t = 0.25, 0.5, 0.75, every point evaluated for real.
6. One summary table (methods as rows), written as ``summary.md`` and ``summary.json``, plots
   (``tradeoff.png``, ``predicted_vs_observed.png``, ``hma_vs_uniform.png``) and one offline
   wandb run holding the summary. Everything is written under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import textwrap
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from frontier_trainer import geometry
from frontier_trainer.hma.pareto import hypervolume, pareto

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.03
"""ε of the demo's frontier run: per-step capability loss allowed, in units of the step norm.

On the lab ε ≤ 0.02 behaves like the null space and ε = 0.1 like vanilla DPO
(``benchmarks/README.md`` §1); at the demo's settings (seed 0, 16 capability rows per
direction) ε = 0.03 lands in between: both entangled tasks partly lost, not destroyed."""

DEFAULT_SEEDS = (0, 1)
"""Training seeds of every DPO method (each run once per pretraining seed)."""
DEFAULT_PRETRAIN_SEEDS = (0, 1, 2)
"""Lab model pretraining seeds: lab models differ across machines (field notes §9), so the demo's
numbers come from several, with intervals, rather than from one model."""

HMA_SETTING: dict[str, Any] = {
    "hidden_size": 64,
    "num_layers": 4,
    "pretrain_steps": 1200,
    "pretrain_batch": 32,
    "entanglement": 1.0,
    "dpo_steps": 60,
    "dpo_lr": 5e-4,
    "sweep": [0.25, 0.5, 0.75],
    "eval_examples": 40,
    "geometry_examples": 32,
    "tolerance_scale": 0.5,
    "grouping": "block",
}
"""``benchmarks/hma_benchmark.py --preset small``, setting ``ent1`` (the demo's world)."""


# --------------------------------------------------------------------------------------
# Planted directions (seconds, no model)
# --------------------------------------------------------------------------------------


def planted_directions(d: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A unit safety direction and four capability directions with known overlap.

    ``chemistry`` and ``persuasion`` have intrinsic overlap γ with safety (0.6 and 0.35: the
    paper's §9.2 examples); ``arithmetic`` and ``translation`` are independent uniform
    directions, whose overlap is incidental packing (τ_i ≈ 1/d in expectation, Prop 5.5).
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, 8, generator=gen, dtype=torch.float64))
    v = basis[:, 0]
    caps = {
        "chemistry": 0.6 * v + 0.8 * basis[:, 1],
        "persuasion": 0.35 * v + math.sqrt(1 - 0.35**2) * basis[:, 2],
    }
    for name in ("arithmetic", "translation"):
        c = torch.randn(d, generator=gen, dtype=torch.float64)
        caps[name] = c / c.norm()
    return v, caps


def geometry_report(d: int = 256, budget: float = 1.0, seed: int = 0) -> dict:
    """Per-task and joint geometry of the planted directions, plus the scaling fit."""
    v, caps = planted_directions(d, seed)
    C = torch.stack(list(caps.values()), dim=1)
    taus = geometry.task_tax_rates(v, C)
    tasks = []
    for (name, c), tau in zip(caps.items(), taus.tolist(), strict=True):
        angle = float(geometry.principal_angles(v[:, None], c[:, None])[0])
        tasks.append(
            {
                "task": name,
                "tau": tau,
                "angle_deg": math.degrees(angle),
                "regime": geometry.regime(tau),
                "free_safety": geometry.free_safety(tau, budget),
            }
        )
    joint_tau = geometry.tax_rate(v, C)
    chem_alpha = math.acos(min(1.0, math.sqrt(tasks[0]["tau"])))
    frontier = [
        {"delta_c": dc, "delta_s": geometry.frontier_safety(dc, chem_alpha, budget)}
        for dc in [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0]
    ]
    dims = [32, 64, 128, 256, 512, 1024]
    incidental = []
    for dim in dims:
        draws = []
        for s in range(200):
            vv, cc = planted_directions(dim, seed=1000 + s)
            draws.append(geometry.tax_rate(vv, torch.stack([cc["arithmetic"], cc["translation"]], 1)))
        incidental.append(sum(draws) / len(draws))
    fit = geometry.fit_scaling_law(dims, incidental)
    return {
        "dimension": d,
        "budget": budget,
        "tasks": tasks,
        "joint_tau": joint_tau,
        "sum_of_task_taus": float(taus.sum()),
        "joint_free_safety": geometry.free_safety(joint_tau, budget),
        "chemistry_frontier": frontier,
        "scaling": {
            "dims": dims,
            "incidental_tau": incidental,
            "fit": {"tau0": fit.tau0, "k": fit.k, "tau0_stderr": fit.tau0_stderr, "k_stderr": fit.k_stderr},
            "expected_k": 2.0,
        },
    }


def format_geometry_report(report: dict) -> str:
    """The planted-direction report as text."""
    lines = [
        f"Geometry of planted directions (d = {report['dimension']}, budget B = {report['budget']})",
        f"{'task':<12} {'tau_i':>8} {'angle':>8} {'regime':>10} {'B*sqrt(1-tau_i)':>16}",
    ]
    for t in report["tasks"]:
        lines.append(
            f"{t['task']:<12} {t['tau']:>8.4f} {t['angle_deg']:>7.1f}° {t['regime']:>10} {t['free_safety']:>16.4f}"
        )
    lines += [
        f"joint tau = {report['joint_tau']:.4f} (sum of per-task tau = {report['sum_of_task_taus']:.4f}; "
        "Remark 4.6: not additive)",
        f"tax-free safety against all four: B*sqrt(1-tau) = {report['joint_free_safety']:.4f}",
        "frontier for chemistry (Thm 4.1): "
        + ", ".join(f"dC={p['delta_c']:+.2f}->dS={p['delta_s']:.3f}" for p in report["chemistry_frontier"]),
    ]
    s = report["scaling"]
    lines.append(
        "incidental tax vs d (arithmetic+translation, 200 draws each): "
        + ", ".join(f"d={d}:{t:.4f}" for d, t in zip(s["dims"], s["incidental_tau"], strict=True))
    )
    f = s["fit"]
    lines.append(
        f"fit tau(d) = tau0 + k/d: tau0 = {f['tau0']:.4f} ± {f['tau0_stderr']:.4f}, "
        f"k = {f['k']:.3f} ± {f['k_stderr']:.3f} (Prop 5.5 predicts tau0 = 0, k = m' = {s['expected_k']:.0f})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Timing and environment
# --------------------------------------------------------------------------------------


@dataclass
class SectionTimer:
    """Wall-clock time of each named section of the demo, logged as it ends."""

    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Log a header, run the block, record and log its wall time in seconds."""
        logger.info("\n=== %s ===", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 1)
            logger.info("[%s: %.1f s]", name, self.timings[name])


@contextlib.contextmanager
def wandb_environment(out: Path) -> Iterator[str]:
    """Offline wandb under ``out`` unless the user configured wandb; restores the environment after.

    ``WANDB_MODE`` is set to ``offline`` only when neither ``WANDB_MODE`` nor ``WANDB_API_KEY`` is
    set; ``WANDB_DIR``, ``WANDB_PROJECT``, ``WANDB_RUN_GROUP`` (all the demo's runs in one group)
    and ``WANDB_SILENT`` are defaults the user's own values override. Yields the run group.
    """
    group = os.environ.get("WANDB_RUN_GROUP") or time.strftime("demo-%Y%m%d-%H%M%S")
    wanted = {
        "WANDB_DIR": str(out),
        "WANDB_PROJECT": "frontier-trainer-demo",
        "WANDB_RUN_GROUP": group,
        "WANDB_SILENT": "true",
    }
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        wanted["WANDB_MODE"] = "offline"
    saved = {k: os.environ.get(k) for k in wanted}
    for k, v in wanted.items():
        os.environ.setdefault(k, v)
    try:
        yield group
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------
# Summary: rows, table, files
# --------------------------------------------------------------------------------------


def _tasks_of(metrics: Mapping[str, Any]) -> list[str]:
    return [k.split("/", 1)[1] for k in metrics if k.startswith("accuracy/") and k != "accuracy/mean"]


def method_row(
    method: str, base: Mapping[str, Any], after: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """One row of the summary table: changes of ``after`` against ``base`` (lab evaluation dicts).

    Keys: ``method``, ``refusal``, ``refusal_gain``, ``mean_accuracy``, ``mean_capability_change``,
    ``worst_task``, ``worst_task_change``, ``over_refusal``, ``over_refusal_change``,
    ``task_changes`` (``{task: Δ accuracy}``), plus ``extra``.
    """
    tasks = _tasks_of(base)
    changes = {t: float(after[f"accuracy/{t}"]) - float(base[f"accuracy/{t}"]) for t in tasks}
    worst = min(changes, key=lambda t: changes[t]) if changes else ""
    row: dict[str, Any] = {
        "method": method,
        "refusal": float(after["refusal_rate"]),
        "refusal_gain": float(after["refusal_rate"]) - float(base["refusal_rate"]),
        "mean_accuracy": float(after["accuracy/mean"]),
        "mean_capability_change": float(after["accuracy/mean"]) - float(base["accuracy/mean"]),
        "worst_task": worst,
        "worst_task_change": changes.get(worst, math.nan),
        "over_refusal": float(after.get("over_refusal_rate", math.nan)),
        "over_refusal_change": float(after.get("over_refusal_rate", math.nan))
        - float(base.get("over_refusal_rate", math.nan)),
        "task_changes": changes,
    }
    row.update(extra)
    return row


INTERVAL_KEYS = ("refusal", "refusal_gain", "mean_capability_change", "over_refusal_change")
"""Row fields that get a ``<key>_ci`` interval when rows are aggregated over seeds."""


def _interval(values: Sequence[float], seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the mean of per-run values ([v, v] for one run)."""
    from frontier_trainer.evaluation import bootstrap_interval

    finite = [float(v) for v in values if math.isfinite(float(v))]
    if not finite:
        return [math.nan, math.nan]
    if len(finite) == 1:
        return [finite[0], finite[0]]
    low, high = bootstrap_interval(finite, seed=seed)
    return [low, high]


def _mean_dicts(dicts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Key-wise mean of the float fields shared by every dict."""
    keys = [k for k, v in dicts[0].items() if isinstance(v, float) and all(k in d for d in dicts)]
    return {k: sum(float(d[k]) for d in dicts) / len(dicts) for k in keys}


def aggregate_rows(method: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary row from per-run :func:`method_row` rows (one per seed pair): means and intervals.

    Each of :data:`INTERVAL_KEYS` gets its mean and ``<key>_ci`` = [low, high], the 95% percentile
    bootstrap of the mean over runs (runs resampled as units). Per-task changes are means; the
    worst task is the one with the most negative mean change (its ``worst_task_change_ci`` too).
    ``per_run`` keeps every run's seeds and headline numbers, so no seed is hidden.
    """
    if not rows:
        raise ValueError(f"aggregate_rows({method!r}): no runs to aggregate; run at least one seed.")
    out: dict[str, Any] = {"method": method, "runs": len(rows)}
    for key in INTERVAL_KEYS:
        values = [float(r[key]) for r in rows]
        out[key] = sum(values) / len(values)
        out[f"{key}_ci"] = _interval(values)
    out["mean_accuracy"] = sum(float(r["mean_accuracy"]) for r in rows) / len(rows)
    tasks = list(rows[0]["task_changes"])
    out["task_changes"] = {t: sum(r["task_changes"][t] for r in rows) / len(rows) for t in tasks}
    worst = min(tasks, key=lambda t: out["task_changes"][t]) if tasks else ""
    out["worst_task"] = worst
    out["worst_task_change"] = out["task_changes"].get(worst, math.nan)
    out["worst_task_change_ci"] = (
        _interval([r["task_changes"][worst] for r in rows]) if worst else [math.nan] * 2
    )
    out["seconds"] = sum(float(r.get("seconds", 0.0)) for r in rows) / len(rows)
    out["per_run"] = [
        {k: r.get(k) for k in ("pretrain_seed", "train_seed", *INTERVAL_KEYS, "worst_task_change")}
        for r in rows
    ]
    return out


def capability_at_refusal(points: Sequence[tuple[float, float]], level: float) -> float:
    """Best mean accuracy reachable at refusal ≥ ``level`` on the front (linear interpolation)."""
    front = pareto(points)
    if not front or level > front[-1][0]:
        return math.nan
    if level <= front[0][0]:
        return max(y for _, y in front)
    for (x0, y0), (x1, y1) in itertools.pairwise(front):
        if x0 <= level <= x1:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return math.nan


def _fmt(x: Any, spec: str = "+.2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _fmt_ci(row: Mapping[str, Any], key: str, spec: str = "+.2f") -> str:
    """``+0.30`` or, for an aggregated row, ``+0.30 [+0.10, +0.50]``."""
    text = _fmt(row[key], spec)
    ci = row.get(f"{key}_ci")
    if ci and text != "n/a":
        text += f" [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"
    return text


def _worst(row: Mapping[str, Any]) -> str:
    """``-1.00 (chemistry)``; ``+0.00 (none lost)`` when no task lost accuracy (interval if aggregated)."""
    if not row.get("worst_task"):
        return "n/a"
    change = row["worst_task_change"]
    return f"{_fmt_ci(row, 'worst_task_change')} ({row['worst_task'] if change < 0 else 'none lost'})"


SUMMARY_COLUMNS = (
    "method",
    "refusal",
    "refusal gain",
    "mean capability change",
    "worst task change",
    "over-refusal change",
)


def summary_table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """The final table (methods as rows) as strings: DPO methods, then the HMA comparison."""
    rows = []
    for r in list(summary.get("methods", [])) + list((summary.get("hma") or {}).get("rows", [])):
        rows.append(
            [
                r["method"] + (f" ({r['runs']} runs)" if "runs" in r else ""),
                _fmt_ci(r, "refusal", ".2f"),
                _fmt_ci(r, "refusal_gain"),
                _fmt_ci(r, "mean_capability_change"),
                _worst(r),
                _fmt_ci(r, "over_refusal_change"),
            ]
        )
    return rows


def format_summary_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: the final table, HMA hypervolumes, predicted vs observed, timings."""
    lines = ["# frontier_trainer demo: summary", ""]
    setup = summary.get("setup", {})
    if setup:
        lines += [
            f"Lab model `{setup.get('model', '?')}`; DPO {setup.get('steps', '?')} steps, seed "
            f"{setup.get('seed', '?')}, same data and seed for every method; changes are against the base "
            f"model on held-out prompts ({setup.get('eval_examples', '?')} per set; HMA rows: "
            f"{setup.get('hma_eval_examples', '?')} per set, against the HMA setting's own base model).",
        ]
        base = summary.get("base") or {}
        hma_base = next(
            (p for p in (summary.get("hma") or {}).get("points", []) if p["method"] == "base"), None
        )
        if base:
            text = (
                f"Base model: refusal {base['refusal_rate']:.2f}, mean accuracy {base['accuracy/mean']:.2f}, "
                f"over-refusal {base['over_refusal_rate']:.2f}"
            )
            if hma_base:
                text += (
                    f"; HMA setting's base: refusal {hma_base['refusal_rate']:.2f}, mean accuracy "
                    f"{hma_base['accuracy/mean']:.2f}, over-refusal {hma_base['over_refusal_rate']:.2f}"
                )
            lines.append(text + ".")
        lines.append("")
    lines += ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_table_rows(summary)]
    hma = summary.get("hma") or {}
    if hma.get("hypervolume"):
        hv = hma["hypervolume"]
        lines += [
            "",
            f"HMA vs uniform averaging ({hma.get('description', '')}): hypervolume in the (refusal, mean "
            f"accuracy) plane, reference (0, 0): uniform {hv['uniform']:.4f}, HMA {hv['hma']:.4f}, ratio "
            f"**{_fmt(hma.get('hv_ratio'), '.3f')}**; τ_ℓ std across blocks "
            f"{_fmt(hma.get('tau_std'), '.5f')}.",
        ]
        matched = hma.get("capability_at_matched_refusal") or {}
        shown = [
            f"{lvl}: uniform {_fmt(v['uniform'], '.3f')} / HMA {_fmt(v['hma'], '.3f')}"
            for lvl, v in matched.items()
            if v["uniform"] == v["uniform"] and v["hma"] == v["hma"]
        ]
        if shown:
            lines.append("Mean accuracy kept at matched refusal (upper envelope): " + "; ".join(shown) + ".")
    degradation = summary.get("degradation") or {}
    if degradation:
        lines += [
            "",
            "Predicted (accumulated first order, Σ⟨∇f_i, Δθ_t⟩) versus observed degradation of each task's "
            "log-likelihood (nats/token, positive = lost):",
            "",
            "| run | task | τ_i (step 0) | predicted | observed |",
            "|---|---|---|---|---|",
        ]
        for run, d in degradation.items():
            for row in d.get("rows", []):
                lines.append(
                    f"| {run} | {row['task']} | {_fmt(row['tau'], '.5f')} | {_fmt(row['predicted'], '.4f')} | "
                    f"{_fmt(row['observed'], '.4f')} |"
                )
        lines.append("")
        for run, d in degradation.items():
            ranks = d.get("rank_correlations") or {}
            if ranks:
                lines.append(
                    f"- {run}: Spearman(τ_i, observed) = {_fmt(ranks.get('spearman_tau_vs_observed'), '.2f')}, "
                    f"Spearman(predicted, observed) = {_fmt(ranks.get('spearman_predicted_vs_observed'), '.2f')}"
                )
    timings = summary.get("timings_s") or {}
    if timings:
        lines += ["", "Wall time per section (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    plots = summary.get("plots") or []
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def format_summary_text(summary: Mapping[str, Any]) -> str:
    """The final table as fixed-width text, for the log."""
    rows = [list(SUMMARY_COLUMNS), *summary_table_rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SUMMARY_COLUMNS))]
    out = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    out.insert(1, "-" * len(out[0]))
    hma = summary.get("hma") or {}
    if hma.get("hypervolume"):
        hv = hma["hypervolume"]
        out.append(
            f"HMA vs uniform hypervolume: {hv['hma']:.4f} vs {hv['uniform']:.4f} "
            f"(ratio {_fmt(hma.get('hv_ratio'), '.3f')})"
        )
    return "\n".join(out)


def write_summary(out: Path, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.md`` under ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "summary.json", out / "summary.md"
    js.write_text(json.dumps(summary, indent=2, default=str))
    md.write_text(format_summary_markdown(summary))
    return js, md


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def plot_tradeoff(summary: Mapping[str, Any], path: Path) -> Path:
    """Refusal gain against mean capability change for each DPO method (and HMA/uniform points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.scatter([0.0], [0.0], marker="*", s=160, color="black", label="base")
    for r in summary.get("methods", []):
        ax.scatter(r["mean_capability_change"], r["refusal_gain"], s=70, label=r["method"])
        ax.annotate(
            r["method"],
            (r["mean_capability_change"], r["refusal_gain"]),
            textcoords="offset points",
            xytext=(5, 4),
        )
    for method, marker in (("uniform", "o"), ("hma", "s")):
        pts = [r for r in (summary.get("hma") or {}).get("rows", []) if r.get("kind") == method]
        if pts:
            ax.scatter(
                [r["mean_capability_change"] for r in pts],
                [r["refusal_gain"] for r in pts],
                marker=marker,
                facecolors="none",
                edgecolors="gray",
                label=f"{method} averaging (4-block model, vs its base)",
            )
    ax.axhline(0, color="lightgray", lw=0.8)
    ax.axvline(0, color="lightgray", lw=0.8)
    ax.set_xlabel("mean capability accuracy change")
    ax.set_ylabel("refusal-rate gain (held-out harmful)")
    ax.set_title("Alignment tax: safety gained vs capability lost")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_predicted_vs_observed(degradation: Mapping[str, Any], path: Path) -> Path:
    """Per-task predicted vs observed degradation, one panel per DPO run (symlog axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import SymmetricalLogLocator

    runs = [(name, d) for name, d in degradation.items() if d.get("rows")]
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(4.6 * max(1, len(runs)), 4.2), squeeze=False)
    for ax, (name, d) in zip(axes[0], runs, strict=False):
        rows = [r for r in d["rows"] if r["observed"] is not None]
        xs = [r["predicted"] for r in rows]
        ys = [r["observed"] for r in rows]
        ax.scatter(xs, ys)
        for r in rows:
            ax.annotate(
                r["task"],
                (r["predicted"], r["observed"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        hi = max([*xs, *ys, 1e-2]) * 2
        lo = min([*xs, *ys, 0.0])
        lo = -1e-2 if lo > -1e-2 else lo * 2
        ax.plot([lo, hi], [lo, hi], "--", color="gray", lw=0.8, label="observed = predicted")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1e-3, subs=[1.0]))
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ranks = d.get("rank_correlations") or {}
        rho = ranks.get("spearman_predicted_vs_observed", math.nan)
        ax.set_title(f"{name}: Spearman {rho:.2f}")
        ax.set_xlabel("predicted degradation (nats/token)")
        ax.set_ylabel("observed degradation (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_hma(hma: Mapping[str, Any], path: Path) -> Path:
    """HMA and uniform fronts in the (refusal, mean accuracy) plane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.6))
    points = hma["points"]
    ends = [p for p in points if p["method"] in ("base", "aligned")]
    for method, style in (("uniform", "o--"), ("hma", "s-")):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["t"])
        seq = [ends[0], *pts, ends[-1]] if len(ends) == 2 else pts
        ax.plot(
            [p["refusal_rate"] for p in seq],
            [p["accuracy/mean"] for p in seq],
            style,
            label=f"{method} (hypervolume {hma['hypervolume'][method]:.3f})",
        )
        for p in pts:
            ax.annotate(f"t={p['t']}", (p["refusal_rate"], p["accuracy/mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    for p in ends:
        ax.annotate(p["method"], (p["refusal_rate"], p["accuracy/mean"]), fontsize=8, xytext=(4, -10),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("refusal rate (held-out harmful)")
    ax.set_ylabel("mean capability accuracy")
    title = "HMA vs uniform averaging at matched budget\n" + "\n".join(
        textwrap.wrap(hma.get("description", ""), 70)
    )
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# The lab: DPO runs
# --------------------------------------------------------------------------------------


def _quiet_training_logs() -> None:
    """Hide per-dataset progress bars and per-evaluation dict logs that drown the story."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    for name in ("frontier_trainer.lab.evaluation", "frontier_trainer.directions"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _QuietProgress(ProgressCallback):
    """transformers' progress bar without the per-step log dict it writes under the bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


class JsonlLogCallback(TrainerCallback):
    """Append every log dict the trainer emits to a JSONL file (one object per line, with the step)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")


def quiet_step_logs(trainer: Any, path: Path) -> None:
    """Route a trainer's per-step log dicts to ``path`` (and its report_to loggers), off the terminal.

    Replaces the progress callback by one that keeps the bar but writes no dicts, drops the printer
    callback (used when progress bars are disabled) and adds :class:`JsonlLogCallback`.
    """
    had_bar = any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(_QuietProgress())
    trainer.add_callback(JsonlLogCallback(path))


def train_dpo(
    name: str,
    projection: str,
    model_dir: Path,
    tokenizer: Any,
    out: Path,
    steps: int,
    seed: int,
    tolerance: float | None = None,
    *,
    track: bool = True,
    eval_examples: int | None = None,
) -> dict[str, Any]:
    """One DPO run on the lab (all six tasks protected for nullspace/frontier), evaluated.

    ``track`` adds the degradation callback (predicted versus observed per-task degradation). The
    trainer's per-step log dicts go to wandb and to ``<run dir>/train_log.jsonl``, not the terminal
    (the progress bar stays). Capability directions use the library's default refresh interval and
    batch size. Returns ``{"eval": lab evaluation after training, "degradation": tracker summary,
    "seconds"}``.
    """
    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer, lab

    def lab_accuracy(m: torch.nn.Module, tok: Any) -> dict[str, float]:
        metrics = lab.evaluate(m, tok, max_examples=50, compute_nll=False, progress=False)
        return {k: v for k, v in metrics.items() if k.startswith("accuracy/") or k.endswith("_rate")}

    slug = "vanilla" if projection == "none" else projection
    run_dir = out / slug
    started = time.perf_counter()
    args = FrontierDPOConfig(
        output_dir=str(run_dir),
        run_name=f"demo-{slug}",
        projection=projection,
        capability_tolerance=tolerance if projection == "frontier" else None,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        report_to="wandb",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        seed=seed,
        degradation_tracking=track,
        capability_eval_datasets=lab.capability_datasets("eval", n=100) if track else None,
        degradation_eval_steps=max(1, steps // 3),
        disable_tqdm=False,
    )
    trainer = FrontierDPOTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=lab.preference_dataset("train"),
        processing_class=tokenizer,
        capability_datasets=lab.capability_datasets("train", n=256),
        degradation_metrics={"lab": lab_accuracy} if track else None,
    )
    quiet_step_logs(trainer, run_dir / "train_log.jsonl")
    trainer.train()
    import wandb

    if wandb.run is not None:
        wandb.finish()
    after = lab.evaluate(trainer.model, tokenizer, max_examples=eval_examples, progress=False)
    tracked = trainer.degradation_callback.summary if trainer.degradation_callback else {}
    png = run_dir / "degradation" / "degradation.png"
    if png.exists():
        shutil.copy(png, out / f"degradation_{slug}.png")
    return {"eval": after, "degradation": tracked or {}, "seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------------------
# The lab: HMA versus uniform averaging
# --------------------------------------------------------------------------------------


def hma_tolerances(geo: Any, t: float, scale: float) -> dict[str, float]:
    """``hma_benchmark.py``'s tolerance rule at uniform-equivalent t.

    The outer tensors move by t in both methods, so the tolerance is set on the blocks: HMA's block
    part must predict a capability change of at least ``scale`` × uniform's block change (if a loss).
    """
    return {
        k: max(
            0.0,
            -t * float(geo.outer_capability[i]) - min(0.0, scale * t * float(geo.capability[i].sum())),
        )
        for i, k in enumerate(geo.tasks)
    }


def hma_versus_uniform(out: Path, seed: int, setting: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """HMA vs uniform averaging at matched budgets on a 4-block lab model (see :data:`HMA_SETTING`).

    Pretrains (cached) the model, aligns it with vanilla DPO, measures per-block geometry once, then
    merges and evaluates base (α=0), aligned (α=1), and uniform/HMA at every t of the sweep.
    Returns the points, hypervolumes, capability at matched refusal, and summary rows.
    """
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer, lab
    from frontier_trainer.hma import Grouping, allocate, measure_geometry, merge, uniform

    s = dict(HMA_SETTING, **(setting or {}))
    work = out / "hma"
    work.mkdir(parents=True, exist_ok=True)
    world = lab.WorldConfig(entanglement=s["entanglement"])
    cfg = lab.LabConfig(hidden_size=s["hidden_size"], num_layers=s["num_layers"], steps=s["pretrain_steps"],
                        batch_size=s["pretrain_batch"], world=world)  # fmt: skip
    base_dir = Path(lab.pretrain_config(cfg, progress=True))
    base_model, tokenizer = lab.load(base_dir)

    aligned_dir = work / "aligned"
    config = FrontierDPOConfig(
        output_dir=str(work / "trainer"), projection="none", max_steps=s["dpo_steps"],
        per_device_train_batch_size=16, learning_rate=s["dpo_lr"], beta=0.1, report_to="none",
        use_cpu=not torch.cuda.is_available(), bf16=False, activation_checkpointing=False,
        logging_steps=max(1, s["dpo_steps"] // 5), save_strategy="no", seed=seed, degradation_tracking=False,
    )  # fmt: skip
    trainer = FrontierDPOTrainer(
        model=base_model,
        args=config,
        train_dataset=lab.preference_dataset("train", world=world),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.model.save_pretrained(aligned_dir)
    tokenizer.save_pretrained(aligned_dir)
    shutil.rmtree(work / "trainer", ignore_errors=True)
    del trainer, base_model

    grouping = Grouping(s["grouping"])
    prefs = lab.preference_dataset("train", world=world)
    caps = lab.capability_datasets("train", n=s["geometry_examples"], world=world)
    geo = measure_geometry(str(base_dir), str(aligned_dir), prefs, caps, grouping=grouping,
                           max_examples=s["geometry_examples"])  # fmt: skip
    geo.save(work / "geometry.json")

    merged_dir = work / "merged"

    def evaluate_point(alloc: Any) -> dict[str, Any]:
        shutil.rmtree(merged_dir, ignore_errors=True)
        merge(str(base_dir), str(aligned_dir), alloc, merged_dir, grouping=grouping, progress=False)
        model = LlamaForCausalLM.from_pretrained(merged_dir).eval()
        metrics = lab.evaluate(model, tokenizer, world=world, max_examples=s["eval_examples"],
                               compute_nll=False, progress=False)  # fmt: skip
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    plan: list[tuple[str, float, Any]] = [("base", 0.0, 0.0), ("aligned", 1.0, 1.0)]
    for t in s["sweep"]:
        plan.append(("uniform", t, uniform(geo, t)))
        plan.append(("hma", t, allocate(geo, t=t, tolerances=hma_tolerances(geo, t, s["tolerance_scale"]))))
    points: list[dict[str, Any]] = []
    for method, t, alloc in tqdm(plan, desc="merge + evaluate", leave=False):
        point: dict[str, Any] = {"method": method, "t": t, **evaluate_point(alloc)}
        if not isinstance(alloc, float):
            point |= {"alphas": alloc.alphas, "outer_alpha": alloc.outer_alpha,
                      "predicted_safety": alloc.predicted_safety, "budget": alloc.budget}  # fmt: skip
        points.append(point)
        logger.info("%-8s t=%.2f  refusal %.3f  mean accuracy %.3f", method, t, point["refusal_rate"],
                    point["accuracy/mean"])  # fmt: skip
    shutil.rmtree(merged_dir, ignore_errors=True)

    ends = [(p["refusal_rate"], p["accuracy/mean"]) for p in points if p["method"] in ("base", "aligned")]
    fronts = {m: ends + [(p["refusal_rate"], p["accuracy/mean"]) for p in points if p["method"] == m]
              for m in ("uniform", "hma")}  # fmt: skip
    hv = {m: hypervolume(f) for m, f in fronts.items()}
    levels = sorted({round(p["refusal_rate"], 3) for p in points if p["refusal_rate"] > 0})
    matched = {f"{x:.3f}": {m: capability_at_refusal(fronts[m], x) for m in fronts} for x in levels}
    base = next(p for p in points if p["method"] == "base")
    rows = [method_row(f"vanilla DPO (4-block model, {s['dpo_steps']} steps)", base,
                       next(p for p in points if p["method"] == "aligned"), kind="aligned", t=1.0)]  # fmt: skip
    for p in points:
        if p["method"] in ("uniform", "hma"):
            label = (
                f"uniform averaging t={p['t']:.2f}"
                if p["method"] == "uniform"
                else f"HMA, budget of t={p['t']:.2f}"
            )
            rows.append(method_row(label, base, p, kind=p["method"], t=p["t"]))
    spread = geo.tax_spread()
    return {
        "description": (
            f"lab world entanglement {s['entanglement']:g}, {s['num_layers']}-block model (hidden "
            f"{s['hidden_size']}, {s['pretrain_steps']} pretraining steps), vanilla DPO {s['dpo_steps']} "
            f"steps, {s['grouping']} groups, t in {s['sweep']}"
        ),
        "setting": s,
        "base_dir": str(base_dir),
        "points": points,
        "hypervolume": hv,
        "hv_ratio": hv["hma"] / hv["uniform"] if hv["uniform"] > 0 else math.nan,
        "capability_at_matched_refusal": matched,
        "tau_std": spread["tau_std"],
        "tau_by_block": dict(zip(geo.groups, [float(x) for x in geo.tax_rates], strict=True)),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# The whole lab story
# --------------------------------------------------------------------------------------


def log_summary_to_wandb(summary: Mapping[str, Any], plots: Sequence[Path], group: str) -> str | None:
    """One wandb run (``demo-summary``, offline unless configured) holding the table, points and plots."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        logger.warning("wandb is not installed: summary not logged to wandb.")
        return None
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "frontier-trainer-demo"),
        name="demo-summary",
        group=group,
        job_type="summary",
        config={"setup": summary.get("setup", {}), "hma_setting": (summary.get("hma") or {}).get("setting")},
    )
    columns = list(SUMMARY_COLUMNS)
    data: dict[str, Any] = {"summary/table": wandb.Table(columns=columns, data=summary_table_rows(summary))}
    hma = summary.get("hma") or {}
    if hma.get("points"):
        keys = ["method", "t", "refusal_rate", "accuracy/mean", "over_refusal_rate"]
        data["hma/points"] = wandb.Table(columns=keys, data=[[p.get(k) for k in keys] for p in hma["points"]])
    for p in plots:
        data[f"plots/{p.stem}"] = wandb.Image(str(p))
    run.log(data)
    for r in list(summary.get("methods", [])) + list(hma.get("rows", [])):
        for key in ("refusal_gain", "mean_capability_change", "worst_task_change", "over_refusal_change"):
            run.summary[f"{r['method']}/{key}"] = r[key]
    if hma.get("hypervolume"):
        run.summary["hma/hypervolume_uniform"] = hma["hypervolume"]["uniform"]
        run.summary["hma/hypervolume_hma"] = hma["hypervolume"]["hma"]
        run.summary["hma/hv_ratio"] = hma["hv_ratio"]
    for name, d in (summary.get("degradation") or {}).items():
        for k, v in (d.get("rank_correlations") or {}).items():
            run.summary[f"{name}/{k}"] = v
    path = run.dir
    run.finish()
    return str(Path(path).parent)


def _lab_story(
    out: Path,
    steps: int,
    seeds: Sequence[int],
    timer: SectionTimer,
    tolerance: float = DEFAULT_TOLERANCE,
    with_hma: bool = True,
    pretrain_seeds: Sequence[int] = DEFAULT_PRETRAIN_SEEDS,
    eval_examples: int | None = None,
    lab_steps: int | None = None,
) -> dict[str, Any]:
    """Steps 2-6 of the module docstring over a grid of seeds; returns the summary (``summary.json``).

    Every method is trained once per (pretraining seed, training seed) pair, from the lab model of
    that pretraining seed, and scored against that model. A method's headline numbers are the mean
    over the pairs with a 95% percentile-bootstrap interval over the pairs (each pair one unit, so
    the spread between machines' lab models and between training seeds sits inside the interval).
    The predicted-versus-observed degradation report is tracked on the first pair only.
    """
    from frontier_trainer import lab
    from frontier_trainer.geometry_report import format_report
    from frontier_trainer.geometry_report import geometry_report as lab_geometry_report
    from frontier_trainer.lab.cli import format_table

    _quiet_training_logs()
    pretrain_kwargs: dict[str, Any] = {} if lab_steps is None else {"steps": lab_steps}
    bases: dict[int, dict[str, Any]] = {}
    model_dirs: dict[int, Path] = {}
    with timer.section(f"lab models (pretraining seeds {list(pretrain_seeds)}): build or load, evaluate"):
        for p in pretrain_seeds:
            model_dirs[p] = lab.pretrain(seed=p, **pretrain_kwargs)
            model, tokenizer = lab.load(model_dirs[p])
            bases[p] = lab.evaluate(model, tokenizer, max_examples=eval_examples, progress=False)
            (out / f"lab_eval_base_p{p}.json").write_text(json.dumps(bases[p], indent=2))
        first = pretrain_seeds[0]
        model, tokenizer = lab.load(model_dirs[first])
        logger.info("Lab model %s (pretraining seed %d) before alignment (held-out prompts):\n%s",
                    model_dirs[first].name, first, format_table(bases[first]))  # fmt: skip

    with timer.section("pre-training geometry report"):
        report = lab_geometry_report(
            model,
            tokenizer,
            lab.preference_dataset("train"),
            lab.capability_datasets("train", n=256),
            second_preference_dataset=lab.helpfulness_dataset("train"),
            batch_size=16,
            seed=seeds[0],
            progress=False,
        )
        logger.info("%s", format_report(report))
        (out / "geometry_lab.json").write_text(json.dumps(report, indent=2, default=str))

    methods = [
        ("vanilla", "vanilla DPO", "none", None),
        ("nullspace", "null-space DPO", "nullspace", None),
        (f"frontier eps={tolerance:g}", f"frontier DPO (eps={tolerance:g})", "frontier", tolerance),
    ]
    pairs = [(p, s) for p in pretrain_seeds for s in seeds]
    per_run: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _, _ in methods}
    degradation: dict[str, Any] = {}
    with wandb_environment(out) as group:
        for i, (p, s) in enumerate(pairs):
            with timer.section(f"DPO, pretraining seed {p}, training seed {s} ({steps} steps x 3 methods)"):
                for name, label, projection, tol in methods:
                    r = train_dpo(name, projection, model_dirs[p], tokenizer, out / f"p{p}_s{s}", steps, s, tol,
                                  track=i == 0, eval_examples=eval_examples)  # fmt: skip
                    row = method_row(
                        label, bases[p], r["eval"], pretrain_seed=p, train_seed=s, seconds=r["seconds"]
                    )
                    per_run[name].append(row)
                    if i == 0:
                        degradation[name] = {
                            k: r["degradation"].get(k) for k in ("rows", "rank_correlations")
                        }
                    logger.info("%-22s p=%d s=%d: refusal gain %+.2f, mean capability change %+.2f, over-refusal "
                                "change %+.2f (%.0f s)", label, p, s, row["refusal_gain"],
                                row["mean_capability_change"], row["over_refusal_change"], r["seconds"])  # fmt: skip

        hma = None
        if with_hma:
            with timer.section("HMA vs uniform averaging"):
                hma = hma_versus_uniform(out, seeds[0])

        with timer.section("summary, plots, wandb"):
            labels = {name: label for name, label, _, _ in methods}
            summary: dict[str, Any] = {
                "setup": {
                    "model": ", ".join(d.name for d in model_dirs.values()),
                    "model_dirs": {str(p): str(d) for p, d in model_dirs.items()},
                    "steps": steps,
                    "seed": list(seeds),
                    "pretrain_seeds": list(pretrain_seeds),
                    "runs_per_method": len(pairs),
                    "frontier_tolerance": tolerance,
                    "torch_threads": torch.get_num_threads(),
                    "eval_examples": eval_examples or lab.WorldConfig().n_eval,
                    "hma_eval_examples": HMA_SETTING["eval_examples"] if with_hma else None,
                    "interval": "95% percentile bootstrap over the (pretraining seed, training seed) runs",
                },
                "base": _mean_dicts(list(bases.values())),
                "bases": {str(p): b for p, b in bases.items()},
                "methods": [aggregate_rows(labels[name], per_run[name]) for name in per_run],
                "hma": hma,
                "degradation": degradation,
                "geometry": report,
            }
            plots = [
                plot_tradeoff(summary, out / "tradeoff.png"),
                plot_predicted_vs_observed(summary["degradation"], out / "predicted_vs_observed.png"),
            ]
            if hma is not None:
                plots.append(plot_hma(hma, out / "hma_vs_uniform.png"))
            summary["plots"] = [p.name for p in plots]
            summary["wandb_run"] = log_summary_to_wandb(summary, plots, group)
            logger.info(
                "wandb (%s): the DPO runs and the summary run are in group %s under %s; "
                "`wandb sync <run dir>` uploads an offline run. Per-step training logs: <run dir>/train_log.jsonl.",
                os.environ.get("WANDB_MODE", "online"),
                group,
                out / "wandb",
            )
    summary["timings_s"] = dict(timer.timings)
    write_summary(out, summary)
    return summary


def _int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (argparse type; names the bad value)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integer seeds, e.g. 0,1,2"
        ) from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds, e.g. 0,1,2")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary (planted-only: the planted report)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo", help="where reports, plots and wandb runs go")
    parser.add_argument("--steps", type=int, default=60, help="DPO steps per run")
    parser.add_argument(
        "--seeds",
        type=_int_list,
        default=list(DEFAULT_SEEDS),
        help="training seeds, comma-separated (default 0,1)",
    )
    parser.add_argument(
        "--pretrain-seeds",
        type=_int_list,
        default=list(DEFAULT_PRETRAIN_SEEDS),
        help="lab model pretraining seeds, comma-separated (default 0,1,2; each model is built once, then cached)",
    )
    parser.add_argument(
        "--eval-examples", type=int, default=None, help="held-out prompts per set (default 100)"
    )
    parser.add_argument(
        "--lab-steps",
        type=int,
        default=None,
        help="lab pretraining steps (default 2000; fewer for a quick look)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="capability_tolerance ε of the frontier run (0: like the null space; 0.1: like vanilla)",
    )
    parser.add_argument("--no-hma", action="store_true", help="skip HMA versus uniform averaging")
    parser.add_argument(
        "--planted-only", action="store_true", help="only the planted-direction report (seconds)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1, or torch's own choice when OMP_NUM_THREADS is set)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "datasets", "transformers", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with intra_op_threads(args.threads):
        return _run(args)


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for the demo, restored afterwards.

    The default is one thread (unless ``OMP_NUM_THREADS`` is set): the lab models are tiny
    (151k parameters), so each op is too small for a second thread to pay off, and on a shared
    machine OpenMP's spinning workers make it far worse (on this project's 2-core CI machine,
    15 null-space DPO steps took 1.7 s on one thread and 59-83 s on two under load).
    """
    previous = torch.get_num_threads()
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's body (``main`` parses arguments and sets threads)."""
    logger.info("torch intra-op threads: %d", torch.get_num_threads())
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timer = SectionTimer()
    with timer.section("planted geometry"):
        report = geometry_report()
        logger.info(format_geometry_report(report))
        (out / "geometry_planted.json").write_text(json.dumps(report, indent=2))
    result: dict[str, Any] = {"planted": report}
    if not args.planted_only:
        summary = _lab_story(
            out,
            args.steps,
            args.seeds,
            timer,
            tolerance=args.tolerance,
            with_hma=not args.no_hma,
            pretrain_seeds=args.pretrain_seeds,
            eval_examples=args.eval_examples,
            lab_steps=args.lab_steps,
        )
        total = round(time.perf_counter() - started, 1)
        summary["timings_s"]["total"] = total
        write_summary(out, summary)
        logger.info("\n=== Summary (held-out prompts; changes against each run's base model; mean [95%% interval] "
                    "over the seed pairs) ===\n%s",
                    format_summary_text(summary))  # fmt: skip
        logger.info(
            "Wall time per section (s): %s",
            ", ".join(f"{k} {v:.1f}" for k, v in summary["timings_s"].items()),
        )
        result = summary
    logger.info("\nwrote %s", out)
    return result


if __name__ == "__main__":
    main()
