"""Prediction 1 on a real model: do representation-space τ_i order vanilla DPO's damage on SmolLM2?

The lab's version is ``benchmarks/probe_prediction.py``; this one measures the same thing on
SmolLM2-135M-Instruct (a chat model that already refuses, the setting Arditi et al. 2024 found their
direction in) with eight real capability tasks of the evaluation suite
(:mod:`frontier_trainer.evaluation.real_suite`): ARC-Easy, ARC-Challenge, MMLU, HellaSwag, PIQA, GSM8K,
BIG-bench 2-digit addition and HumanEval.

Rule, fixed before any DPO run of this script (issue 13 §2):

* safety probe (:func:`frontier_trainer.probes.probe_tax_rates`): harmful = the DPO training prompts
  (UncensorBench), harmless = the benign set's validation prompts (everyday requests, StrategyQA: the
  analogue of Arditi's harmful-vs-Alpaca); the layer ℓ* is the one with the largest d′ on held-out prompts
  (HarmBench ``val`` against further benign validation prompts), every prompt rendered with the chat
  template, read at the last prompt token (the generation prompt's last token);
* task probes: difference of means of each task's validation prompts (chat template) against the grand mean
  of the task means; τ_i = cos²(v*_ℓ*, c_i,ℓ*);
* gradient space, for comparison: step-0 τ_i of :func:`frontier_trainer.report.geometry_report` over the full
  parameters of the base model (DPO direction vs ∇ of each task's completion log-likelihood);
* observed: vanilla ``trl.DPOTrainer`` + LoRA r 16 (the arena's target modules) per seed, and the rise of each
  task's completion NLL (nats/token of the reference answer: the gold choice for the multiple-choice tasks,
  the solution for GSM8K and HumanEval, the sum for addition) on test-split rows, plain prompts as lm-eval
  scores them.

Pre-declared variants, reported next to the primary rule, never instead of it: harmless = look-alikes (the
lab's primary), mean over layers, and the relative NLL rise.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.probe_prediction_real --seeds 0 1 2 \\
        --output-dir benchmarks/results/probes-smollm2
    # the same base-model measurements, DPO at another rate:
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.probe_prediction_real --seeds 0 1 2 --dpo-learning-rate 2e-4 \\
        --geometry-from benchmarks/results/probes-smollm2/results.json --output-dir benchmarks/results/probes-smollm2/lr2e-4
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
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import torch
import transformers
import trl
from tqdm.auto import tqdm

from benchmarks.probe_prediction import bootstrap_pooled, bootstrap_within, spearman
from frontier_trainer import probes
from frontier_trainer.report import geometry_report

logger = logging.getLogger("probe_prediction_real")

TASKS = (
    "arc_easy",
    "arc_challenge",
    "mmlu",
    "hellaswag",
    "piqa",
    "gsm8k",
    "bigbench_arithmetic",
    "humaneval",
)
SETTINGS: dict[str, Any] = {
    "probe_rows": 32,  # validation prompts per task / harmful / harmless set for the probes
    "held_out_rows": 32,  # held-out prompts per safety set for the layer rule's d′
    "eval_rows": 32,  # test rows per task for the observed NLL change
    "gradient_batches": 2,
    "gradient_batch_size": 8,  # 16 rows per gradient direction
    "max_length": 256,
    "dpo_steps": 20,
    "dpo_batch_size": 2,
    "dpo_learning_rate": 1e-3,  # the top of the smollm2-cpu arena sweep: a clear damage to order
    "dpo_beta": 0.1,
    "dpo_max_length": 128,
    "lora_r": 16,
    "bootstrap_samples": 10_000,
}


def task_pairs(suite: Any, split: str, n: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt, reference completion) per task from a split of the real evaluation suite."""
    out: dict[str, list[tuple[str, str]]] = {}
    for task in suite.capability_tasks(split, n):
        if task.name == "gsm8k":
            continue  # the 3-shot context would dominate the probe: the NLL set's plain question below
        if task.output_type == "multiple_choice":
            out[task.name] = [(d["query"], " " + d["choices"][d["gold"]]) for d in task.docs]
        else:
            out[task.name] = [(d["query"], " " + d["answer"]) for d in task.docs]
    nll = suite.nll_sets(split, n)
    out["gsm8k"], out["humaneval"] = nll["gsm8k"], nll["humaneval"]
    return {t: out[t] for t in TASKS}


def completion_nll(model: Any, tokenizer: Any, pairs: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Mean completion NLL (nats/token) per task."""
    from frontier_trainer.real.evaluation import completion_nll_per_row

    model.eval()
    out = {}
    for task, rows in pairs.items():
        values = completion_nll_per_row(
            model, tokenizer, [{"prompt": p, "completion": c} for p, c in rows], batch_size=8, max_length=1024
        )
        out[task] = float(sum(values) / len(values))
    return out


def representation_geometry(model: Any, tokenizer: Any, suite: Any, prefs: Any) -> dict[str, Any]:
    """The primary probe rule and the look-alike variant, before training (each set's activations once)."""
    n, held = SETTINGS["probe_rows"], SETTINGS["held_out_rows"]
    harmful = list(dict.fromkeys(row[0]["content"] for row in prefs["prompt"]))[:n]
    val = suite.safety_sets("validation", None)
    benign, lookalike = val["benign"], val["lookalike"]
    half = len(lookalike) // 2
    tasks = {t: [p for p, _ in rows] for t, rows in task_pairs(suite, "validation", n).items()}

    def acts(prompts: list[str], name: str) -> Any:
        return probes.residual_activations(
            model, tokenizer, prompts, chat_template=True, batch_size=16, name=name
        )

    h, held_h = acts(harmful, "harmful"), acts(val["harmful/harmbench"][:held], "held_out_harmful")
    b, held_b = acts(benign[:n], "benign"), acts(benign[n : n + held], "held_out_benign")
    look, held_look = acts(lookalike[:half], "lookalike"), acts(lookalike[half:], "held_out_lookalike")
    c = probes.task_directions(
        {t: acts(p, f"tasks[{t!r}]") for t, p in tqdm(tasks.items(), desc="task probes")}
    )
    baseline = "grand mean of the task means"
    v = probes.safety_direction(h, b)
    primary = probes.probe_geometry(
        v, c, probes.safety_separation(v, held_h, held_b), separation_held_out=True, baseline=baseline
    )
    v_look = probes.safety_direction(h, look)
    variant = probes.probe_geometry(
        v_look,
        c,
        probes.safety_separation(v_look, held_h, held_look),
        separation_held_out=True,
        baseline=baseline,
    )
    return {
        "primary": primary.to_dict(),
        "lookalike": variant.to_dict(),
        "variants": {
            "harmless=look-alikes": variant.tau,
            "mean over layers": {t: sum(by.values()) / len(by) for t, by in primary.tau_by_layer.items()},
            "signed cos (exploratory)": primary.cos,
        },
        "rows": {
            "harmful": len(harmful),
            "benign": n,
            "lookalike": half,
            "per_task": {t: len(p) for t, p in tasks.items()},
        },
    }


def gradient_geometry(model: Any, tokenizer: Any, suite: Any, prefs: Any) -> dict[str, float]:
    """Step-0 gradient-space τ_i over the base model's full parameters."""
    caps = {
        t: datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in rows])
        for t, rows in task_pairs(suite, "validation", SETTINGS["probe_rows"]).items()
    }
    report = geometry_report(
        model,
        tokenizer,
        prefs,
        caps,
        batches=SETTINGS["gradient_batches"],
        batch_size=SETTINGS["gradient_batch_size"],
        max_length=SETTINGS["max_length"],
        seed=0,
        progress=False,
    )
    return {row["task"]: row["tau"] for row in report["tasks"]}


def vanilla_dpo(model_dir: Path, prefs: Any, seed: int, work: Path) -> Any:
    """Vanilla DPO (``trl.DPOTrainer`` + LoRA, the arena's target modules); returns the policy."""
    from peft import LoraConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    r = SETTINGS["lora_r"]
    config = trl.DPOConfig(
        output_dir=str(work / f"dpo-{seed}"),
        max_steps=SETTINGS["dpo_steps"],
        per_device_train_batch_size=SETTINGS["dpo_batch_size"],
        learning_rate=SETTINGS["dpo_learning_rate"],
        lr_scheduler_type="constant",
        beta=SETTINGS["dpo_beta"],
        max_length=SETTINGS["dpo_max_length"],
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=10,
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, args=config, train_dataset=prefs, processing_class=tokenizer, peft_config=lora
    )
    trainer.train()
    return trainer.model


def correlate(points: list[dict[str, Any]], tau: dict[str, float], observed_key: str) -> dict[str, Any]:
    """Per-seed, pooled (seed, task) and mean within-seed Spearman of one τ against one observation."""
    per_seed = [([tau[t] for t in TASKS], [p[observed_key][t] for t in TASKS]) for p in points]
    xs = [x for xs_, _ in per_seed for x in xs_]
    ys = [y for _, ys_ in per_seed for y in ys_]
    b = SETTINGS["bootstrap_samples"]
    within = [spearman(x, y) for x, y in per_seed]
    mean_observed = [sum(p[observed_key][t] for p in points) / len(points) for t in TASKS]
    return {
        "per_seed": {str(p["seed"]): r for p, r in zip(points, within, strict=True)},
        "seed_mean_observed": spearman([tau[t] for t in TASKS], mean_observed),
        "pooled": spearman(xs, ys),
        "pooled_ci95": bootstrap_pooled(xs, ys, b),
        "within_seed_mean": sum(within) / len(within),
        "within_seed_ci95": bootstrap_within(per_seed, b),
    }


def markdown(results: dict[str, Any]) -> str:
    geo = results["representation"]["primary"]
    lines = [
        "# Prediction 1 on SmolLM2-135M-Instruct: representation τ_i against vanilla DPO's damage",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; torch {results['versions']['torch']}, transformers "
        f"{results['versions']['transformers']}, trl {results['versions']['trl']}. Wall time {results['seconds']:.0f} s.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()) + ".",
        "",
        f"Safety probe: layer ℓ* = {geo['layer']} (held-out d′ {geo['separation'][str(geo['layer'])]:.2f}); "
        "d′ per layer: " + ", ".join(f"{k}: {v:.2f}" for k, v in geo["separation"].items()) + ".",
        "",
        f"## Spearman(τ_i, observed), {len(TASKS)} tasks, {len(results['seeds'])} DPO seeds",
        "",
        "| τ from | observed | per seed | τ vs seed-mean observed | pooled (95% CI) | mean within seed (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["correlations"]:
        per = ", ".join(f"{k}: {r:+.2f}" for k, r in c["per_seed"].items())
        lo, hi = c["pooled_ci95"]
        wlo, whi = c["within_seed_ci95"]
        lines.append(
            f"| {c['tau']} | {c['observed']} | {per} | {c['seed_mean_observed']:+.2f} | {c['pooled']:+.2f} "
            f"({lo:+.2f}, {hi:+.2f}) | {c['within_seed_mean']:+.2f} ({wlo:+.2f}, {whi:+.2f}) |"
        )
    lines += [
        "",
        "## Per task",
        "",
        "| task | τ repr | signed cos | τ grad | NLL before | NLL rise per seed |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for t in TASKS:
        rises = ", ".join(f"{s['nll_increase'][t]:+.3f}" for s in results["seeds"])
        lines.append(
            f"| {t} | {geo['tau'][t]:.4f} | {geo['cos'][t]:+.3f} | {results['tau_grad'][t]:.2e} | "
            f"{results['nll_before'][t]:.3f} | {rises} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="benchmarks/results/probes-smollm2")
    parser.add_argument("--dpo-steps", type=int, default=SETTINGS["dpo_steps"])
    parser.add_argument("--dpo-learning-rate", type=float, default=SETTINGS["dpo_learning_rate"])
    parser.add_argument("--bootstrap", type=int, default=SETTINGS["bootstrap_samples"])
    parser.add_argument(
        "--geometry-from",
        default=None,
        help="results.json of an earlier run: reuse its base-model τ and NLL (only the DPO runs are new)",
    )
    args = parser.parse_args(argv)
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: pass distinct seeds, e.g. --seeds 0 1 2")
    if args.dpo_steps < 1:
        parser.error(f"--dpo-steps {args.dpo_steps}: pass a positive number of optimizer steps")
    if args.dpo_learning_rate <= 0:
        parser.error(f"--dpo-learning-rate {args.dpo_learning_rate}: pass a positive rate")
    SETTINGS["dpo_steps"], SETTINGS["bootstrap_samples"] = args.dpo_steps, args.bootstrap
    SETTINGS["dpo_learning_rate"] = args.dpo_learning_rate
    earlier = None  # the base model's measurements of an earlier run (its DPO settings may differ)
    if args.geometry_from:
        path = Path(args.geometry_from)
        if not path.is_file():
            parser.error(f"--geometry-from {path}: no such results.json; run once without it first")
        earlier = json.loads(path.read_text())
        keys = (
            "probe_rows",
            "held_out_rows",
            "eval_rows",
            "gradient_batches",
            "gradient_batch_size",
            "max_length",
        )
        differ = [k for k in keys if earlier["settings"].get(k) != SETTINGS[k]]
        if differ:
            parser.error(f"--geometry-from {path}: its settings differ in {differ}; re-measure instead")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "trl", "frontier_trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from frontier_trainer.evaluation.real_suite import RealSuite
    from frontier_trainer.real import data
    from frontier_trainer.real.model import smollm2_dir

    t0 = time.perf_counter()
    suite = RealSuite(nll_sets=("humaneval", "gsm8k"))
    prefs = data.load_uncensorbench_pairs(split="train").select_columns(["prompt", "chosen", "rejected"])
    model_dir = smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    observed_rows = task_pairs(suite, "test", SETTINGS["eval_rows"])
    if earlier is not None:
        representation, tau_grad, before = (
            earlier["representation"],
            earlier["tau_grad"],
            earlier["nll_before"],
        )
    else:
        representation = representation_geometry(model, tokenizer, suite, prefs)
        logger.info(
            "representation τ at layer %d: %s",
            representation["primary"]["layer"],
            representation["primary"]["tau"],
        )
        tau_grad = gradient_geometry(model, tokenizer, suite, prefs)
        logger.info("gradient τ: %s", tau_grad)
        before = completion_nll(model, tokenizer, observed_rows)
    del model
    work = Path(tempfile.mkdtemp(prefix="probe-real-"))
    points = []
    try:
        for seed in tqdm(args.seeds, desc="DPO seeds"):
            aligned = vanilla_dpo(model_dir, prefs, seed, work)
            after = completion_nll(aligned, tokenizer, observed_rows)
            points.append(
                {
                    "seed": seed,
                    "nll_after": after,
                    "nll_increase": {t: after[t] - before[t] for t in TASKS},
                    "relative_nll_increase": {t: after[t] / before[t] - 1.0 for t in TASKS},
                }
            )
            logger.info("seed %d: NLL rise %s", seed, points[-1]["nll_increase"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    taus = {"representation (primary rule)": representation["primary"]["tau"], "gradient, step 0": tau_grad}
    taus.update({f"variant: {k}": v for k, v in representation["variants"].items()})
    correlations = [
        {"tau": name, "observed": obs, **correlate(points, tau, obs)}
        for name, tau in taus.items()
        for obs in ("nll_increase", "relative_nll_increase")
    ]
    results = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.probe_prediction_real "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": dict(SETTINGS),
        "tasks": list(TASKS),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} thread(s)",
        "seconds": time.perf_counter() - t0,
        "geometry_from": args.geometry_from,
        "representation": representation,
        "tau_grad": tau_grad,
        "nll_before": before,
        "seeds": points,
        "correlations": correlations,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    for c in correlations:
        lo, hi = c["pooled_ci95"]
        logger.info("%-45s %-22s pooled %+.2f (%+.2f, %+.2f)", c["tau"], c["observed"], c["pooled"], lo, hi)
    logger.info("wrote %s", out / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
