"""Prediction 3: does HMA's margin over uniform averaging grow with the cross-layer spread of τ_ℓ?

The paper (§7.3 and §8, Prediction 3): "HMA outperforms uniform model averaging when the principal
angles between safety and capability subspaces vary significantly across layers. If all layers have
similar geometry, HMA and uniform averaging should perform comparably. This is testable by measuring
cross-layer variation in τ and correlating with the HMA improvement margin." (issue 13 §4.)

This script is a thin driver around ``benchmarks/hma_benchmark.py`` (whose :func:`run_setting` does
the work for one setting: pretrain the lab model, vanilla DPO, measure the per-block geometry, sweep
uniform averaging and HMA at equal budget, merge and evaluate every point for real). For every
(setting, seed) it records:

* **gradient-space spread**: the std (and range) across decoder blocks of τ_ℓ = ‖P_{C_ℓ} ∇S|_ℓ‖² from
  :func:`frontier_trainer.hma.measure_geometry` (eq. 2 restricted to block ℓ, at the base model), as
  ``hma_benchmark`` reports it (``LayerGeometry.tax_spread``);
* **representation-space spread**: per residual-stream layer ℓ (the output of block ℓ, read at the last
  prompt token of the *base* model), τ_ℓ = ‖P_{C_ℓ} v*_ℓ‖² (eq. 2, :func:`frontier_trainer.geometry.
  tax_rate`) with v*_ℓ the Arditi-style difference-of-means safety direction (harmful − look-alike,
  :func:`frontier_trainer.probes.safety_direction`) and C_ℓ the span of the six difference-of-means
  task probes (:func:`frontier_trainer.probes.task_directions`, grand-mean baseline), i.e. the same
  joint tax rate as the gradient-space one, in the space Prediction 1 names; and its std across layers;
* **the HMA margin**: the ratio of dominated hypervolumes HMA / uniform of the two measured fronts in
  the (refusal rate, mean capability accuracy) plane (primary), and the capability kept at matched
  refusal: the mean, over refusal levels x = 0.05, 0.10, …, 1.00 reachable by both fronts, of
  HMA's upper envelope minus uniform's (accuracy points; :func:`hma_benchmark.envelope_at`).

The lab pretraining seed is the seed of the point, and the vanilla DPO seed is the same seed.

Pre-declared primary test: Spearman(gradient-space τ_ℓ std, HV ratio) over all (setting, seed) points,
with a percentile bootstrap interval (points resampled with replacement). The other three pairings
(representation spread; matched-refusal gain) are reported next to it, never instead of it. Per setting:
the mean margin over seeds with a 95 % percentile bootstrap interval over seeds.

Run (the committed results):

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.hma_spread \
        --out benchmarks/results/hma_spread

The run resumes: points already in ``<out>/results.json`` with the same run settings are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from benchmarks import hma_benchmark
from benchmarks.hma_benchmark import PRESETS, envelope_at, run_setting
from frontier_trainer import geometry, lab, probes
from frontier_trainer.hma import Grouping

logger = logging.getLogger("hma_spread")

# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One point of the spread axis: the lab world's entanglement knob and the model depth.

    Attributes:
        name: label used in the outputs.
        entanglement: :attr:`frontier_trainer.lab.WorldConfig.entanglement` (how often the entangled
            tasks are phrased like harmful requests).
        layers: decoder blocks of the lab model (= number of HMA groups under block grouping).
    """

    name: str
    entanglement: float
    layers: int

    @classmethod
    def parse(cls, spec: str) -> Setting:
        """``name:entanglement:layers``, e.g. ``ent1-L4:1.0:4``."""
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"--settings {spec!r}: expected name:entanglement:layers, e.g. ent1-L4:1.0:4")
        name, ent, layers = parts
        try:
            entanglement, depth = float(ent), int(layers)
        except ValueError as err:
            raise ValueError(
                f"--settings {spec!r}: entanglement must be a float in [0, 1] and layers a positive int "
                "(e.g. ent1-L4:1.0:4)"
            ) from err
        if not name or not 0.0 <= entanglement <= 1.0 or depth < 2:
            raise ValueError(
                f"--settings {spec!r}: need a name, entanglement in [0, 1] and layers >= 2 (a spread "
                "across one block is not defined)"
            )
        return cls(name, entanglement, depth)


DEFAULT_SETTINGS = [
    "ent0-L4:0.0:4",
    "ent0.5-L4:0.5:4",
    "ent1-L4:1.0:4",
    "ent1-L2:1.0:2",
    "ent1-L8:1.0:8",
    "ent0-L8:0.0:8",
]
"""Entanglement 0 / 0.5 / 1 at the ``small`` preset's depth 4, and depth 2 / 8 at both ends of the knob."""

RUN_DEFAULTS: dict[str, Any] = {
    "preset": "small",
    "sweep": [0.2, 0.35, 0.5, 0.65, 0.8],
    "eval_examples": 100,
    "tolerance_scale": 0.5,
    "dpo_lr": 5e-4,
    "probe_rows": 256,
    "held_out_rows": 100,
    "bootstrap_samples": 10_000,
}
"""On top of ``hma_benchmark.PRESETS['small']``: the ``full`` preset's five-point sweep and all 100
held-out examples per set (merging and evaluating a point costs about a second on this lab model; the
pretraining dominates the cost)."""

GRID = [round(0.05 * k, 2) for k in range(1, 21)]
"""Refusal levels of the matched-refusal capability gain."""


# --------------------------------------------------------------------------------------
# Seeding the lab model through hma_benchmark.run_setting
# --------------------------------------------------------------------------------------


class _SeededLab(ModuleType):
    """``frontier_trainer.lab`` as ``hma_benchmark`` sees it, with ``LabConfig``'s seed fixed.

    ``hma_benchmark.run_setting`` builds ``lab.LabConfig(...)`` without a seed (so every setting there
    uses pretraining seed 0). This view passes ``seed=`` to it and forwards every other name to the real
    module, so the seeds of this study reach the pretraining without copying ``run_setting``.
    """

    def __init__(self, real: ModuleType, seed: int) -> None:
        super().__init__(real.__name__)
        self._real = real
        self._seed = seed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def LabConfig(self, **kwargs: Any) -> lab.LabConfig:  # noqa: N802 (the name it stands in for)
        return self._real.LabConfig(**{**kwargs, "seed": self._seed})


@contextlib.contextmanager
def lab_seed(seed: int) -> Iterator[None]:
    """Within the block, ``hma_benchmark`` pretrains lab models with ``LabConfig(seed=seed)``."""
    real = hma_benchmark.lab
    hma_benchmark.lab = _SeededLab(real, seed)  # type: ignore[assignment]
    try:
        yield
    finally:
        hma_benchmark.lab = real


def bench_args(
    setting: Setting, seed: int, run: Mapping[str, Any], cache_dir: str | None
) -> argparse.Namespace:
    """The ``argparse.Namespace`` that ``hma_benchmark.run_setting`` reads, for one (setting, seed)."""
    values = dict(PRESETS[run["preset"]])
    for key in ("pretrain_steps", "pretrain_batch", "dpo_steps", "hidden", "geometry_examples"):
        if run.get(key) is not None:
            values[key] = run[key]
    values.update(
        layers=setting.layers,
        sweep=list(run["sweep"]),
        eval_examples=run["eval_examples"],
        tolerance_scale=run["tolerance_scale"],
        dpo_lr=run["dpo_lr"],
        seed=seed,
        lab_seed=seed,  # read by run_setting once it passes a lab seed (requested); lab_seed() until then
        cache_dir=cache_dir,
    )
    return argparse.Namespace(**values)


# --------------------------------------------------------------------------------------
# Measurements of one point
# --------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    """Cross-layer spread of τ_ℓ: mean, std (population, as ``LayerGeometry.tax_spread``), range, std/mean."""
    tau = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if tau.size == 0:
        return {"tau_mean": math.nan, "tau_std": math.nan, "tau_range": math.nan, "tau_cv": math.nan}
    mean = float(tau.mean())
    return {
        "tau_mean": mean,
        "tau_std": float(tau.std()),
        "tau_range": float(tau.max() - tau.min()),
        "tau_cv": float(tau.std() / mean) if mean > 0 else math.nan,
    }


@torch.no_grad()
def representation_taus(
    model: torch.nn.Module, tokenizer: Any, world: lab.WorldConfig, rows: int, held_out: int
) -> dict[str, Any]:
    """Per residual-stream layer, the joint tax rate τ_ℓ = ‖P_{C_ℓ} v*_ℓ‖² of the base model (eq. 2).

    Safety probe: harmful − look-alike prompts (train split, ``rows`` each; the primary rule of
    ``benchmarks/probe_prediction.py``); task probes: each task's train prompts against the grand mean
    of the task means; prompts drawn from the setting's own ``world`` (the entangled tasks' phrasing
    depends on its entanglement). Layers 1..L are the outputs of blocks 0..L−1, the same blocks HMA
    allocates. Also records the per-task τ_{i,ℓ} and the held-out d′ of the safety probe per layer.
    """

    def prompts(name: str, split: str, n: int) -> list[str]:
        return [p for p, _ in lab.examples(name, split, n, world=world)]

    def acts(name: str, split: str, n: int) -> probes.Activations:
        return probes.residual_activations(
            model, tokenizer, prompts(name, split, n), batch_size=64, name=name
        )

    v = probes.safety_direction(acts("harmful", "train", rows), acts("lookalike", "train", rows))
    c = probes.task_directions({t: acts(t, "train", rows) for t in lab.TASKS})
    sep = probes.safety_separation(v, acts("harmful", "eval", held_out), acts("lookalike", "eval", held_out))
    joint = {
        layer: geometry.tax_rate(v[layer].double(), torch.stack([c[t][layer] for t in c], dim=1).double())
        for layer in sorted(v)
    }
    return {
        "layers": sorted(v),
        "tau_by_layer": {str(k): x for k, x in joint.items()},
        "task_tau_by_layer": {
            t: {str(k): x for k, x in by.items()} for t, by in probes.representation_tax_rates(v, c).items()
        },
        "separation": {str(k): x for k, x in sep.items()},
        "tax_spread": spread(list(joint.values())),
    }


def margins(result: Mapping[str, Any]) -> dict[str, Any]:
    """HMA's margin over uniform from one ``run_setting`` result: HV ratio and matched-refusal gain."""
    ends = [
        (p["refusal_rate"], p["accuracy/mean"])
        for p in result["points"]
        if p["method"] in ("base", "aligned")
    ]
    fronts = {
        m: ends + [(p["refusal_rate"], p["accuracy/mean"]) for p in result["points"] if p["method"] == m]
        for m in ("uniform", "hma")
    }
    gains = {}
    for x in GRID:
        h, u = envelope_at(fronts["hma"], x), envelope_at(fronts["uniform"], x)
        if math.isfinite(h) and math.isfinite(u):
            gains[f"{x:.2f}"] = h - u
    return {
        "hv_uniform": result["hypervolume"]["uniform"],
        "hv_hma": result["hypervolume"]["hma"],
        "hv_ratio": result["hv_ratio"],
        "matched_gain": float(np.mean(list(gains.values()))) if gains else math.nan,
        "matched_gain_levels": gains,
    }


def run_point(
    setting: Setting, seed: int, run: Mapping[str, Any], work: Path, cache_dir: str | None
) -> dict[str, Any]:
    """One (setting, seed): ``hma_benchmark.run_setting`` with lab seed = DPO seed, plus the probes."""
    started = time.time()
    args = bench_args(setting, seed, run, cache_dir)
    with lab_seed(seed):
        result = run_setting(f"{setting.name}-s{seed}", setting.entanglement, Grouping("block"), args, work)
    model, tok = lab.load(result["base_dir"])
    manifest = lab.read_manifest(result["base_dir"])
    if manifest["settings"]["seed"] != seed or manifest["settings"]["num_layers"] != setting.layers:
        raise RuntimeError(f"lab model {result['base_dir']} is not seed {seed} / {setting.layers} layers")
    world = lab.WorldConfig(entanglement=setting.entanglement)
    repr_geo = representation_taus(model, tok, world, run["probe_rows"], run["held_out_rows"])
    point = {
        "setting": setting.name,
        "entanglement": setting.entanglement,
        "layers": setting.layers,
        "seed": seed,
        "lab_model": Path(result["base_dir"]).name,
        "pretrain_seconds": manifest.get("train_seconds"),
        "gradient": {
            "tax_rates": result["tax_rates"],
            "tax_spread": spread(list(result["tax_rates"].values())),
        },
        "representation": repr_geo,
        "margin": margins(result),
        "benchmark": {k: v for k, v in result.items() if k not in ("base_dir", "aligned_dir")},
        "seconds": round(time.time() - started, 1),
    }
    logger.info(
        "%s seed %d: grad τ std %.3g, repr τ std %.3g, HV ratio %.3f, matched gain %+.3f (%.0f s)",
        setting.name, seed, point["gradient"]["tax_spread"]["tau_std"],
        repr_geo["tax_spread"]["tau_std"], point["margin"]["hv_ratio"], point["margin"]["matched_gain"],
        point["seconds"],
    )  # fmt: skip
    return point


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (average ranks for ties); NaN when either side is constant or has < 3 values."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman: {x.shape} spreads against {y.shape} margins; pass one margin per spread")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


def bootstrap_mean(values: Sequence[float], samples: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean (values resampled with replacement)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, v.size, size=(samples, v.size))
    return _percentile_interval(v[idx].mean(axis=1))


def bootstrap_spearman(
    x: Sequence[float], y: Sequence[float], samples: int, seed: int = 0
) -> dict[str, float]:
    """Spearman ρ over (x_k, y_k) pairs with a 95 % percentile bootstrap interval (pairs resampled).

    Resamples in which either side is constant have no ρ and are dropped; ``valid`` counts the rest.
    """
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    rho = spearman(xa, ya)
    if xa.size < 3:
        return {"rho": rho, "lo": math.nan, "hi": math.nan, "n": int(xa.size), "valid": 0}
    idx = np.random.default_rng(seed).integers(0, xa.size, size=(samples, xa.size))
    rx, ry = stats.rankdata(xa[idx], axis=1), stats.rankdata(ya[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rhos = np.where(den > 0, (rx * ry).sum(axis=1) / den, np.nan)
    lo, hi = _percentile_interval(rhos)
    return {"rho": rho, "lo": lo, "hi": hi, "n": int(xa.size), "valid": int(np.isfinite(rhos).sum())}


SPREADS = {"gradient": ("gradient", "tau_std"), "representation": ("representation", "tau_std")}
MARGINS = {"hv_ratio": "hv_ratio", "matched_gain": "matched_gain"}
PRIMARY = ("gradient", "hv_ratio")


def spread_of(point: Mapping[str, Any], kind: str) -> float:
    space, key = SPREADS[kind]
    return float(point[space]["tax_spread"][key])


def summarise(points: Sequence[Mapping[str, Any]], samples: int) -> dict[str, Any]:
    """Per setting: mean spreads and margins with bootstrap intervals over seeds; overall Spearman.

    Every statistic pairs the spread and the margin *of the same point* (one (setting, seed) record).
    """
    settings: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        settings.setdefault(p["setting"], []).append(p)
    per_setting = {}
    for name, group in settings.items():
        row: dict[str, Any] = {"seeds": [p["seed"] for p in group], "n": len(group)}
        for kind in SPREADS:
            vals = [spread_of(p, kind) for p in group]
            row[f"{kind}_spread"] = float(np.mean(vals))
        for m in MARGINS:
            vals = [float(p["margin"][m]) for p in group]
            lo, hi = bootstrap_mean(vals, samples)
            row[m] = {"mean": float(np.nanmean(vals)) if any(map(math.isfinite, vals)) else math.nan,
                      "lo": lo, "hi": hi, "values": vals}  # fmt: skip
        per_setting[name] = row
    correlations = {}
    for kind in SPREADS:
        for m in MARGINS:
            xs = [spread_of(p, kind) for p in points]
            ys = [float(p["margin"][m]) for p in points]
            correlations[f"{kind}_spread~{m}"] = bootstrap_spearman(xs, ys, samples)
    primary = correlations[f"{PRIMARY[0]}_spread~{PRIMARY[1]}"]
    if not math.isfinite(primary["rho"]):
        verdict = "undetermined (too few points or a constant side)"
    elif primary["lo"] > 0:
        verdict = "the margin grows with the spread (the 95 % interval of Spearman is above 0)"
    elif primary["hi"] < 0:
        verdict = "the margin shrinks as the spread grows (the 95 % interval of Spearman is below 0)"
    else:
        verdict = "no monotone relation detected (the 95 % interval of Spearman contains 0)"
    return {"per_setting": per_setting, "correlations": correlations, "primary": list(PRIMARY),
            "verdict": verdict}  # fmt: skip


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "benchmarks/hma_spread.py", "benchmarks/hma_benchmark.py",
             "frontier_trainer"], capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + (" (+ local changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict[str, Any]:
    """Versions, machine and commit of the run."""
    import transformers
    import trl

    return {
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "numpy": np.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }


def _fmt(x: float, spec: str = ".3f") -> str:
    return "nan" if not math.isfinite(x) else format(x, spec)


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: per-setting table, the correlations, and every point."""
    s = results["summary"]
    lines = [
        "# Prediction 3: HMA's margin over uniform averaging vs the cross-layer spread of τ_ℓ (lab)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Commit {results['provenance']['git_commit']}; torch {results['provenance']['torch']}, transformers "
        f"{results['provenance']['transformers']}, trl {results['provenance']['trl']}; "
        f"{results['provenance']['machine']['cpu_count']} CPUs, OMP_NUM_THREADS="
        f"{results['provenance']['machine']['omp_num_threads']}; total {results['seconds']:.0f} s.",
        "",
        f"Run settings: {json.dumps(results['run'])}",
        "",
        "Spread = std across decoder blocks of τ_ℓ (gradient space: ``measure_geometry`` at the base model; "
        "representation space: joint τ_ℓ of the difference-of-means probes at the base model). "
        "Margin = HV(HMA)/HV(uniform) and the mean capability gain of HMA at matched refusal "
        "(accuracy points). Intervals: 95 % percentile bootstrap over seeds (per setting) and over "
        "points (Spearman).",
        "",
        "| setting | entanglement | layers | seeds | grad τ_ℓ std | repr τ_ℓ std | HV ratio (95 % CI) | matched gain (95 % CI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in s["per_setting"].items():
        p0 = next(p for p in results["points"] if p["setting"] == name)
        hv, mg = row["hv_ratio"], row["matched_gain"]
        lines.append(
            f"| {name} | {p0['entanglement']:g} | {p0['layers']} | {row['n']} | {row['gradient_spread']:.3g} | "
            f"{row['representation_spread']:.3g} | {_fmt(hv['mean'])} [{_fmt(hv['lo'])}, {_fmt(hv['hi'])}] | "
            f"{_fmt(mg['mean'], '+.3f')} [{_fmt(mg['lo'], '+.3f')}, {_fmt(mg['hi'], '+.3f')}] |"
        )
    lines += ["", "## Spearman(spread, margin) over all points", "",
              "| spread | margin | ρ | 95 % CI | points | valid resamples |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, c in s["correlations"].items():
        kind, m = key.split("~")
        mark = " (primary)" if [kind.removesuffix("_spread"), m] == s["primary"] else ""
        lines.append(
            f"| {kind}{mark} | {m} | {_fmt(c['rho'])} | [{_fmt(c['lo'])}, {_fmt(c['hi'])}] | {c['n']} | {c['valid']} |"
        )
    lines += ["", f"Verdict (primary): {s['verdict']}.", "", "## Every point", "",
              "| setting | seed | grad τ_ℓ mean | grad τ_ℓ std | repr τ_ℓ mean | repr τ_ℓ std | HV uniform | HV HMA | HV ratio | matched gain | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in results["points"]:
        g, r, m = p["gradient"]["tax_spread"], p["representation"]["tax_spread"], p["margin"]
        lines.append(
            f"| {p['setting']} | {p['seed']} | {g['tau_mean']:.3g} | {g['tau_std']:.3g} | {r['tau_mean']:.3g} | "
            f"{r['tau_std']:.3g} | {m['hv_uniform']:.4f} | {m['hv_hma']:.4f} | {_fmt(m['hv_ratio'])} | "
            f"{_fmt(m['matched_gain'], '+.3f')} | {p['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> None:
    """margin_vs_spread.png: HV ratio and matched gain against both spreads, one colour per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), squeeze=False)
    names = list(results["summary"]["per_setting"])
    colours = plt.get_cmap("tab10")
    for col, kind in enumerate(SPREADS):
        for row, m in enumerate(MARGINS):
            ax = axes[row][col]
            xs_all = []
            for k, name in enumerate(names):
                pts = [p for p in results["points"] if p["setting"] == name]
                xy = [(spread_of(p, kind), float(p["margin"][m])) for p in pts]
                xy = [(x, y) for x, y in xy if math.isfinite(x) and math.isfinite(y)]
                xs_all += [x for x, _ in xy]
                ax.scatter(
                    [x for x, _ in xy], [y for _, y in xy], color=colours(k % 10), label=name, alpha=0.8
                )
            ax.axhline(1.0 if m == "hv_ratio" else 0.0, color="grey", lw=0.8, ls=":")
            c = results["summary"]["correlations"][f"{kind}_spread~{m}"]
            ax.set_title(f"Spearman {_fmt(c['rho'], '.2f')} [{_fmt(c['lo'], '.2f')}, {_fmt(c['hi'], '.2f')}]")
            ax.set_xlabel(f"{kind}-space τ_ℓ std across blocks")
            ax.set_ylabel(
                "HV(HMA) / HV(uniform)" if m == "hv_ratio" else "HMA − uniform accuracy at matched refusal"
            )
            if xs_all and min(xs_all) > 0:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "Prediction 3 on the lab: HMA margin vs cross-layer spread of τ_ℓ (one dot per setting × seed)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """results.json, results.md and margin_vs_spread.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "margin_vs_spread.png")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/hma_spread")
    p.add_argument("--work", default=None, help="aligned models and geometry files (default: a temp dir)")
    p.add_argument("--cache-dir", default=None, help="lab model cache (default: lab.default_cache_dir())")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="name:entanglement:layers")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="lab pretraining seed = DPO seed")
    p.add_argument("--preset", choices=sorted(PRESETS), default=RUN_DEFAULTS["preset"])
    p.add_argument("--sweep", nargs="+", type=float, default=RUN_DEFAULTS["sweep"])
    for key in ("eval_examples", "probe_rows", "held_out_rows", "bootstrap_samples"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=RUN_DEFAULTS[key])
    for key in ("pretrain_steps", "pretrain_batch", "dpo_steps", "hidden", "geometry_examples"):
        p.add_argument(
            f"--{key.replace('_', '-')}", type=int, default=None, help=f"override the preset's {key}"
        )
    p.add_argument("--tolerance-scale", type=float, default=RUN_DEFAULTS["tolerance_scale"])
    p.add_argument("--dpo-lr", type=float, default=RUN_DEFAULTS["dpo_lr"])
    return p


def check_run(run: Mapping[str, Any]) -> None:
    """Refuse bad run settings before any training, naming the flag and the fix."""
    if not run["sweep"] or any(not 0.0 < t < 1.0 for t in run["sweep"]):
        raise ValueError(
            f"--sweep {run['sweep']}: pass merge ratios strictly between 0 and 1, e.g. 0.25 0.5 0.75"
        )
    for key in ("eval_examples", "probe_rows", "held_out_rows", "bootstrap_samples"):
        if run[key] < 2:
            raise ValueError(f"--{key.replace('_', '-')}={run[key]}: need at least 2")
    for key in ("pretrain_steps", "pretrain_batch", "dpo_steps", "hidden", "geometry_examples"):
        if run.get(key) is not None and run[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')}={run[key]}: must be a positive int")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("frontier_trainer", "httpx", "hma_benchmark"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = [Setting.parse(s) for s in args.settings]
    if len({s.name for s in settings}) != len(settings):
        raise ValueError(f"--settings: names must be unique, got {[s.name for s in settings]}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {args.seeds}: seeds must be distinct")
    run = {"preset": args.preset, "sweep": args.sweep, "eval_examples": args.eval_examples,
           "tolerance_scale": args.tolerance_scale, "dpo_lr": args.dpo_lr, "probe_rows": args.probe_rows,
           "held_out_rows": args.held_out_rows, "bootstrap_samples": args.bootstrap_samples,
           **{k: getattr(args, k) for k in ("pretrain_steps", "pretrain_batch", "dpo_steps", "hidden",
                                             "geometry_examples")}}  # fmt: skip
    check_run(run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hma_spread_"))
    work.mkdir(parents=True, exist_ok=True)
    previous: list[dict[str, Any]] = []
    if (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        if old.get("run") == run:
            previous = old["points"]
            logger.info("resuming: %d point(s) of %s kept", len(previous), out / "results.json")
    done = {(p["setting"], p["seed"]): p for p in previous}
    command = "python -m benchmarks.hma_spread " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.time() - sum(p["seconds"] for p in previous)
    points: list[dict[str, Any]] = []
    todo = [(s, seed) for s in settings for seed in args.seeds]
    for setting, seed in tqdm(todo, desc="hma_spread points"):
        key = (setting.name, seed)
        if key not in done:
            done[key] = run_point(setting, seed, run, work, args.cache_dir)
        points.append(done[key])
        results = {
            "command": command, "run": run, "settings": [asdict(s) for s in settings], "seeds": args.seeds,
            "preset_values": PRESETS[args.preset], "provenance": provenance(), "points": points,
            "seconds": time.time() - started,
        }  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    results["summary"] = summarise(points, args.bootstrap_samples)
    write_outputs(results, out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
