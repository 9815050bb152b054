"""Property tests for frontier_trainer.geometry.

Each formula is checked against something independent of it: a generic numerical
optimiser (scipy SLSQP), scipy's own subspace angles, explicit projections built with
numpy least squares, root finding on the frontier equation, or Monte Carlo.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontier_trainer import geometry as g

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rng_from(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def explicit_projection(C: np.ndarray, v: np.ndarray) -> np.ndarray:
    """P_C v by least squares: independent of the Gram-form pseudo-inverse."""
    w, *_ = np.linalg.lstsq(C, v, rcond=None)
    return C @ w


def slsqp_max(objective: np.ndarray, d: int, constraints: list[dict], radius: float, seed: int) -> float:
    """max ⟨objective, x⟩ s.t. ‖x‖ ≤ radius and the given constraints, best of several starts."""
    rng = rng_from(seed)
    cons = [{"type": "ineq", "fun": lambda x: radius**2 - x @ x, "jac": lambda x: -2 * x}, *constraints]
    best = -math.inf
    for _ in range(6):
        x0 = rng.normal(size=d) * radius / (2 * math.sqrt(d))
        res = scipy.optimize.minimize(
            lambda x: -(objective @ x),
            x0,
            jac=lambda x: -objective,
            constraints=cons,
            method="SLSQP",
            options={"ftol": 1e-12, "maxiter": 500},
        )
        ok = all(
            np.all(c["fun"](res.x) >= -1e-7)
            if c["type"] == "ineq"
            else np.all(np.abs(c["fun"](res.x)) <= 1e-7)
            for c in cons
        )
        if ok:
            best = max(best, float(objective @ res.x))
    return best


# --------------------------------------------------------------------------------------
# tax rates
# --------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 10_000), d=st.integers(3, 12), m=st.integers(1, 4))
def test_tax_rate_matches_explicit_projection(seed: int, d: int, m: int) -> None:
    rng = rng_from(seed)
    v = rng.normal(size=d)
    C = rng.normal(size=(d, min(m, d)))
    expected = np.sum(explicit_projection(C, v / np.linalg.norm(v)) ** 2)
    assert g.tax_rate(torch.tensor(v), torch.tensor(C)) == pytest.approx(expected, abs=1e-10)


def test_tax_rate_rank_deficient_and_duplicated_columns() -> None:
    rng = rng_from(1)
    v = rng.normal(size=6)
    c1, c2 = rng.normal(size=6), rng.normal(size=6)
    C_dependent = np.stack([c1, c2, 2 * c1 - 3 * c2, c1], axis=1)
    expected = np.sum(explicit_projection(np.stack([c1, c2], 1), v / np.linalg.norm(v)) ** 2)
    assert g.tax_rate(torch.tensor(v), torch.tensor(C_dependent)) == pytest.approx(expected, abs=1e-10)
    # a zero column does not change the subspace
    C_zero = np.stack([c1, np.zeros(6), c2], axis=1)
    assert g.tax_rate(torch.tensor(v), torch.tensor(C_zero)) == pytest.approx(expected, abs=1e-10)


@SETTINGS
@given(seed=st.integers(0, 10_000), overlap=st.floats(0.2, 0.95))
def test_remark_4_6_non_additivity(seed: int, overlap: float) -> None:
    """Joint tax < sum of per-task taxes for overlapping capabilities; = for orthonormal ones."""
    rng = rng_from(seed)
    d = 8
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v = Q[:, 0] + Q[:, 1] + 0.5 * Q[:, 2]
    c1 = Q[:, 0]
    c2 = overlap * Q[:, 0] + math.sqrt(1 - overlap**2) * Q[:, 1]  # overlaps c1
    per_task = g.task_tax_rates(torch.tensor(v), torch.tensor(np.stack([c1, c2], 1)))
    joint = g.tax_rate(torch.tensor(v), torch.tensor(np.stack([c1, c2], 1)))
    assert joint < float(per_task.sum()) - 1e-6
    orth = np.stack([Q[:, 0], Q[:, 1]], 1)
    assert g.tax_rate(torch.tensor(v), torch.tensor(orth)) == pytest.approx(
        float(g.task_tax_rates(torch.tensor(v), torch.tensor(orth)).sum()), abs=1e-12
    )


def test_task_tax_rates_are_squared_cosines_and_keep_dtype() -> None:
    v = torch.tensor([1.0, 0.0, 0.0])
    C = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    taus = g.task_tax_rates(v, C)
    assert taus.dtype == torch.float32
    assert torch.allclose(taus, torch.tensor([1.0, 0.5, 0.0]))


# --------------------------------------------------------------------------------------
# principal angles
# --------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 10_000), d=st.integers(4, 10), p=st.integers(1, 3), q=st.integers(1, 3))
def test_principal_angles_match_scipy(seed: int, d: int, p: int, q: int) -> None:
    rng = rng_from(seed)
    A, B = rng.normal(size=(d, p)), rng.normal(size=(d, q))
    ours = g.principal_angles(torch.tensor(A), torch.tensor(B)).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(A, B))
    # scipy loses ~1e-8 at angle 0 (arccos near 1); ours uses the sine there
    np.testing.assert_allclose(ours, ref, atol=5e-8)
    assert np.all(np.diff(ours) >= 0)
    if p + q > d:  # the subspaces must intersect: the smallest angle is exactly 0
        assert ours[0] < 1e-12


def test_principal_angles_small_angle_precision() -> None:
    """arccos alone would give ~1e-8 error here; the sine branch keeps full precision."""
    theta = 1e-9
    A = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    B = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]], dtype=torch.float64)
    assert float(g.principal_angles(A, B)[0]) == pytest.approx(theta, rel=1e-6)


# --------------------------------------------------------------------------------------
# Thm 4.1 and Remark 4.2
# --------------------------------------------------------------------------------------


def planted_pair(alpha: float, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit v and c at angle alpha, randomly rotated into R^d."""
    Q, _ = np.linalg.qr(rng_from(seed).normal(size=(d, d)))
    v = Q[:, 0]
    c = math.cos(alpha) * Q[:, 0] + math.sin(alpha) * Q[:, 1]
    return v, c


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    alpha=st.floats(0.05, math.pi - 0.05),
    frac=st.floats(-0.95, 0.95),
    budget=st.floats(0.3, 3.0),
)
def test_thm_4_1_tight_against_numerical_optimiser(
    seed: int, alpha: float, frac: float, budget: float
) -> None:
    d = 5
    v, c = planted_pair(alpha, d, seed)
    delta_c = frac * budget
    closed = g.frontier_safety(delta_c, alpha, budget)
    numeric = slsqp_max(
        v, d, [{"type": "eq", "fun": lambda x: c @ x - delta_c, "jac": lambda x: c}], budget, seed
    )
    assert numeric <= closed + 1e-6  # nothing better than the closed form
    assert numeric == pytest.approx(closed, abs=1e-5)  # and the optimiser reaches it
    # attainment: the proof's δ* meets the constraints with equality and gives the value
    e1, e2 = v, (c - math.cos(alpha) * v) / math.sin(alpha)
    d1 = closed
    delta = d1 * e1 + (delta_c - d1 * math.cos(alpha)) / math.sin(alpha) * e2
    assert np.linalg.norm(delta) == pytest.approx(budget, rel=1e-9)
    assert c @ delta == pytest.approx(delta_c, abs=1e-9)
    assert v @ delta == pytest.approx(closed, abs=1e-9)


@SETTINGS
@given(delta=st.floats(-1.0, 1.0), budget=st.floats(0.1, 5.0))
def test_remark_4_2_limits(delta: float, budget: float) -> None:
    dc = delta * budget
    assert g.frontier_safety(dc, 0.0, budget) == pytest.approx(dc, abs=1e-12)
    assert g.frontier_safety(dc, math.pi / 2, budget) == pytest.approx(math.sqrt(budget**2 - dc**2), abs=1e-9)


def test_frontier_safety_vectorised_and_enforces_budget() -> None:
    dc = torch.linspace(-1.0, 1.0, 7, dtype=torch.float32)
    out = g.frontier_safety(dc, 1.0, 1.0)
    assert isinstance(out, torch.Tensor) and out.shape == (7,) and out.dtype == torch.float32
    for i, x in enumerate(dc.tolist()):
        assert float(out[i]) == pytest.approx(g.frontier_safety(x, 1.0, 1.0), abs=1e-6)
    with pytest.raises(ValueError, match="delta_c"):
        g.frontier_safety(1.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        g.frontier_safety(0.5, 4.0, 1.0)
    with pytest.raises(ValueError, match="budget"):
        g.frontier_safety(0.5, 1.0, -1.0)


# --------------------------------------------------------------------------------------
# Thm 4.3, Cor 4.4, Cor 4.7
# --------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 10_000), m=st.integers(1, 3), scale=st.floats(0.0, 0.9), budget=st.floats(0.5, 2.0)
)
def test_thm_4_3_attained_and_optimal(seed: int, m: int, scale: float, budget: float) -> None:
    rng = rng_from(seed)
    d = 6
    v = rng.normal(size=d)
    C = rng.normal(size=(d, m))
    raw = C @ rng.normal(size=m)
    delta_c = raw / np.linalg.norm(raw) * scale * budget
    gain, delta = g.max_safety_gain(torch.tensor(v), torch.tensor(C), torch.tensor(delta_c), budget)
    delta = delta.numpy()
    v_hat = v / np.linalg.norm(v)
    # the returned δ attains the gain and meets P_C δ = δ_C, ‖δ‖ ≤ B
    assert v_hat @ delta == pytest.approx(gain, abs=1e-9)
    np.testing.assert_allclose(explicit_projection(C, delta), delta_c, atol=1e-9)
    assert np.linalg.norm(delta) <= budget * (1 + 1e-9)
    # eq. 4 with the tax rate: gain = <v, δ_C> + sqrt(B² − ‖δ_C‖²) sqrt(1 − τ)
    tau = g.tax_rate(torch.tensor(v), torch.tensor(C))
    assert gain == pytest.approx(
        v_hat @ delta_c + math.sqrt(budget**2 - delta_c @ delta_c) * math.sqrt(1 - tau), abs=1e-9
    )
    # nothing better under the same constraints (independent optimiser, constraint CᵀX = Cᵀδ_C)
    target = C.T @ delta_c
    numeric = slsqp_max(
        v_hat, d, [{"type": "eq", "fun": lambda x: C.T @ x - target, "jac": lambda x: C.T}], budget, seed
    )
    assert numeric <= gain + 1e-6


@SETTINGS
@given(seed=st.integers(0, 10_000), budget=st.floats(0.1, 3.0))
def test_cor_4_4_free_safety_is_thm_4_3_at_zero(seed: int, budget: float) -> None:
    rng = rng_from(seed)
    v, C = rng.normal(size=7), rng.normal(size=(7, 2))
    tau = g.tax_rate(torch.tensor(v), torch.tensor(C))
    gain, _ = g.max_safety_gain(torch.tensor(v), torch.tensor(C), torch.zeros(7, dtype=torch.float64), budget)
    assert gain == pytest.approx(g.free_safety(tau, budget), abs=1e-9)


def test_cor_4_7_negative_tax() -> None:
    """A capability target aligned with safety pays back more than the free amount."""
    v = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    C = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    tau = g.tax_rate(v, C)
    gain, _ = g.max_safety_gain(v, C, torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64), 1.0)
    assert gain > g.free_safety(tau, 1.0)


def test_max_safety_gain_rejects_delta_c_outside_span() -> None:
    v = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    C = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="delta_c"):
        g.max_safety_gain(v, C, torch.tensor([0.0, 0.1, 0.0], dtype=torch.float64), 1.0)


# --------------------------------------------------------------------------------------
# §6: safety-safety
# --------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_eq_12_partial_correlation_is_cosine_of_projected_directions(seed: int) -> None:
    rng = rng_from(seed)
    v1, v2, c = (x / np.linalg.norm(x) for x in rng.normal(size=(3, 6)))
    rho, a, b = v1 @ v2, c @ v1, c @ v2
    p1, p2 = v1 - a * c, v2 - b * c
    expected = p1 @ p2 / (np.linalg.norm(p1) * np.linalg.norm(p2))
    assert g.partial_correlation(rho, a, b) == pytest.approx(expected, abs=1e-10)
    # Thm 6.1 is Prop 6.5 with one capability
    theta = g.effective_angle(torch.tensor(v1), torch.tensor(v2), torch.tensor(c))
    assert math.cos(theta) == pytest.approx(expected, abs=1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), m=st.integers(1, 3))
def test_prop_6_5_against_explicit_projection(seed: int, m: int) -> None:
    rng = rng_from(seed)
    v1, v2 = rng.normal(size=8), rng.normal(size=8)
    C = rng.normal(size=(8, m))
    p1 = v1 / np.linalg.norm(v1) - explicit_projection(C, v1 / np.linalg.norm(v1))
    p2 = v2 / np.linalg.norm(v2) - explicit_projection(C, v2 / np.linalg.norm(v2))
    expected = math.acos(np.clip(p1 @ p2 / (np.linalg.norm(p1) * np.linalg.norm(p2)), -1, 1))
    assert g.effective_angle(torch.tensor(v1), torch.tensor(v2), torch.tensor(C)) == pytest.approx(
        expected, abs=1e-8
    )


@SETTINGS
@given(theta=st.floats(0.01, math.pi - 0.01))
def test_cor_6_3_from_eq_13(theta: float) -> None:
    """Solve s = s cos θ + sin θ √(1 − s²) (eq. 13 with s₁ = s₂) by root finding."""
    root = scipy.optimize.brentq(
        lambda s: s * math.cos(theta) + math.sin(theta) * math.sqrt(1 - s * s) - s, 0, 1
    )
    assert g.max_equal_improvement(theta) == pytest.approx(root, abs=1e-10)


def unit_triple(rho: float, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three unit vectors with the prescribed inner products (Cholesky of their Gram matrix)."""
    G = np.array([[1, rho, a], [rho, 1, b], [a, b, 1]])
    L = np.linalg.cholesky(G)
    v1, v2, c = (torch.tensor(row) for row in L)
    return v1, v2, c


def test_thm_6_4_cases_and_paper_example() -> None:
    # case (iii), the paper's numeric example: 0.995 > 0.99
    assert g.partial_correlation(0.99, 0.1, 0.001) == pytest.approx(0.995, abs=5e-4)
    eff = g.conflict_effect(*unit_triple(0.99, 0.1, 0.001))
    assert eff.case == "asymmetric_same_sign" and eff.helps
    assert eff.preserved == pytest.approx(g.partial_correlation(0.99, 0.1, 0.001), abs=1e-9)
    # case (i): opposite signs strictly help
    eff = g.conflict_effect(*unit_triple(0.2, 0.4, -0.3))
    assert eff.case == "opposite_sign" and eff.helps and eff.preserved > eff.rho
    # case (ii): symmetric same-sign projections weakly hurt
    eff = g.conflict_effect(*unit_triple(0.3, 0.5, 0.5))
    assert eff.case == "symmetric" and not eff.helps
    assert eff.preserved == pytest.approx((0.3 - 0.25) / 0.75, abs=1e-9)


@SETTINGS
@given(rho=st.floats(-0.9, 0.9), a=st.floats(-0.9, 0.9), b=st.floats(-0.9, 0.9))
def test_thm_6_4_case_1_and_2_hold_generally(rho: float, a: float, b: float) -> None:
    """Case (i) as proved needs ρ − ab ≥ 0.

    The paper's proof divides ρ − ab by √((1−a²)(1−b²)) < 1 and concludes the value grows,
    which holds only for a non-negative numerator: ρ = −0.5, a = −0.125, b = 0.5 gives
    −0.509 < ρ. We test the corrected statement and check that counterexample explicitly.
    """
    det = 1 - rho**2 - a**2 - b**2 + 2 * rho * a * b
    if det < -1e-9:
        with pytest.raises(ValueError, match="unit vectors"):
            g.partial_correlation(rho, a, b)
        return
    if det < 1e-9:
        return  # coplanar boundary: valid but numerically delicate, covered elsewhere
    value = g.partial_correlation(rho, a, b)
    if a * b < -1e-9 and rho - a * b >= 0:
        assert value > rho
    if 1 - rho**2 - 2 * a**2 + 2 * rho * a * a > 1e-9:
        assert g.partial_correlation(rho, a, a) <= rho + 1e-12


def test_thm_6_4_case_1_counterexample_with_negative_numerator() -> None:
    eff = g.conflict_effect(*unit_triple(-0.5, -0.125, 0.5))
    assert eff.case == "opposite_sign"
    assert eff.preserved < eff.rho and not eff.helps


# --------------------------------------------------------------------------------------
# §5: scaling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,m_prime", [(32, 3), (128, 6)])
def test_prop_5_5_packing_term_in_expectation(d: int, m_prime: int) -> None:
    """E[τ] = m′/d for m′ independent uniform capability directions (Prop 5.5).

    4000 draws: τ·d/m′ has standard deviation ≤ ~sqrt(2/m′); the Monte Carlo standard error
    of its mean is then ≤ 0.013, so a 5% relative tolerance is > 3.5 standard errors.
    """
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    taus = [g.tax_rate(v, torch.randn(d, m_prime, generator=gen, dtype=torch.float64)) for _ in range(4000)]
    assert float(np.mean(taus)) == pytest.approx(m_prime / d, rel=0.05)


def test_fit_scaling_law_recovers_planted_law() -> None:
    dims = [32, 64, 128, 256, 512]
    rng = rng_from(0)
    taus = [0.2 + 3.0 / d + rng.normal(scale=1e-4) for d in dims]
    fit = g.fit_scaling_law(dims, taus)
    assert fit.tau0 == pytest.approx(0.2, abs=5e-4) and fit.k == pytest.approx(3.0, abs=0.1)
    assert 0 < fit.tau0_stderr < 1e-3 and fit.n == 5
    # compare with numpy's polyfit on 1/d
    k, tau0 = np.polyfit(1.0 / np.array(dims), taus, 1)
    assert fit.tau0 == pytest.approx(tau0, abs=1e-10) and fit.k == pytest.approx(k, abs=1e-8)


def test_regime_thresholds() -> None:
    assert g.regime(0.0) == "free" and g.regime(0.5) == "tradeoff" and g.regime(0.99) == "entangled"
    assert g.regime(g.FREE_MAX_TAU) == "tradeoff"
    with pytest.raises(ValueError, match="tau"):
        g.regime(1.5)


def test_whiten_matches_definition_and_identity_fisher_is_noop() -> None:
    rng = rng_from(3)
    v, C = torch.tensor(rng.normal(size=5)), torch.tensor(rng.normal(size=(5, 2)))
    vt, Ct = g.whiten(v, C, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(vt, v / v.norm()) and torch.allclose(Ct, C / C.norm(dim=0))
    f = torch.tensor(rng.uniform(0.1, 10, size=5))
    vt, Ct = g.whiten(v, C, f)
    # the whitened problem's max at zero capability cost equals the anisotropic problem's,
    # solved independently in original coordinates: max <v̂t, δ̃> s.t. δ̃ ⊥ C̃, ‖δ̃‖ ≤ 1
    # <=> max <F^{-1/2}v, δ̃>/‖F^{-1/2}v‖ with (F^{-1/2}C)ᵀδ̃ = 0.
    Fm = np.diag(f.numpy() ** -0.5)
    obj = Fm @ v.numpy() / np.linalg.norm(Fm @ v.numpy())
    A = Fm @ C.numpy()
    numeric = slsqp_max(obj, 5, [{"type": "eq", "fun": lambda x: A.T @ x, "jac": lambda x: A.T}], 1.0, 0)
    assert numeric == pytest.approx(g.free_safety(g.tax_rate(vt, Ct), 1.0), abs=1e-5)
    with pytest.raises(ValueError, match="fisher_diag"):
        g.whiten(v, C, torch.zeros(5, dtype=torch.float64))


# --------------------------------------------------------------------------------------
# the per-step solvers
# --------------------------------------------------------------------------------------


def frontier_problem(kind: str, seed: int, d: int = 7, m: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """u and capability columns C for the named family of problems."""
    rng = rng_from(seed)
    u = rng.normal(size=d)
    C = rng.normal(size=(d, m))
    if kind == "conflicting":  # capabilities that the raw step lowers
        C = C - np.outer(u, np.abs(C.T @ u) + 1.0) / (u @ u)
    elif kind == "aligned":  # capabilities the raw step raises
        C = C + np.outer(u, np.abs(C.T @ u) + 1.0) / (u @ u)
    elif kind == "dependent":
        C[:, 2] = 0.7 * C[:, 0] - 1.3 * C[:, 1]
    elif kind == "parallel":
        C[:, 1] = 2.5 * C[:, 0]
    elif kind == "zero":
        C[:, 1] = 0.0
    return u, C


def reference_frontier(u: np.ndarray, C: np.ndarray, eps: np.ndarray, seed: int) -> float:
    R = np.linalg.norm(u)
    cons = []
    for i in range(C.shape[1]):
        n = np.linalg.norm(C[:, i])
        if math.isfinite(eps[i]) and n > 0:
            ci = C[:, i] / n
            cons.append(
                {"type": "ineq", "fun": lambda x, ci=ci, e=eps[i]: ci @ x + e * R, "jac": lambda x, ci=ci: ci}
            )
    return slsqp_max(u, u.shape[0], cons, R, seed)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["random", "conflicting", "aligned", "dependent", "parallel", "zero"]),
    eps=st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.5, math.inf]), min_size=3, max_size=3),
)
def test_solve_frontier_step_against_generic_optimiser(seed: int, kind: str, eps: list[float]) -> None:
    u, C = frontier_problem(kind, seed)
    W = np.concatenate([u[:, None], C], axis=1)
    a = g.solve_frontier_step(torch.tensor(W.T @ W), eps).numpy()
    delta = W @ a
    R = np.linalg.norm(u)
    assert np.linalg.norm(delta) <= R * (1 + 1e-8)
    for i, e in enumerate(eps):
        n = np.linalg.norm(C[:, i])
        if math.isfinite(e) and n > 0:
            assert C[:, i] @ delta / n >= -e * R - 1e-8 * R
    reference = reference_frontier(u, C, np.array(eps), seed)
    assert u @ delta >= reference - 1e-6 * R * R  # at least as good as the generic optimiser
    assert u @ delta <= reference + 1e-5 * R * R  # and the optimiser agrees it is reachable


def test_solve_frontier_step_limits() -> None:
    u, C = frontier_problem("conflicting", 5)
    W = np.concatenate([u[:, None], C], axis=1)
    gram = torch.tensor(W.T @ W)
    # all ε = inf: u itself
    assert torch.equal(
        g.solve_frontier_step(gram, [math.inf] * 3), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    )
    # ε = 0 on capabilities the step lowers: Thm 4.3 with δ_C = 0 — the null-space direction at full budget
    a = g.solve_frontier_step(gram, [0.0, 0.0, 0.0]).numpy()
    null = W @ g.nullspace_coefficients(gram).numpy()
    delta = W @ a
    np.testing.assert_allclose(delta, null / np.linalg.norm(null) * np.linalg.norm(u), atol=1e-10)
    # zero step: zero coefficients
    zero_gram = gram.clone()
    zero_gram[0, :] = 0
    zero_gram[:, 0] = 0
    assert not torch.any(g.solve_frontier_step(zero_gram, [0.0] * 3))


def test_solve_frontier_step_monotone_in_tolerance() -> None:
    """As ε grows from 0 the safety objective rises and the capability loss grows, monotonically."""
    u, C = frontier_problem("conflicting", 11)
    W = np.concatenate([u[:, None], C], axis=1)
    gram = torch.tensor(W.T @ W)
    gains, losses = [], []
    for e in [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]:
        delta = W @ g.solve_frontier_step(gram, [e] * 3).numpy()
        gains.append(u @ delta)
        losses.append(-min(C[:, i] @ delta / np.linalg.norm(C[:, i]) for i in range(3)))
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(gains))
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(losses))
    assert gains[-1] > gains[0]


def large_frontier_problem(kind: str, seed: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """u and m capability columns for the polynomial solver's families.

    ``random``: independent directions; ``conflicting``: the raw step lowers every capability;
    ``dependent``: a third of the columns are combinations of others (rank-deficient C);
    ``bounded``: the normals positively span a 3-D subspace containing u, so the feasible set
    within span(u, C) is a small box and no step of full norm is feasible (‖δ*‖ < ‖u‖).
    """
    rng = rng_from(seed)
    d = m + 6
    u = rng.normal(size=d)
    if kind == "bounded":
        basis, _ = np.linalg.qr(np.concatenate([u[:, None], rng.normal(size=(d, 2))], axis=1))
        signs = np.concatenate([basis, -basis], axis=1)  # ±e_1, ±e_2, ±e_3
        picks = [signs[:, k % 6] + 0.05 * basis @ rng.normal(size=3) for k in range(m)]
        return u, np.stack(picks, axis=1) * rng.uniform(0.5, 2.0, size=m)
    C = rng.normal(size=(d, m))
    if kind == "conflicting":
        C = C - np.outer(u, np.abs(C.T @ u) + 0.5 * np.linalg.norm(C, axis=0) * np.linalg.norm(u)) / (u @ u)
    elif kind == "dependent":
        k = m // 3
        C[:, :k] = C[:, k : 2 * k] @ rng.normal(size=(k, k))
        C = C - np.outer(u, np.abs(C.T @ u)) / (u @ u)
    return u, C


@pytest.mark.parametrize("kind", ["random", "conflicting", "dependent", "bounded"])
@pytest.mark.parametrize("m", [6, 12, 24])
@pytest.mark.parametrize("eps_value", [0.0, 0.1])
def test_polynomial_solver_agrees_with_slsqp(kind: str, m: int, eps_value: float) -> None:
    """Issue 12 §3: the QP solver meets every constraint and reaches SLSQP's optimum on random,
    rank-deficient, conflicting and bounded (no full-norm step) problems, at sizes the old
    active-set enumeration could not reach (2^24 sets at m = 24)."""
    for seed in range(2):
        u, C = large_frontier_problem(kind, 100 * m + seed, m)
        eps = np.full(m, eps_value)
        if kind == "random":
            eps[::4] = math.inf  # some tasks unconstrained
        W = np.concatenate([u[:, None], C], axis=1)
        sol = g.solve_frontier_qp(torch.tensor(W.T @ W), eps.tolist())
        assert sol.converged
        delta = W @ sol.coefficients.numpy()
        R = np.linalg.norm(u)
        assert np.linalg.norm(delta) <= R * (1 + 1e-8)
        for i in range(m):
            n = np.linalg.norm(C[:, i])
            if math.isfinite(eps[i]):
                assert C[:, i] @ delta / n >= -eps[i] * R - 1e-8 * R
        reference = reference_frontier(u, C, eps, seed)
        assert u @ delta >= reference - 1e-6 * R * R
        assert u @ delta <= reference + 1e-5 * R * R
        if kind == "bounded" and eps_value == 0.1:
            assert np.linalg.norm(delta) < 0.5 * R  # the ball is not what binds


def test_bounded_problem_optimum_is_inside_the_ball() -> None:
    """With ε = 0 and the constraints' normals positively spanning a subspace that holds u,
    no step keeps every capability: the frontier step is zero."""
    u, C = large_frontier_problem("bounded", 3, 6)
    W = np.concatenate([u[:, None], C], axis=1)
    sol = g.solve_frontier_qp(torch.tensor(W.T @ W), [0.0] * 6)
    assert sol.converged
    np.testing.assert_allclose(W @ sol.coefficients.numpy(), 0.0, atol=1e-10 * np.linalg.norm(u))


@pytest.mark.parametrize("kind", ["random", "conflicting", "dependent"])
def test_warm_start_gives_the_cold_solution(kind: str) -> None:
    """Warm starting from the previous active set (or from a wrong one) changes the cost, not
    the answer: the same step as a cold solve on a sequence of drifting problems."""
    rng = rng_from(5)
    u, C = large_frontier_problem(kind, 5, 16)
    active: tuple[int, ...] | list[int] = list(range(16))  # a wrong warm start to begin with
    for _ in range(6):
        u = u + 0.1 * np.linalg.norm(u) * rng.normal(size=u.shape) / math.sqrt(u.size)
        W = np.concatenate([u[:, None], C], axis=1)
        gram = torch.tensor(W.T @ W)
        cold = g.solve_frontier_qp(gram, [0.05] * 16)
        warm = g.solve_frontier_qp(gram, [0.05] * 16, warm_start=active)
        assert cold.converged and warm.converged
        np.testing.assert_allclose(W @ warm.coefficients.numpy(), W @ cold.coefficients.numpy(), atol=1e-9 * np.linalg.norm(u))
        assert warm.active == cold.active
        active = warm.active


def test_solver_falls_back_to_the_nullspace_step_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the solver cannot settle (here: a budget of one linear solve), it does not raise: it
    returns the null-space step at full budget, which meets every constraint, says so in
    ``converged``, and logs one warning however often it happens."""
    monkeypatch.setattr(g, "_fallback_warned", False)
    u, C = large_frontier_problem("conflicting", 9, 12)
    W = np.concatenate([u[:, None], C], axis=1)
    gram = torch.tensor(W.T @ W)
    with caplog.at_level("WARNING", logger="frontier_trainer.geometry"):
        for _ in range(3):
            sol = g.solve_frontier_qp(gram, [0.05] * 12, max_solves=1)
            assert not sol.converged
    warnings = [r for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(warnings) == 1
    delta = W @ sol.coefficients.numpy()
    null = W @ g.nullspace_coefficients(gram).numpy()
    np.testing.assert_allclose(delta, null * np.linalg.norm(u) / np.linalg.norm(null), atol=1e-9)
    np.testing.assert_allclose(C.T @ delta, 0.0, atol=1e-8 * np.linalg.norm(u) * np.linalg.norm(C))
    # the default budget solves the same problem
    assert g.solve_frontier_qp(gram, [0.05] * 12).converged


@SETTINGS
@given(seed=st.integers(0, 10_000), noise=st.sampled_from([1e-12, 1e-8, 1e-4, 1e-2]))
def test_solver_never_raises_on_a_numerically_inconsistent_gram(seed: int, noise: float) -> None:
    """A Gram matrix perturbed off positive semidefiniteness (rounding, a stale entry) still
    gives finite coefficients without an exception, and a step no longer than u."""
    u, C = large_frontier_problem("conflicting", seed, 10)
    W = np.concatenate([u[:, None], C], axis=1)
    G = W.T @ W
    E = rng_from(seed).normal(size=G.shape) * noise * np.sqrt(np.outer(np.diag(G), np.diag(G)))
    G = G + (E + E.T) / 2
    G[np.diag_indices_from(G)] = np.abs(np.diag(G))
    a = g.solve_frontier_step(torch.tensor(G), [0.0, 0.05] * 5)
    assert torch.isfinite(a).all()
    assert float(a @ torch.tensor(G) @ a) <= float(G[0, 0]) * (1 + 1e-6) + 1e-12


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["random", "dependent", "parallel", "zero"]))
def test_nullspace_coefficients_are_exact(seed: int, kind: str) -> None:
    u, C = frontier_problem(kind, seed)
    W = np.concatenate([u[:, None], C], axis=1)
    a = g.nullspace_coefficients(torch.tensor(W.T @ W)).numpy()
    delta = W @ a
    assert a[0] == 1.0
    np.testing.assert_allclose(C.T @ delta, 0.0, atol=1e-9 * np.linalg.norm(u) * np.linalg.norm(C))
    np.testing.assert_allclose(delta, u - explicit_projection(C, u), atol=1e-9)


# --------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: g.tax_rate(torch.zeros(3), torch.eye(3)), "v is the zero vector"),
        (lambda: g.tax_rate(torch.ones(3), torch.eye(4)), "C has 4 rows"),
        (lambda: g.tax_rate(torch.tensor([1.0, float("nan"), 0.0]), torch.eye(3)), "v contains NaN"),
        (lambda: g.tax_rate(torch.ones(3, 1), torch.eye(3)), "v must be a non-empty 1-D"),
        (lambda: g.task_tax_rates(torch.ones(3), torch.zeros(3, 2)), "zero columns"),
        (lambda: g.free_safety(1.5, 1.0), "tau"),
        (lambda: g.max_equal_improvement(-0.1), "theta"),
        (lambda: g.partial_correlation(0.5, 1.0, 0.2), r"\|a\| = 1"),
        (lambda: g.solve_frontier_step(torch.eye(3), [0.0]), "tolerances must have one entry"),
        (lambda: g.solve_frontier_step(torch.eye(3), [0.0, -1.0]), "tolerances must be >= 0"),
        (lambda: g.solve_frontier_step(torch.ones(2, 3), [0.0]), "gram must be a square"),
        (lambda: g.fit_scaling_law([32, 32], [0.1, 0.2]), "two distinct"),
        (lambda: g.principal_angles(torch.zeros(3, 1), torch.eye(3)), "A spans the zero subspace"),
        (
            lambda: g.effective_angle(
                torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([1.0, 0, 0])
            ),
            "v1 lies in span",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@SETTINGS
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4))
def test_tax_rate_from_gram_matches_tax_rate(seed: int, m: int) -> None:
    rng = rng_from(seed)
    v, C = rng.normal(size=9), rng.normal(size=(9, m))
    W = np.concatenate([v[:, None], C], axis=1)
    assert g.tax_rate_from_gram(torch.tensor(W.T @ W)) == pytest.approx(
        g.tax_rate(torch.tensor(v), torch.tensor(C)), abs=1e-10
    )


def test_rank_rule_ignores_vector_lengths() -> None:
    """A capability gradient 1e-7 times shorter than the others keeps its direction."""
    rng = rng_from(7)
    u, C = rng.normal(size=9), rng.normal(size=(9, 3))
    C[:, 1] *= 1e-7
    expected = u - explicit_projection(C / np.linalg.norm(C, axis=0), u)
    W = np.concatenate([u[:, None], C], axis=1)
    gram = torch.tensor(W.T @ W)
    np.testing.assert_allclose(W @ g.nullspace_coefficients(gram).numpy(), expected, atol=1e-8)
    v_hat = u / np.linalg.norm(u)
    tau = np.sum(explicit_projection(C / np.linalg.norm(C, axis=0), v_hat) ** 2)
    assert g.tax_rate(torch.tensor(u), torch.tensor(C)) == pytest.approx(tau, abs=1e-10)
    assert g.tax_rate_from_gram(gram) == pytest.approx(tau, abs=1e-10)
    # the frontier solver honours the short direction's constraint too
    delta = W @ g.solve_frontier_step(gram, [0.0, 0.0, 0.0]).numpy()
    for i in range(3):
        assert C[:, i] @ delta / np.linalg.norm(C[:, i]) >= -1e-8 * np.linalg.norm(u)
