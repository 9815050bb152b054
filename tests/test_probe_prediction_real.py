"""Tests for ``benchmarks/probe_prediction_real.py`` (Prediction 1 on SmolLM2) and the arena's full-fine-tuning
preset: the task rows it builds, its correlation summary, and LoRA off at ``lora_r`` 0."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks import probe_prediction_real as bench
from benchmarks.arena import presets
from benchmarks.arena.suites import RealSuite
from frontier_trainer.evaluation.lm_eval_tasks import LmEvalTask


class FakeSuite:
    """The two methods of the real evaluation suite that ``task_pairs`` reads, with distinct rows per split."""

    def capability_tasks(self, split: str, n: int) -> list[LmEvalTask]:
        mc = tuple(
            {"query": f"{split} q{i}?\nAnswer:", "choices": [f"wrong{i}", f"right{i}", "x"], "gold": 1}
            for i in range(n)
        )
        gen = tuple({"query": f"{split} {i}+1=", "answer": str(i + 1)} for i in range(n))
        tasks = [
            LmEvalTask(t, "multiple_choice", mc)
            for t in ("arc_easy", "arc_challenge", "mmlu", "hellaswag", "piqa")
        ]
        tasks.append(
            LmEvalTask(
                "gsm8k",
                "generate_until",
                tuple({"query": "3-shot context " + d["query"], "answer": "7"} for d in gen),
            )
        )
        tasks.append(LmEvalTask("bigbench_arithmetic", "generate_until", gen))
        return tasks

    def nll_sets(self, split: str, n: int) -> dict[str, list[tuple[str, str]]]:
        return {
            "gsm8k": [(f"Question: {split} {i}\nAnswer:", f" solution {i}") for i in range(n)],
            "humaneval": [(f"def f{i}():\n", f"    return {i}\n") for i in range(n)],
        }


def test_task_pairs_take_gold_choice_plain_gsm8k_and_every_task_in_order() -> None:
    pairs = bench.task_pairs(FakeSuite(), "test", 3)
    assert tuple(pairs) == bench.TASKS
    assert pairs["arc_easy"][2] == ("test q2?\nAnswer:", " right2")  # the gold choice, after a space
    assert pairs["bigbench_arithmetic"][0] == ("test 0+1=", " 1")
    assert pairs["gsm8k"][1] == ("Question: test 1\nAnswer:", " solution 1")  # no few-shot context
    assert pairs["humaneval"][0] == ("def f0():\n", "    return 0\n")
    assert all(len(rows) == 3 for rows in pairs.values())


def test_correlate_orders_planted_points_and_reports_every_seed() -> None:
    tau = {t: float(i) for i, t in enumerate(bench.TASKS)}
    same = {t: 0.1 * i for i, t in enumerate(bench.TASKS)}
    reverse = {t: -0.1 * i for i, t in enumerate(bench.TASKS)}
    bench.SETTINGS["bootstrap_samples"] = 200
    try:
        agree = bench.correlate([{"seed": 0, "obs": same}, {"seed": 1, "obs": same}], tau, "obs")
        mixed = bench.correlate([{"seed": 0, "obs": same}, {"seed": 1, "obs": reverse}], tau, "obs")
    finally:
        bench.SETTINGS["bootstrap_samples"] = 10_000
    assert agree["per_seed"] == {"0": pytest.approx(1.0), "1": pytest.approx(1.0)}
    assert agree["pooled"] == pytest.approx(1.0) and agree["within_seed_mean"] == pytest.approx(1.0)
    assert mixed["per_seed"]["1"] == pytest.approx(-1.0)
    assert mixed["within_seed_mean"] == pytest.approx(0.0)
    assert mixed["seed_mean_observed"] != mixed["seed_mean_observed"]  # the seed means are all 0: undefined


def test_full_fine_tuning_preset_turns_lora_off() -> None:
    full = presets.get_preset("smollm2-cpu-full")
    assert full.lora_r == 0 and "activation" in full.methods
    assert RealSuite(full).peft_config() is None
    lora = RealSuite(replace(full, lora_r=8)).peft_config()
    assert lora.r == 8 and lora.lora_alpha == 16


def test_geometry_from_refuses_a_run_with_other_probe_settings(tmp_path, capsys) -> None:
    earlier = tmp_path / "results.json"
    earlier.write_text('{"settings": {"probe_rows": 999}}')
    with pytest.raises(SystemExit) as stop:
        bench.main(["--geometry-from", str(earlier)])
    assert stop.value.code == 2 and "settings differ in ['probe_rows'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--geometry-from", str(tmp_path / "missing.json")])
    assert "no such results.json" in capsys.readouterr().err
