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


def _train(model_dir, tmp_path, name: str, held: dict, **overrides):
    from tiny import LeakProbe, capability_datasets

    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer

    tok = build_tokenizer()
    probe = LeakProbe(held, tok)
    values = dict(
        output_dir=str(tmp_path / name),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        capability_refresh_steps=3,
        degradation_tracking=False,
        seed=0,
    )
    values.update(overrides)
    trainer = FrontierDPOTrainer(
        model=str(model_dir),
        args=FrontierDPOConfig(**values),
        train_dataset=Dataset.from_list(preference_rows(24)),
        processing_class=tok,
        capability_datasets=capability_datasets(64),
        callbacks=[probe],
    )
    trainer.train()
    return trainer, probe


def test_trainer_sketch_protects_held_out_rows_better(tmp_path) -> None:
    """End to end (FrontierDPOTrainer, 6 steps, refresh every 3): the mean held-out |cos(∇f_i, Δθ)|
    (LeakProbe on rows the trainer never sees) is lower with capability_estimator='sketch' than with
    'batch', and both below the unprojected step's. The sketch trainer drew exactly refreshes ×
    capability_sketch_batches batches per task (directions are refreshed, from each task's own rows).
    Measured at this commit: none 0.0051, batch 0.0043, sketch 0.0024."""
    model_dir = build_model_dir(tmp_path / "m", seed=1)
    held = capability_rows(24, start=300)
    runs = {
        "none": _train(model_dir, tmp_path, "none", held, projection="none"),
        "batch": _train(model_dir, tmp_path, "batch", held, capability_batch_size=8),
        "sketch": _train(
            model_dir, tmp_path, "sketch", held, capability_estimator="sketch", capability_batch_size=4,
            capability_sketch_batches=8,
        ),
    }
    mean = {
        k: sum(v for s in probe.steps for v in s["leak"].values()) / sum(len(s["leak"]) for s in probe.steps)
        for k, (_, probe) in runs.items()
    }
    assert mean["sketch"] < mean["batch"] < mean["none"], mean
    trainer = runs["sketch"][0]
    state = trainer.capability_sampler.state_dict()["tasks"]
    for task in ("copy", "count"):  # refreshes at steps 0 and 3: 2 x 8 batches of 4 of 64 rows
        assert state[task]["epoch"] * 64 + state[task]["cursor"] == 2 * 8 * 4
    logged = [h for h in trainer.state.log_history if "frontier/generalisation_leak/copy" in h]
    assert logged, "the generalisation leak is logged at the second refresh"
    param_bytes = sum(p.numel() * p.element_size() for p in trainer.projector.params)
    k = trainer.projector.num_directions  # 2 tasks x rank 1; the sketch adds ℓ + 1 = 2 while estimating
    assert trainer.peak_state_bytes == (1 + k + 2) * param_bytes
