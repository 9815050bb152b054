"""benchmarks/activation_refresh.py's helpers: the eigh-only switch really forces eigh and is undone."""

from __future__ import annotations

import torch

from benchmarks.activation_refresh import full_eigh_only, subspace_distance
from frontier_trainer import activation


def test_full_eigh_only_forces_eigh_and_restores_the_threshold(monkeypatch) -> None:
    calls: list[int] = []
    real = activation.top_eigenpairs_by_iteration
    monkeypatch.setattr(activation, "top_eigenpairs_by_iteration", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = activation.ITERATION_MIN_WIDTH
    g = torch.Generator().manual_seed(0)
    X = torch.randn(d, 3 * d // 2, dtype=torch.float64, generator=g)
    C = X @ X.T
    saved = activation.ITERATION_MIN_WIDTH
    with full_eigh_only():
        inside = activation.top_subspace(C, 0.99, 8)
    assert calls == []
    assert saved == activation.ITERATION_MIN_WIDTH
    assert torch.equal(inside, activation.top_subspace(C, 0.99, 8, method="eigh"))
    activation.top_subspace(C, 0.99, 8)
    assert calls == [1]


def test_subspace_distance_is_zero_inside_and_one_orthogonal() -> None:
    E = torch.eye(6, dtype=torch.float64)[:, :3]
    assert subspace_distance(E[:, :2], E) == 0.0
    assert abs(subspace_distance(torch.eye(6, dtype=torch.float64)[:, 3:4], E) - 1.0) < 1e-12
