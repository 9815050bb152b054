"""Benchmark: capability-direction estimators side by side (issue 15 §2, §4).

For one arena suite (the lab, or SmolLM2-135M-Instruct + LoRA), trains vanilla DPO and null-space
DPO under several direction configurations in one process, same model, data, seed and learning
rate, and reports for each:

* ``held_out_leak``: mean over steps and tasks of |cos(Δθ, ∇f_i(held-out rows))|, Δθ the applied
  update and the gradient taken at θ before the step on capability rows the estimator never sees
  (the lab's eval split / the real sets' eval split): the generalisation leak of §1 against the
  *task*, not one fresh batch. Vanilla's value is the unprojected step's.
* ``step_time`` (amortised: mean over all optimizer steps, refreshes included, minus the probe's
  own time) and its ratio to vanilla's;
* quality on the arena's *validation* split (defaults are chosen on validation, never test):
  refusal gain, over-refusal change and per-task capability change against the base model, and
  the capability loss as a fraction of vanilla's.

Configurations (``--configs``): ``batch-r10`` (the library default before this benchmark:
refresh every 10 steps, one batch of 8 rows per direction), ``batch-r1`` (refresh every step),
``sketch-r10`` (a frequent-directions sketch of 8 micro-batches of 4 rows per task, refresh every
10 steps), ``sketch-r5``, ``sketch-r10-ema`` (EMA 0.5 across refreshes), and ``+benign`` variants
that also protect the model's own answers to benign prompt-only rows (``lab:benign`` /
``real:benign``, completed by the model itself).

Reproduce (lab, ~5-10 min on 2 cores):
``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.subspace_benchmark --suite lab --output-dir benchmarks/results/subspace``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from benchmarks.arena.leak import HeldOutLeakProbe
from benchmarks.arena.presets import get_preset
from benchmarks.arena.protocol import (
    CAPABILITY_PREFIX,
    OVER_REFUSAL,
    REFUSAL,
    common_train_args,
)
from benchmarks.arena.suites import make_suite

logger = logging.getLogger("subspace_benchmark")

CONFIGS: dict[str, dict[str, Any] | None] = {
    "vanilla": None,
    "batch-r10": dict(capability_refresh_steps=10, capability_batch_size=8),
    "batch-r1": dict(capability_refresh_steps=1, capability_batch_size=8),
    "sketch-r10": dict(
        capability_estimator="sketch", capability_refresh_steps=10, capability_batch_size=4, capability_sketch_batches=8
    ),
    "sketch-r5": dict(
        capability_estimator="sketch", capability_refresh_steps=5, capability_batch_size=4, capability_sketch_batches=8
    ),
    "sketch-r10-ema": dict(
        capability_estimator="sketch",
        capability_refresh_steps=10,
        capability_batch_size=4,
        capability_sketch_batches=8,
        capability_ema=0.5,
    ),
    "sketch-r1": dict(
        capability_estimator="sketch", capability_refresh_steps=1, capability_batch_size=4, capability_sketch_batches=8
    ),
    "sketch-r1-k4": dict(
        capability_estimator="sketch",
        capability_refresh_steps=1,
        capability_batch_size=4,
        capability_sketch_batches=8,
        capability_rank=4,
    ),
    "sketch-r10-small": dict(
        capability_estimator="sketch", capability_refresh_steps=10, capability_batch_size=2, capability_sketch_batches=4
    ),
    # cheaper refreshes (issue 15 §4): fewer rows, rarer refreshes, one task per refresh (round-robin,
    # capability_refresh_tasks) with an EMA that carries earlier rows along (a streaming estimate)
    "batch-r10-b4": dict(capability_refresh_steps=10, capability_batch_size=4),
    "batch-r10-b2": dict(capability_refresh_steps=10, capability_batch_size=2),
    "batch-r20-b4": dict(capability_refresh_steps=20, capability_batch_size=4),
    "rr-r5-b4": dict(capability_refresh_steps=5, capability_batch_size=4, capability_refresh_tasks=1),
    "batch-r10-k4-b2": dict(capability_refresh_steps=10, capability_batch_size=2, capability_rank=4),
    "batch-r10-k2-b2": dict(capability_refresh_steps=10, capability_batch_size=2, capability_rank=2),
    # the real suite's capability rows are cut at the preset's 128 tokens by default: only 10 of HumanEval's
    # 66 directions rows are that short (median 171 tokens); these keep rows up to 256 / 512 tokens
    "batch-r10-b4-len256": dict(capability_refresh_steps=10, capability_batch_size=4, capability_max_length=256),
    "batch-r10-b4-len512": dict(capability_refresh_steps=10, capability_batch_size=4, capability_max_length=512),
    # activation mode (issue 13 §1) under the same held-out probe: does an input subspace hold code, which no
    # gradient span of feasible rank covers (benchmarks/leak_ceiling.py)?
    "activation-r8": dict(capability_space="activation", activation_rank=8),
    "activation-r4": dict(capability_space="activation", activation_rank=4),
    # ...and its cost (issue 15 §4): rarer refreshes (every 20 steps: once in a 20-step run)
    "activation-r8-r20": dict(capability_space="activation", activation_rank=8, capability_refresh_steps=20),
    "stream-r2-b1": dict(
        capability_refresh_steps=2, capability_batch_size=1, capability_refresh_tasks=1, capability_ema=0.8
    ),
    "stream-r1-b2": dict(
        capability_refresh_steps=1, capability_batch_size=2, capability_refresh_tasks=1, capability_ema=0.8
    ),
}
"""Name -> FrontierDPOConfig overrides (None: vanilla trl.DPOTrainer). A ``+benign`` suffix on any
projected name adds the suite's benign prompt-only task."""

BENIGN = {"lab": "lab:benign", "real": "real:benign"}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run_config(
    name: str,
    suite: Any,
    preset: Any,
    model_dir: str,
    lr: float,
    seed: int,
    out: Path,
    probe_rows: int,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train one configuration; return its timing, held-out leak and validation quality
    (``probe_rows=0``: no probe, timing and validation quality only)."""
    from trl import DPOConfig, DPOTrainer

    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer

    base_name = name.removesuffix("+benign")
    overrides = CONFIGS[base_name]
    model, tok = suite.load(model_dir)
    common = {k: v for k, v in common_train_args(preset, out / name, lr, seed).items() if v is not None}
    timer = StepTimer()
    max_length = 512  # the probe keeps long held-out rows (HumanEval) that a 128-token trainer limit drops
    probe = (
        HeldOutLeakProbe(suite.held_out_capability(probe_rows), tok, max_length=max_length, rows=probe_rows)
        if probe_rows > 0
        else None
    )
    callbacks = [timer] if probe is None else [timer, probe]
    if overrides is None:
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**common),
            train_dataset=suite.preference_dataset(),
            processing_class=tok,
            peft_config=suite.peft_config(),
            callbacks=callbacks,
        )
    else:
        caps = dict(suite.capability_datasets())
        if name.endswith("+benign"):
            caps["benign"] = BENIGN[preset.suite]
        fields = {
            "projection": "nullspace",
            "degradation_tracking": False,
            **({"capability_max_length": preset.max_length} if preset.suite == "real" else {}),
            **overrides,
        }
        config = FrontierDPOConfig(**common, **fields)
        trainer = FrontierDPOTrainer(
            model=model,
            args=config,
            train_dataset=suite.preference_dataset(),
            processing_class=tok,
            capability_datasets=caps,
            peft_config=suite.peft_config(),
            callbacks=callbacks,
        )
    trainer.train()
    step = timer.times if probe is None else [t - p for t, p in zip(timer.times, probe.seconds, strict=False)]
    trained = trainer.model
    if not evaluate:
        samples: dict[str, list[float]] = {}
    elif preset.suite == "lab":
        samples = suite.evaluate_fast(trained, tok, None, "validation")
    else:
        samples = suite.evaluate(trained, tok, None, "validation")
    probed: dict[str, Any] = {}
    if probe is not None:
        leaks = {t: statistics.fmean(v) for t, v in probe.leaks.items() if v}
        probed = {
            "held_out_leak": leaks,
            "held_out_leak_mean": statistics.fmean(leaks.values()),
            "held_out_nll_rise": probe.nll_rise,
        }
    return {
        "config": name,
        "overrides": overrides,
        "step_time_mean": statistics.fmean(step),
        "step_time_median": statistics.median(step),
        "step_seconds": step,
        **probed,
        # the trainer's own timings, means over its logging windows (absent for vanilla)
        "trainer_seconds": {
            key.removeprefix("frontier/"): statistics.fmean(row[key] for row in trainer.state.log_history if key in row)
            for key in ("frontier/projection_seconds", "frontier/refresh_seconds", "frontier/leak_seconds")
            if any(key in row for row in trainer.state.log_history)
        },
        "metrics": {k: statistics.fmean(v) for k, v in samples.items() if v},
    }


def summarise(rows: list[dict[str, Any]], base: dict[str, float]) -> list[dict[str, Any]]:
    vanilla = next(r for r in rows if r["config"] == "vanilla")
    out = []
    for r in rows:
        row: dict[str, Any] = {
            "config": r["config"],
            # --interleave: against the vanilla run just before this one (cancels the machine's drift)
            "time_ratio": r["step_time_mean"] / r.get("adjacent_vanilla_step_time", vanilla["step_time_mean"]),
        }
        if "held_out_leak_mean" in r:  # probed (--probe-rows > 0)
            row |= {
                "held_out_leak": r["held_out_leak_mean"],
                "leak_vs_unprojected": r["held_out_leak_mean"] / vanilla["held_out_leak_mean"],
                "held_out_nll_rise": r["held_out_nll_rise"],
                "nll_rise_vs_vanilla": {
                    t: (v / vanilla["held_out_nll_rise"][t] if vanilla["held_out_nll_rise"][t] > 0 else float("nan"))
                    for t, v in r["held_out_nll_rise"].items()
                },
            }
        if base:
            caps = [k for k in base if k.startswith(CAPABILITY_PREFIX)]
            v_loss = {k: base[k] - vanilla["metrics"][k] for k in caps}
            v_gain = vanilla["metrics"][REFUSAL] - base[REFUSAL]
            m = r["metrics"]
            loss = {k: base[k] - m[k] for k in caps}
            row.update(
                refusal_gain=m[REFUSAL] - base[REFUSAL],
                refusal_gain_kept=(m[REFUSAL] - base[REFUSAL]) / v_gain if v_gain else float("nan"),
                over_refusal_change=m[OVER_REFUSAL] - base[OVER_REFUSAL],
                capability_loss=loss,
                capability_loss_vs_vanilla={k: (loss[k] / v_loss[k] if v_loss[k] > 0 else float("nan")) for k in caps},
            )
        out.append(row)
    return out


def mean_summary(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean over seeds of every number in the per-seed summaries, config by config, with the
    per-seed values of the headline numbers kept (``<key>_per_seed``)."""
    out = []
    for i, first in enumerate(per_seed[0]):
        runs = [seed[i] for seed in per_seed]
        row: dict[str, Any] = {"config": first["config"]}
        for key, value in first.items():
            if isinstance(value, float):
                row[key] = statistics.fmean(r[key] for r in runs)
                row[f"{key}_per_seed"] = [r[key] for r in runs]
            elif isinstance(value, dict):
                row[key] = {k: statistics.fmean(r[key][k] for r in runs) for k in value}
        out.append(row)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    if "held_out_leak" not in summary[0]:  # --probe-rows 0: the cost only
        lines = ["| config | time × vanilla (mean) | per seed |", "|---|---|---|"]
        for s in summary:
            per_seed = ", ".join(f"{x:.3f}" for x in s.get("time_ratio_per_seed", [s["time_ratio"]]))
            lines.append(f"| {s['config']} | {s['time_ratio']:.3f} | {per_seed} |")
        return "\n".join(lines)
    if "capability_loss" not in summary[0]:
        tasks = sorted(summary[0]["held_out_nll_rise"])
        head = "| config | time × vanilla | held-out leak | leak / unprojected | " + " | ".join(
            f"{t} NLL rise / vanilla" for t in tasks
        ) + " |"
        lines = [head, "|" + "---|" * (4 + len(tasks))]
        for s in summary:
            lines.append(
                f"| {s['config']} | {s['time_ratio']:.2f} | {s['held_out_leak']:.4f} | {s['leak_vs_unprojected']:.2f} | "
                + " | ".join(f"{s['nll_rise_vs_vanilla'][t]:.2f}" for t in tasks)
                + " |"
            )
        return "\n".join(lines)
    caps = sorted(summary[0]["capability_loss"])
    head = "| config | time × vanilla | held-out leak | leak / unprojected | refusal gain kept | over-refusal Δ | " + " | ".join(
        f"{c.removeprefix(CAPABILITY_PREFIX)} loss" for c in caps
    ) + " |"
    lines = [head, "|" + "---|" * (6 + len(caps))]
    for s in summary:
        lines.append(
            f"| {s['config']} | {s['time_ratio']:.2f} | {s['held_out_leak']:.4f} | {s['leak_vs_unprojected']:.2f} | "
            f"{s['refusal_gain_kept']:.2f} | {s['over_refusal_change']:+.3f} | "
            + " | ".join(f"{s['capability_loss'][c]:+.3f}" for c in caps)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("lab", "real"), default="lab")
    parser.add_argument("--preset", default=None, help="arena preset (default lab-quick / smollm2-cpu)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's middle learning rate")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--probe-rows", type=int, default=16, help="held-out rows per task for the leak probe (0: no probe, cost only)"
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the generation-based validation scores (timing, leak, NLL only)"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="run vanilla again just before every other configuration and time each against that run "
        "(the CPU's speed drifts by ±10%% over minutes; adjacent runs cancel most of it)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/subspace"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in args.configs:
        if name.removesuffix("+benign") not in CONFIGS:
            parser.error(f"--configs: unknown {name!r}; choose from {list(CONFIGS)} (optionally with +benign)")
    preset = get_preset(args.preset or ("lab-quick" if args.suite == "lab" else "smollm2-cpu"))
    if args.steps:
        preset = type(preset)(**{**preset.__dict__, "steps": args.steps})
    lr = args.lr if args.lr is not None else preset.learning_rates[len(preset.learning_rates) // 2]
    suite = make_suite(preset)
    model_dir = suite.base_model(preset.pretrain_seeds[0])
    base: dict[str, float] = {}
    if not args.no_eval:
        base_model, tok = suite.load(model_dir)
        evaluate = suite.evaluate_fast if preset.suite == "lab" else suite.evaluate
        base = {k: statistics.fmean(v) for k, v in evaluate(base_model, tok, None, "validation").items() if v}
        del base_model
    out = args.output_dir / preset.name
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    per_seed: list[list[dict[str, Any]]] = []
    for seed in args.seeds:
        seed_rows = []
        for name in tqdm(args.configs, desc=f"configs (seed {seed})"):
            adjacent = None
            if args.interleave and name != "vanilla":
                logger.info("seed %d: training vanilla (timing reference for %s)", seed, name)
                adjacent = run_config(
                    "vanilla", suite, preset, model_dir, lr, seed, out / "runs", args.probe_rows, evaluate=False
                )
                adjacent |= {"seed": seed, "timing_reference_for": name}
                rows.append(adjacent)
            logger.info("seed %d: training %s", seed, name)
            seed_rows.append(
                run_config(
                    name, suite, preset, model_dir, lr, seed, out / "runs", args.probe_rows, evaluate=not args.no_eval
                )
            )
            seed_rows[-1]["seed"] = seed
            if adjacent is not None:
                seed_rows[-1]["adjacent_vanilla_step_time"] = adjacent["step_time_mean"]
            logger.info("%s: %s", name, json.dumps(seed_rows[-1]))
        rows += seed_rows
        per_seed.append(summarise(seed_rows, base))
    summary = mean_summary(per_seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "preset": preset.name,
        "steps": preset.steps,
        "lr": lr,
        "seeds": args.seeds,
        "interleave": args.interleave,
        "per_seed_summary": per_seed,
        "commit": commit,
        "machine": f"{platform.platform()}; torch {torch.__version__}; threads {torch.get_num_threads()}",
        "base": base,
        "rows": rows,
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    (out / "table.md").write_text(table(summary) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()
