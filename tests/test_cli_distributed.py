"""``frontier-dpo`` under ``torchrun`` and ``accelerate launch``: two CPU processes (gloo DDP).

The command is launched exactly as a user would, on a lab recipe at tiny size. The check that
two processes really ran is the main process's own report of the world size (field notes §4:
``accelerate launch --cpu --num_processes 2`` silently runs one). That the replicas stay
byte-identical under the projection is tested on the trainer in ``test_ddp.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny import build_model_dir, capability_datasets, check_multiprocess_exit, preference_rows

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "lab-nullspace.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("cli-ddp")
    model = build_model_dir(root / "model")
    prefs = root / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in preference_rows(32)))
    caps = {}
    for task, ds in capability_datasets().items():
        caps[task] = str(root / f"{task}.jsonl")
        ds.to_json(caps[task])
    return [
        "--config", str(RECIPE),
        "--model_name_or_path", str(model), "--dataset_name", str(prefs),
        "--capability_datasets", json.dumps(caps), "--capability_eval_datasets", json.dumps(caps),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--capability_batch_size", "4",
        "--logging_steps", "1", "--degradation_eval_steps", "1", "--report_to", "none",
        "--ddp_backend", "gloo",
    ]  # fmt: skip


def _launch(prefix: list[str], args: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*prefix, "-m", "frontier_trainer.cli", *args, "--output_dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_cli_runs_on_two_processes(launcher: str, tiny_args: list[str], tmp_path: Path) -> None:
    port = str(29600 + (os.getpid() + (launcher == "accelerate")) % 300)
    if launcher == "torchrun":
        prefix = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:  # --multi_gpu with use_cpu gives gloo DDP on CPU; --cpu alone would run one process
        prefix = [
            str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
        ]  # fmt: skip
    out = tmp_path / "out"
    proc = _launch(prefix, tiny_args, out)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    # the known exit-time abort is tolerated only with complete outputs: the saved weights must load
    # (not cut off mid-save) and every assertion below still runs
    check_multiprocess_exit(proc, [])
    assert "training on 2 process(es), projection=nullspace" in proc.stdout, log
    assert (out / "model.safetensors").exists(), log
    load_file(out / "model.safetensors")  # complete and readable, not cut off mid-save
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "frontier/leak/copy" in h]
    assert len(steps) == 2
    assert max(max(h["frontier/leak/copy"], h["frontier/leak/count"]) for h in steps) <= 1e-4


def test_only_the_known_exit_abort_with_complete_results_is_tolerated(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tiny import KNOWN_EXIT_ABORT

    done = tmp_path / "rank0.json"
    done.write_text("{}")
    aborted = SimpleNamespace(returncode=-6, stdout="", stderr=f"... {KNOWN_EXIT_ABORT}\n")
    with pytest.warns(UserWarning, match="known exit-time abort"):
        check_multiprocess_exit(aborted, [done])
    with pytest.raises(AssertionError, match="no "):  # aborted before its results were written
        check_multiprocess_exit(aborted, [tmp_path / "rank1.json"])
    crashed = SimpleNamespace(returncode=1, stdout="", stderr="Traceback ... ValueError: boom")
    with pytest.raises(AssertionError, match="exit 1"):
        check_multiprocess_exit(crashed, [done])
