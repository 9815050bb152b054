"""Activation mode's refresh on SmolLM2 + LoRA: full ``eigh`` against subspace iteration, side by side.

A refresh (``ActivationProjector.refresh``) is one no-grad forward of the capability batches plus the
top-r eigenvectors of every input group's covariance (``frontier_trainer.activation.top_subspace``).
This times both ways of finding them on the same model, batches and covariances, alternating in one
process (eigh, iteration, eigh, iteration, ...), and reports how far apart the two bases are:

* the batches are the trainer's own: ``capability_rank`` (1) batch of ``capability_batch_size`` (8)
  rows per task from ``directions.build_capability_sampler``, the arena ``smollm2-cpu`` preset's
  tasks (BIG-bench addition, HumanEval) at its length (128 tokens), on SmolLM2-135M-Instruct with
  the arena's LoRA (r = 16 on every block linear);
* per rank: seconds per refresh for each method (median over ``--repeats``), their ratio, the
  largest subspace distance ‖U_it − U_e U_eᵀ U_it‖₂ over groups, and whether every group kept the
  same number of directions.

    python -m benchmarks.activation_refresh --ranks 8 32 --repeats 3 --output-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import get_peft_model

from frontier_trainer import activation
from frontier_trainer.activation import ActivationProjector
from frontier_trainer.directions import build_capability_sampler

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def full_eigh_only() -> Iterator[None]:
    """Every ``top_subspace`` call takes the full ``eigh`` path (the behaviour before the iteration)."""
    saved = activation.ITERATION_MIN_WIDTH
    activation.ITERATION_MIN_WIDTH = 1 << 62
    try:
        yield
    finally:
        activation.ITERATION_MIN_WIDTH = saved


def subspace_distance(U: torch.Tensor, E: torch.Tensor) -> float:
    """‖U − E Eᵀ U‖₂: how far span U leaves span E (0 when U ⊆ E)."""
    if U.shape[1] == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(U - E @ (E.T @ U), 2))


def run(ranks: list[int], repeats: int, batch_size: int = 8) -> list[dict]:
    from benchmarks.arena.presets import get_preset
    from benchmarks.arena.suites import make_suite

    preset = get_preset("smollm2-cpu")
    suite = make_suite(preset)
    model, tok = suite.load(suite.base_model(0))
    model = get_peft_model(model, suite.peft_config())
    sampler = build_capability_sampler(
        suite.capability_datasets(), tok, max_length=preset.max_length, batch_size=batch_size
    )
    batches = [sampler.next_batch(task) for task in sampler.tasks]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    rows = []
    for rank in ranks:
        projector = ActivationProjector(model, rank=rank)
        seconds: dict[str, list[float]] = {"eigh": [], "iteration": []}
        bases: dict[str, dict[str, torch.Tensor]] = {}
        for _ in range(repeats):
            for method in ("eigh", "iteration"):
                with full_eigh_only() if method == "eigh" else contextlib.nullcontext():
                    start = time.perf_counter()
                    projector.refresh(batches)
                    seconds[method].append(time.perf_counter() - start)
                bases[method] = {k: v.clone() for k, v in projector.bases.items()}
        distances = {g: subspace_distance(bases["iteration"][g], bases["eigh"][g]) for g in bases["eigh"]}
        same_ranks = all(bases["iteration"][g].shape == bases["eigh"][g].shape for g in bases["eigh"])
        wide = sorted(g for g, b in bases["eigh"].items() if b.shape[0] >= activation.ITERATION_MIN_WIDTH)
        row = {
            "activation_rank": rank,
            "groups": len(bases["eigh"]),
            "groups_iterated": len(wide),
            "capability_tokens": tokens,
            "eigh_seconds": [round(s, 2) for s in seconds["eigh"]],
            "iteration_seconds": [round(s, 2) for s in seconds["iteration"]],
            "ratio_median": round(statistics.median(seconds["iteration"]) / statistics.median(seconds["eigh"]), 3),
            "max_subspace_distance": max(distances.values()),
            "same_ranks": same_ranks,
        }
        logger.info("%s", row)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| activation_rank | groups (iterated) | eigh refresh, s | iteration refresh, s | iteration / eigh "
        "(median) | max subspace distance | same ranks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['activation_rank']} | {r['groups']} ({r['groups_iterated']}) | "
            f"{', '.join(map(str, r['eigh_seconds']))} | {', '.join(map(str, r['iteration_seconds']))} | "
            f"{r['ratio_median']:.2f} | {r['max_subspace_distance']:.1e} | {r['same_ranks']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    rows = run(args.ranks, args.repeats)
    text = table(rows)
    logger.info("\n%s", text)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        words = sys.argv[1:] if argv is None else argv
        meta = {"command": "python -m benchmarks.activation_refresh " + " ".join(words), "threads": args.threads}
        (args.output_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (args.output_dir / "table.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
