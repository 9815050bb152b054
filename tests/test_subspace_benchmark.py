"""benchmarks/subspace_benchmark.py's summary: ratios against vanilla, and against the adjacent vanilla
run when configurations are interleaved (--interleave)."""

from __future__ import annotations

import pytest

from benchmarks.subspace_benchmark import mean_summary, summarise, table


def _row(config: str, step: float, leak: float, rise: dict[str, float], **extra: float) -> dict:
    return {"config": config, "step_time_mean": step, "held_out_leak_mean": leak, "held_out_nll_rise": rise,
            "metrics": {}, **extra}  # fmt: skip


def test_ratios_use_the_adjacent_vanilla_run_when_interleaved() -> None:
    rows = [
        _row("vanilla", 2.0, 0.04, {"code": 0.1, "addition": 0.8}),
        _row("a", 2.2, 0.02, {"code": 0.05, "addition": 0.2}),  # not interleaved: against the first vanilla
        _row("b", 3.3, 0.01, {"code": 0.0, "addition": 0.08}, adjacent_vanilla_step_time=3.0),
    ]
    out = {r["config"]: r for r in summarise(rows, base={})}
    assert out["vanilla"]["time_ratio"] == 1.0
    assert out["a"]["time_ratio"] == pytest.approx(1.1)
    assert out["b"]["time_ratio"] == pytest.approx(1.1)  # 3.3 / 3.0, not 3.3 / 2.0
    assert out["b"]["leak_vs_unprojected"] == pytest.approx(0.25)
    assert out["a"]["nll_rise_vs_vanilla"] == pytest.approx({"code": 0.5, "addition": 0.25})


def test_mean_summary_keeps_per_seed_values() -> None:
    seeds = [
        summarise([_row("vanilla", 2.0, 0.04, {"x": 1.0}), _row("a", 2.2, 0.02, {"x": 0.5})], base={}),
        summarise([_row("vanilla", 2.0, 0.04, {"x": 1.0}), _row("a", 2.6, 0.01, {"x": 0.3})], base={}),
    ]
    a = mean_summary(seeds)[1]
    assert a["time_ratio"] == pytest.approx(1.2) and a["time_ratio_per_seed"] == pytest.approx([1.1, 1.3])
    assert a["nll_rise_vs_vanilla"] == pytest.approx({"x": 0.4})


def test_without_the_probe_only_the_cost_is_summarised() -> None:
    """--probe-rows 0: rows carry no leak or NLL, the summary and table give the time ratio alone,
    per seed, each against its adjacent vanilla."""

    def timed(config: str, step: float, **extra: float) -> dict:
        return {"config": config, "step_time_mean": step, "metrics": {}, **extra}

    seeds = [
        summarise([timed("vanilla", 2.0), timed("a", 2.4, adjacent_vanilla_step_time=2.2)], base={}),
        summarise([timed("vanilla", 2.0), timed("a", 2.6, adjacent_vanilla_step_time=2.0)], base={}),
    ]
    assert set(seeds[0][1]) == {"config", "time_ratio"}
    mean = mean_summary(seeds)
    assert mean[1]["time_ratio_per_seed"] == pytest.approx([2.4 / 2.2, 1.3])
    text = table(mean)
    assert "| a | 1.195 | 1.091, 1.300 |" in text and "leak" not in text
