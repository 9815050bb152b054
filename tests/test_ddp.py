"""Two CPU processes under torchrun (gloo DDP): replicas stay byte-identical every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import build_model_dir


@pytest.mark.parametrize("projection", ["nullspace", "frontier"])
def test_ddp_ranks_stay_byte_identical(tmp_path: Path, projection: str) -> None:
    model_dir = build_model_dir(tmp_path / "model")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(Path(__file__).with_name("ddp_worker.py")),
            str(model_dir),
            str(tmp_path),
            projection,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
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
    model_dir = build_model_dir(tmp_path / "model")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(28500 + os.getpid() % 1000),
         str(Path(__file__).with_name("ddp_worker.py")), str(model_dir), str(tmp_path), "nullspace", "grpo"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert [a["sha256"] for a in ranks[0]] == [b["sha256"] for b in ranks[1]]
    assert len({r["sha256"] for r in ranks[0]}) == 4
    assert max(max(r["leak"]) for r in ranks[0]) <= 1e-5
