"""The projection under real FSDP2 on CPU (2 gloo ranks under torchrun), and its refusals.

The workers (tests/fsdp_worker.py) write one JSON result per rank with everything asserted here
BEFORE they exit. Multi-process CPU runs occasionally abort at exit after finishing (SIGABRT,
"terminate called without an active exception", field notes §4): a nonzero exit code fails a
test only when a rank's result file is missing or incomplete; otherwise it is logged.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tiny import build_model_dir

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("fsdp_worker.py")
BIN = Path(sys.executable).parent


def launch(
    mode: str,
    tmp_path: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """Run the worker on 2 ranks; return the process and each rank's complete result."""
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        build_model_dir(model_dir)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    port = str(29700 + (os.getpid() * 7 + len(mode)) % 200)
    prefix = launcher or [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    proc = subprocess.run(
        [*prefix, str(WORKER), mode, str(model_dir), str(out), *extra],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, read_results(proc, out, mode)


def read_results(proc: subprocess.CompletedProcess[str], out: Path, mode: str) -> list[dict[str, Any]]:
    """Both ranks' result files; a nonzero exit is an error only if one is missing or incomplete."""
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    results = []
    for rank in (0, 1):
        path = out / f"{mode}.rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result (exit code {proc.returncode}):\n{log}"
        data = json.loads(path.read_text())
        assert data.get("complete") is True, (
            f"rank {rank}'s result is incomplete (exit {proc.returncode}):\n{log}"
        )
        results.append(data)
    if proc.returncode != 0:
        logger.warning(
            "fsdp worker %s exited with %d after writing complete results on both ranks (the known "
            "exit-time abort of multi-process CPU runs, field notes §4); results are used:\n%s",
            mode,
            proc.returncode,
            proc.stderr[-1500:],
        )
    return results


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    _, results = launch("raw", tmp_path_factory.mktemp("fsdp-raw"))
    return results


@pytest.mark.parametrize("mode", ["nullspace", "frontier"])
def test_fsdp2_projection_equals_ddp(raw: list[dict[str, Any]], mode: str) -> None:
    """FSDP2 + ShardedUpdateProjector ends where DDP + UpdateProjector ends, to 1e-6 relative,
    having really moved; one all-reduce per step; ranks agree on every coefficient."""
    for result in raw:
        run = result["modes"][mode]
        assert run["moved_rel"] > 1e-2
        assert run["rel_diff_vs_ddp"] <= 1e-6, run["rel_diff_vs_ddp"]
        for step in run["steps"]:
            assert step["fsdp"]["all_reduces"] == 1  # the (m+1)-vector, nothing else per step
            for a, b in zip(step["fsdp"]["coefficients"], step["ddp"]["coefficients"], strict=True):
                assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    for s0, s1 in zip(raw[0]["modes"][mode]["steps"], raw[1]["modes"][mode]["steps"], strict=True):
        assert s0["fsdp"]["coefficients"] == s1["fsdp"]["coefficients"]  # bit-identical across ranks


def test_fsdp2_nullspace_leak_against_gathered_directions(raw: list[dict[str, Any]]) -> None:
    """|cos(c_i, Δθ)| ≤ 1e-6 with c_i computed by the worker on a gathered, unsharded copy and
    Δθ gathered with full_tensor; the projection really acted (nonzero coefficients)."""
    steps = raw[0]["modes"]["nullspace"]["steps"]
    assert max(max(s["gathered_leak"]) for s in steps) <= 1e-6
    assert max(abs(c) for s in steps for c in s["fsdp"]["coefficients"][1:]) > 1e-4


def test_fsdp2_frontier_constraint_against_gathered_directions(raw: list[dict[str, Any]]) -> None:
    """⟨ĉ_i, δ⟩ ≥ −ε‖u‖ (Thm 4.1) against the gathered directions, and the constraint binds."""
    steps = raw[0]["modes"]["frontier"]["steps"]
    assert min(min(s["gathered_signed"]) for s in steps) >= -0.01 - 1e-6
    assert max(abs(c) for s in steps for c in s["fsdp"]["coefficients"][1:]) > 0  # it corrected something


def test_fsdp2_memory_per_rank_is_a_shard(raw: list[dict[str, Any]]) -> None:
    """The projector holds (k+1) shards: (k+1)/world of the trainable bytes (tiny Llama: even split)."""
    for result in raw:
        run = result["modes"]["nullspace"]
        assert run["local_direction_bytes"] == run["planned_shard_bytes"] == run["full_bytes"] // 2
        assert run["extra_memory_bytes"] == 3 * run["planned_shard_bytes"]  # snapshot + 2 directions


def test_fsdp2_resume_equals_uninterrupted(raw: list[dict[str, Any]]) -> None:
    """DCP model/optimizer + per-rank projector state: 2 + 2 steps end where 4 steps end; a state
    from the other rank is refused."""
    for result in raw:
        assert result["resume"]["max_abs_diff"] <= 1e-7
        assert "resume with the same number of processes" in result["resume"]["wrong_rank_error"]
