"""Planning: choose per-group merge ratios α from first-order geometry (paper §7.3, Prediction 3).

Merging ``θ(α) = θ_base + Σ_ℓ α_ℓ Δ_ℓ`` (``Δ_ℓ = θ_aligned − θ_base`` restricted to layer group ℓ)
moves the model, to first order, by ``Δ_S(α) = Σ_ℓ α_ℓ s_ℓ`` in safety and ``Δ_{C_i}(α) = Σ_ℓ α_ℓ c_iℓ``
in capability ``i`` (Definition 3.3's inner products ⟨v*, δ⟩ and ⟨c_i, δ⟩ with δ = Σ α_ℓ Δ_ℓ). The
perturbation budget of Definition 3.3, ``‖δ‖² ≤ B``, restricted to per-group scalings of the update, is
``Σ_ℓ w_ℓ α_ℓ² ≤ B`` with ``w_ℓ = ‖Δ_ℓ‖²`` (Euclidean) or ``w_ℓ = Δ_ℓᵀ F Δ_ℓ`` (the Fisher ellipsoid
of §4.4, diagonal F). Heterogeneous model averaging (HMA) is then the small convex program

    maximise    Σ_ℓ α_ℓ s_ℓ                                  (predicted safety gain)
    subject to  Σ_ℓ α_ℓ c_iℓ ≥ −ε_i      for every task i    (capability tolerances; ε_i may be ∞)
                Σ_ℓ w_ℓ α_ℓ² ≤ B                             (budget)
                0 ≤ α_ℓ ≤ 1.

Uniform averaging (α_ℓ = t) is one feasible point of it at B = t² Σ w_ℓ: the straight line of §7.3;
the optimum is the predicted HMA frontier point at that budget.

Method (exact, no black-box search, no scipy): with ν = 1/(2μ) for the budget multiplier μ, the
problem for fixed ν is the strictly convex separable QP ``min ½ Σ w α² − ν s·α`` over the box and the
task constraints. Its dual over the task multipliers u ≥ 0 is a convex piecewise-quadratic function
of dimension m (number of finite tolerances), minimised by projected semi-smooth Newton, with
``α(u) = clip((ν s + Aᵀu)/w, 0, 1)``. The budget used, ``b(ν) = Σ w α(ν)²``, is non-decreasing in
ν, so the multiplier is found by a monotone 1-D search (doubling, then bisection). Finally the
active sets (free / at-one coordinates, binding tasks) are read off and the KKT system is solved in
closed form: ``α_F = (ν p + q)`` is affine in ν and the budget equation is a quadratic in ν, so
the returned point satisfies the KKT conditions to rounding error. :class:`Allocation` reports the
residual.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_TOL = 1e-12


class InfeasibleAllocationError(ValueError):
    """The capability tolerances cannot be met by any α in [0, 1]^L (only possible with outer terms)."""


@dataclass(frozen=True)
class QPSolution:
    """Solution of :func:`solve_allocation_qp`.

    Attributes:
        alpha: optimal α, shape (L,).
        objective: ``s · α``.
        budget_used: ``Σ w α²``.
        budget_active: whether the budget constraint binds.
        task_multipliers: Lagrange multipliers of the task constraints (0 for infinite tolerances),
            in units of the objective (λ_i = u_i / ν).
        budget_multiplier: μ ≥ 0 of the budget constraint (0 if it does not bind).
        kkt_residual: max violation of primal feasibility, dual feasibility and complementarity.
    """

    alpha: np.ndarray
    objective: float
    budget_used: float
    budget_active: bool
    task_multipliers: np.ndarray
    budget_multiplier: float
    kkt_residual: float


def _exact_step(z: np.ndarray, y: np.ndarray, w: np.ndarray, const: float, t_max: float) -> float:
    """Exact minimiser over ``t ∈ [0, t_max]`` of a convex piecewise quadratic along a dual ray.

    Along ``u + t d`` the dual's derivative is ``φ'(t) = Σ_ℓ y_ℓ clip((z_ℓ + t y_ℓ)/w_ℓ, 0, 1) − const``
    (``y = Aᵀd``, ``const = d·rhs``): non-decreasing and piecewise linear with breakpoints where a
    coordinate reaches 0 or 1. Its root is found exactly by evaluating φ' at the breakpoints and
    interpolating linearly on the bracketing piece.
    """

    def dphi(t: np.ndarray) -> np.ndarray:
        a = np.clip((z[None, :] + t[:, None] * y[None, :]) / w[None, :], 0.0, 1.0)
        return a @ y - const

    with np.errstate(divide="ignore", invalid="ignore"):
        bps = np.concatenate([-z / y, (w - z) / y])
    bps = bps[np.isfinite(bps) & (bps > 0) & (bps < t_max)]
    ts = np.unique(np.concatenate([[0.0], bps, [t_max] if math.isfinite(t_max) else []]))
    vals = dphi(ts)
    if vals[0] >= 0:
        return 0.0
    above = np.flatnonzero(vals >= 0)
    if above.size == 0:
        if math.isfinite(t_max):
            return float(t_max)
        # beyond the last breakpoint φ' is constant (all clipped) or linear: extrapolate on the last piece
        t0 = ts[-1]
        slope = float(np.sum(y * y / w * ((z + (t0 + 1.0) * y > 0) & (z + (t0 + 1.0) * y < w))))
        if slope <= 0:  # φ' constant beyond the last breakpoint: 0 up to rounding, or the dual diverges
            return float(t0) if vals[-1] >= -1e-12 * (np.abs(y).sum() + abs(const) + 1e-300) else math.inf
        return float(t0 - vals[-1] / slope)
    k = int(above[0])
    t0, t1, v0, v1 = ts[k - 1], ts[k], vals[k - 1], vals[k]
    return float(t0 + (t1 - t0) * (-v0) / (v1 - v0)) if v1 > v0 else float(t1)


def _inner_solve(
    nu: float, s: np.ndarray, A: np.ndarray, rhs: np.ndarray, w: np.ndarray, u0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``min ½ Σ w α² − ν s·α`` s.t. ``A α ≥ rhs``, ``0 ≤ α ≤ 1`` through its dual (u ≥ 0).

    The dual ``g(u) = Σ_ℓ φ_ℓ(ν s_ℓ + (Aᵀu)_ℓ) − u·rhs``, ``φ_ℓ(z) = max_{a∈[0,1]} z a − ½ w_ℓ a²``,
    is convex, C¹ and piecewise quadratic. Projected semi-smooth Newton directions (steepest descent
    where the generalised Hessian is singular) with an *exact* line search (:func:`_exact_step`) that
    stops at the first dual bound it meets: every step lands on the minimiser of its ray.

    Returns:
        ``(alpha, u)``.

    Raises:
        InfeasibleAllocationError: the dual diverges (the task constraints are infeasible on the box).
    """
    m = A.shape[0]

    def primal(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = nu * s + A.T @ u
        return np.clip(z / w, 0.0, 1.0), z

    u = np.zeros(m) if u0 is None else np.maximum(u0.copy(), 0.0)
    if m == 0:
        return primal(u)[0], u
    scale = max(float(np.abs(A).max()), float(np.abs(rhs).max()), 1e-300)
    # α(u) carries a rounding error of order eps·ν·|s|/w: the stopping test cannot ask for less.
    tol = 1e-13 * scale * max(1.0, nu * float(np.abs(s).max(initial=0.0)) / float(w.min()))
    for it in range(2000):
        a, z = primal(u)
        grad = A @ a - rhs
        active = (u > 0) | (grad < 0)
        pg = np.where(active, grad, 0.0)
        if np.max(np.abs(pg)) <= tol:
            return a, u
        free = (z > 0) & (z < w)
        idx = np.flatnonzero(active)
        d = np.zeros(m)
        use_newton = it % 5 != 4  # every fifth step is steepest descent: guarantees progress
        if use_newton and free.any():
            Af = A[np.ix_(idx, np.flatnonzero(free))]
            H = (Af / w[free]) @ Af.T
            d[idx] = -np.linalg.lstsq(H, grad[idx], rcond=1e-12)[0]
        if not np.any(d) or float(pg @ d) >= 0:
            d = -pg
        neg = d < 0
        t_max = float(np.min(u[neg] / -d[neg])) if neg.any() else math.inf
        t = _exact_step(z, A.T @ d, w, float(d @ rhs), t_max)
        if not math.isfinite(t):
            raise InfeasibleAllocationError(
                "the capability tolerances cannot all be met by any α in [0, 1]: loosen them (or use "
                "outer='group' so that embeddings, norms and head are allocated too)."
            )
        u_new = np.maximum(u + t * d, 0.0)
        if neg.any() and t == t_max:
            u_new[neg & (u / np.where(neg, -d, 1.0) <= t_max * (1 + 1e-15))] = 0.0
        if np.array_equal(u_new, u):
            if use_newton:
                continue
            return a, u
        u = u_new
    logger.warning("allocation dual solver hit its iteration cap; the KKT polish decides the result.")
    return primal(u)[0], u


def _kkt_residual(
    alpha: np.ndarray,
    lam: np.ndarray,
    mu: float,
    s: np.ndarray,
    A: np.ndarray,
    rhs: np.ndarray,
    w: np.ndarray,
    budget: float,
) -> float:
    """Max violation of the KKT conditions of the HMA problem (scaled by the data)."""
    sc = max(float(np.abs(s).max(initial=0.0)), float(np.abs(A).max(initial=0.0)), 1e-300)
    res = [0.0]
    res.append(float(np.max(np.maximum(-alpha, 0.0), initial=0.0)))
    res.append(float(np.max(np.maximum(alpha - 1.0, 0.0), initial=0.0)))
    if A.shape[0]:
        slack = A @ alpha - rhs
        res.append(float(np.max(np.maximum(-slack, 0.0))) / sc)
        res.append(float(np.max(np.abs(lam * slack))) / sc)
        res.append(float(np.max(np.maximum(-lam, 0.0))))
    used = float(w @ (alpha * alpha))
    if math.isfinite(budget):
        res.append(max(used - budget, 0.0) / max(budget, 1e-300))
        res.append(abs(mu * (used - budget)) / (sc * max(1.0, budget)))
    # stationarity: g = s + Aᵀλ − 2μ w α must be ≤0 where α=0, ≥0 where α=1, =0 in between
    g = s + A.T @ lam - 2 * mu * w * alpha
    lo, hi = alpha <= 1e-12, alpha >= 1 - 1e-12
    mid = ~(lo | hi)
    res.append(float(np.max(np.abs(g[mid]), initial=0.0)) / sc)
    res.append(float(np.max(np.maximum(g[lo], 0.0), initial=0.0)) / sc)
    res.append(float(np.max(np.maximum(-g[hi], 0.0), initial=0.0)) / sc)
    return max(res)


def _polish(
    alpha: np.ndarray,
    u: np.ndarray,
    s: np.ndarray,
    A: np.ndarray,
    rhs: np.ndarray,
    w: np.ndarray,
    budget: float,
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Closed-form KKT solution on the active sets read off ``(alpha, u)``, budget binding.

    On free coordinates ``α_F = (ν s_F + A_TFᵀ u_T)/w_F``; binding tasks ``A_T α = rhs_T`` give
    ``u_T = M⁻¹(c − ν r)`` so ``α_F = ν p + q``; the budget ``Σ w α² = B`` is a quadratic in ν.
    Returns ``(alpha, lam, mu)`` or ``None`` if the active sets are inconsistent.
    """
    tol = 1e-9
    F = (alpha > tol) & (alpha < 1 - tol)
    U = alpha >= 1 - tol
    T = np.flatnonzero(u > 0)
    if not F.any():
        return None
    sF, wF = s[F], w[F]
    AT_F = A[np.ix_(T, np.flatnonzero(F))]
    const = rhs[T] - A[T][:, U].sum(axis=1) if T.size else np.zeros(0)
    if T.size:
        M = (AT_F / wF) @ AT_F.T
        if np.linalg.cond(M) > 1e12:
            return None
        Minv = np.linalg.inv(M)
        r = AT_F @ (sF / wF)
        p = (sF - AT_F.T @ (Minv @ r)) / wF
        q = (AT_F.T @ (Minv @ const)) / wF
    else:
        p, q, Minv, r = sF / wF, np.zeros(F.sum()), np.zeros((0, 0)), np.zeros(0)
    qa = float(wF @ (p * p))
    qb = 2.0 * float(wF @ (p * q))
    qc = float(wF @ (q * q)) + float(w[U].sum()) - budget
    if qa <= 0:
        return None
    disc = qb * qb - 4 * qa * qc
    if disc < 0:
        return None
    nu = (-qb + math.sqrt(disc)) / (2 * qa)
    if nu <= 0:
        return None
    new = np.where(U, 1.0, 0.0)
    new[F] = nu * p + q
    uT = Minv @ (const - nu * r) if T.size else np.zeros(0)
    lam = np.zeros(A.shape[0])
    lam[T] = uT / nu
    return new, lam, 1.0 / (2.0 * nu)


def solve_allocation_qp(
    s: Sequence[float] | np.ndarray,
    C: Sequence[Sequence[float]] | np.ndarray,
    w: Sequence[float] | np.ndarray,
    budget: float,
    tolerances: Sequence[float] | np.ndarray | None = None,
    offsets: Sequence[float] | np.ndarray | None = None,
) -> QPSolution:
    """Solve ``max s·α`` s.t. ``C α ≥ −ε − offsets``, ``Σ w α² ≤ budget``, ``0 ≤ α ≤ 1`` exactly.

    Args:
        s: safety gains per group, shape (L,).
        C: capability changes per task and group, shape (m, L).
        w: budget weights per group, shape (L,), non-negative (zero-weight groups get α = 0 unless
            their safety gain is positive, in which case α = 1: they cost no budget).
        budget: B ≥ 0.
        tolerances: ε_i ≥ 0 per task (``inf`` = unconstrained); default all ``inf``.
        offsets: fixed capability change per task already spent elsewhere (the outer tensors);
            default 0.

    Raises:
        ValueError: bad shapes, negative weights/budget/tolerances.
        InfeasibleAllocationError: the task constraints cannot be met on the box.
    """
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    L = s.shape[0]
    C = np.asarray(C, dtype=np.float64).reshape(-1, L) if L else np.zeros((0, 0))
    m = C.shape[0]
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape != (L,):
        raise ValueError(f"weights have shape {w.shape}, expected ({L},).")
    eps = np.full(m, np.inf) if tolerances is None else np.asarray(tolerances, dtype=np.float64).reshape(-1)
    off = np.zeros(m) if offsets is None else np.asarray(offsets, dtype=np.float64).reshape(-1)
    if eps.shape != (m,) or off.shape != (m,):
        raise ValueError(f"tolerances/offsets need one value per task ({m}).")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(C)) and np.all(np.isfinite(w))):
        raise ValueError("safety, capability and weight coefficients must be finite.")
    if np.any(w < 0) or not budget >= 0 or np.any(eps < 0) or np.any(np.isnan(eps)):
        raise ValueError("weights, budget and tolerances must be non-negative.")
    alpha = np.zeros(L)
    # Zero-weight groups cost no budget: α = 1 if it helps safety; they enter the task rows as offsets.
    zero = w <= 0
    alpha[zero & (s > 0)] = 1.0
    pos = ~zero
    finite = np.isfinite(eps)
    A = C[finite][:, pos]
    rhs = -eps[finite] - off[finite] - C[finite][:, zero] @ alpha[zero]
    sp, wp = s[pos], w[pos]
    lam_full = np.zeros(m)
    if not pos.any():
        if A.shape[0] and np.any(rhs > 0):
            raise InfeasibleAllocationError("capability tolerances violated with no adjustable group.")
        obj = float(s @ alpha)
        return QPSolution(alpha, obj, 0.0, False, lam_full, 0.0, 0.0)

    def used(a: np.ndarray) -> float:
        return float(wp @ (a * a))

    a0, u0 = _inner_solve(0.0, sp, A, rhs, wp)  # feasibility (minimum-norm feasible point)
    if used(a0) > budget * (1 + 1e-12) + 1e-300:
        raise InfeasibleAllocationError(
            f"the capability tolerances need a budget of at least {used(a0):.6g} > {budget:.6g}."
        )
    # Monotone search on ν: b(ν) = Σ w α(ν)² is non-decreasing.
    nu_lo, a_lo, u_lo = 0.0, a0, u0
    nu_hi = 1.0 / max(float(np.abs(sp).max() / wp.min()), 1e-300)
    a_hi, u_hi = _inner_solve(nu_hi, sp, A, rhs, wp, u0)
    budget_active = True
    lam_lp: np.ndarray | None = None
    nu_scale = 1.0 / max(float(np.abs(sp).max() / wp.min()), 1e-300)
    for _ in range(200):
        if used(a_hi) >= budget:
            break
        a_prev, u_prev, nu_prev = a_hi, u_hi, nu_hi
        nu_lo, a_lo, u_lo = nu_hi, a_hi, u_hi
        nu_hi *= 2.0
        a_hi, u_hi = _inner_solve(nu_hi, sp, A, rhs, wp, u_hi)
        if np.max(np.abs(a_hi - a_prev)) <= 1e-12:
            # α(ν) did not move: on this piece u(ν) is affine, λ = du/dν. If (α, λ, μ=0) satisfies the
            # KKT conditions of the problem without the budget, α is optimal and the budget is slack.
            lam_lp = (u_hi - u_prev) / (nu_hi - nu_prev)
            if _kkt_residual(a_hi, lam_lp, 0.0, sp, A, rhs, wp, math.inf) <= 1e-9:
                budget_active = False
                break
        if nu_hi > 1e12 * nu_scale:
            budget_active = False
            break
    else:
        budget_active = False
    if not budget_active:
        alpha[pos] = a_hi
        lam = np.zeros(m)
        lam[finite] = lam_lp if lam_lp is not None else u_hi / nu_hi
        mu = 0.0
        res = _kkt_residual(a_hi, lam[finite], 0.0, sp, A, rhs, wp, budget)
    else:
        for _ in range(200):
            nu_mid = 0.5 * (nu_lo + nu_hi)
            if not nu_lo < nu_mid < nu_hi:
                break
            a_mid, u_mid = _inner_solve(nu_mid, sp, A, rhs, wp, u_lo)
            if used(a_mid) <= budget:
                nu_lo, a_lo, u_lo = nu_mid, a_mid, u_mid
            else:
                nu_hi, a_hi, u_hi = nu_mid, a_mid, u_mid
        best_a, best_lam, best_mu = a_lo, u_lo / max(nu_lo, 1e-300), 1.0 / (2.0 * max(nu_lo, 1e-300))
        if nu_lo == 0.0:
            best_lam, best_mu = np.zeros(A.shape[0]), 0.0
        best_res = _kkt_residual(best_a, best_lam, best_mu, sp, A, rhs, wp, budget)
        polished = _polish(a_lo, u_lo, sp, A, rhs, wp, budget)
        if polished is not None:
            pa, plam, pmu = polished
            pres = _kkt_residual(pa, plam, pmu, sp, A, rhs, wp, budget)
            if pres <= max(best_res, 1e-9):
                best_a, best_lam, best_mu, best_res = pa, plam, pmu, pres
        alpha[pos] = np.clip(best_a, 0.0, 1.0)
        lam = np.zeros(m)
        lam[finite] = best_lam
        mu = best_mu
        res = _kkt_residual(alpha[pos], lam[finite], mu, sp, A, rhs, wp, budget)
    return QPSolution(
        alpha=alpha,
        objective=float(s @ alpha),
        budget_used=float(w @ (alpha * alpha)),
        budget_active=budget_active,
        task_multipliers=lam,
        budget_multiplier=mu,
        kkt_residual=res,
    )


# --------------------------------------------------------------------------------------
# Allocation on a measured LayerGeometry
# --------------------------------------------------------------------------------------


@dataclass
class Allocation:
    """Per-group merge ratios and the first-order frontier point they predict.

    Attributes:
        method: ``"hma"`` or ``"uniform"``.
        alphas: ``{group: α_ℓ}`` for the allocated groups.
        outer_alpha: α applied to the outer tensors (embeddings, final norm, LM head), see
            :mod:`frontier_trainer.hma.groups`.
        budget: the budget B (Σ w α² over allocated groups).
        predicted_safety: ``Σ α_ℓ s_ℓ`` + the outer tensors' share.
        predicted_capability: ``{task: Σ α_ℓ c_iℓ + outer share}``.
        tolerances: ``{task: ε_i}`` used (``inf`` if unconstrained).
        budget_used: ``Σ w α²`` actually used.
        kkt_residual: residual of the QP's optimality conditions (0 for uniform).
    """

    method: str
    alphas: dict[str, float]
    outer_alpha: float
    budget: float
    predicted_safety: float
    predicted_capability: dict[str, float]
    tolerances: dict[str, float] = field(default_factory=dict)
    budget_used: float = 0.0
    kkt_residual: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``inf`` as the string ``"inf"``)."""
        d = asdict(self)
        d["tolerances"] = {k: ("inf" if math.isinf(v) else v) for k, v in self.tolerances.items()}
        return d


def outer_alpha_for_budget(total_weight: float, budget: float) -> float:
    """The uniform-equivalent ratio of a budget, ``t_B = sqrt(B / Σ w)`` (capped at 1).

    The rule for the outer tensors (default ``outer="budget"``): at budget B they take t_B, which is
    exactly t for uniform averaging at t (B = t² Σ w), so HMA and uniform treat them identically.
    """
    if total_weight <= 0:
        return 1.0 if budget > 0 else 0.0
    return min(1.0, math.sqrt(max(budget, 0.0) / total_weight))


def allocate(
    geometry: Any,
    budget: float | None = None,
    *,
    t: float | None = None,
    tolerances: Mapping[str, float] | float | None = None,
) -> Allocation:
    """HMA: α in [0, 1]^L maximising predicted safety under tolerances and a budget (see module doc).

    Args:
        geometry: a :class:`~frontier_trainer.hma.signals.LayerGeometry`.
        budget: B in the units of ``geometry.weights``; or give ``t`` for the budget of uniform averaging
            at t, ``B = t² Σ_ℓ w_ℓ`` (comparison at equal budget).
        tolerances: ``{task: ε_i}`` (missing tasks unconstrained), or one float for every task, in the
            capability metric's units (mean completion log-likelihood, nats per token). ``None``: no
            capability constraint.

    Returns:
        The :class:`Allocation` with its predicted frontier point.
    """
    if (budget is None) == (t is None):
        raise ValueError("give exactly one of budget= or t=.")
    W = float(np.sum(geometry.weights))
    if t is not None:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t={t!r} must be in [0, 1].")
        budget = t * t * W
    assert budget is not None
    tasks = list(geometry.tasks)
    if tolerances is None:
        eps = dict.fromkeys(tasks, math.inf)
    elif isinstance(tolerances, (int, float)):
        eps = dict.fromkeys(tasks, float(tolerances))
    else:
        unknown = sorted(set(tolerances) - set(tasks))
        if unknown:
            raise ValueError(f"tolerances for unknown task(s) {unknown}; tasks are {tasks}.")
        eps = {k: float(tolerances.get(k, math.inf)) for k in tasks}
    t_out = outer_alpha_for_budget(W, budget)
    outer_cap = np.asarray(geometry.outer_capability, dtype=np.float64) * t_out
    sol = solve_allocation_qp(
        geometry.safety, geometry.capability, geometry.weights, budget, [eps[k] for k in tasks], outer_cap
    )
    return _allocation("hma", geometry, sol.alpha, t_out, budget, eps, sol.kkt_residual)


def uniform(geometry: Any, t: float) -> Allocation:
    """Uniform averaging α_ℓ = t (the §7.3 straight line), with its predicted point."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t!r} must be in [0, 1].")
    W = float(np.sum(geometry.weights))
    L = len(geometry.groups)
    return _allocation("uniform", geometry, np.full(L, float(t)), float(t), t * t * W, {}, 0.0)


def _allocation(
    method: str,
    geometry: Any,
    alpha: np.ndarray,
    t_out: float,
    budget: float,
    eps: dict[str, float],
    res: float,
) -> Allocation:
    s = np.asarray(geometry.safety, dtype=np.float64)
    C = np.asarray(geometry.capability, dtype=np.float64).reshape(len(geometry.tasks), -1)
    w = np.asarray(geometry.weights, dtype=np.float64)
    safety = float(s @ alpha) + t_out * float(geometry.outer_safety)
    cap = C @ alpha + t_out * np.asarray(geometry.outer_capability, dtype=np.float64)
    alphas = {g: float(a) for g, a in zip(geometry.groups, alpha, strict=True)}
    return Allocation(
        method=method,
        alphas=alphas,
        outer_alpha=float(alphas.get("outer", t_out)),
        budget=float(budget),
        predicted_safety=safety,
        predicted_capability={k: float(v) for k, v in zip(geometry.tasks, cap, strict=True)},
        tolerances=eps,
        budget_used=float(w @ (alpha * alpha)),
        kkt_residual=float(res),
    )
