"""The static held-out leak ceiling (benchmarks/leak_ceiling.py): its span, its proxy for Adam's first step, its
three constructions and its ratios, each against an independent computation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_arena import _TinySuite

from benchmarks import leak_ceiling as lc


def test_span_projects_as_a_qr_basis_does_and_skips_dependent_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(50, generator=gen) for _ in range(5)]
    span = lc.Span(50, capacity=6)
    assert all(span.add(v) for v in vectors)
    assert not span.add(vectors[0] * 3 - vectors[2])  # inside the span: not added
    q, _ = torch.linalg.qr(torch.stack(vectors).double().T)
    x = torch.randn(50, generator=gen).double()
    assert torch.allclose(span.project_off(x), x - q @ (q.T @ x), atol=1e-12)
    assert span.coverage(vectors[3]) == pytest.approx(1.0, abs=1e-9)
    off = x - q @ (q.T @ x)
    assert span.coverage(off) == pytest.approx(0.0, abs=1e-6)


def test_first_adam_update_is_adamw_first_step_direction() -> None:
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(200, generator=gen)
    param = torch.nn.Parameter(torch.randn(200, generator=gen))
    before = param.detach().clone()
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.0, eps=1e-12)
    param.grad = grad.clone()
    opt.step()
    step = param.detach() - before
    cos = torch.nn.functional.cosine_similarity(step.double(), lc.first_adam_update(grad).double(), dim=0)
    assert float(cos) > 0.999999


def test_the_three_constructions_take_the_rows_they_name() -> None:
    rows = [torch.full((3,), float(i)) for i in range(20)]
    assert [float(v[0]) for v in lc.directions_for("rows", rows, 5)] == [0, 1, 2, 3, 4]
    batches = lc.directions_for("batches", rows, 20)  # two full batches of 8; the last 4 rows are left out
    assert [float(v[0]) for v in batches] == [3.5, 11.5]
    assert [float(v[0]) for v in lc.directions_for("mean", rows, 4)] == [1.5]
    with pytest.raises(ValueError, match="construction"):
        lc.directions_for("sketch", rows, 4)


def test_leak_ratio_is_zero_inside_the_span_and_at_least_one_off_it() -> None:
    """A held-out gradient that is a combination of training rows is fully covered and the projected update has no
    component along it; one orthogonal to every row is not covered and projection cannot lower the leak."""
    gen = torch.Generator().manual_seed(2)
    dim = 40
    rows = {"a": [torch.randn(dim, generator=gen) for _ in range(8)]}
    inside = sum(rows["a"][:3])
    q, _ = torch.linalg.qr(torch.stack(rows["a"]).double().T)
    outside = torch.randn(dim, generator=gen).double()
    outside = outside - q @ (q.T @ outside)
    updates = [torch.randn(dim, generator=gen) for _ in range(3)]
    table = {
        name: lc.leak_ratios(rows, {"a": g}, updates, [8], "rows")[0]
        for name, g in (("in", inside), ("out", outside))
    }
    assert table["in"]["coverage"] == pytest.approx(1.0, abs=1e-9)
    assert table["in"]["ratio"] < 1e-6  # float32 rows
    assert table["out"]["coverage"] < 1e-6
    assert table["out"]["ratio"] >= 1.0 - 1e-9
    assert table["in"]["rank"] == 8
    # fewer rows in the span: partial coverage of a vector built from 3 of them
    partial = lc.leak_ratios(rows, {"a": inside}, updates, [1], "rows")[0]
    assert 0.0 < partial["coverage"] < 1.0


class _Suite(_TinySuite):
    """test_arena's tiny suite, 16 training rows per task and held-out rows from a later range."""

    def capability_datasets(self) -> dict[str, Any]:
        return self.tiny.capability_datasets(16)

    def held_out_capability(self, n: int) -> dict[str, Any]:
        from datasets import Dataset

        return {t: Dataset.from_list(r) for t, r in self.tiny.capability_rows(n, start=100).items()}


def test_measure_model_uses_each_tasks_own_rows_and_coverage_grows_with_rows(tmp_path: Path) -> None:
    """On the tiny model: the span after n rows has the rank the rows give, coverage of each task's held-out
    gradient does not fall as rows are added (nested spans), and per-row gradients are the task's own: the
    gradient of the task's first training row, recomputed independently, lies in the span."""
    import tiny

    from benchmarks.arena.presets import get_preset

    preset = replace(get_preset("lab-quick"), batch_size=4)
    suite = _Suite(tmp_path)
    model, tok = lc.load_model(suite, preset, 0)
    result = lc.measure_model(
        model, tok, suite, preset, max_rows=16, held_out_rows=8, dpo_batches=2, counts=[1, 8, 16], sgd=True
    )
    tasks = sorted(result["rows_per_task"])
    assert result["rows_per_task"] == {t: 16 for t in tasks}
    rows = [r for r in result["table"] if r["update"] == "adam" and r["construction"] == "rows"]
    for task in tasks:
        cov = [r["coverage"] for r in sorted(rows, key=lambda r: r["rows"]) if r["task"] == task]
        assert cov == sorted(cov) and cov[-1] > cov[0], (task, cov)
    assert {r["rank"] for r in rows if r["rows"] == 1} == {len(tasks)}
    assert {r["update"] for r in result["table"]} == {"adam", "sgd"}
    # the per-row gradients are each task's own rows: an independent gradient of a training row is in the span
    params = [p for p in model.parameters() if p.requires_grad]
    first_rows = {t: tiny.capability_rows(16)[t] for t in tasks}
    per_row = lc.collect_per_row_gradients(model, tok, suite, preset, max_rows=16)
    spans = {}
    for task in tasks:
        spans[task] = lc.Span(per_row[task][0].numel(), capacity=16)
        for v in per_row[task]:
            spans[task].add(v)
    for task, other in zip(tasks, tasks[1:] + tasks[:1], strict=True):
        own = tiny.independent_gradient(model, params, first_rows[task][:1], tok)
        assert spans[task].coverage(own) > 0.9999, task
        assert spans[other].coverage(own) < 0.99, (task, other)
