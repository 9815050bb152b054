"""Prediction 1 on the lab: do pre-alignment tax rates τ_i order the degradation DPO causes?

One command runs, on a lab model: the pre-training geometry report, then a vanilla DPO run
(``projection="none"``) and a null-space DPO run, each with a :class:`DegradationCallback`
(predicted first-order change vs observed change of the completion log-likelihood on held-out
eval sets, plus the lab's exact-match accuracy). It writes ``results.json`` and one PNG per run
under ``--output-dir`` and prints Spearman/Kendall(τ_i, observed degradation) per run.

    python benchmarks/degradation_benchmark.py --output-dir outputs/degradation       # default lab model
    python benchmarks/degradation_benchmark.py --size small --output-dir /tmp/deg     # minutes-scale check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer, lab
from frontier_trainer.geometry_report import format_report, geometry_report
from frontier_trainer.tracking import DegradationCallback

logger = logging.getLogger("degradation_benchmark")

SIZES: dict[str, dict[str, Any]] = {
    # pretraining settings, rows per capability/eval set, DPO steps
    "small": dict(lab=dict(hidden_size=32, steps=300), rows=64, eval_rows=64, dpo_steps=20),
    "default": dict(lab=dict(), rows=256, eval_rows=100, dpo_steps=100),
}


def run(
    model_dir: Path, projection: str, out: Path, rows: int, eval_rows: int, steps: int, seed: int
) -> dict[str, Any]:
    """One DPO run with degradation tracking; returns the callback's summary plus lab metrics."""
    model, tokenizer = lab.load(model_dir)
    model.train()
    caps = lab.capability_datasets("train", n=rows)
    evals = lab.capability_datasets("eval", n=eval_rows)
    args = FrontierDPOConfig(
        output_dir=str(out / projection),
        projection=projection,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        seed=seed,
        capability_batch_size=16,
        capability_refresh_steps=1,
        degradation_tracking=False,  # this script attaches its own callback, with the lab accuracy metric
    )
    trainer = FrontierDPOTrainer(
        model=model,
        ref_model=lab.load(model_dir)[0],
        args=args,
        train_dataset=lab.preference_dataset("train"),
        processing_class=tokenizer,
        capability_datasets=caps if projection != "none" else None,
    )

    def accuracy(m: torch.nn.Module, tok: Any) -> dict[str, float]:
        metrics = lab.evaluate(m, tok, max_examples=eval_rows, compute_nll=False, progress=False)
        return {k: v for k, v in metrics.items() if k.startswith("accuracy/") or k.endswith("_rate")}

    callback = DegradationCallback(
        caps,
        eval_datasets=evals,
        metrics={"lab": accuracy},
        eval_steps=max(1, steps // 4),
        batch_size=16,
        seed=seed,
    ).attach(trainer)
    trainer.train()
    summary = callback.summary or {}
    png = out / f"degradation_{projection}.png"
    shutil.copy(Path(args.output_dir) / "degradation" / "degradation.png", png)
    return {"projection": projection, "plot": str(png), **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--output-dir", default="outputs/degradation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the DPO steps of --size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = SIZES[args.size]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = lab.pretrain(**size["lab"], seed=args.seed)
    model, tokenizer = lab.load(model_dir)
    report = geometry_report(
        model,
        tokenizer,
        lab.preference_dataset("train"),
        lab.capability_datasets("train", n=size["rows"]),
        second_preference_dataset=lab.helpfulness_dataset("train"),
        batch_size=16,
        seed=args.seed,
    )
    print(format_report(report))
    steps = args.steps or size["dpo_steps"]
    results = {"size": args.size, "model_dir": str(model_dir), "geometry_report": report, "runs": {}}
    for projection in ("none", "nullspace"):
        results["runs"][projection] = run(
            model_dir, projection, out, size["rows"], size["eval_rows"], steps, args.seed
        )
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{'run':<10} {'task':<12} {'tau':>8} {'predicted':>10} {'observed':>10} {'d acc':>8}")
    for name, res in results["runs"].items():
        for row in res.get("rows", []):
            dacc = res.get("user_change", {}).get(f"lab/accuracy/{row['task']}", float("nan"))
            print(
                f"{name:<10} {row['task']:<12} {row['tau']:>8.4f} {row['predicted']:>10.4f} "
                f"{row['observed']:>10.4f} {dacc:>+8.3f}"
            )
        ranks = res.get("rank_correlations", {})
        print(
            f"{name}: Spearman(tau, observed) = {ranks.get('spearman_tau_vs_observed', float('nan')):.3f}, "
            f"Kendall = {ranks.get('kendall_tau_vs_observed', float('nan')):.3f}, "
            f"Spearman(predicted, observed) = {ranks.get('spearman_predicted_vs_observed', float('nan')):.3f}"
        )
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
