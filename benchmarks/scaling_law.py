"""Prediction 2 (Thm 5.4, Prop 5.5): does τ_i(d) fall like 1/d for incidental tasks and plateau for entangled ones?

For every lab model of the scaling family (``frontier_trainer.lab.pretrain(hidden_size=d, seed=s)``,
d ∈ {32, 64, 128, 256}, several pretraining seeds, all other pretraining settings equal) this script
measures, before any alignment step, the tax rate τ_i of every lab task in two spaces, with the
functions of ``benchmarks/probe_prediction.py`` (imported, not copied):

* **representation space**: ``representation_geometry`` → :func:`frontier_trainer.probes.probe_tax_rates`,
  τ_i = cos²(v*, c_i) in the residual stream at the last prompt token (Arditi-style safety probe harmful −
  look-alike, difference-of-means task probes), at the layer whose safety probe separates held-out
  prompts best (the primary rule of Prediction 1);
* **gradient space**: ``gradient_geometry`` → :func:`frontier_trainer.report.geometry_report`, the
  step-0 DPO direction against ∇ of each task's completion log-likelihood.

Then, per task and space, it fits τ(d) = τ₀ + k/d (eq. 8; Prop 5.5 eq. 11 gives k ≈ 1 per incidental
task under random packing) with :func:`frontier_trainer.geometry.fit_scaling_law` over **all** (d, seed)
points (ordinary least squares on x = 1/d, standard errors from the residuals), and classifies the task.

Classification rule (written down before any scaling result was seen; ``classify``). With d_max the
largest hidden size (256), τ̂(d_max) = τ₀ + k/d_max the fitted value there, z = 2:

* **intrinsic** (plateau, Remark 5.7 class b): τ₀ − z·se(τ₀) > 0 **and** τ₀ ≥ ½·τ̂(d_max) (the
  plateau carries most of τ at d_max);
* **incidental** (falls like 1/d, class a): not intrinsic, and k − z·se(k) > 0 (τ falls with d);
* **inconclusive**: neither (no significant plateau and no significant fall; e.g. τ flat at the
  noise floor, or rising with d with a small intercept). The paper names two classes; a third label
  is kept so that "did not fall" is never reported as "fell".

Expected by construction (``lab.TASKS[t].overlap``): the ``entangled`` tasks (chemistry, persuasion)
intrinsic, the others (``none``) incidental. The script reports for every task and space whether the
data agree, whatever they say. Secondary, pre-declared, never instead of the primary fit: a seed-cluster
bootstrap interval of τ₀ (seeds resampled within each d), the per-layer and mean-over-layers
representation τ, and gradient-space τ against 1/P (P = trainable parameters, the gradient space's
actual dimension; random packing in ℝ^P predicts k/P there, not k/d).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.scaling_law \\
        --output-dir benchmarks/results/scaling

Writes ``results.json`` (settings, versions, machine, git commit, every point, every fit),
``results.md`` (tables) and ``scaling.png`` (τ against 1/d per task, with the fit) under the output
directory. Lab models come from (and go to) the lab cache (``lab.default_cache_dir()``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
from tqdm.auto import tqdm

from benchmarks import probe_prediction as pp
from benchmarks.arena.report import git_state, machine, package_versions
from frontier_trainer import geometry, lab

logger = logging.getLogger("scaling_law")

SETTINGS: dict[str, Any] = {
    "hidden_sizes": list(lab.FAMILY_HIDDEN_SIZES),
    "seeds": [0, 1, 2],
    # lab.pretrain settings other than hidden_size/seed (the rest are lab.LabConfig defaults: 2 blocks,
    # batch 128, lr 3e-3, head dim 32, MLP 4d). 500 steps: the family length documented in
    # `frontier-lab build --hidden-size 32 64 128 256 --steps 500`; the default 2000 steps cost
    # 0.73 s/step at h256 here (~73 min for 3 seeds under nice), past this benchmark's budget.
    "pretrain": {"steps": 500},
    "eval_rows": 50,  # lab.evaluate rows per set: does each model know its tasks? (0 skips it)
    "z": 2.0,  # significance multiplier of the classification rule
    "plateau_fraction": 0.5,  # τ₀ must carry at least this share of τ̂(d_max)
    "bootstrap_samples": 2000,  # seed-cluster bootstrap of τ₀
}

PROBE_KEYS = (
    "probe_rows_per_set",
    "held_out_rows",
    "gradient_rows",
    "gradient_batch_size",
    "gradient_batches",
)
"""The probe_prediction settings this benchmark uses (and records); the rest concern its DPO runs."""

LABELS = ("intrinsic", "incidental", "inconclusive")
EXPECTED = {"entangled": "intrinsic", "none": "incidental"}
"""Class each lab task should fall in by construction of the world (``lab.TASKS[t].overlap``)."""


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------


def measure(
    hidden_size: int, seed: int, pretrain_kwargs: Mapping[str, Any], cache_dir: str | None, eval_rows: int
) -> dict[str, Any]:
    """One point of the family: pretrain (or load from cache), then τ_i in both spaces before alignment."""
    t0 = time.perf_counter()
    model_dir = lab.pretrain(
        hidden_size=hidden_size, seed=seed, cache_dir=cache_dir, progress=False, **pretrain_kwargs
    )
    manifest = lab.read_manifest(model_dir)
    model, tokenizer = lab.load(model_dir)
    repr_geo = pp.representation_geometry(model, tokenizer)
    primary = repr_geo["primary"]
    point: dict[str, Any] = {
        "hidden_size": hidden_size,
        "seed": seed,
        "model_dir": str(model_dir),
        "model_hash": manifest["hash"],
        "pretrain_settings": manifest["settings"],
        "pretrain_final_loss": manifest["final_loss"],
        "pretrain_seconds": manifest["train_seconds"],
        "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tau_repr": primary["tau"],
        "repr_layer": primary["layer"],
        "repr_separation": primary["separation"],
        "tau_repr_by_layer": primary["tau_by_layer"],
        "tau_repr_mean_layers": repr_geo["variants"]["mean over layers"],
        "tau_grad": pp.gradient_geometry(model, tokenizer, seed),
    }
    if eval_rows > 0:
        metrics = lab.evaluate(model, tokenizer, max_examples=eval_rows, progress=False)
        point["eval"] = {k: float(v) for k, v in metrics.items() if isinstance(v, float)}
    point["seconds"] = time.perf_counter() - t0
    logger.info(
        "h%d seed %d: loss %.3f, layer %s, %.0fs",
        hidden_size,
        seed,
        point["pretrain_final_loss"],
        point["repr_layer"],
        point["seconds"],
    )
    return point


# --------------------------------------------------------------------------------------
# the spaces, the fit and the rule
# --------------------------------------------------------------------------------------

Series = Callable[[Mapping[str, Any], str], float]


def _layers(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Layer keys present in every point's per-layer τ (JSON keys are strings)."""
    sets = [set(map(str, p["tau_repr_by_layer"][next(iter(p["tau_repr_by_layer"]))])) for p in points]
    return sorted(set.intersection(*sets), key=int) if sets else []


def spaces(points: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every series that gets a fit: name → how to read τ and x from a point, and whether it is primary."""

    def by_layer(layer: str) -> Series:
        return lambda p, t: float({str(k): v for k, v in p["tau_repr_by_layer"][t].items()}[layer])

    out: dict[str, dict[str, Any]] = {
        "representation": {"tau": lambda p, t: float(p["tau_repr"][t]), "x": "hidden_size", "primary": True},
        "gradient": {"tau": lambda p, t: float(p["tau_grad"][t]), "x": "hidden_size", "primary": True},
        "representation, mean over layers": {
            "tau": lambda p, t: float(p["tau_repr_mean_layers"][t]),
            "x": "hidden_size",
            "primary": False,
        },
    }
    for layer in _layers(points):
        out[f"representation, layer {layer} only"] = {
            "tau": by_layer(layer),
            "x": "hidden_size",
            "primary": False,
        }
    out["gradient, x = 1/P"] = {"tau": out["gradient"]["tau"], "x": "num_parameters", "primary": False}
    return out


def series(
    points: Sequence[Mapping[str, Any]], task: str, tau: Series, x: str = "hidden_size"
) -> tuple[list[float], list[float]]:
    """(dims, taus) of one task, paired point by point (never sorted or grouped apart)."""
    dims = [float(p[x]) for p in points]
    taus = [tau(p, task) for p in points]
    return dims, taus


def classify(
    fit: geometry.ScalingFit, d_max: float, z: float = 2.0, plateau_fraction: float = 0.5
) -> dict[str, Any]:
    """The pre-declared rule (module docstring): intrinsic / incidental / inconclusive, with its parts.

    NaN standard errors (two points only) make both tests false: ``inconclusive``.
    """
    tau_at_max = fit.tau0 + fit.k / d_max
    share = fit.tau0 / tau_at_max if tau_at_max > 0 else float("nan")
    significant_plateau = fit.tau0 - z * fit.tau0_stderr > 0
    carries_most = share >= plateau_fraction  # False for NaN
    falls = fit.k - z * fit.k_stderr > 0
    if significant_plateau and carries_most:
        label = "intrinsic"
    elif falls:
        label = "incidental"
    else:
        label = "inconclusive"
    return {
        "label": label,
        "tau_at_d_max": tau_at_max,
        "plateau_share_at_d_max": share,
        "tau0_significant": bool(significant_plateau),
        "plateau_carries_most": bool(carries_most),
        "falls_with_d": bool(falls),
    }


def seed_bootstrap(
    dims: Sequence[float], taus: Sequence[float], samples: int, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile 95% interval of τ₀, resampling the points (seeds) within each d with replacement."""
    if samples < 1:
        return None
    d, t = np.asarray(dims, dtype=float), np.asarray(taus, dtype=float)
    groups = [np.flatnonzero(d == v) for v in np.unique(d)]
    rng = np.random.default_rng(seed)
    X = np.stack([np.ones_like(d), 1.0 / d], axis=1)
    values = np.empty(samples)
    for b in range(samples):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        values[b] = np.linalg.lstsq(X[idx], t[idx], rcond=None)[0][0]
    values.sort()
    return float(values[int(0.025 * samples)]), float(values[max(0, int(0.975 * samples) - 1)])


def fit_task(
    points: Sequence[Mapping[str, Any]], task: str, space: Mapping[str, Any], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The τ₀ + k/d fit of one task in one space, its class, the expected class and the descriptives."""
    dims, taus = series(points, task, space["tau"], space["x"])
    fit = geometry.fit_scaling_law(dims, taus)
    d_max = max(dims)
    rule = classify(fit, d_max, settings["z"], settings["plateau_fraction"])
    expected = EXPECTED[lab.TASKS[task].overlap]
    by_size: dict[str, dict[str, float]] = {}
    for p in points:
        by_size.setdefault(str(p["hidden_size"]), {"values": []})["values"].append(space["tau"](p, task))  # type: ignore[arg-type]
    for row in by_size.values():
        v = np.asarray(row.pop("values"))
        row.update(mean=float(v.mean()), sd=float(v.std(ddof=1)) if len(v) > 1 else float("nan"), n=len(v))
    sizes = sorted(by_size, key=int)
    first, last = by_size[sizes[0]]["mean"], by_size[sizes[-1]]["mean"]
    return {
        "task": task,
        "overlap": lab.TASKS[task].overlap,
        "fit": asdict(fit),
        **rule,
        "tau0_seed_bootstrap_ci95": seed_bootstrap(dims, taus, settings["bootstrap_samples"]),
        "expected": expected,
        "agrees": rule["label"] == expected,
        "by_hidden_size": by_size,
        "ratio_smallest_to_largest": first / last if last > 0 else float("nan"),
        "x": space["x"],
    }


def fit_all(points: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Fits of every task in every space, plus the per-space verdict on the prediction."""
    out: dict[str, Any] = {}
    for name, space in spaces(points).items():
        rows = [fit_task(points, t, space, settings) for t in lab.TASKS]
        entangled = [r for r in rows if r["overlap"] == "entangled"]
        others = [r for r in rows if r["overlap"] != "entangled"]
        out[name] = {
            "primary": space["primary"],
            "tasks": rows,
            "entangled_plateau": sum(r["label"] == "intrinsic" for r in entangled),
            "entangled_total": len(entangled),
            "others_fall": sum(r["label"] == "incidental" for r in others),
            "others_total": len(others),
            "prediction_holds": all(r["agrees"] for r in rows),
        }
    return out


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def _num(x: float, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: protocol, the rule, the fits with classes, per-size means, and every point."""
    s = results["settings"]
    m = results["machine"]
    dirty = results["git"].get("uncommitted_changes") or []
    lines = [
        "# Prediction 2: the scaling law τ_i(d) = τ₀ + k/d on the lab family",
        "",
        f"Command: `{results['command']}` (commit `{(results['git'].get('commit') or '?')[:10]}`"
        + (f", uncommitted changes in: {', '.join(dirty)}" if dirty else "")
        + f"). Wall time {results['seconds'] / 60:.1f} min on {m['cpu_model']} ({m['cpu_count']} CPUs, torch "
        f"threads {m['torch_threads']}); torch {results['versions']['torch']}, transformers "
        f"{results['versions']['transformers']}.",
        "",
        f"Family: hidden sizes {s['hidden_sizes']} × pretraining seeds {s['seeds']} "
        f"(`lab.pretrain(hidden_size=d, seed=s, **{s['pretrain']})`; other settings: lab defaults, "
        f"{results['points'][0]['pretrain_settings']['num_layers']} blocks, batch "
        f"{results['points'][0]['pretrain_settings']['batch_size']}, lr "
        f"{results['points'][0]['pretrain_settings']['learning_rate']}). τ measured before any alignment step "
        f"with `benchmarks/probe_prediction.py`'s functions: {', '.join(f'{k}={s[k]}' for k in PROBE_KEYS)}.",
        "",
        f"Rule (fixed before the results): fit τ₀ + k/d by OLS over all {len(results['points'])} points; "
        f"**intrinsic** if τ₀ − {s['z']:g}·se > 0 and τ₀ ≥ {s['plateau_fraction']:g}·τ̂({max(s['hidden_sizes'])}); "
        f"else **incidental** if k − {s['z']:g}·se(k) > 0; else **inconclusive**. Expected: entangled → "
        "intrinsic, others → incidental. Bootstrap: seeds resampled within each d "
        f"({s['bootstrap_samples']} resamples).",
        "",
    ]
    for name, space in results["fits"].items():
        tag = "primary" if space["primary"] else "secondary (pre-declared sensitivity)"
        xs = space["tasks"][0]["x"]
        lines += [
            f"## {name} ({tag})",
            "",
            f"Entangled tasks that plateau: {space['entangled_plateau']}/{space['entangled_total']}; other tasks "
            f"that fall like 1/{'P' if xs == 'num_parameters' else 'd'}: {space['others_fall']}/{space['others_total']}.",
            "",
            "| task | by construction | τ₀ ± se | τ₀ 95% seed bootstrap | k ± se | τ̂(d_max) | τ₀ share | class | "
            "expected | agrees |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in space["tasks"]:
            f = r["fit"]
            ci = r["tau0_seed_bootstrap_ci95"]
            ci_s = f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "n/a"
            lines.append(
                f"| {r['task']} | {r['overlap']} | {f['tau0']:.3g} ± {_num(f['tau0_stderr'], '.2g')} | {ci_s} | "
                f"{f['k']:.3g} ± {_num(f['k_stderr'], '.2g')} | {r['tau_at_d_max']:.3g} | "
                f"{_num(r['plateau_share_at_d_max'], '.2f')} | **{r['label']}** | {r['expected']} | "
                f"{'yes' if r['agrees'] else 'no'} |"
            )
        sizes = sorted(space["tasks"][0]["by_hidden_size"], key=int)
        lines += [
            "",
            "Mean τ (sd over seeds) per hidden size:",
            "",
            "| task | " + " | ".join(f"d={d}" for d in sizes) + " | τ(d_min)/τ(d_max) |",
            "|---|" + "---|" * (len(sizes) + 1),
        ]
        for r in space["tasks"]:
            cells = [
                f"{r['by_hidden_size'][d]['mean']:.3g} ({_num(r['by_hidden_size'][d]['sd'], '.2g')})"
                for d in sizes
            ]
            lines.append(
                f"| {r['task']} | "
                + " | ".join(cells)
                + f" | {_num(r['ratio_smallest_to_largest'], '.2f')} |"
            )
        lines.append("")
    lines += [
        "## Every point",
        "",
        "| d | seed | parameters | pretrain loss | layer (d′) | "
        + " | ".join(f"τ repr {t}" for t in lab.TASKS)
        + " | "
        + " | ".join(f"τ grad {t}" for t in lab.TASKS)
        + " | accuracy (mean) |",
        "|---|---|---|---|---|" + "---|" * (2 * len(lab.TASKS) + 1),
    ]
    for p in results["points"]:
        sep = {str(k): v for k, v in p["repr_separation"].items()}[str(p["repr_layer"])]
        acc = p.get("eval", {}).get("accuracy/mean")
        lines.append(
            f"| {p['hidden_size']} | {p['seed']} | {p['num_parameters']:,} | {p['pretrain_final_loss']:.3g} | "
            f"{p['repr_layer']} ({sep:.2f}) | "
            + " | ".join(f"{p['tau_repr'][t]:.3g}" for t in lab.TASKS)
            + " | "
            + " | ".join(f"{p['tau_grad'][t]:.2e}" for t in lab.TASKS)
            + f" | {_num(acc, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> None:
    """τ against 1/d per task (rows: the two primary spaces), every (d, seed) point and the fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    primary = [n for n, s in results["fits"].items() if s["primary"]]
    tasks = list(lab.TASKS)
    fig, axes = plt.subplots(
        len(primary), len(tasks), figsize=(3.0 * len(tasks), 2.8 * len(primary)), squeeze=False
    )
    readers = spaces(points)
    x_max = 1.0 / min(results["settings"]["hidden_sizes"])
    grid = np.linspace(0.0, 1.05 * x_max, 50)
    for i, name in enumerate(primary):
        for j, (task, row) in enumerate(zip(tasks, results["fits"][name]["tasks"], strict=True)):
            ax = axes[i][j]
            dims, taus = series(points, task, readers[name]["tau"])
            ax.scatter(1.0 / np.asarray(dims), taus, s=14, color="tab:blue", label="(d, seed)")
            f = row["fit"]
            ax.plot(grid, f["tau0"] + f["k"] * grid, color="tab:red", lw=1.2, label="τ₀ + k/d")
            ax.axhline(0.0, color="0.7", lw=0.6)
            ax.set_title(f"{task} ({row['overlap']}): {row['label']}", fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel(f"τ ({name})", fontsize=8)
            if i == len(primary) - 1:
                ax.set_xlabel("1/d", fontsize=8)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=SETTINGS["hidden_sizes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=SETTINGS["seeds"])
    parser.add_argument("--pretrain-steps", type=int, default=SETTINGS["pretrain"]["steps"])
    parser.add_argument("--cache-dir", default=None, help="lab cache root (default: lab.default_cache_dir())")
    parser.add_argument("--output-dir", default="benchmarks/results/scaling")
    for key in PROBE_KEYS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=pp.SETTINGS[key])
    parser.add_argument("--eval-rows", type=int, default=SETTINGS["eval_rows"])
    parser.add_argument("--bootstrap", type=int, default=SETTINGS["bootstrap_samples"])
    args = parser.parse_args(argv)
    if len(set(args.hidden_sizes)) < 2 or len(set(args.hidden_sizes)) != len(args.hidden_sizes):
        parser.error(
            f"--hidden-sizes {args.hidden_sizes}: pass at least two distinct sizes, e.g. 32 64 128 256"
        )
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: seeds must be distinct, e.g. --seeds 0 1 2")
    if len(args.hidden_sizes) * len(args.seeds) < 3:
        parser.error(
            f"--hidden-sizes × --seeds gives {len(args.hidden_sizes) * len(args.seeds)} points; the fit's "
            "standard errors need at least 3: add a seed or a size"
        )
    for d in args.hidden_sizes:
        try:
            lab.LabConfig(hidden_size=d, steps=max(1, args.pretrain_steps))
        except ValueError as err:
            parser.error(f"--hidden-sizes {d}: {err}")
    if args.pretrain_steps < 1:
        parser.error(f"--pretrain-steps {args.pretrain_steps}: must be a positive integer, e.g. 500")
    for key in PROBE_KEYS:
        if getattr(args, key) < 2:
            parser.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least 2")
    if args.eval_rows < 0 or args.bootstrap < 0:
        parser.error("--eval-rows and --bootstrap must be >= 0 (0 skips the evaluation / the bootstrap)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "trl", "frontier_trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = {
        **copy.deepcopy(SETTINGS),
        "hidden_sizes": list(args.hidden_sizes),
        "seeds": list(args.seeds),
        "pretrain": {**SETTINGS["pretrain"], "steps": args.pretrain_steps},
        "eval_rows": args.eval_rows,
        "bootstrap_samples": args.bootstrap,
        **{k: getattr(args, k) for k in PROBE_KEYS},
    }
    git = git_state()  # read at the start: the code that ran
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = dict(pp.SETTINGS)
    pp.SETTINGS.update({k: settings[k] for k in PROBE_KEYS})  # probe_prediction reads its own dict
    t0 = time.perf_counter()
    try:
        grid = [(d, s) for d in args.hidden_sizes for s in args.seeds]
        points = [
            measure(d, s, settings["pretrain"], args.cache_dir, args.eval_rows)
            for d, s in tqdm(grid, desc="lab family (d, seed)")
        ]
    finally:
        pp.SETTINGS.clear()
        pp.SETTINGS.update(saved)
    fits = fit_all(points, settings)
    versions = package_versions()
    for name in ("scipy", "matplotlib"):
        versions[name] = __import__(name).__version__
    versions["python"] = sys.version.split()[0]
    results = {
        "command": "OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.scaling_law "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "versions": versions,
        "machine": machine(),
        "git": git,
        "seconds": time.perf_counter() - t0,
        "points": points,
        "fits": fits,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "scaling.png")
    for name, space in fits.items():
        if not space["primary"]:
            continue
        print(f"-- {name}")
        for r in space["tasks"]:
            f = r["fit"]
            print(
                f"{r['task']:<11} {r['overlap']:<9} tau0 {f['tau0']:+.3e} ± {f['tau0_stderr']:.1e}  "
                f"k {f['k']:+.3e} ± {f['k_stderr']:.1e}  -> {r['label']:<12} (expected {r['expected']})"
            )
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
