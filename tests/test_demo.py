"""The demo: planted geometry recovers the ground truth; summary rows, table, files and plots."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from frontier_trainer import demo

sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = ("arithmetic", "chemistry", "persuasion")


def test_planted_geometry_report_recovers_ground_truth(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    demo.main(["--output-dir", str(tmp_path), "--planted-only"])
    assert torch.get_num_threads() == threads  # the demo's one-thread default does not leak
    report = json.loads((tmp_path / "geometry_planted.json").read_text())
    taus = {t["task"]: t["tau"] for t in report["tasks"]}
    assert abs(taus["chemistry"] - 0.36) < 1e-9 and abs(taus["persuasion"] - 0.35**2) < 1e-9
    assert taus["arithmetic"] < 0.05 and taus["translation"] < 0.05
    fit = report["scaling"]["fit"]
    # Prop 5.5: incidental tax is m'/d with m' = 2 and no plateau
    assert abs(fit["k"] - 2.0) < 5 * fit["k_stderr"] + 0.1
    assert abs(fit["tau0"]) < 5 * fit["tau0_stderr"] + 1e-3
    # the planted-only path never touches the lab
    assert not (tmp_path / "summary.json").exists()


def _eval(acc: dict[str, float], refusal: float, over: float) -> dict[str, float]:
    out = {f"accuracy/{t}": acc[t] for t in TASKS}
    out["accuracy/mean"] = sum(acc.values()) / len(acc)
    out |= {"refusal_rate": refusal, "over_refusal_rate": over, "compliance_rate": 1 - refusal}
    return out


BASE = _eval({"arithmetic": 1.0, "chemistry": 1.0, "persuasion": 1.0}, 0.0, 0.0)
VANILLA = _eval({"arithmetic": 0.9, "chemistry": 0.0, "persuasion": 0.3}, 0.3, 0.25)
NULLSPACE = _eval({"arithmetic": 1.0, "chemistry": 1.0, "persuasion": 1.0}, 0.85, 0.8)


def test_method_row_changes_against_base() -> None:
    row = demo.method_row("vanilla DPO", BASE, VANILLA, seconds=1.5)
    assert row["refusal"] == 0.3 and row["refusal_gain"] == pytest.approx(0.3)
    assert row["mean_capability_change"] == pytest.approx((0.9 + 0.0 + 0.3) / 3 - 1.0)
    assert row["worst_task"] == "chemistry" and row["worst_task_change"] == pytest.approx(-1.0)
    assert row["over_refusal_change"] == pytest.approx(0.25)
    assert row["task_changes"]["arithmetic"] == pytest.approx(-0.1)
    assert row["seconds"] == 1.5


def test_hypervolume_and_matched_capability() -> None:
    # one point (0.5, 0.5) dominates a quarter of the unit square
    assert demo.hypervolume([(0.5, 0.5)]) == pytest.approx(0.25)
    # a staircase: (1, 0.2) and (0.4, 1): 0.4 * 1 + 0.6 * 0.2
    assert demo.hypervolume([(1.0, 0.2), (0.4, 1.0), (0.3, 0.5)]) == pytest.approx(0.52)
    assert demo.pareto([(1.0, 0.2), (0.4, 1.0), (0.3, 0.5)]) == [(0.4, 1.0), (1.0, 0.2)]
    front = [(0.0, 1.0), (0.5, 0.6), (1.0, 0.2)]
    assert demo.capability_at_refusal(front, 0.25) == pytest.approx(0.8)
    assert demo.capability_at_refusal(front, 0.0) == pytest.approx(1.0)
    assert math.isnan(demo.capability_at_refusal([(0.3, 0.5)], 0.4))


def _synthetic_summary() -> dict[str, Any]:
    methods = [
        demo.method_row("vanilla DPO", BASE, VANILLA),
        demo.method_row("nullspace DPO", BASE, NULLSPACE),
    ]
    hma_points = [
        {"method": "base", "t": 0.0, "refusal_rate": 0.0, "accuracy/mean": 0.4, "over_refusal_rate": 0.0},
        {"method": "aligned", "t": 1.0, "refusal_rate": 0.5, "accuracy/mean": 0.1, "over_refusal_rate": 0.3},
        {"method": "uniform", "t": 0.5, "refusal_rate": 0.2, "accuracy/mean": 0.25, "over_refusal_rate": 0.1},
        {"method": "hma", "t": 0.5, "refusal_rate": 0.2, "accuracy/mean": 0.35, "over_refusal_rate": 0.1},
    ]
    hma_base = _eval({"arithmetic": 0.4, "chemistry": 0.4, "persuasion": 0.4}, 0.0, 0.0)
    hma_rows = [
        demo.method_row("uniform averaging t=0.50", hma_base, _eval(dict.fromkeys(TASKS, 0.25), 0.2, 0.1), kind="uniform"),
        demo.method_row("HMA, budget of t=0.50", hma_base, _eval(dict.fromkeys(TASKS, 0.35), 0.2, 0.1), kind="hma"),
    ]  # fmt: skip
    degradation_rows = [
        {"task": "arithmetic", "tau": 1e-4, "predicted": 0.01, "observed": 0.02},
        {"task": "chemistry", "tau": 2e-5, "predicted": 1.3, "observed": 2.4},
        {"task": "persuasion", "tau": 4e-4, "predicted": 2.0, "observed": 4.8},
    ]
    return {
        "setup": {"model": "abc", "steps": 60, "seed": 0, "eval_examples": 100, "hma_eval_examples": 40},
        "base": BASE,
        "methods": methods,
        "hma": {
            "description": "synthetic",
            "points": hma_points,
            "hypervolume": {"uniform": 0.1, "hma": 0.12},
            "hv_ratio": 1.2,
            "tau_std": 0.001,
            "capability_at_matched_refusal": {"0.200": {"uniform": 0.25, "hma": 0.35}},
            "rows": hma_rows,
        },
        "degradation": {
            "vanilla": {
                "rows": degradation_rows,
                "rank_correlations": {"spearman_predicted_vs_observed": 1.0},
            }
        },
        "timings_s": {"planted geometry": 3.0, "total": 100.0},
    }


def test_summary_table_and_files(tmp_path: Path) -> None:
    summary = _synthetic_summary()
    rows = demo.summary_table_rows(summary)
    assert [r[0] for r in rows] == [
        "vanilla DPO",
        "nullspace DPO",
        "uniform averaging t=0.50",
        "HMA, budget of t=0.50",
    ]
    assert rows[0][2] == "+0.30" and rows[0][4] == "-1.00 (chemistry)" and rows[1][3] == "+0.00"
    assert rows[1][4] == "+0.00 (none lost)"
    js, md = demo.write_summary(tmp_path, summary)
    assert json.loads(js.read_text())["hma"]["hv_ratio"] == 1.2
    text = md.read_text()
    assert "| vanilla DPO | 0.30 | +0.30 | -0.60 | -1.00 (chemistry) | +0.25 |" in text
    assert (
        "Base model: refusal 0.00, mean accuracy 1.00, over-refusal 0.00; HMA setting's base: refusal 0.00"
        in text
    )
    assert "ratio **1.200**" in text and "0.200: uniform 0.250 / HMA 0.350" in text
    assert "| vanilla | persuasion | 0.00040 | 2.0000 | 4.8000 |" in text
    assert "Spearman(predicted, observed) = 1.00" in text and "total 100.0" in text
    log = demo.format_summary_text(summary)
    assert "nullspace DPO" in log and "ratio 1.200" in log


def test_plots_are_written(tmp_path: Path) -> None:
    summary = _synthetic_summary()
    paths = [
        demo.plot_tradeoff(summary, tmp_path / "tradeoff.png"),
        demo.plot_predicted_vs_observed(summary["degradation"], tmp_path / "pvo.png"),
        demo.plot_hma(summary["hma"], tmp_path / "hma.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_environment_offline_by_default_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    with demo.wandb_environment(tmp_path) as group:
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
        assert os.environ["WANDB_PROJECT"] == "mine" and os.environ["WANDB_RUN_GROUP"] == group
    assert "WANDB_MODE" not in os.environ and "WANDB_DIR" not in os.environ
    assert os.environ["WANDB_PROJECT"] == "mine"
    monkeypatch.setenv("WANDB_MODE", "online")
    with demo.wandb_environment(tmp_path):
        assert os.environ["WANDB_MODE"] == "online"


def test_intra_op_threads_default_one_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with demo.intra_op_threads(None):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with demo.intra_op_threads(None):
        assert torch.get_num_threads() == before  # the user's setting wins


def test_aggregate_rows_means_intervals_and_every_run_kept() -> None:
    runs = [
        demo.method_row("v", BASE, VANILLA, pretrain_seed=0, train_seed=0),
        demo.method_row("v", BASE, NULLSPACE, pretrain_seed=1, train_seed=0),
    ]
    row = demo.aggregate_rows("vanilla DPO", runs)
    assert row["runs"] == 2 and row["refusal_gain"] == pytest.approx((0.3 + 0.85) / 2)
    low, high = row["refusal_gain_ci"]
    assert 0.3 <= low < row["refusal_gain"] < high <= 0.85  # bootstrap of two runs spans them
    assert row["worst_task"] == "chemistry" and row["worst_task_change"] == pytest.approx(-0.5)
    assert [r["pretrain_seed"] for r in row["per_run"]] == [0, 1]
    one = demo.aggregate_rows("x", runs[:1])
    assert one["refusal_gain_ci"] == [pytest.approx(0.3), pytest.approx(0.3)]
    with pytest.raises(ValueError, match="no runs to aggregate"):
        demo.aggregate_rows("x", [])
    table = demo.summary_table_rows({"methods": [row]})
    assert table[0][0] == "vanilla DPO (2 runs)"
    assert table[0][2] == f"+0.57 [{low:+.2f}, {high:+.2f}]" and table[0][4].endswith("(chemistry)")


def test_seed_lists_are_parsed_and_bad_ones_named() -> None:
    assert demo._int_list("0,1,2") == [0, 1, 2]
    import argparse

    for bad in ("0,x", "1,1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="seeds"):
            demo._int_list(bad)


def test_step_log_dicts_go_to_a_file_not_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trainer's per-step dicts land in train_log.jsonl; the progress bar stays; nothing printed."""
    import tiny
    from transformers.trainer_callback import ProgressCallback
    from trl import DPOConfig, DPOTrainer

    model_dir = tiny.build_model_dir(tmp_path / "m")
    args = DPOConfig(output_dir=str(tmp_path / "o"), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                     report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=False)  # fmt: skip
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=tiny.preference_dataset(),
                         processing_class=tiny.build_tokenizer())  # fmt: skip
    demo.quiet_step_logs(trainer, tmp_path / "log" / "train_log.jsonl")
    assert any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)  # bar kept
    capsys.readouterr()
    trainer.train()
    captured = capsys.readouterr()
    assert (
        "'loss'" not in captured.out + captured.err and "'learning_rate'" not in captured.out + captured.err
    )
    lines = [json.loads(x) for x in (tmp_path / "log" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]


def test_demo_over_seeds_at_tiny_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's seed grid end to end at tiny sizes (a 20-step lab model, 2 DPO steps, 8 prompts)."""
    monkeypatch.setenv("FRONTIER_TRAINER_CACHE", str(tmp_path / "cache"))
    summary = demo.main(["--output-dir", str(tmp_path / "out"), "--steps", "2", "--seeds", "0,1",
                         "--pretrain-seeds", "0", "--lab-steps", "20", "--eval-examples", "8", "--no-hma"])  # fmt: skip
    rows = summary["methods"]
    assert [r["method"] for r in rows] == [
        "vanilla DPO",
        "null-space DPO",
        f"frontier DPO (eps={demo.DEFAULT_TOLERANCE:g})",
    ]
    for r in rows:
        assert r["runs"] == 2 and [(x["pretrain_seed"], x["train_seed"]) for x in r["per_run"]] == [
            (0, 0),
            (0, 1),
        ]
        assert r["refusal_gain_ci"][0] <= r["refusal_gain"] <= r["refusal_gain_ci"][1]
    assert summary["setup"]["pretrain_seeds"] == [0] and summary["setup"]["eval_examples"] == 8
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["methods"][0]["refusal_gain_ci"] == rows[0]["refusal_gain_ci"]
    assert (tmp_path / "out" / "p0_s1" / "nullspace" / "train_log.jsonl").is_file()
    assert "[" in (tmp_path / "out" / "summary.md").read_text()  # intervals in the table


@pytest.mark.slow
def test_full_demo_writes_summary_plots_and_wandb(tmp_path: Path) -> None:
    """The whole ``make demo`` story with short DPO runs (a few minutes; builds the lab model if absent)."""
    summary = demo.main(
        ["--output-dir", str(tmp_path), "--steps", "10", "--seeds", "0", "--pretrain-seeds", "0"]
    )
    names = [r["method"] for r in summary["methods"]]
    assert names == ["vanilla DPO", "null-space DPO", f"frontier DPO (eps={demo.DEFAULT_TOLERANCE:g})"]
    assert summary["hma"]["hypervolume"]["uniform"] > 0 and len(summary["hma"]["rows"]) == 7
    for f in (
        "summary.md",
        "summary.json",
        "tradeoff.png",
        "predicted_vs_observed.png",
        "hma_vs_uniform.png",
    ):
        assert (tmp_path / f).is_file(), f
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 4  # three DPO runs and the summary run
    assert "total" in summary["timings_s"]
