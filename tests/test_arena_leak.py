"""The arena's held-out generalisation-leak probe (issue 15 §1): exact on planted updates, inert on
training, and wired through the arena's cells, summary, targets and results.md."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from datasets import Dataset
from test_arena import _TinySuite

from benchmarks.arena import presets
from benchmarks.arena.leak import HeldOutLeakProbe, trainer_diagnostics, update_cosine


def test_update_cosine_on_planted_vectors() -> None:
    g = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0]])]
    assert update_cosine([torch.tensor([2.0, 0.0]), torch.tensor([[0.0, 0.0]])], g) == pytest.approx(1.0)
    assert update_cosine([torch.tensor([-1.0, 0.0]), torch.tensor([[0.0, 0.0]])], g) == pytest.approx(1.0)
    assert update_cosine([torch.tensor([0.0, 3.0]), torch.tensor([[0.0, 5.0]])], g) == pytest.approx(0.0)
    assert update_cosine([torch.tensor([1.0, 1.0]), torch.tensor([[0.0, 0.0]])], g) == pytest.approx(0.5**0.5)
    assert math.isnan(update_cosine([torch.zeros(2), torch.zeros(1, 2)], g))


def _probe_run(tmp_path: Path, make_delta: Any) -> tuple[HeldOutLeakProbe, dict[str, torch.Tensor], Any]:
    """Drive the probe's callbacks by hand around an 'optimizer step' that adds make_delta(gradients)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.build_model_dir(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = tiny.capability_rows(6, start=30)
    probe = HeldOutLeakProbe({t: Dataset.from_list(r) for t, r in rows.items()}, tok, max_length=None, rows=6)
    params = [p for p in model.parameters() if p.requires_grad]
    independent = {t: tiny.independent_gradient(model, params, r, tok) for t, r in rows.items()}
    rng = torch.get_rng_state()
    before = [p.detach().clone() for p in params]
    model.train()
    probe.on_pre_optimizer_step(None, None, None, model=model)
    assert torch.equal(torch.get_rng_state(), rng), "the probe consumed the training RNG"
    assert all(p.grad is None for p in params), "the probe wrote .grad"
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)), "the probe moved parameters"
    assert model.training, "the probe left the model in eval mode"
    flat_delta = make_delta(independent)
    with torch.no_grad():
        offset = 0
        for p in params:
            p.add_(flat_delta[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
    probe.on_optimizer_step(None, None, None)
    return probe, independent, model


def test_probe_measures_the_applied_update_against_each_tasks_own_held_out_gradient(tmp_path: Path) -> None:
    """An update along copy's held-out gradient: copy's leak is 1 and count's is |cos(g_copy, g_count)|,
    both against gradients computed without frontier_trainer (kills: another task's rows, a snapshot
    taken after the step, gradients at the moved parameters)."""
    probe, g, _ = _probe_run(tmp_path, lambda g: 1e-3 * g["copy"])
    cross = float(abs(g["copy"] @ g["count"]) / (g["copy"].norm() * g["count"].norm()))
    assert 0.05 < cross < 0.95  # the two tasks' gradients are neither parallel nor orthogonal
    assert probe.leaks["copy"] == [pytest.approx(1.0, abs=1e-4)]
    assert probe.leaks["count"] == [pytest.approx(cross, abs=1e-4)]
    assert len(probe.seconds) == 1 and probe.seconds[0] > 0


def test_probe_sees_zero_leak_for_an_update_orthogonal_to_the_held_out_gradient(tmp_path: Path) -> None:
    def orthogonal(g: dict[str, torch.Tensor]) -> torch.Tensor:
        u = torch.randn(g["copy"].numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        c = g["copy"] / g["copy"].norm()
        return 1e-2 * (u - (u @ c) * c)

    probe, _, _ = _probe_run(tmp_path, orthogonal)
    assert probe.leaks["copy"][0] < 1e-4
    assert probe.leaks["count"][0] > 1e-3


def test_trainer_diagnostics_average_the_logged_leaks() -> None:
    history = [
        {"loss": 1.0, "frontier/leak/a": 1e-9, "frontier/leak/b": 3e-9},
        {"frontier/generalisation_leak/a": 0.2, "frontier/generalisation_leak/b": 0.4},
        {"frontier/leak/a": float("nan")},
    ]
    assert trainer_diagnostics(history) == {
        "realised_leak": pytest.approx(2e-9),
        "generalisation_leak": pytest.approx(0.3),
    }
    assert trainer_diagnostics([{"loss": 1.0}]) == {}


class _OwnRowsSuite(_TinySuite):
    """The tiny world whose held-out rows are the trainers' own capability rows: a null-space step
    refreshed every step on all of them must show no leak; an unprojected step must."""

    def held_out_capability(self, n: int) -> dict[str, Any]:
        return self.capability_datasets()


def test_arena_cells_carry_the_leak_and_the_target_row_is_scored(tmp_path: Path) -> None:
    from benchmarks.arena import run as arena_run

    rows = len(tiny.capability_rows()["copy"])
    preset = replace(presets.get_preset("lab-quick"), pretrain_seeds=(0,), train_seeds=(0,), steps=2, batch_size=4,
                     methods=("vanilla", "nullspace"), replicates=50, capability_rows=rows, leak_rows=rows,
                     method_options={"nullspace": {"capability_refresh_steps": 1, "capability_batch_size": rows}})  # fmt: skip
    presets.PRESETS["tiny-leak"] = replace(preset, name="tiny-leak")
    try:
        summary = arena_run.run("tiny-leak", tmp_path / "out", suite=_OwnRowsSuite(tmp_path), command="pytest")
    finally:
        del presets.PRESETS["tiny-leak"]
    leak = summary["leak"]
    assert leak["vanilla"]["held_out_leak"] > 1e-3
    assert leak["nullspace"]["held_out_leak"] < 1e-5  # exact against the rows it held, which are these
    assert leak["nullspace"]["leak_ratio"] < 1e-3
    assert "generalisation_leak" in leak["nullspace"] and "realised_leak" in leak["nullspace"]
    assert "generalisation_leak" not in leak["vanilla"]
    assert set(leak["vanilla"]["held_out_nll_rise"]) == {"copy", "count"}
    row = next(t for t in summary["targets"]["nullspace"] if t["target"].startswith("held-out leak"))
    assert row["status"] == "met"
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Generalisation leak" in text and "| nullspace |" in text


def test_leak_rows_is_validated_and_overridable() -> None:
    with pytest.raises(ValueError, match="leak_rows"):
        replace(presets.get_preset("lab-quick"), leak_rows=-1).validate()
    assert presets.get_preset("smollm2-cpu").with_overrides(leak_rows=4).leak_rows == 4
    assert presets.get_preset("smollm2-cpu").leak_rows == 0
