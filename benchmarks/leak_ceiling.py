"""How much of the held-out leak can a gradient subspace remove at all? The static ceiling (issue 15 §1, §2).

The arena's held-out leak (:mod:`benchmarks.arena.leak`) is |cos(Δθ, ∇f_i)| with ∇f_i the gradient of task
i's completion log-likelihood on rows no trainer sees; the issue's target is a leak ≤ 0.10 of an unprojected
step's. This benchmark asks, before any training, how many training rows a gradient subspace needs for that,
and whether any number suffices. At the base model, per task:

* ``u``: vanilla DPO's first update. At policy = reference, ∇L_DPO = −(β/2)∇(log π(chosen) − log π(rejected))
  (:func:`frontier_trainer.report.safety_direction` gives the margin's gradient), and AdamW's first step is
  −lr·g/(|g| + ε) elementwise, i.e. the sign of the gradient (bias correction cancels): ``u = sign(∇margin)``.
  ``--sgd`` also reports the plain gradient. One DPO batch of the preset's size per ``--dpo-batches``.
* the protected span after n training rows: the same subspace the trainer would hold, built three ways from
  the same per-row gradients (the training split the trainers get, at the preset's token limit):
  ``rows`` keeps every row's gradient (rank n per task: the most any estimator can protect from n rows);
  ``batches`` keeps one mean per 8 consecutive rows (``capability_rank`` = n/8 with ``capability_batch_size``
  = 8, the trainer's batch estimator); ``mean`` keeps one mean of all n rows (rank 1 with
  ``capability_batch_size`` = n). Every task's vectors go into one span, as the trainer projects against all
  tasks' directions at once.
* ratio(n) = |cos(P⊥u, ∇f_i^held-out)| / |cos(u, ∇f_i^held-out)|, P⊥ the projection off the span; and the
  coverage ‖P ĝ_i‖, the fraction of the held-out gradient's norm inside the span.

A ratio that stays far above 0.10 as n grows says the target is out of reach for any gradient-subspace rule
with that many rows: the task's held-out gradients are not in the span of its training gradients.

What this leaves out: the update after step 0 (Adam's moments, the drift of θ), which the arena measures. With
LoRA at initialisation B = 0, so only B's gradient is non-zero and the first step moves B alone.

Reproduce: ``OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.leak_ceiling --preset lab-quick --seeds 0 1 2
--output-dir benchmarks/results/leak_ceiling/lab-quick`` (and ``--preset smollm2-cpu``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from tqdm.auto import tqdm

from benchmarks.arena.presets import get_preset
from benchmarks.arena.suites import make_suite
from frontier_trainer.directions import build_capability_sampler, capability_gradients, flatten
from frontier_trainer.report import safety_direction

logger = logging.getLogger("leak_ceiling")

BATCH_ROWS = 8
"""Rows behind one direction in the ``batches`` construction (the trainer's default capability_batch_size)."""
CONSTRUCTIONS = ("rows", "batches", "mean")


class Span:
    """An orthonormal basis grown one vector at a time (classical Gram-Schmidt applied twice, float64)."""

    def __init__(self, dim: int, capacity: int) -> None:
        self._buffer = torch.zeros(capacity, dim, dtype=torch.float64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, vector: torch.Tensor, tol: float = 1e-6) -> bool:
        """Add ``vector``'s component off the span; False (nothing added) if it is inside to ``tol`` (relative;
        the per-row gradients are float32)."""
        norm = float(vector.double().norm())
        if norm == 0.0:
            return False
        v = self.project_off(vector)
        if float(v.norm()) <= tol * norm:
            return False
        if self._size == self._buffer.shape[0]:
            raise ValueError(f"Span: capacity {self._size} reached")
        self._buffer[self._size] = v / v.norm()
        self._size += 1
        return True

    def project_off(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` minus its projection onto the span."""
        basis = self._buffer[: self._size]
        v = vector.double().clone()
        for _ in range(2):
            v -= basis.T @ (basis @ v)
        return v

    def coverage(self, vector: torch.Tensor) -> float:
        """‖P v‖ / ‖v‖: the fraction of ``vector``'s norm inside the span."""
        v = vector.double()
        return math.sqrt(max(1.0 - float(self.project_off(v).norm() ** 2 / v.norm() ** 2), 0.0))


def abs_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """|cos(a, b)| in float64; NaN when either is zero."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return abs(float(torch.dot(a.double(), b.double()))) / (na * nb)


def first_adam_update(gradient: torch.Tensor) -> torch.Tensor:
    """The direction of AdamW's first step on ``gradient`` (descent on a loss whose gradient it is):
    −g/(|g| + ε) with bias correction, which is −sign(g) up to ε (tested against ``torch.optim.AdamW``)."""
    return -torch.sign(gradient)


def directions_for(construction: str, rows: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """One task's vectors for the span after ``n`` rows, by construction (module docstring)."""
    if construction == "rows":
        return list(rows[:n])
    if construction == "batches":
        groups = [rows[i : i + BATCH_ROWS] for i in range(0, n - n % BATCH_ROWS, BATCH_ROWS)]
        return [torch.stack(list(g)).mean(0) for g in groups]
    if construction == "mean":
        return [torch.stack(list(rows[:n])).mean(0)]
    raise ValueError(f"construction={construction!r}: use one of {CONSTRUCTIONS}")


def leak_ratios(
    per_row: Mapping[str, Sequence[torch.Tensor]],
    held_out: Mapping[str, torch.Tensor],
    updates: Sequence[torch.Tensor],
    counts: Iterable[int],
    construction: str,
) -> list[dict[str, Any]]:
    """Per row count n and task: the held-out leak ratio after projecting every update off the span of all
    tasks' vectors (mean |cos| over the updates, projected over unprojected) and the held-out gradient's
    coverage by that span."""
    out = []
    dim = next(iter(held_out.values())).numel()
    for n in counts:
        if construction == "batches" and n < BATCH_ROWS:
            continue
        vectors = [
            v for rows in per_row.values() for v in directions_for(construction, rows, min(n, len(rows)))
        ]
        span = Span(dim, capacity=len(vectors))
        for vector in vectors:
            span.add(vector)
        projected = [span.project_off(u) for u in updates]
        for task, g in held_out.items():
            # a ratio of means over the updates, as the arena's (means over steps, then vanilla's as reference)
            raw = statistics.fmean(abs_cos(u, g) for u in updates)
            out.append(
                {
                    "construction": construction,
                    "rows": n,
                    "task": task,
                    "rank": len(span),
                    "raw_leak": raw,
                    "ratio": statistics.fmean(abs_cos(p, g) for p in projected) / raw
                    if raw > 0
                    else math.nan,
                    "coverage": span.coverage(g),
                }
            )
    return out


def collect_per_row_gradients(
    model: Any, tokenizer: Any, suite: Any, preset: Any, *, max_rows: int, max_length: int | None = None
) -> dict[str, list[torch.Tensor]]:
    """Per task, the gradient of the completion log-likelihood of each of up to ``max_rows`` training rows (the
    rows the trainers get, at the preset's token limit unless ``max_length`` is given), flattened, float32."""
    params = [p for p in model.parameters() if p.requires_grad]
    if max_length is None and preset.suite == "real":
        max_length = preset.max_length
    sampler = build_capability_sampler(
        suite.capability_datasets(), tokenizer, max_length=max_length, batch_size=1, seed=0
    )
    per_row: dict[str, list[torch.Tensor]] = {}
    for task in sampler.tasks:
        n = min(max_rows, len(sampler.rows[task]))
        per_row[task] = [
            flatten(capability_gradients(model, params, sampler.next_batch(task))[1]).float()
            for _ in tqdm(range(n), desc=f"per-row gradients: {task}", leave=False)
        ]
    return per_row


def measure_model(
    model: Any,
    tokenizer: Any,
    suite: Any,
    preset: Any,
    *,
    max_rows: int,
    held_out_rows: int,
    dpo_batches: int,
    counts: Sequence[int],
    sgd: bool,
    train_max_length: int | None = None,
) -> dict[str, Any]:
    """Per-row training gradients, held-out gradients and DPO updates of one model; the ratios.
    ``train_max_length``: the training rows' token limit (default: the preset's, as the trainers get them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_row = collect_per_row_gradients(
        model, tokenizer, suite, preset, max_rows=max_rows, max_length=train_max_length
    )
    held = build_capability_sampler(
        suite.held_out_capability(held_out_rows),
        tokenizer,
        max_length=512 if preset.suite == "real" else None,  # as the arena's probe
        batch_size=held_out_rows,
        seed=0,
    )
    held_out = {t: flatten(capability_gradients(model, params, held.next_batch(t))[1]) for t in held.tasks}
    margins = [
        flatten(
            safety_direction(
                model, params, tokenizer, suite.preference_dataset(), batches=1,
                batch_size=preset.batch_size, seed=j,
                max_length=512 if preset.suite == "real" else None,  # untruncated pairs (TRL truncates to the preset's)
            )[1]
        )
        for j in range(dpo_batches)
    ]  # fmt: skip
    # descent on L_DPO ∝ −margin: Adam's first step is +sign(∇margin)
    updates = {"adam": [first_adam_update(-m) for m in margins]}
    if sgd:
        updates["sgd"] = list(margins)
    rows = []
    for kind, us in updates.items():
        for construction in CONSTRUCTIONS:
            for row in leak_ratios(per_row, held_out, us, counts, construction):
                rows.append({"update": kind, **row})
    return {
        "rows_per_task": {t: len(v) for t, v in per_row.items()},
        "held_out_rows": {t: min(held_out_rows, len(held.rows[t])) for t in held.tasks},
        "trainable": sum(p.numel() for p in params),
        "table": rows,
    }


def load_model(suite: Any, preset: Any, seed: int) -> tuple[Any, Any]:
    """The preset's base model (lab: pretraining seed ``seed``; real: SmolLM2 with the preset's LoRA)."""
    model, tokenizer = suite.load(suite.base_model(seed))
    peft_config = suite.peft_config()
    if peft_config is not None:
        from peft import get_peft_model

        torch.manual_seed(seed)  # LoRA's A is drawn at random
        model = get_peft_model(model, peft_config)
    model.train()
    return model, tokenizer


def summarise(per_seed: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean, min and max over seeds of the coverage, the ratio and the raw leak, per (update, construction,
    rows, task)."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for result in per_seed.values():
        for row in result["table"]:
            groups.setdefault((row["update"], row["construction"], row["rows"], row["task"]), []).append(row)
    out = []
    for (update, construction, n, task), rows in sorted(groups.items()):
        entry: dict[str, Any] = {"update": update, "construction": construction, "rows": n, "task": task}
        for key in ("coverage", "ratio", "raw_leak", "rank"):
            values = [r[key] for r in rows if not math.isnan(r[key])]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
            entry[f"{key}_min"] = min(values) if values else math.nan
            entry[f"{key}_max"] = max(values) if values else math.nan
        entry["seeds"] = len(rows)
        out.append(entry)
    return out


def _cell(row: Mapping[str, Any], key: str, digits: int = 2) -> str:
    return f"{row[key + '_mean']:.{digits}f} [{row[key + '_min']:.{digits}f}, {row[key + '_max']:.{digits}f}]"


def markdown(summary: Sequence[Mapping[str, Any]], noise_level: float, update: str = "adam") -> str:
    """Coverage tables (rows down, tasks across), then vanilla's raw leak and the leak ratio at the most rows."""
    lines = []
    tasks = sorted({r["task"] for r in summary})
    head = ["| rows per task | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for construction in CONSTRUCTIONS:
        rows = [r for r in summary if r["update"] == update and r["construction"] == construction]
        if not rows:
            continue
        lines += [f"### Coverage ‖P ĝ‖ of the held-out gradient, `{construction}` construction", "", *head]
        for n in sorted({r["rows"] for r in rows}):
            cells = [
                next((_cell(r, "coverage") for r in rows if r["rows"] == n and r["task"] == t), "-")
                for t in tasks
            ]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    first = [r for r in summary if r["update"] == update and r["construction"] == "rows"]
    if first:
        most = max(r["rows"] for r in first)
        lines += [
            f"### Vanilla's first update ({update}): raw held-out leak and the ratio after projection",
            "",
            f"A random direction's |cos| is about 1/√P = {noise_level:.4f}; a ratio whose raw leak is at that level "
            "is noise.",
            "",
            "| task | raw leak | ratio, `rows` at the most rows | ratio, `mean` of 8 rows (the defaults' one direction) |",
            "|---|---|---|---|",
        ]
        for t in tasks:
            raw = next(r for r in first if r["task"] == t and r["rows"] == most)
            mean8 = [r for r in summary if r["update"] == update and r["construction"] == "mean" and r["rows"] == 8
                     and r["task"] == t]  # fmt: skip
            lines.append(
                f"| {t} | {_cell(raw, 'raw_leak', 4)} | {_cell(raw, 'ratio')} ({most} rows) | "
                + (_cell(mean8[0], "ratio") if mean8 else "-")
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lab-quick", help="an arena preset (its suite, model and sizes)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="lab pretraining seeds / LoRA seeds"
    )
    parser.add_argument(
        "--max-rows", type=int, default=128, help="training rows per task (per-row gradients)"
    )
    parser.add_argument(
        "--held-out-rows", type=int, default=16, help="held-out rows per task (the arena's 16)"
    )
    parser.add_argument("--dpo-batches", type=int, default=16, help="DPO batches, one first update each")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--sgd", action="store_true", help="also the plain gradient as the update")
    parser.add_argument(
        "--train-max-length",
        type=int,
        default=None,
        help="training rows' token limit (default: the preset's)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    suite = make_suite(preset)
    start = time.time()
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        logger.info("seed %d", seed)
        torch.manual_seed(seed)
        model, tokenizer = load_model(suite, preset, seed)
        per_seed[seed] = measure_model(
            model, tokenizer, suite, preset, max_rows=args.max_rows, held_out_rows=args.held_out_rows,
            dpo_batches=args.dpo_batches, counts=[c for c in args.counts if c <= args.max_rows], sgd=args.sgd,
            train_max_length=args.train_max_length,
        )  # fmt: skip
        del model
    summary = summarise(per_seed)
    noise = 1.0 / math.sqrt(next(iter(per_seed.values()))["trainable"])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    provenance = {
        "command": "python -m benchmarks.leak_ceiling " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit, "machine": platform.node(), "torch_threads": torch.get_num_threads(),
        "seconds": round(time.time() - start, 1),
    }  # fmt: skip
    (args.output_dir / "results.json").write_text(
        json.dumps(
            {"provenance": provenance, "per_seed": per_seed, "summary": summary}, indent=1, default=float
        )
    )
    text = (
        f"# Held-out leak ceiling: `{args.preset}`, seeds {args.seeds}\n\n"
        "Cells: mean [min, max] over seeds. Coverage: the fraction of the held-out gradient's norm inside the span "
        "of every task's vectors after n training rows per task (module docstring).\n\n"
        + markdown(summary, noise)
        + (("\n" + markdown(summary, noise, "sgd")) if args.sgd else "")
        + f"\n_{provenance['command']} at {commit[:7]}, {provenance['seconds']} s._\n"
    )
    (args.output_dir / "results.md").write_text(text)
    logger.info("wrote %s", args.output_dir / "results.md")


if __name__ == "__main__":
    main()
