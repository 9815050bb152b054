"""Smoke-and-cost run of every baseline on the lab model (one seed, one setting: not a comparison).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.baselines.cost --steps 20

Trains each baseline with its default options for ``--steps`` DPO steps (batch 16, lr 5e-4 constant,
the lab's harmful-request preferences) and prints milliseconds per step and the mean change of the
capability NLL on one fixed batch of 32 training rows per task. Quality claims belong to the arena
(``benchmarks/arena``: learning-rate sweeps, seeds, held-out evaluation); this only shows that each
baseline runs end to end and what it costs next to vanilla in the same process.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm
from trl import DPOConfig

from benchmarks.baselines import BASELINES, build_trainer
from frontier_trainer import lab
from frontier_trainer.directions import build_capability_sampler, completion_metric

logger = logging.getLogger(__name__)


def capability_nll(model: torch.nn.Module, caps: dict, tokenizer: object) -> dict[str, float]:
    """Token-mean NLL of one fixed batch (seed 123, 32 rows) per task."""
    sampler = build_capability_sampler(caps, tokenizer, max_length=None, batch_size=32, seed=123)
    with torch.no_grad():
        return {t: -float(completion_metric(model, sampler.next_batch(t))) for t in sampler.tasks}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model_dir = lab.pretrain()
    caps = lab.capability_datasets()
    prefs = lab.preference_dataset("train")
    rows = []
    for name in tqdm(args.methods, desc="baselines"):
        model, tokenizer = lab.load(model_dir)
        before = capability_nll(model, caps, tokenizer)
        config = DPOConfig(
            output_dir=tempfile.mkdtemp(prefix=f"baseline-{name}-"),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=5e-4,
            lr_scheduler_type="constant",
            report_to="none",
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            save_strategy="no",
            logging_steps=args.steps,
            disable_tqdm=True,
            seed=0,
        )
        trainer = build_trainer(
            name,
            model=model,
            args=config,
            train_dataset=prefs,
            processing_class=tokenizer,
            capability_datasets=caps,
        )
        start = time.perf_counter()
        trainer.train()
        ms = (time.perf_counter() - start) / args.steps * 1000
        after = capability_nll(trainer.model, caps, tokenizer)
        change = sum(after[t] - before[t] for t in before) / len(before)
        rows.append((name, ms, change))
    print("| baseline | ms / step | mean capability NLL change |")
    print("|---|---|---|")
    for name, ms, change in rows:
        print(f"| {name} | {ms:.0f} | {change:+.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
