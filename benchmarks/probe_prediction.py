"""Prediction 1 from representation probes: does τ_i = cos²(v*, c_i) in the residual stream order DPO's damage?

For each lab pretraining seed: measure, before any alignment step, the representation-space tax rates
(:func:`frontier_trainer.probes.probe_tax_rates`: Arditi-style safety probe harmful − look-alike,
difference-of-means task probes against the grand mean of the task means, τ at the layer where the
safety probe separates held-out prompts best) and the gradient-space tax rates of
:func:`frontier_trainer.report.geometry_report` (DPO direction vs ∇ of each task's completion
log-likelihood at step 0). Then run vanilla DPO (``trl.DPOTrainer``; the settings of
``benchmarks/degradation_benchmark.py``: 100 steps, batch 16, lr 5e-4 constant, β 0.1) and measure
the observed degradation per task with ``lab.evaluate`` on held-out prompts: the increase of the
completion NLL (nats/token, the primary measure) and the drop in exact-match accuracy.

Reported: Spearman(τ, observed) per seed and pooled over all (seed, task) points with a bootstrap 95%
interval (resampling points), plus the mean within-seed Spearman with a stratified bootstrap (tasks
resampled within each seed), for both spaces. A few pre-declared sensitivity variants (another harmless
set, each single layer, mean over layers) are reported next to the primary rule, never instead of it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_prediction.py --seeds 0 1 2 \
        --output-dir benchmarks/results/probes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import scipy
import torch
import transformers
import trl
from scipy import stats
from tqdm.auto import tqdm

from frontier_trainer import lab, probes
from frontier_trainer.lab.world import examples
from frontier_trainer.report import geometry_report

logger = logging.getLogger("probe_prediction")

SETTINGS: dict[str, Any] = {
    "probe_rows_per_set": 256,  # train prompts per task / harmful / look-alike set for the probes
    "held_out_rows": 100,  # eval prompts per safety set for the layer rule's d'
    "pooled_harmless_rows_per_task": 43,  # variant: 6 x 43 = 258 benign capability prompts, disjoint
    "gradient_rows": 256,  # capability rows for the gradient-space directions
    "gradient_batch_size": 16,
    "gradient_batches": 16,  # 16 x 16 = 256 rows per direction, as the degradation tracker's 256
    "eval_rows": 100,  # held-out rows per task for the observed change
    "dpo_steps": 100,
    "dpo_batch_size": 16,
    "dpo_learning_rate": 5e-4,
    "dpo_beta": 0.1,
    "bootstrap_samples": 10_000,
}


def prompts(name: str, split: str, n: int) -> list[str]:
    """Prompts of a lab task or safety set (deterministic)."""
    return [p for p, _ in examples(name, split, n)]


def representation_geometry(model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """The primary probe rule plus the pre-declared variants, all before training."""
    n, held = SETTINGS["probe_rows_per_set"], SETTINGS["held_out_rows"]
    k = SETTINGS["pooled_harmless_rows_per_task"]
    task_prompts = {t: prompts(t, "train", n + k) for t in lab.TASKS}
    probe_tasks = {t: p[:n] for t, p in task_prompts.items()}
    harmful, lookalike = prompts("harmful", "train", n), prompts("lookalike", "train", n)
    held_h, held_l = prompts("harmful", "eval", held), prompts("lookalike", "eval", held)
    primary = probes.probe_tax_rates(
        model,
        tokenizer,
        harmful,
        lookalike,
        probe_tasks,
        held_out_harmful=held_h,
        held_out_harmless=held_l,
        batch_size=64,
    )
    # variant: harmless = generic benign instructions (the capability prompts, disjoint from the probe rows)
    pooled = [p for t in lab.TASKS for p in task_prompts[t][n:]]
    held_pooled = [p for t in lab.TASKS for p in prompts(t, "eval", 17)]
    pooled_result = probes.probe_tax_rates(
        model,
        tokenizer,
        harmful,
        pooled,
        probe_tasks,
        held_out_harmful=held_h,
        held_out_harmless=held_pooled,
        batch_size=64,
    )
    variants: dict[str, dict[str, float]] = {"harmless=capability prompts": pooled_result.tau}
    for layer in primary.layers:
        variants[f"layer {layer} only"] = {t: by[layer] for t, by in primary.tau_by_layer.items()}
    variants["signed cos (exploratory)"] = primary.cos
    variants["mean over layers"] = {t: sum(by.values()) / len(by) for t, by in primary.tau_by_layer.items()}
    return {
        "primary": primary.to_dict(),
        "pooled_harmless": pooled_result.to_dict(),
        "variants": variants,
    }


def gradient_geometry(model: torch.nn.Module, tokenizer: Any, seed: int) -> dict[str, float]:
    """Step-0 gradient-space τ_i from frontier_trainer.report (the geometry report's library half)."""
    report = geometry_report(
        model,
        tokenizer,
        lab.preference_dataset("train"),
        lab.capability_datasets("train", n=SETTINGS["gradient_rows"]),
        batch_size=SETTINGS["gradient_batch_size"],
        batches=SETTINGS["gradient_batches"],
        seed=seed,
        progress=False,
    )
    return {row["task"]: row["tau"] for row in report["tasks"]}


def vanilla_dpo(model_dir: Path, seed: int, work: Path) -> torch.nn.Module:
    """Vanilla DPO with trl.DPOTrainer at the degradation benchmark's settings; returns the policy."""
    model, tokenizer = lab.load(model_dir)
    model.train()
    config = trl.DPOConfig(
        output_dir=str(work / f"dpo-{seed}"),
        max_steps=SETTINGS["dpo_steps"],
        per_device_train_batch_size=SETTINGS["dpo_batch_size"],
        learning_rate=SETTINGS["dpo_learning_rate"],
        lr_scheduler_type="constant",
        beta=SETTINGS["dpo_beta"],
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=20,
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=lab.load(model_dir)[0],
        args=config,
        train_dataset=lab.preference_dataset("train"),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer.model


def evaluate(model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
    metrics = lab.evaluate(model, tokenizer, max_examples=SETTINGS["eval_rows"], progress=False)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, float)}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (average ranks for ties); NaN when either side is constant."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman ρ of two (B, n) arrays (average ranks for ties); NaN for a constant row."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / den, np.nan)


def _interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of the finite values."""
    v = np.sort(values[np.isfinite(values)])
    return float(v[int(0.025 * len(v))]), float(v[int(0.975 * len(v)) - 1])


def bootstrap_pooled(xs: list[float], ys: list[float], samples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of Spearman over (seed, task) points resampled with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(xs), size=(samples, len(xs)))
    return _interval(_spearman_rows(np.asarray(xs)[idx], np.asarray(ys)[idx]))


def bootstrap_within(
    per_seed: list[tuple[list[float], list[float]]], samples: int, seed: int = 0
) -> tuple[float, float]:
    """95% interval of the mean within-seed Spearman, tasks resampled within each seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for xs, ys in per_seed:
        idx = rng.integers(0, len(xs), size=(samples, len(xs)))
        rows.append(_spearman_rows(np.asarray(xs)[idx], np.asarray(ys)[idx]))
    r = np.stack(rows)
    keep = np.isfinite(r).any(axis=0)
    with np.errstate(invalid="ignore"):
        return _interval(np.nanmean(r[:, keep], axis=0))


def correlate(seeds: list[dict[str, Any]], tau_key: str, observed_key: str) -> dict[str, Any]:
    """Per-seed, pooled and within-seed Spearman between a τ and an observed degradation."""
    tasks = list(lab.TASKS)
    per_seed, xs, ys = [], [], []
    for s in seeds:
        x = [s[tau_key][t] for t in tasks]
        y = [s[observed_key][t] for t in tasks]
        per_seed.append((x, y))
        xs += x
        ys += y
    b = SETTINGS["bootstrap_samples"]
    within = [spearman(x, y) for x, y in per_seed]
    finite = [r for r in within if r == r]
    return {
        "per_seed": {str(s["seed"]): r for s, r in zip(seeds, within, strict=True)},
        "pooled": spearman(xs, ys),
        "pooled_ci95": bootstrap_pooled(xs, ys, b),
        "within_seed_mean": sum(finite) / len(finite) if finite else float("nan"),
        "within_seed_ci95": bootstrap_within(per_seed, b),
    }


def class_auc(seed: dict[str, Any], tau_key: str) -> float:
    """P(τ of an entangled task > τ of a disjoint task) over the 2 × 4 pairs of one seed (ties: 1/2).

    A post-hoc, class-level check (paper §9.2: entangled tasks should carry the tax), added after the
    6-task Spearman turned out to be dominated by the order of the four near-zero disjoint tasks.
    """
    tau = seed[tau_key]
    hi = [tau[t] for t, task in lab.TASKS.items() if task.overlap == "entangled"]
    lo = [tau[t] for t, task in lab.TASKS.items() if task.overlap != "entangled"]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a in hi for b in lo]
    return sum(wins) / len(wins)


def run_seed(seed: int, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = lab.pretrain(seed=seed, progress=False)
    model, tokenizer = lab.load(model_dir)
    repr_geo = representation_geometry(model, tokenizer)
    grad_tau = gradient_geometry(model, tokenizer, seed)
    before = evaluate(model, tokenizer)
    aligned = vanilla_dpo(model_dir, seed, work)
    after = evaluate(aligned, tokenizer)
    tasks = list(lab.TASKS)
    out = {
        "seed": seed,
        "model_dir": str(model_dir),
        "tau_repr": repr_geo["primary"]["tau"],
        "tau_grad": grad_tau,
        "nll_increase": {t: after[f"nll/{t}"] - before[f"nll/{t}"] for t in tasks},
        "accuracy_drop": {t: before[f"accuracy/{t}"] - after[f"accuracy/{t}"] for t in tasks},
        "representation": repr_geo,
        "before": before,
        "after": after,
        "seconds": time.perf_counter() - t0,
    }
    for name, tau in repr_geo["variants"].items():
        out[f"tau_variant/{name}"] = tau
    logger.info("seed %d done in %.0fs", seed, out["seconds"])
    return out


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    tasks = list(lab.TASKS)
    lines = [
        "# Prediction 1 from representation probes (lab, vanilla DPO)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
        f"torch {results['versions']['torch']} ({results['machine']['threads']} thread(s)); "
        f"transformers {results['versions']['transformers']}, trl {results['versions']['trl']}. "
        f"Wall time {results['seconds']:.0f} s.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()) + ".",
        "",
        "Protocol: the primary rule (`tau_repr`: harmless = look-alikes, task baseline = grand mean of the "
        "task means, τ at the layer of largest held-out d′) was fixed in `frontier_trainer/probes.py` "
        "before any DPO run of this script (after looking at seed-0 τ values only). The variants were "
        f"first compared with degradation on the development seed(s) {results['development_seeds']}; "
        "the 'confirmation seeds' tables leave those out. Observed degradation: `nll_increase` = "
        "after − before completion NLL (nats/token, primary), `accuracy_drop` = before − after exact match.",
        "",
    ]
    for group, rows in results["correlations"].items():
        lines += [
            f"## Spearman(τ_i, observed degradation), 6 tasks per seed: {group}",
            "",
            "| τ from | observed | per seed | pooled (95% CI) | mean within-seed (95% CI) |",
            "|---|---|---|---|---|",
        ]
        for c in rows:
            per = ", ".join(f"{k}: {r:+.3f}" for k, r in c["per_seed"].items())
            lo, hi = c["pooled_ci95"]
            wlo, whi = c["within_seed_ci95"]
            lines.append(
                f"| {c['tau']} | {c['observed']} | {per} | {c['pooled']:+.3f} ({lo:+.2f}, {hi:+.2f}) | "
                f"{c['within_seed_mean']:+.3f} ({wlo:+.2f}, {whi:+.2f}) |"
            )
        lines.append("")
    lines += [
        "## Post hoc: do the entangled tasks get the larger τ?",
        "",
        "AUC = P(τ of chemistry or persuasion > τ of a disjoint task), over the 8 pairs of each seed "
        "(1 = both entangled tasks above all four others; 0.5 = chance). Added after the Spearman "
        "results were seen.",
        "",
        "| τ from | AUC per seed | mean |",
        "|---|---|---|",
    ]
    for key, per in results["class_auc"].items():
        values = list(per.values())
        lines.append(
            f"| {key} | "
            + ", ".join(f"{k}: {v:.2f}" for k, v in per.items())
            + f" | {sum(values) / len(values):.2f} |"
        )
    lines += ["", "## Per seed and task", ""]
    lines.append("| seed | task | τ repr (layer) | τ grad | NLL increase | accuracy drop |")
    lines.append("|---|---|---|---|---|---|")
    for s in seeds:
        layer = s["representation"]["primary"]["layer"]
        for t in tasks:
            lines.append(
                f"| {s['seed']} | {t} | {s['tau_repr'][t]:.4f} ({layer}) | {s['tau_grad'][t]:.2e} | "
                f"{s['nll_increase'][t]:+.3f} | {s['accuracy_drop'][t]:+.2f} |"
            )
    lines += ["", "Refusal and over-refusal before → after DPO:", ""]
    for s in seeds:
        b, a = s["before"], s["after"]
        sep = s["representation"]["primary"]["separation"]
        lines.append(
            f"- seed {s['seed']}: refusal {b['refusal_rate']:.2f} → {a['refusal_rate']:.2f}, over-refusal "
            f"{b['over_refusal_rate']:.2f} → {a['over_refusal_rate']:.2f}; safety-probe held-out d′ per layer "
            + ", ".join(f"{k}: {v:.2f}" for k, v in sep.items())
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="benchmarks/results/probes")
    parser.add_argument("--bootstrap", type=int, default=SETTINGS["bootstrap_samples"])
    parser.add_argument(
        "--development-seeds",
        type=int,
        nargs="*",
        default=[0],
        help="seeds on which the variants were explored; reported apart as well (default: 0)",
    )
    args = parser.parse_args(argv)
    if len(args.seeds) < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: pass distinct seeds, e.g. --seeds 0 1 2")
    SETTINGS["bootstrap_samples"] = args.bootstrap
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "trl", "frontier_trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="probe-prediction-"))
    try:
        seeds = [run_seed(s, work) for s in tqdm(args.seeds, desc="seeds")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ["tau_repr", "tau_grad", *[k for k in seeds[0] if k.startswith("tau_variant/")]]
    groups = {"all seeds": seeds}
    confirmation = [s for s in seeds if s["seed"] not in args.development_seeds]
    if confirmation and len(confirmation) < len(seeds):
        groups["confirmation seeds"] = confirmation
    correlations = {
        group: [
            {"tau": k, "observed": o, **correlate(members, k, o)}
            for k in keys
            for o in ("nll_increase", "accuracy_drop")
        ]
        for group, members in groups.items()
    }
    results = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "settings": dict(SETTINGS),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "datasets": datasets.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        "seconds": time.perf_counter() - t0,
        "development_seeds": args.development_seeds,
        "seeds": seeds,
        "correlations": correlations,
        "class_auc": {k: {str(s["seed"]): class_auc(s, k) for s in seeds} for k in keys},
    }
    (out / "results.md").write_text(markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    for group, rows in correlations.items():
        print(f"-- {group}")
        for c in rows:
            lo, hi = c["pooled_ci95"]
            per = " ".join(f"{r:+.3f}" for r in c["per_seed"].values())
            print(
                f"{c['tau']:<45} {c['observed']:<14} per seed {per}  "
                f"pooled {c['pooled']:+.3f} ({lo:+.2f}, {hi:+.2f})"
            )
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
