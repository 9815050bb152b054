"""Two CPU processes under torchrun (gloo DDP): replicas stay byte-identical every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import build_model_dir, check_multiprocess_exit


def run_ranks(tmp_path: Path, port_base: int, *worker_args: str) -> list[list[dict]]:
    """Run ``ddp_worker.py`` on two torchrun ranks over a fresh tiny model; each rank's per-step records."""
    model_dir = build_model_dir(tmp_path / "model")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port_base + os.getpid() % 1000),
         str(Path(__file__).with_name("ddp_worker.py")), str(model_dir), str(tmp_path), *worker_args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    check_multiprocess_exit(proc, [tmp_path / f"rank{r}.json" for r in (0, 1)])
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("projection", ["nullspace", "frontier"])
def test_ddp_ranks_stay_byte_identical(tmp_path: Path, projection: str) -> None:
    ranks = run_ranks(tmp_path, 29500, projection)
    assert len(ranks[0]) == len(ranks[1]) == 4
    for a, b in zip(*ranks, strict=True):
        assert a["step"] == b["step"]
        assert a["sha256"] == b["sha256"], f"replicas diverged at step {a['step']}"
    assert len({r["sha256"] for r in ranks[0]}) == 4  # parameters did change every step
    if projection == "nullspace":
        assert max(max(r["leak"]) for r in ranks[0]) <= 1e-5


def test_ddp_grpo_ranks_stay_byte_identical(tmp_path: Path) -> None:
    """FrontierGRPOTrainer under DDP: each rank generates its own rollouts, yet the all-reduced
    update and the seeded directions keep the replicas byte-identical, and the step exact."""
    ranks = run_ranks(tmp_path, 28500, "nullspace", "grpo")
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert [a["sha256"] for a in ranks[0]] == [b["sha256"] for b in ranks[1]]
    assert len({r["sha256"] for r in ranks[0]}) == 4
    assert max(max(r["leak"]) for r in ranks[0]) <= 1e-5


def test_ddp_round_robin_refresh_follows_one_schedule_on_every_rank(tmp_path: Path) -> None:
    """capability_refresh_tasks=1 under DDP: the task re-estimated at each refresh comes from the step
    alone, so both ranks draw the same task's rows in the same order and stay byte-identical."""
    ranks = run_ranks(tmp_path, 26500, "nullspace", "roundrobin")
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert [a["sha256"] for a in ranks[0]] == [b["sha256"] for b in ranks[1]]
    assert [a["directions_sha256"] for a in ranks[0]] == [b["directions_sha256"] for b in ranks[1]]
    assert len({r["directions_sha256"] for r in ranks[0]}) == 4  # one task re-estimated at every step
    drawn = [[task for task, _ in ranks[r][-1]["drawn"]] for r in (0, 1)]
    # step 0 every task; then refresh n re-estimates task n mod 2 (copy = 0, count = 1)
    assert drawn[0] == drawn[1] == ["copy", "count", "count", "copy", "count"]
    assert max(max(r["leak"]) for r in ranks[0]) <= 1e-5


def test_ddp_sketch_ranks_draw_their_own_rows_and_stay_identical(tmp_path: Path) -> None:
    """capability_estimator='sketch' under DDP (issue 15 §2): each rank draws different capability rows
    (N ranks estimate from N x the data), the micro-batch gradients are all-reduced and rank 0's
    directions broadcast, so the installed directions and the replicas are byte-identical even though
    rank 1's sketch result is perturbed (a stand-in for nondeterministic kernels)."""
    ranks = run_ranks(tmp_path, 27500, "nullspace", "sketch")
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert [a["sha256"] for a in ranks[0]] == [b["sha256"] for b in ranks[1]]
    assert [a["directions_sha256"] for a in ranks[0]] == [b["directions_sha256"] for b in ranks[1]]
    assert len({r["directions_sha256"] for r in ranks[0]}) == 2  # refreshed at steps 0 and 2
    assert len({r["sha256"] for r in ranks[0]}) == 4
    assert max(max(r["leak"]) for r in ranks[0]) <= 1e-5
    drawn = [ranks[r][-1]["drawn"] for r in (0, 1)]
    assert len(drawn[0]) == len(drawn[1]) == 2 * 2 * 3  # 2 refreshes x 2 tasks x 3 micro-batches
    for (task0, rows0), (task1, rows1) in zip(*drawn, strict=True):
        assert task0 == task1 and not set(rows0) & set(rows1), "ranks drew the same capability rows"
    # the first refresh's directions are the sketch of the *two ranks'* averaged micro-batch gradients,
    # recomputed here in one process from the rows each rank drew
    import torch
    from tiny import build_tokenizer, capability_datasets
    from transformers import AutoModelForCausalLM

    from frontier_trainer.directions import build_capability_sampler, capability_gradients
    from frontier_trainer.subspace import GradientSketch

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # run_ranks' model
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = build_capability_sampler(capability_datasets(), build_tokenizer(), max_length=512, batch_size=2)
    recorded = json.loads((tmp_path / "rank0_directions.json").read_text())
    for t_index, task in enumerate(sampler.tasks):
        sketch = GradientSketch(rank=1, oversample=1)
        for b in range(3):
            (_, rows0), (_, rows1) = drawn[0][t_index * 3 + b], drawn[1][t_index * 3 + b]
            g0 = capability_gradients(model, params, sampler.collate(task, rows0))[1]
            g1 = capability_gradients(model, params, sampler.collate(task, rows1))[1]
            sketch.add([(a + c) / 2 for a, c in zip(g0, g1, strict=True)], weight=1 / 3)
        (direction,), _ = sketch.directions()
        expected = torch.cat([t.reshape(-1) for t in direction])
        assert torch.allclose(torch.tensor(recorded[t_index]), expected, rtol=1e-4, atol=1e-7), task
