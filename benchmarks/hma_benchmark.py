"""HMA versus uniform averaging on the alignment-tax lab (issue 6; paper §7.3 and Prediction 3).

For each setting (a lab world with a given entanglement, and a layer grouping):

1. pretrain (or load from cache) the lab model: the *base*;
2. align it with vanilla DPO (``FrontierDPOTrainer(projection="none")``, bitwise plain TRL DPO): the
   *aligned* model;
3. measure the per-group geometry once (:func:`frontier_trainer.hma.measure_geometry`);
4. for every t of the sweep: uniform averaging α_ℓ = t, and HMA at the *same budget* B = t² Σ w_ℓ with
   capability tolerances on the blocks: HMA's block part must predict a capability change of at least
   ρ · min(0, t Σ_ℓ c_iℓ) (ρ = ``--tolerance-scale``; ρ = 1 keeps uniform's predicted capability,
   ρ = 0 asks for no predicted loss in the blocks); the outer tensors move by t in both methods;
5. merge each point (streaming) and evaluate it for real with ``lab.evaluate``: refusal rate on
   held-out harmful prompts and per-task exact-match accuracy; also the real change of the first-order
   objectives (safety margin S, capability log-likelihoods f_i) to get the first-order prediction error.

Reported per setting: the dominated hypervolume of each front in the (refusal rate, mean capability
accuracy) plane with reference point (0, 0) (both axes are rates in [0, 1]; base and aligned models are
points of both fronts), the capability kept at matched safety (upper envelopes interpolated linearly in
refusal rate), the first-order prediction error per point, and the cross-layer spread of τ_ℓ.

Run (full): ``python benchmarks/hma_benchmark.py --out benchmarks/results/hma``; small smoke run:
``python benchmarks/hma_benchmark.py --preset small --out /tmp/hma_bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontier_trainer import lab
from frontier_trainer.directions import build_capability_sampler, completion_metric
from frontier_trainer.hma import Allocation, Grouping, allocate, measure_geometry, merge, uniform
from frontier_trainer.hma.pareto import hypervolume, pareto
from frontier_trainer.hma.signals import preference_batch, preference_margin

logger = logging.getLogger("hma_benchmark")

PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(hidden=64, layers=4, pretrain_steps=1200, pretrain_batch=32, dpo_steps=60, eval_examples=40,
                  sweep=[0.25, 0.5, 0.75], geometry_examples=32),
    "full": dict(hidden=128, layers=4, pretrain_steps=1500, pretrain_batch=64, dpo_steps=200, eval_examples=100,
                 sweep=[0.2, 0.35, 0.5, 0.65, 0.8], geometry_examples=64),
}  # fmt: skip


# --------------------------------------------------------------------------------------
# Fronts
# --------------------------------------------------------------------------------------


def envelope_at(points: list[tuple[float, float]], x: float) -> float:
    """Best capability reachable at refusal ≥ x on the front (upper envelope, linear interpolation)."""
    front = pareto(points)
    xs = np.array([p[0] for p in front])
    ys = np.array([p[1] for p in front])
    if x > xs.max():
        return math.nan
    if x <= xs.min():
        return float(ys.max())
    return float(np.interp(x, xs, ys))


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def align(base_dir: Path, out: Path, world: lab.WorldConfig, steps: int, seed: int, lr: float) -> Path:
    """Vanilla DPO (projection='none' is bitwise plain TRL DPO) on the lab's safety preferences."""
    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer

    if (out / "model.safetensors").is_file():
        return out
    model, tok = lab.load(base_dir)
    config = FrontierDPOConfig(
        output_dir=str(out / "trainer"), projection="none", max_steps=steps, per_device_train_batch_size=16,
        learning_rate=lr, beta=0.1, report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
        logging_steps=max(1, steps // 5), save_strategy="no", seed=seed,
    )  # fmt: skip
    trainer = FrontierDPOTrainer(
        model=model,
        args=config,
        train_dataset=lab.preference_dataset("train", world=world),
        processing_class=tok,
    )
    trainer.train()
    trainer.model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    return out


def objectives(model: Any, tok: Any, prefs: Any, caps: dict[str, Any], n: int) -> dict[str, float]:
    """S (log-prob margin) and f_i (completion log-likelihood) on the geometry's own batches."""
    sampler = build_capability_sampler(caps, tok, None, batch_size=n, seed=0)
    with torch.no_grad():
        out = {
            "S": float(
                preference_margin(model, preference_batch(tok, list(prefs.select(range(min(n, len(prefs)))))))
            )
        }
        for t in sampler.tasks:
            out[t] = float(completion_metric(model, sampler.next_batch(t)))
    return out


def evaluate_point(
    base_dir: Path, aligned_dir: Path, alloc: Allocation | float, grouping: Grouping, world: lab.WorldConfig,
    prefs: Any, caps: dict[str, Any], args: argparse.Namespace, scratch: Path,
) -> dict[str, Any]:  # fmt: skip
    out = scratch / "merged"
    shutil.rmtree(out, ignore_errors=True)
    merge(str(base_dir), str(aligned_dir), alloc, out, grouping=grouping, progress=False)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, out / f)
    model, tok = lab.load(out)
    metrics = lab.evaluate(
        model, tok, world=world, max_examples=args.eval_examples, compute_nll=False, progress=False
    )
    obj = objectives(model, tok, prefs, caps, args.geometry_examples)
    return {k: v for k, v in metrics.items() if isinstance(v, float)} | {"objectives": obj}


def run_setting(
    name: str, entanglement: float, grouping: Grouping, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    started = time.time()
    world = lab.WorldConfig(entanglement=entanglement)
    cfg = lab.LabConfig(hidden_size=args.hidden, num_layers=args.layers, steps=args.pretrain_steps,
                        batch_size=args.pretrain_batch, world=world)  # fmt: skip
    base_dir = Path(lab.pretrain_config(cfg, cache_dir=args.cache_dir, progress=False))
    aligned_dir = align(
        base_dir,
        out / f"aligned-ent{entanglement:g}-{base_dir.name}-lr{args.dpo_lr:g}-s{args.dpo_steps}",
        world,
        args.dpo_steps,
        args.seed,
        args.dpo_lr,
    )
    prefs = lab.preference_dataset("train", world=world)
    caps = lab.capability_datasets("train", n=args.geometry_examples, world=world)
    geo = measure_geometry(str(base_dir), str(aligned_dir), prefs, caps, grouping=grouping,
                           max_examples=args.geometry_examples)  # fmt: skip
    geo.save(out / f"{name}-geometry.json")
    scratch = Path(tempfile.mkdtemp(prefix="hma_bench_"))
    base_model, tok = lab.load(base_dir)
    base_obj = objectives(base_model, tok, prefs, caps, args.geometry_examples)
    points: list[dict[str, Any]] = []
    for label, alloc in [("base", 0.0), ("aligned", 1.0)]:
        r = evaluate_point(base_dir, aligned_dir, alloc, grouping, world, prefs, caps, args, scratch)
        points.append({"method": label, "t": alloc, **r})
    for t in args.sweep:
        uni = uniform(geo, t)
        # The outer tensors move identically in both methods (t_B = t), so the tolerance is set on the
        # blocks: HMA's block part must predict at least ρ × uniform's block loss (ρ = tolerance scale).
        eps = {
            k: max(
                0.0,
                -t * float(geo.outer_capability[i])
                - min(0.0, args.tolerance_scale * t * float(geo.capability[i].sum())),
            )
            for i, k in enumerate(geo.tasks)
        }
        hmaa = allocate(geo, t=t, tolerances=eps)
        for alloc in (uni, hmaa):
            r = evaluate_point(base_dir, aligned_dir, alloc, grouping, world, prefs, caps, args, scratch)
            obj = r["objectives"]
            err = {
                "S": (obj["S"] - base_obj["S"]) - alloc.predicted_safety,
                **{k: (obj[k] - base_obj[k]) - v for k, v in alloc.predicted_capability.items()},
            }
            points.append({"method": alloc.method, "t": t, "alphas": alloc.alphas, "outer_alpha": alloc.outer_alpha,
                           "predicted": {"S": alloc.predicted_safety, **alloc.predicted_capability},
                           "realised": {"S": obj["S"] - base_obj["S"], **{k: obj[k] - base_obj[k] for k in geo.tasks}},
                           "first_order_error": err, **r})  # fmt: skip
            logger.info(
                "%s %s t=%.2f refusal=%.3f acc=%.3f",
                name,
                alloc.method,
                t,
                r["refusal_rate"],
                r["accuracy/mean"],
            )
    shutil.rmtree(scratch, ignore_errors=True)
    ends = [(p["refusal_rate"], p["accuracy/mean"]) for p in points if p["method"] in ("base", "aligned")]
    fronts = {
        m: ends + [(p["refusal_rate"], p["accuracy/mean"]) for p in points if p["method"] == m]
        for m in ("uniform", "hma")
    }
    hv = {m: hypervolume(f) for m, f in fronts.items()}
    levels = sorted({round(x, 2) for x in np.linspace(0.1, 1.0, 10)})
    matched = {f"{x:.1f}": {m: envelope_at(fronts[m], x) for m in fronts} for x in levels}
    return {
        "setting": name, "entanglement": entanglement, "grouping": grouping.mode, "outer": grouping.outer,
        "base_dir": str(base_dir), "aligned_dir": str(aligned_dir), "tax_spread": geo.tax_spread(),
        "tax_rates": dict(zip(geo.groups, [None if not math.isfinite(x) else x for x in geo.tax_rates.tolist()], strict=True)),
        "hypervolume": hv, "hv_ratio": hv["hma"] / hv["uniform"] if hv["uniform"] > 0 else math.nan,
        "capability_at_matched_refusal": matched, "points": points, "seconds": round(time.time() - started, 1),
    }  # fmt: skip


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def write_report(results: list[dict[str, Any]], out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for method, style in (("uniform", "o--"), ("hma", "s-")):
            pts = [p for p in res["points"] if p["method"] in (method, "base", "aligned")]
            pts.sort(
                key=lambda p: p["t"] if p["method"] == method else (0 if p["method"] == "base" else 1.01)
            )
            ax.plot(
                [p["refusal_rate"] for p in pts],
                [p["accuracy/mean"] for p in pts],
                style,
                label=f"{method} (HV {res['hypervolume'][method]:.3f})",
            )
        ax.set_xlabel("refusal rate (held-out harmful)")
        ax.set_ylabel("mean capability accuracy")
        ax.set_title(f"{res['setting']}: τ spread {res['tax_spread']['tau_std']:.3g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hma_vs_uniform.png", dpi=120)
    lines = ["# HMA vs uniform averaging (lab)", "", f"Command: `{command}`", "",
             "| setting | entanglement | grouping | τ_ℓ mean | τ_ℓ std | τ_ℓ range | HV uniform | HV HMA | HV ratio |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        ts = r["tax_spread"]
        lines.append(f"| {r['setting']} | {r['entanglement']} | {r['grouping']} | {ts['tau_mean']:.4g} | {ts['tau_std']:.4g} | "
                     f"{ts['tau_range']:.4g} | {r['hypervolume']['uniform']:.4f} | {r['hypervolume']['hma']:.4f} | {r['hv_ratio']:.3f} |")  # fmt: skip
    for r in results:
        lines += ["", f"## {r['setting']}", "", "| method | t | refusal | acc mean | pred ΔS | real ΔS | ΔS error | max abs cap error |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in r["points"]:
            if "predicted" in p:
                cap_err = max(abs(v) for k, v in p["first_order_error"].items() if k != "S")
                lines.append(f"| {p['method']} | {p['t']} | {p['refusal_rate']:.3f} | {p['accuracy/mean']:.3f} | {p['predicted']['S']:+.3f} | "
                             f"{p['realised']['S']:+.3f} | {p['first_order_error']['S']:+.3f} | {cap_err:.3f} |")  # fmt: skip
            else:
                lines.append(
                    f"| {p['method']} | {p['t']} | {p['refusal_rate']:.3f} | {p['accuracy/mean']:.3f} | | | | |"
                )
        lines += ["", "Capability kept at matched refusal (upper envelope): " + ", ".join(
            f"{x}: uniform {v['uniform']:.3f} / HMA {v['hma']:.3f}" for x, v in r["capability_at_matched_refusal"].items())]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--out", default="benchmarks/results/hma")
    p.add_argument("--cache-dir", default=None, help="lab model cache (default: lab.default_cache_dir())")
    p.add_argument("--settings", nargs="+", default=["ent1:1.0:block", "ent0:0.0:block"],
                   help="name:entanglement:grouping (grouping: block, module or parts:K)")  # fmt: skip
    p.add_argument("--tolerance-scale", type=float, default=0.5)
    p.add_argument(
        "--dpo-lr", type=float, default=5e-4, help="DPO learning rate (2e-3 destroyed the small model)"
    )
    p.add_argument("--seed", type=int, default=0)
    for key, value in PRESETS["full"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value) if not isinstance(value, list) else float,
                       nargs="+" if isinstance(value, list) else None, default=None)  # fmt: skip
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("frontier_trainer.lab", "frontier_trainer.lab.evaluate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.settings:
        name, ent, group = spec.split(":", 2)
        results.append(run_setting(name, float(ent), Grouping(group), args, out))
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    command = "python benchmarks/hma_benchmark.py " + " ".join(__import__("sys").argv[1:])
    write_report(results, out, command)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
