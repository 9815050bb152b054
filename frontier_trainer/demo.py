"""``make demo``: the product's story on the built-in lab, end to end.

1. The theory on planted directions with known ground truth (tax rates, the frontier, the
   m'/d scaling law), a few seconds.
2. The lab model (built once, then cached): per-task accuracy, compliance with harmful
   requests, over-refusal.
3. Its pre-training geometry report: τ_i of the DPO safety direction against each task's
   capability direction, and the harmlessness/helpfulness conflict (Thm 6.4).
4. Vanilla DPO and null-space DPO from the same start, each tracked by the degradation
   callback (predicted versus observed per-task degradation), logged to an offline wandb run.
5. A final summary table. Everything is written under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from frontier_trainer import geometry

logger = logging.getLogger(__name__)


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


def _lab_story(out: Path, steps: int, seed: int) -> dict[str, Any]:
    """Steps 2-5 of the module docstring; returns the summary written to ``summary.json``."""
    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer, lab
    from frontier_trainer.geometry_report import format_report, geometry_report
    from frontier_trainer.lab.cli import format_table

    model_dir = lab.pretrain()
    model, tokenizer = lab.load(model_dir)
    base = lab.evaluate(model, tokenizer, progress=False)
    logger.info("\nLab model %s before alignment (held-out prompts):\n%s", model_dir.name, format_table(base))
    (out / "lab_eval_base.json").write_text(json.dumps(base, indent=2))

    report = geometry_report(
        model,
        tokenizer,
        lab.preference_dataset("train"),
        lab.capability_datasets("train", n=256),
        second_preference_dataset=lab.helpfulness_dataset("train"),
        batch_size=16,
        seed=seed,
        progress=False,
    )
    logger.info("\nPre-training geometry of the lab model:\n%s", format_report(report))
    (out / "geometry_lab.json").write_text(json.dumps(report, indent=2, default=str))

    def lab_accuracy(m: torch.nn.Module, tok: Any) -> dict[str, float]:
        metrics = lab.evaluate(m, tok, max_examples=50, compute_nll=False, progress=False)
        return {k: v for k, v in metrics.items() if k.startswith("accuracy/") or k.endswith("_rate")}

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(out))
    os.environ.setdefault("WANDB_PROJECT", "frontier-trainer-demo")
    runs: dict[str, Any] = {}
    for projection in ("none", "nullspace"):
        name = "vanilla" if projection == "none" else projection
        run_dir = out / name
        args = FrontierDPOConfig(
            output_dir=str(run_dir),
            run_name=f"demo-{name}",
            projection=projection,
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
            capability_batch_size=16,
            capability_refresh_steps=1,
            capability_eval_datasets=lab.capability_datasets("eval", n=100),
            degradation_eval_steps=max(1, steps // 3),
            disable_tqdm=True,
        )
        trainer = FrontierDPOTrainer(
            model=str(model_dir),
            args=args,
            train_dataset=lab.preference_dataset("train"),
            processing_class=tokenizer,
            capability_datasets=lab.capability_datasets("train", n=256),
            degradation_metrics={"lab": lab_accuracy},
        )
        trainer.train()
        import wandb

        if wandb.run is not None:
            wandb.finish()
        after = lab.evaluate(trainer.model, tokenizer, progress=False)
        tracked = trainer.degradation_callback.summary if trainer.degradation_callback else {}
        runs[name] = {"eval": after, "degradation": tracked}
        png = run_dir / "degradation" / "degradation.png"
        if png.exists():
            shutil.copy(png, out / f"degradation_{name}.png")
        logger.info(
            "\n%s DPO, %d steps: lab evaluation after alignment:\n%s", name, steps, format_table(after)
        )
    summary = {"model_dir": str(model_dir), "base": base, "runs": runs, "geometry": report}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    logger.info("\n%s", format_summary(base, runs))
    return summary


def format_summary(base: dict[str, Any], runs: dict[str, Any]) -> str:
    """The demo's closing table: safety, over-refusal and per-task accuracy, before and after."""
    tasks = [k.split("/", 1)[1] for k in base if k.startswith("accuracy/") and k != "accuracy/mean"]
    head = f"{'model':<10} {'refusal':>8} {'over-ref':>9} {'mean acc':>9} " + " ".join(
        f"{t[:10]:>10}" for t in tasks
    )
    lines = ["Summary (held-out prompts)", head, "-" * len(head)]
    rows = [("base", base)] + [(name, r["eval"]) for name, r in runs.items()]
    for name, m in rows:
        lines.append(
            f"{name:<10} {m['refusal_rate']:>8.2f} {m['over_refusal_rate']:>9.2f} {m['accuracy/mean']:>9.2f} "
            + " ".join(f"{m[f'accuracy/{t}']:>10.2f}" for t in tasks)
        )
    lines += [
        "",
        f"{'run':<10} {'task':<12} {'tau_i':>8} {'predicted':>10} {'observed':>10}  (degradation, nats/token)",
    ]
    for name, r in runs.items():
        for row in (r.get("degradation") or {}).get("rows", []):
            lines.append(
                f"{name:<10} {row['task']:<12} {row['tau']:>8.5f} {row['predicted']:>10.4f} {row['observed']:>10.4f}"
            )
    for name, r in runs.items():
        ranks = (r.get("degradation") or {}).get("rank_correlations", {})
        if ranks:
            lines.append(
                f"{name}: Spearman(tau_i, observed degradation) = {ranks.get('spearman_tau_vs_observed', math.nan):.2f}, "
                f"Spearman(predicted, observed) = {ranks.get('spearman_predicted_vs_observed', math.nan):.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo", help="where reports, plots and wandb runs go")
    parser.add_argument("--steps", type=int, default=60, help="DPO steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--planted-only", action="store_true", help="only the planted-direction report (seconds)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "datasets", "transformers", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = geometry_report()
    logger.info(format_geometry_report(report))
    (out / "geometry_planted.json").write_text(json.dumps(report, indent=2))
    if not args.planted_only:
        _lab_story(out, args.steps, args.seed)
    logger.info("\nwrote %s", out)


if __name__ == "__main__":
    main()
