"""Tests for frontier_trainer.subspace: the frequent-directions capability subspace (issue 15 §2).

Checked against independent computations: an exact SVD of the stacked weighted gradients, the
FD error bound (Ghashami et al. Thm 1.1), a planted low-rank problem with known subspace, and the
tiny Llama's own gradients computed by ``capability_gradients`` on the rows the sampler drew.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from datasets import Dataset

from frontier_trainer.directions import build_capability_sampler, capability_gradients, flatten
from frontier_trainer.subspace import GradientSketch, principal_angle_sines, sketch_task_directions
from tests import tiny

SHAPES = [(6, 5), (50,)]
P = sum(torch.Size(s).numel() for s in SHAPES)


def as_list(flat: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        out.append(flat[start : start + n].reshape(shape).clone())
        start += n
    return out


def planted(n: int, k: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` per-example gradients ``U z + noise·ε`` (rows) and the planted basis ``U`` (k×P)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(P, k, generator=gen, dtype=torch.float64)).Q.T
    scales = torch.linspace(3.0, 2.0, k, dtype=torch.float64)
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) * scales + 0.5
    grads = z @ basis + noise * torch.randn(n, P, generator=gen, dtype=torch.float64)
    return grads, basis


def sketch_of(rows: torch.Tensor, k: int, oversample: int, weight: float = 1.0) -> GradientSketch:
    sketch = GradientSketch(rank=k, oversample=oversample)
    for row in rows:
        sketch.add(as_list(row.clone()), weight=weight)
    return sketch


def stack(directions: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([flatten(d).double() for d in directions])


def test_no_shrink_is_the_exact_svd() -> None:
    """With fewer rows than k + ℓ (no shrink) the sketch is exact: eigenvalues and span of the SVD."""
    grads, _ = planted(3, 3, 0.3, seed=0)
    sketch = sketch_of(grads, k=2, oversample=2, weight=0.25)
    assert sketch.shrinks == 0
    directions, eigvals = sketch.directions()
    expected = torch.linalg.svdvals(grads * 0.5) ** 2
    assert eigvals == pytest.approx(expected[:2].tolist(), rel=1e-9)
    top = torch.linalg.svd(grads, full_matrices=False).Vh[:2]
    assert float(principal_angle_sines(stack(directions), top).max()) < 1e-6
    norms = stack(directions).norm(dim=1) ** 2
    assert norms.tolist() == pytest.approx(expected[:2].tolist(), rel=1e-9)


@pytest.mark.parametrize("oversample", [1, 2, 4])
def test_frequent_directions_error_bound(oversample: int) -> None:
    """0 ⪯ AᵀA − BᵀB, ‖AᵀA − BᵀB‖₂ ≤ ‖A − A_k‖_F² / ℓ (FD, Ghashami et al. Thm 1.1) and
    ≤ Σδ = (‖A‖_F² − ‖B‖_F²) / (k + ℓ), and the
    sketch holds fewer than k + ℓ rows between insertions."""
    k = 2
    grads, _ = planted(40, 4, 0.5, seed=1)
    sketch = GradientSketch(rank=k, oversample=oversample)
    for row in grads:
        sketch.add(as_list(row.clone()))
        assert len(sketch.rows) < k + oversample
    row_bytes = P * 8
    assert sketch.peak_bytes == (k + oversample + 1) * row_bytes  # k + ℓ rows and the sum, at a shrink
    assert sketch.shrinks > 0
    b = torch.stack([flatten(r).double() for r in sketch.rows])
    err = grads.T @ grads - b.T @ b
    eig = torch.linalg.eigvalsh(err)
    assert float(eig.min()) > -1e-8 * float(eig.abs().max())
    tail = (torch.linalg.svdvals(grads)[k:] ** 2).sum()
    assert float(eig.max()) <= float(tail) / oversample * (1 + 1e-9)
    # each shrink subtracts δ from all m = k + ℓ eigenvalues, so the Frobenius mass lost is m·Σδ and
    # the spectral error is at most Σδ (a truncation that drops the last row instead breaks this)
    lost = float((grads**2).sum() - (b**2).sum())
    assert lost == pytest.approx((k + oversample) * sketch.delta_total, rel=1e-9)
    assert float(eig.max()) <= sketch.delta_total * (1 + 1e-9)


def test_planted_subspace_recovered_where_batches_are_not() -> None:
    """Per-example gradients span a planted 3-dim subspace plus isotropic noise: the sketch of 64
    micro-batches of 2 rows recovers it (largest principal-angle sine < 0.2; the exact SVD of the
    same micro-batches gets 0.12), while the batch estimator (3 disjoint batches of 8, today's
    rank-3 directions) does not (> 0.5; measured 0.94)."""
    k = 3
    grads, basis = planted(128, k, noise=0.2, seed=2)
    micro = grads.reshape(64, 2, P).mean(dim=1)
    sketch = sketch_of(micro, k=k, oversample=2, weight=1 / 64)
    directions, _ = sketch.directions()
    sketch_sine = float(principal_angle_sines(stack(directions), basis).max())
    batches = grads[:24].reshape(3, 8, P).mean(dim=1)
    batch_sine = float(principal_angle_sines(batches, basis).max())
    assert sketch_sine < 0.2, sketch_sine
    assert batch_sine > 0.5, batch_sine


def test_directions_improve_the_metric_on_average() -> None:
    """Each direction is oriented so that ⟨d_j, mean gradient⟩ ≥ 0 (frontier mode's one-sided
    constraint needs the sign); padded with zeros when the data span fewer than k dimensions."""
    grads, _ = planted(30, 2, 0.05, seed=3)
    grads = -grads  # a sign flip of the data must flip the directions, not leave them
    mean = grads.mean(dim=0)
    directions, _ = sketch_of(grads, k=2, oversample=1).directions()
    for d in directions:
        assert float(flatten(d).double() @ mean) >= 0
    one = torch.randn(1, P, dtype=torch.float64)
    directions, eigvals = sketch_of(one.repeat(3, 1), k=2, oversample=3).directions()
    assert float(stack(directions)[1].abs().max()) == 0.0 and eigvals[1] == 0.0
    assert float(principal_angle_sines(stack(directions[:1]), one).max()) < 1e-6


def test_ema_seed_mixes_previous_second_moment() -> None:
    """Seeding with previous directions at weight ema estimates ema·S_old + (1−ema)·S_new."""
    old_dir, new_dir = torch.zeros(P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
    old_dir[0], new_dir[1] = 2.0, 1.0
    sketch = GradientSketch(rank=2, oversample=2)
    sketch.seed([as_list(old_dir.clone())], weight=0.75)
    sketch.add(as_list(new_dir.clone()), weight=0.25)
    directions, eigvals = sketch.directions()
    assert sorted(eigvals) == pytest.approx(sorted([0.75 * 4.0, 0.25 * 1.0]))
    assert float(principal_angle_sines(stack(directions), torch.stack([old_dir, new_dir])).max()) < 1e-6


def test_bad_settings_rejected() -> None:
    with pytest.raises(ValueError, match="rank"):
        GradientSketch(rank=0)
    with pytest.raises(ValueError, match="oversample"):
        GradientSketch(rank=1, oversample=0)
    with pytest.raises(ValueError, match="weight"):
        GradientSketch(rank=1).add(as_list(torch.ones(P)), weight=0.0)


def _tiny_setup(tmp_path):
    path = tiny.build_model_dir(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = tiny.build_tokenizer()
    rows = tiny.capability_rows(12)
    data = {task: Dataset.from_list(r) for task, r in rows.items()}
    return model, tok, data


def test_sketch_directions_are_the_tasks_own_gradients(tmp_path) -> None:
    """On the tiny Llama, with 3 micro-batches (no shrink) the directions span exactly the gradients
    of the rows the sampler drew for *that* task (a second sampler replays the same draws), and
    their eigenvalues are the weighted Gram's: a direction from another task's rows fails."""
    model, tok, data = _tiny_setup(tmp_path)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = build_capability_sampler(data, tok, max_length=32, batch_size=2, seed=5)
    replay = build_capability_sampler(data, tok, max_length=32, batch_size=2, seed=5)
    result = sketch_task_directions(model, params, sampler, "count", rank=2, num_batches=3, oversample=2)
    directions, values, eigvals = result.directions, result.values, result.eigenvalues
    trainable = sum(p.numel() * p.element_size() for p in params)
    assert result.peak_bytes == 4 * trainable  # 3 rows (no shrink yet) and the orienting sum
    assert len(values) == 3 and len(directions) == 2
    own = torch.stack(
        [flatten(capability_gradients(model, params, replay.next_batch("count"))[1]).double() for _ in range(3)]
    )
    other = torch.stack(
        [flatten(capability_gradients(model, params, replay.next_batch("copy"))[1]).double() for _ in range(3)]
    )
    top = torch.linalg.svd(own, full_matrices=False).Vh[:2]
    assert float(principal_angle_sines(stack(directions), top).max()) < 1e-4
    assert float(principal_angle_sines(stack(directions), torch.linalg.svd(other).Vh[:2]).max()) > 0.1
    expected = (torch.linalg.svdvals(own) ** 2 / 3)[:2]
    assert eigvals == pytest.approx(expected.tolist(), rel=1e-4)
    # the sampler advanced by exactly three batches of 'count' and none of 'copy'
    assert sampler.state_dict() == replay.state_dict() or sampler.state_dict()["tasks"]["copy"]["cursor"] == 0
    assert sampler.state_dict()["tasks"]["count"] == replay.state_dict()["tasks"]["count"]


def test_sketch_task_directions_seeds_with_previous_directions(tmp_path) -> None:
    """capability_ema across refreshes: the previous directions enter with weight ema and the window's
    gradient with (1 − ema) / n, exactly (no shrink): eigenvalues of [√ema·D_old; √((1−ema)/n)·g]."""
    model, tok, data = _tiny_setup(tmp_path)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = build_capability_sampler(data, tok, max_length=32, batch_size=2, seed=7)
    replay = build_capability_sampler(data, tok, max_length=32, batch_size=2, seed=7)
    old = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    old[:5] = 0.3
    previous = [[t.float() for t in as_params(old, params)]]
    result = sketch_task_directions(
        model, params, sampler, "copy", rank=2, num_batches=1, oversample=2, previous=previous, ema=0.5
    )
    g = flatten(capability_gradients(model, params, replay.next_batch("copy"))[1]).double()
    expected = torch.linalg.svdvals(torch.stack([0.5**0.5 * old, 0.5**0.5 * g])) ** 2
    assert result.eigenvalues == pytest.approx(expected.tolist(), rel=1e-4)


def as_params(flat_vector: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat_vector[start : start + p.numel()].reshape(p.shape).clone())
        start += p.numel()
    return out
