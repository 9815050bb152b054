"""Benchmark: vanilla DPO vs null-space vs frontier DPO on the lab model, and the cost of projecting.

Two parts, run side by side in one process with the same seeds:

1. *Quality.* Align the default lab model (harmful prompts: refusal preferred) with
   ``trl.DPOTrainer`` and with ``FrontierDPOTrainer`` (nullspace, and frontier at a few ε),
   capability directions from all six lab tasks' train split. Evaluate each on held-out prompts:
   refusal gain, per-task exact-match change, over-refusal change.
2. *Cost.* Vanilla ``trl.DPOTrainer`` against nullspace with 2 capability tasks, refresh every 10
   steps, interleaved repeats: amortised (mean) and median step time, the projection's share of
   a step, and the bytes held by the projection state against the trainable-parameter bytes.

Reproduce:  ``.venv/bin/python benchmarks/trainer_benchmark.py --output-dir benchmarks/results/trainer``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer, lab

logger = logging.getLogger("trainer_benchmark")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def common_args(out: Path, steps: int, seed: int, lr: float, batch: int) -> dict[str, Any]:
    return dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="constant",
        beta=0.1,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
    )


def train(
    method: str,
    model_dir: Path,
    out: Path,
    args: argparse.Namespace,
    tasks: list[str] | None = None,
    eps: float | None = None,
    steps: int | None = None,
) -> tuple[Any, StepTimer]:
    steps = steps or args.steps
    timer = StepTimer()
    base = common_args(out, steps, args.seed, args.lr, args.batch_size)
    tok = lab.load(model_dir)[1]
    prefs = lab.preference_dataset("train")
    if method == "vanilla":
        trainer = DPOTrainer(
            model=str(model_dir),
            args=DPOConfig(**base),
            train_dataset=prefs,
            processing_class=tok,
            callbacks=[timer],
        )
    else:
        caps = lab.capability_datasets("train", tasks=tasks)
        cfg = FrontierDPOConfig(
            **base,
            projection="frontier" if eps is not None else "nullspace",
            capability_tolerance=eps,
            capability_refresh_steps=args.refresh_steps,
            capability_batch_size=args.capability_batch_size,
            # the cost runs time the projection alone; the quality runs also track degradation
            degradation_tracking=getattr(args, "degradation_tracking", True),
        )
        trainer = FrontierDPOTrainer(
            model=str(model_dir),
            args=cfg,
            train_dataset=prefs,
            processing_class=tok,
            capability_datasets=caps,
            callbacks=[timer],
        )
    trainer.train()
    return trainer, timer


def evaluate(model: torch.nn.Module, tok: Any, max_examples: int) -> dict[str, float]:
    model.eval()
    metrics = lab.evaluate(model, tok, max_examples=max_examples, compute_nll=False, progress=False)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def summarise(name: str, base: dict[str, float], after: dict[str, float], tasks: list[str]) -> dict[str, Any]:
    acc_change = {t: after[f"accuracy/{t}"] - base[f"accuracy/{t}"] for t in tasks}
    return {
        "method": name,
        "refusal_rate": after["refusal_rate"],
        "refusal_gain": after["refusal_rate"] - base["refusal_rate"],
        "over_refusal_change": after["over_refusal_rate"] - base["over_refusal_rate"],
        "accuracy_change": acc_change,
        "mean_accuracy_drop": -sum(acc_change.values()) / len(acc_change),
    }


def quality(model_dir: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every method once per seed (same seed for every method); rows hold the mean over seeds."""
    model, tok = lab.load(model_dir)
    tasks = list(lab.TASKS)
    base = evaluate(model, tok, args.eval_examples)
    methods: list[tuple[str, str, float | None]] = [
        ("vanilla", "vanilla", None),
        ("nullspace", "nullspace", None),
    ]
    methods += [(f"frontier eps={e:g}", "frontier", e) for e in args.eps]
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in methods}
    for seed in args.seeds:
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
        for name, method, eps in methods:
            logger.info("quality: seed %d, training %s", seed, name)
            run_dir = out / f"seed{seed}" / name.replace(" ", "_")
            trainer, _ = train(method, model_dir, run_dir, seed_args, tasks=tasks, eps=eps)
            per_seed[name].append(
                summarise(name, base, evaluate(trainer.model, tok, args.eval_examples), tasks)
            )
            logger.info("%s: %s", name, json.dumps(per_seed[name][-1]))
    rows = [_mean_row(name, per_seed[name], tasks) for name, _, _ in methods]
    vanilla = rows[0]
    for row in rows[1:]:
        row["refusal_gain_kept"] = (
            row["refusal_gain"] / vanilla["refusal_gain"] if vanilla["refusal_gain"] else math.nan
        )
        row["drop_vs_vanilla"] = (
            row["mean_accuracy_drop"] / vanilla["mean_accuracy_drop"]
            if vanilla["mean_accuracy_drop"] > 0
            else math.nan
        )
    return {"base": base, "seeds": args.seeds, "rows": rows, "per_seed": per_seed}


def _mean_row(name: str, runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in runs)

    return {
        "method": name,
        "refusal_rate": mean("refusal_rate"),
        "refusal_gain": mean("refusal_gain"),
        "refusal_gain_per_seed": [r["refusal_gain"] for r in runs],
        "over_refusal_change": mean("over_refusal_change"),
        "accuracy_change": {t: statistics.fmean(r["accuracy_change"][t] for r in runs) for t in tasks},
        "mean_accuracy_drop": mean("mean_accuracy_drop"),
        "mean_accuracy_drop_per_seed": [r["mean_accuracy_drop"] for r in runs],
    }


def cost(model_dir: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    tasks = args.cost_tasks
    runs: dict[str, list[dict[str, Any]]] = {"vanilla": [], "nullspace": []}
    for repeat in range(args.repeats):
        for method in ("vanilla", "nullspace"):
            cost_args = argparse.Namespace(
                **{
                    **vars(args),
                    "seed": args.seeds[0],
                    "refresh_steps": args.cost_refresh_steps,
                    "capability_batch_size": args.cost_capability_batch_size,
                    "degradation_tracking": False,
                }
            )
            start = time.perf_counter()
            trainer, timer = train(
                method,
                model_dir,
                out / f"cost_{method}_{repeat}",
                cost_args,
                tasks=tasks,
                steps=args.cost_steps,
            )
            wall = time.perf_counter() - start
            record: dict[str, Any] = {"step_times": timer.times, "train_wall": wall}
            if method == "nullspace":
                history = trainer.state.log_history
                proj = [
                    h["frontier/projection_seconds"] for h in history if "frontier/projection_seconds" in h
                ]
                refresh = [h["frontier/refresh_seconds"] for h in history if "frontier/refresh_seconds" in h]
                params = trainer.projector.params
                param_bytes = sum(p.numel() * p.element_size() for p in params)
                record.update(
                    projection_seconds_mean=statistics.fmean(proj),
                    refresh_seconds_mean=statistics.fmean(refresh),
                    trainable_bytes=param_bytes,
                    held_bytes=trainer.projector.extra_memory_bytes(),
                    peak_held_bytes=trainer.peak_state_bytes,
                    k=trainer.projector.num_directions,
                )
            runs[method].append(record)
    summary: dict[str, Any] = {
        "tasks": tasks,
        "refresh_steps": args.cost_refresh_steps,
        "capability_batch_size": args.cost_capability_batch_size,
        "runs": runs,
    }
    v_all = [t for r in runs["vanilla"] for t in r["step_times"]]
    n_all = [t for r in runs["nullspace"] for t in r["step_times"]]
    summary["vanilla_step_mean"] = statistics.fmean(v_all)
    summary["nullspace_step_mean"] = statistics.fmean(n_all)
    summary["vanilla_step_median"] = statistics.median(v_all)
    summary["nullspace_step_median"] = statistics.median(n_all)
    summary["amortised_ratio"] = summary["nullspace_step_mean"] / summary["vanilla_step_mean"]
    summary["median_ratio"] = summary["nullspace_step_median"] / summary["vanilla_step_median"]
    summary["projection_share"] = (
        statistics.fmean(r["projection_seconds_mean"] for r in runs["nullspace"])
        / summary["nullspace_step_mean"]
    )
    last = runs["nullspace"][-1]
    summary["held_ratio"] = last["held_bytes"] / last["trainable_bytes"]
    summary["peak_held_ratio"] = last["peak_held_bytes"] / last["trainable_bytes"]
    summary["k"] = last["k"]
    return summary


def plot(quality_result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in quality_result["rows"]:
        ax.scatter(row["mean_accuracy_drop"], row["refusal_gain"], s=60)
        ax.annotate(
            row["method"],
            (row["mean_accuracy_drop"], row["refusal_gain"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.set_xlabel("mean capability exact-match drop (held-out)")
    ax.set_ylabel("refusal-rate gain on held-out harmful prompts")
    ax.set_title("Lab: safety gain vs capability tax")
    ax.axvline(0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _seeds(values: list[float]) -> str:
    return ", ".join(f"{v:+.2f}" for v in values)


def markdown(result: dict[str, Any]) -> str:
    tasks = list(result["quality"]["rows"][0]["accuracy_change"])
    lines = [
        "| method | refusal gain (per seed) | kept vs vanilla | mean acc. drop (per seed) | drop / vanilla's | "
        "over-refusal change | " + " | ".join(tasks) + " |",
        "|" + "---|" * (6 + len(tasks)),
    ]
    for row in result["quality"]["rows"]:
        lines.append(
            f"| {row['method']} | {row['refusal_gain']:+.3f} ({_seeds(row['refusal_gain_per_seed'])}) | "
            f"{row.get('refusal_gain_kept', 1.0):.2f} | "
            f"{row['mean_accuracy_drop']:+.3f} ({_seeds(row['mean_accuracy_drop_per_seed'])}) | "
            f"{row.get('drop_vs_vanilla', 1.0):.2f} | "
            f"{row['over_refusal_change']:+.3f} | "
            + " | ".join(f"{row['accuracy_change'][t]:+.2f}" for t in tasks)
            + " |"
        )
    if "cost" not in result:
        return "\n".join(lines)
    c = result["cost"]
    lines += [
        "",
        f"Cost (k = {c['k']} directions from {c['tasks']}, refresh every {c['refresh_steps']} steps, "
        f"{c['capability_batch_size']} rows per direction): "
        f"amortised step-time ratio {c['amortised_ratio']:.3f} (mean {c['nullspace_step_mean'] * 1e3:.1f} ms vs "
        f"{c['vanilla_step_mean'] * 1e3:.1f} ms), median ratio {c['median_ratio']:.3f}, projection "
        f"{100 * c['projection_share']:.2f}% of a step, projection state held {c['held_ratio']:.2f}x and at peak "
        f"{c['peak_held_ratio']:.2f}x the trainable-parameter bytes.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="benchmarks/results/trainer")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--eps", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--refresh-steps", type=int, default=1, help="direction refresh in the quality runs")
    parser.add_argument(
        "--cost-refresh-steps", type=int, default=10, help="direction refresh in the cost runs"
    )
    parser.add_argument(
        "--capability-batch-size", type=int, default=32, help="capability rows per direction (quality)"
    )
    parser.add_argument(
        "--cost-capability-batch-size",
        type=int,
        default=8,
        help="capability rows per direction (cost; config default)",
    )
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--cost-steps", type=int, default=40)
    parser.add_argument("--cost-tasks", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.cost_tasks is None:
        args.cost_tasks = list(lab.TASKS)[:2]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = lab.pretrain()
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "settings": vars(args),
    }
    if not args.skip_quality:
        result["quality"] = quality(model_dir, args, out / "runs")
        plot(result["quality"], out / "frontier.png")
    if not args.skip_cost:
        result["cost"] = cost(model_dir, args, out / "runs")
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    if "quality" in result:
        (out / "results.md").write_text(markdown(result) + "\n")
        logger.info("\n%s", markdown(result))
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
