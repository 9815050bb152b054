"""Protection that generalises to the task's held-out rows (issue 15 §2).

The held-out gradient is computed by :func:`tiny.independent_gradient` (its own tokenisation,
metric and autograd loop, no frontier_trainer code) on capability rows the estimator never saw.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from datasets import Dataset
from tiny import (
    build_model_dir,
    build_tokenizer,
    capability_rows,
    flat,
    independent_gradient,
    preference_rows,
)
from transformers import AutoModelForCausalLM

from frontier_trainer.directions import build_capability_sampler, capability_gradients, flatten
from frontier_trainer.subspace import sketch_task_directions


def _null_space_step(u: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """u minus its projection onto span(directions) (Thm 4.3, δ_C = 0), in float64."""
    q = torch.linalg.qr(directions.T).Q
    return u - q @ (q.T @ u)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b).abs() / (a.norm() * b.norm()))


def test_sketch_directions_generalise_to_held_out_rows(tmp_path) -> None:
    """A refusal step projected against the sketch (16 micro-batches of 4 rows) moves the held-out
    capability metric less than one projected against today's batch direction (8 rows), and at least
    4× less than the unprojected step; mean |cos| over 3 models × 2 tasks. Measured at this commit:
    unprojected 0.042, batch 0.017, sketch 0.005."""
    tok = build_tokenizer()
    rows = capability_rows(64)
    held = capability_rows(32, start=200)  # never seen by either estimator
    data = {task: Dataset.from_list(r) for task, r in rows.items()}
    refusal = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(16)])
    leaks: dict[str, list[float]] = {"none": [], "batch": [], "sketch": []}
    for seed in range(3):
        model = AutoModelForCausalLM.from_pretrained(build_model_dir(tmp_path / f"m{seed}", seed=seed))
        params = [p for p in model.parameters() if p.requires_grad]
        safety = build_capability_sampler({"refusal": refusal}, tok, 64, batch_size=16)
        u = flatten(capability_gradients(model, params, safety.next_batch("refusal"))[1]).double()
        for task in ("copy", "count"):
            g_held = independent_gradient(model, params, held[task], tok)
            batch = build_capability_sampler(data, tok, 64, batch_size=8, seed=seed)
            d_batch = flat(capability_gradients(model, params, batch.next_batch(task))[1])[None]
            micro = build_capability_sampler(data, tok, 64, batch_size=4, seed=seed)
            result = sketch_task_directions(model, params, micro, task, rank=1, num_batches=16)
            d_sketch = torch.stack([flat(d) for d in result.directions])
            leaks["none"].append(_cos(u, g_held))
            leaks["batch"].append(_cos(_null_space_step(u, d_batch), g_held))
            leaks["sketch"].append(_cos(_null_space_step(u, d_sketch), g_held))
    mean = {k: sum(v) / len(v) for k, v in leaks.items()}
    assert mean["sketch"] < 0.5 * mean["batch"], mean
    assert mean["sketch"] < mean["none"] / 4, mean
