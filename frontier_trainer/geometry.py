"""The paper's geometry as pure functions on torch tensors.

"What Is the Geometry of the Alignment Tax?" (Young): under the linear representation
hypothesis, safety is a direction ``v*`` and capabilities span a subspace ``C``. This module
turns its definitions and theorems into small exact functions that the rest of the package
(the trainer's projector, the degradation tracker, HMA) builds on.

Conventions
-----------
* A direction is a 1-D tensor of shape ``(d,)``; several directions are the **columns** of a
  2-D tensor of shape ``(d, m)``. Directions need not be unit length: functions normalise
  where the paper assumes unit vectors.
* Everything is computed in float64. Scalars come back as Python ``float``; vectors and
  matrices come back in the dtype of the (first) input tensor unless documented otherwise.
* Every function validates its inputs and raises :class:`ValueError` naming the argument
  (wrong shape, zero vector, NaN/inf, out-of-range value).
* Rank decisions (dependent capability directions) use one relative threshold,
  :data:`GRAM_RTOL`, on the eigenvalues of a Gram matrix.

No Trainer, transformers or wandb import here, by design.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ENTANGLED_MIN_TAU",
    "FREE_MAX_TAU",
    "FRONTIER_NORM_RTOL",
    "FRONTIER_RIDGE",
    "GRAM_RTOL",
    "ConflictEffect",
    "FrontierSolution",
    "ScalingFit",
    "conflict_effect",
    "effective_angle",
    "fit_scaling_law",
    "free_safety",
    "frontier_safety",
    "max_equal_improvement",
    "max_safety_gain",
    "nullspace_coefficients",
    "partial_correlation",
    "pinv_psd",
    "principal_angles",
    "regime",
    "solve_frontier_qp",
    "solve_frontier_step",
    "task_tax_rates",
    "tax_rate",
    "tax_rate_from_gram",
    "whiten",
]

#: Relative eigenvalue threshold of a Gram matrix below which a direction counts as dependent
#: on the others. 1e-12 on eigenvalues is 1e-6 on singular values: a direction closer than
#: that to the span of the others adds nothing (its residual leak is below 1e-6).
GRAM_RTOL: float = 1e-12

#: Regime thresholds of §9.3 on the tax rate τ = cos²α. ``free``: τ < 0.05 (α > 77°);
#: ``entangled``: τ > 0.95 (α < 13°); ``tradeoff`` in between.
FREE_MAX_TAU: float = 0.05
ENTANGLED_MIN_TAU: float = 0.95

Regime = Literal["free", "tradeoff", "entangled"]


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _vector(name: str, x: object, *, allow_zero: bool = False) -> torch.Tensor:
    """Validate a direction of shape (d,) and return it in float64."""
    x = _check_tensor(name, x)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of shape (d,), got shape {tuple(x.shape)}")
    x64 = x.detach().to(torch.float64)
    if not allow_zero and not torch.any(x64 != 0):
        raise ValueError(f"{name} is the zero vector; a direction needs a nonzero norm")
    return x64


def _matrix(name: str, C: object, d: int | None = None) -> torch.Tensor:
    """Validate a matrix of column directions of shape (d, m); a 1-D tensor is one column."""
    C = _check_tensor(name, C)
    if C.dim() == 1:
        C = C.unsqueeze(1)
    if C.dim() != 2 or C.shape[0] == 0 or C.shape[1] == 0:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (d, m) with directions as columns, got {tuple(C.shape)}"
        )
    if d is not None and C.shape[0] != d:
        raise ValueError(f"{name} has {C.shape[0]} rows but the direction has dimension {d}")
    return C.detach().to(torch.float64)


def _finite_float(name: str, x: object) -> float:
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _budget(budget: object) -> float:
    B = _finite_float("budget", budget)
    if B <= 0:
        raise ValueError(f"budget must be > 0 (the radius B of ‖δ‖ ≤ B), got {B}")
    return B


def _unit_scaling(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D⁻¹GD⁻¹, D⁻¹) with D the vectors' norms: the Gram matrix of the same vectors at unit length.

    Rank decisions are made on this correlation matrix, so they depend on directions only:
    a capability gradient a million times shorter than another (a saturated task) keeps its
    own direction instead of falling under a cut-off relative to the longest vector. Zero
    vectors get a zero row and column.
    """
    norms = torch.diagonal(G).clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return G * inv[:, None] * inv[None, :], inv


def pinv_psd(G: torch.Tensor) -> torch.Tensor:
    """A generalised inverse of a Gram matrix with the :data:`GRAM_RTOL` rank rule on directions.

    Returns D⁻¹ (D⁻¹GD⁻¹)⁺ D⁻¹: for a full-rank G this is G⁻¹; otherwise it satisfies
    G X G = G, which is all that projections (C X Cᵀ = P_C) and tax rates (aᵀXa) need, and its
    rank rule ignores the vectors' lengths (see :func:`_unit_scaling`).
    """
    unit, inv_norm = _unit_scaling(G)
    evals, evecs = torch.linalg.eigh(unit)
    cutoff = GRAM_RTOL * max(float(evals.max()), 0.0)
    keep = evals > cutoff
    inv = torch.zeros_like(evals)
    inv[keep] = 1.0 / evals[keep]
    return inv_norm[:, None] * ((evecs * inv) @ evecs.T) * inv_norm[None, :]


def _projection_coefficients(C: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Coefficients w with P_C v = C w, i.e. w = (CᵀC)⁺ Cᵀ v (rank-deficient C allowed)."""
    return pinv_psd(C.T @ C) @ (C.T @ v)


# --------------------------------------------------------------------------------------
# tax rates and angles (§3-§4)
# --------------------------------------------------------------------------------------


def tax_rate(v: torch.Tensor, C: torch.Tensor) -> float:
    """Alignment tax rate τ = ‖P_C v̂‖² (Def 3.4, eq. 2).

    Computed through the Gram form of Remark 4.6, τ = vᵀC(CᵀC)⁺Cᵀv / ‖v‖², with a
    pseudo-inverse so that overlapping, parallel or rank-deficient capability columns are
    handled: the result is the squared cosine between ``v`` and the subspace spanned by the
    columns of ``C``, never their sum of per-task rates (non-additivity, Remark 4.6).

    Args:
        v: safety direction, shape (d,), any nonzero norm.
        C: capability directions as columns, shape (d, m) (or (d,) for one direction).

    Returns:
        τ in [0, 1] as a Python float.
    """
    v64 = _vector("v", v)
    C64 = _matrix("C", C, v64.shape[0])
    if not torch.any(C64 != 0):
        raise ValueError("C is all zeros; the capability subspace needs at least one nonzero column")
    a = C64.T @ v64
    tau = float(a @ pinv_psd(C64.T @ C64) @ a) / float(v64 @ v64)
    return min(max(tau, 0.0), 1.0)


def tax_rate_from_gram(gram: torch.Tensor) -> float:
    """τ of the first vector against the span of the others, from their Gram matrix alone.

    The same Gram form as :func:`tax_rate` (Remark 4.6), for callers that hold inner products
    rather than vectors (the trainer's per-step Gram matrix of [u, c_1, …, c_m]). Returns 0 for
    a zero first vector or when every other vector is zero.
    """
    G = _gram("gram", gram)
    if G.shape[0] < 2 or float(G[0, 0]) <= 0 or float(torch.diagonal(G)[1:].max()) <= 0:
        return 0.0
    a = G[1:, 0]
    return min(max(float(a @ pinv_psd(G[1:, 1:]) @ a) / float(G[0, 0]), 0.0), 1.0)


def task_tax_rates(v: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Per-task tax rates τ_i = ⟨v̂, ĉ_i⟩² = cos²(v, c_i) (Cor 4.5, eq. 6).

    Args:
        v: safety direction, shape (d,).
        C: capability directions as columns, shape (d, m); no column may be zero.

    Returns:
        Tensor of shape (m,) in ``v``'s dtype, each entry in [0, 1].
    """
    v64 = _vector("v", v)
    C64 = _matrix("C", C, v64.shape[0])
    norms = C64.norm(dim=0)
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"C has zero columns {zero}; a per-task tax rate needs a nonzero direction")
    cos = (C64.T @ v64) / (norms * v64.norm())
    return cos.square().clamp(0.0, 1.0).to(v.dtype)


def _orthonormal_basis(name: str, A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of A (float64), rank-revealing via SVD."""
    U, S, _ = torch.linalg.svd(A, full_matrices=False)
    if S.numel() == 0 or float(S[0]) == 0.0:
        raise ValueError(f"{name} spans the zero subspace; principal angles need a nonzero column")
    rank = int((S[0] * math.sqrt(GRAM_RTOL) < S).sum())
    return U[:, :rank]


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles between span(A) and span(B), Björck–Golub (1973).

    Orthonormalise each set of columns, take the singular values σ of Q_AᵀQ_B, and return
    θ_k = arccos σ_k. Small angles are computed from sines (the singular values of
    Q_B − Q_A Q_AᵀQ_B), as Björck and Golub recommend, because arccos loses half the digits
    near σ = 1.

    Args:
        A: shape (d, p); B: shape (d, q). Rank-deficient inputs are reduced to their rank.

    Returns:
        Angles in radians, ascending, shape (min(rank A, rank B),), in ``A``'s dtype.
    """
    A64 = _matrix("A", A)
    B64 = _matrix("B", B, A64.shape[0])
    QA = _orthonormal_basis("A", A64)
    QB = _orthonormal_basis("B", B64)
    if QA.shape[1] < QB.shape[1]:  # make QB the smaller basis so the counts line up
        QA, QB = QB, QA
    cos = torch.linalg.svdvals(QA.T @ QB).clamp(0.0, 1.0)  # descending
    angles = torch.arccos(cos)
    sin = torch.linalg.svdvals(QB - QA @ (QA.T @ QB)).clamp(0.0, 1.0).flip(0)  # ascending
    small = cos.square() > 0.5
    angles[small] = torch.arcsin(sin[small])
    return angles.to(A.dtype if A.is_floating_point() else torch.float64)


# --------------------------------------------------------------------------------------
# frontier (§4)
# --------------------------------------------------------------------------------------


def frontier_safety(delta_c: float | torch.Tensor, alpha: float, budget: float) -> float | torch.Tensor:
    """Single-capability Pareto frontier (Thm 4.1, eq. 3).

    Δ_S = Δ_C cos α + sin α √(B² − Δ_C²), for |Δ_C| ≤ B.

    Args:
        delta_c: capability change(s) Δ_C; a float or a tensor (vectorised elementwise).
        alpha: angle between safety and capability directions, in [0, π].
        budget: B > 0.

    Returns:
        The largest achievable safety gain, a float for a float input, else a tensor of
        ``delta_c``'s shape and floating dtype.
    """
    B = _budget(budget)
    a = _finite_float("alpha", alpha)
    if not 0.0 <= a <= math.pi:
        raise ValueError(f"alpha must be an angle in [0, pi] radians, got {a}")
    is_tensor = isinstance(delta_c, torch.Tensor)
    dc = (
        _check_tensor("delta_c", delta_c)
        if is_tensor
        else torch.tensor(_finite_float("delta_c", delta_c), dtype=torch.float64)
    )
    dc64 = dc.detach().to(torch.float64)
    if dc64.numel() and float(dc64.abs().max()) > B * (1 + 1e-12):
        raise ValueError(
            f"delta_c must satisfy |delta_c| <= budget = {B}; got max |delta_c| = {float(dc64.abs().max())}"
        )
    root = (B * B - dc64.square()).clamp_min(0.0).sqrt()
    out = dc64 * math.cos(a) + math.sin(a) * root
    if not is_tensor:
        return float(out)
    return out.to(dc.dtype if dc.is_floating_point() else torch.float64)


def max_safety_gain(
    v: torch.Tensor, C: torch.Tensor, delta_c: torch.Tensor, budget: float
) -> tuple[float, torch.Tensor]:
    """Maximum safety gain at a fixed capability change (Thm 4.3, eq. 4).

    With v̂ = v/‖v‖, the best step δ with P_C δ = δ_C and ‖δ‖ ≤ B is
    δ* = δ_C + √(B² − ‖δ_C‖²) · P_{C⊥} v̂ / ‖P_{C⊥} v̂‖, with gain
    ⟨v̂, δ_C⟩ + √(B² − ‖δ_C‖²) ‖P_{C⊥} v̂‖. With δ_C = 0 this is Cor 4.4, B√(1−τ).

    Args:
        v: safety direction, shape (d,).
        C: capability directions as columns, shape (d, m).
        delta_c: the capability component δ_C, shape (d,); must lie in span(C).
        budget: B > 0 with ‖δ_C‖ ≤ B.

    Returns:
        ``(gain, delta)``: the gain as a float and δ* in ``v``'s dtype. If v̂ lies inside
        span(C) there is no free direction and δ* = δ_C.
    """
    v64 = _vector("v", v)
    d = v64.shape[0]
    C64 = _matrix("C", C, d)
    dc = _vector("delta_c", delta_c, allow_zero=True)
    if dc.shape[0] != d:
        raise ValueError(f"delta_c has dimension {dc.shape[0]} but v has dimension {d}")
    B = _budget(budget)
    dc_norm = float(dc.norm())
    if dc_norm > B * (1 + 1e-12):
        raise ValueError(f"delta_c has norm {dc_norm} > budget {B}; Thm 4.3 needs ‖δ_C‖ ≤ B")
    off_span = float((dc - C64 @ _projection_coefficients(C64, dc)).norm())
    if off_span > 1e-9 * max(dc_norm, 1.0):
        raise ValueError(
            f"delta_c must lie in span(C) (it is the capability component P_C δ); its residual is {off_span:.3g}"
        )
    v_hat = v64 / v64.norm()
    v_perp = v_hat - C64 @ _projection_coefficients(C64, v_hat)
    residual_budget = math.sqrt(max(B * B - dc_norm * dc_norm, 0.0))
    perp_norm = float(v_perp.norm())
    delta = dc.clone()
    if perp_norm > math.sqrt(GRAM_RTOL):
        delta = delta + residual_budget * v_perp / perp_norm
    gain = float(v_hat @ delta)
    return gain, delta.to(v.dtype)


def free_safety(tau: float, budget: float) -> float:
    """Tax-free safety B√(1 − τ) (Cor 4.4, eq. 5): the best gain at zero capability cost."""
    t = _finite_float("tau", tau)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"tau must be a tax rate in [0, 1], got {t}")
    return _budget(budget) * math.sqrt(1.0 - t)


def whiten(v: torch.Tensor, C: torch.Tensor, fisher_diag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Change of variables for an anisotropic budget δᵀFδ ≤ B² with diagonal F (§4.4).

    In whitened coordinates δ̃ = F^{1/2}δ the budget is the Euclidean ball, and the
    directions become ṽ = F^{-1/2}v/‖F^{-1/2}v‖ and c̃_i = F^{-1/2}c_i/‖F^{-1/2}c_i‖; every
    result of this module then applies to (ṽ, C̃) with the whitened angles.

    Args:
        v: safety direction, shape (d,).
        C: capability directions, shape (d, m); no zero column.
        fisher_diag: the diagonal of F, shape (d,), strictly positive.

    Returns:
        ``(v_tilde, C_tilde)``, unit vectors, in ``v``'s dtype.
    """
    v64 = _vector("v", v)
    d = v64.shape[0]
    C64 = _matrix("C", C, d)
    f = _vector("fisher_diag", fisher_diag)
    if f.shape[0] != d:
        raise ValueError(f"fisher_diag has dimension {f.shape[0]} but v has dimension {d}")
    if float(f.min()) <= 0:
        raise ValueError("fisher_diag must be strictly positive (F must be positive definite)")
    inv_sqrt = f.rsqrt()
    vt = v64 * inv_sqrt
    Ct = C64 * inv_sqrt[:, None]
    norms = Ct.norm(dim=0)
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"C has zero columns {zero}; cannot whiten a zero direction")
    return (vt / vt.norm()).to(v.dtype), (Ct / norms).to(v.dtype)


# --------------------------------------------------------------------------------------
# safety-safety tradeoffs (§6)
# --------------------------------------------------------------------------------------


def partial_correlation(rho: float, a: float, b: float) -> float:
    """Effective correlation of two safety directions under capability preservation (eq. 12).

    cos θ = (ρ − ab) / √((1 − a²)(1 − b²)), the partial correlation of v₁*, v₂* given c
    (Thm 6.1, Remark 6.2), with ρ = ⟨v₁*, v₂*⟩, a = ⟨c, v₁*⟩, b = ⟨c, v₂*⟩ for unit vectors.

    Raises ValueError if |a| or |b| is 1 (a safety direction inside the capability line, so
    its projection vanishes) or if (ρ, a, b) cannot be inner products of three unit vectors
    (their Gram matrix would not be positive semidefinite).
    """
    r, x, y = (_finite_float(n, val) for n, val in (("rho", rho), ("a", a), ("b", b)))
    for name, val in (("rho", r), ("a", x), ("b", y)):
        if abs(val) > 1:
            raise ValueError(f"{name} is an inner product of unit vectors and must be in [-1, 1], got {val}")
    for name, val in (("a", x), ("b", y)):
        if abs(val) >= 1:
            raise ValueError(
                f"|{name}| = 1: that safety direction lies on the capability line and has no projection"
            )
    det = 1 - r * r - x * x - y * y + 2 * r * x * y
    if det < -1e-12:
        raise ValueError(
            f"rho={r}, a={x}, b={y} are not the inner products of three unit vectors (Gram determinant {det:.3g} < 0)"
        )
    value = (r - x * y) / math.sqrt((1 - x * x) * (1 - y * y))
    return min(max(value, -1.0), 1.0)


def effective_angle(v1: torch.Tensor, v2: torch.Tensor, C: torch.Tensor) -> float:
    """Effective angle θ between two safety directions when all of C is preserved (Prop 6.5).

    cos θ = (ρ − aᵀ(CᵀC)⁺b) / √((1 − τ₁)(1 − τ₂)), eq. 15, with a = Cᵀv̂₁, b = Cᵀv̂₂ and
    τ_i the tax rates of v̂_i against C. For a single unit column this is eq. 12 (Thm 6.1).

    Returns:
        θ in radians, in [0, π].
    """
    v1_64 = _vector("v1", v1)
    v2_64 = _vector("v2", v2)
    if v2_64.shape != v1_64.shape:
        raise ValueError(
            f"v1 and v2 must have the same shape, got {tuple(v1_64.shape)} and {tuple(v2_64.shape)}"
        )
    C64 = _matrix("C", C, v1_64.shape[0])
    u1 = v1_64 / v1_64.norm()
    u2 = v2_64 / v2_64.norm()
    G_pinv = pinv_psd(C64.T @ C64)
    a = C64.T @ u1
    b = C64.T @ u2
    tau1 = float(a @ G_pinv @ a)
    tau2 = float(b @ G_pinv @ b)
    for name, tau in (("v1", tau1), ("v2", tau2)):
        if 1.0 - tau <= math.sqrt(GRAM_RTOL):
            raise ValueError(
                f"{name} lies in span(C): preserving C leaves it no direction, so θ is undefined"
            )
    cos_theta = (float(u1 @ u2) - float(a @ G_pinv @ b)) / math.sqrt((1.0 - tau1) * (1.0 - tau2))
    return math.acos(min(max(cos_theta, -1.0), 1.0))


def max_equal_improvement(theta: float) -> float:
    """Largest equal normalised gain s₁ = s₂ on the safety–safety frontier: cos(θ/2) (Cor 6.3)."""
    t = _finite_float("theta", theta)
    if not 0.0 <= t <= math.pi:
        raise ValueError(f"theta must be an angle in [0, pi] radians, got {t}")
    return math.cos(t / 2.0)


@dataclass(frozen=True)
class ConflictEffect:
    """How preserving one capability changes a safety–safety conflict (Thm 6.4).

    Attributes:
        rho: ⟨v̂₁, v̂₂⟩, the correlation without preserving c.
        a: ⟨ĉ, v̂₁⟩.
        b: ⟨ĉ, v̂₂⟩.
        preserved: the partial correlation (eq. 12) when c is held fixed.
        case: which case of Thm 6.4 applies: ``"opposite_sign"`` (case 1, ab < 0: preserving
            c strictly helps), ``"symmetric"`` (case 2, a = b: preserving weakly hurts),
            ``"asymmetric_same_sign"`` (case 3, ab > 0, a ≠ b: may help as a suppressor), or
            ``"orthogonal"`` (ab = 0, outside the theorem's cases).
        helps: whether preserving c raises the correlation (preserved > rho), computed, not
            read off the case: case 1's proof in the paper divides ρ − ab by a factor < 1,
            which raises the value only when ρ − ab ≥ 0. With ρ − ab < 0 (for example
            ρ = −0.5, a = −0.125, b = 0.5) preserving c *lowers* the correlation.
    """

    rho: float
    a: float
    b: float
    preserved: float
    case: Literal["opposite_sign", "symmetric", "asymmetric_same_sign", "orthogonal"]
    helps: bool


def conflict_effect(v1: torch.Tensor, v2: torch.Tensor, c: torch.Tensor) -> ConflictEffect:
    """Safety–safety correlation with and without preserving capability ``c`` (Thm 6.4).

    Args:
        v1, v2: safety directions (e.g. harmlessness, helpfulness), shape (d,).
        c: one capability direction, shape (d,).
    """
    u1 = _vector("v1", v1)
    u2 = _vector("v2", v2)
    cc = _vector("c", c)
    if not (u1.shape == u2.shape == cc.shape):
        raise ValueError(
            f"v1, v2 and c must have the same shape, got {tuple(u1.shape)}, {tuple(u2.shape)}, {tuple(cc.shape)}"
        )
    u1, u2, cc = u1 / u1.norm(), u2 / u2.norm(), cc / cc.norm()
    rho, a, b = float(u1 @ u2), float(cc @ u1), float(cc @ u2)
    preserved = partial_correlation(min(max(rho, -1.0), 1.0), a, b)
    tol = 1e-12
    if abs(a * b) <= tol:
        case = "orthogonal"
    elif a * b < 0:
        case = "opposite_sign"
    elif math.isclose(a, b, rel_tol=1e-9, abs_tol=tol):
        case = "symmetric"
    else:
        case = "asymmetric_same_sign"
    return ConflictEffect(rho=rho, a=a, b=b, preserved=preserved, case=case, helps=preserved > rho)


# --------------------------------------------------------------------------------------
# the per-step solvers the trainer calls
# --------------------------------------------------------------------------------------


def _gram(name: str, gram: object) -> torch.Tensor:
    G = _check_tensor(name, gram)
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 1:
        raise ValueError(
            f"{name} must be a square (m+1)x(m+1) Gram matrix of [u, c_1..c_m], got {tuple(G.shape)}"
        )
    G = G.detach().to(torch.float64)
    G = 0.5 * (G + G.T)
    if float(torch.diagonal(G).min()) < 0:
        raise ValueError(f"{name} has a negative diagonal entry: it is not a Gram matrix")
    return G


def nullspace_coefficients(gram: torch.Tensor) -> torch.Tensor:
    """Coefficients of the plain null-space update P_{C⊥}u (Thm 4.3 with δ_C = 0, unscaled).

    With G the Gram matrix of [u, c_1, …, c_m], P_{C⊥}u = u − Σ w_i c_i where
    w = (G_CC)⁺ G_Cu. Works on the Gram matrix alone, so its cost does not depend on the
    model's size; dependent or zero c_i are handled by the pseudo-inverse.

    Returns:
        float64 tensor a of shape (m+1,) with a_0 = 1 and a_i = −w_i, so that
        P_{C⊥}u = a_0 u + Σ a_i c_i.
    """
    G = _gram("gram", gram)
    coeffs = torch.zeros(G.shape[0], dtype=torch.float64)
    coeffs[0] = 1.0
    if G.shape[0] > 1:
        coeffs[1:] = -(pinv_psd(G[1:, 1:]) @ G[1:, 0])
    return coeffs


#: Tikhonov term added to the unit-diagonal dual Hessian of :func:`solve_frontier_qp`: keeps
#: every block invertible when directions are dependent (parallel, repeated, opposite). It
#: relaxes each constraint by at most this much times its multiplier (relative to ‖u‖).
FRONTIER_RIDGE: float = 1e-11

#: Relative accuracy at which :func:`solve_frontier_qp` accepts ‖δ‖ = ‖u‖.
FRONTIER_NORM_RTOL: float = 1e-11

_fallback_warned = False


@dataclass(frozen=True)
class FrontierSolution:
    """Result of :func:`solve_frontier_qp`.

    Attributes:
        coefficients: float64 a of shape (m+1,), δ = a_0 u + Σ a_i c_i.
        active: indices i of the capability constraints held at equality (multiplier > 0):
            pass them back as ``warm_start`` at the next step.
        converged: False when the solver gave up and ``coefficients`` are the fallback, the
            null-space step at full budget (it satisfies every constraint).
        solves: number of box-QP solves used (a cost measure; 0 when u was feasible).
    """

    coefficients: torch.Tensor
    active: tuple[int, ...]
    converged: bool
    solves: int


def solve_frontier_step(
    gram: torch.Tensor,
    tolerances: torch.Tensor | list[float],
    *,
    warm_start: Sequence[int] | None = None,
) -> torch.Tensor:
    """Exact frontier step on the Gram matrix of [u, c_1, …, c_m] (Thm 4.1/4.3 made operational).

    Solves  max_δ ⟨u, δ⟩  s.t.  ‖δ‖ ≤ ‖u‖  and  ⟨c_i/‖c_i‖, δ⟩ ≥ −ε_i‖u‖  for every finite ε_i,
    over δ = a_0 u + Σ a_i c_i. Here u is the proposed (raw) update and c_i are capability
    *ascent* directions, so ε_i bounds how much capability i may fall per unit of step; a
    capability gain is never blocked. If u itself is feasible the result is exactly
    (1, 0, …, 0); with every ε_i = inf likewise. Zero c_i are skipped (their constraint
    0 ≥ −ε_i‖u‖ always holds); parallel and dependent c_i are handled.

    The method (polynomial, on the (m+1)² Gram matrix only) is :func:`solve_frontier_qp`'s;
    this wrapper returns its coefficients. It never raises on a valid Gram matrix: if the
    solver cannot converge it returns the null-space step at full budget, which satisfies
    every constraint, and logs a warning once per process.

    Args:
        gram: (m+1)×(m+1) Gram matrix of [u, c_1, …, c_m].
        tolerances: m values ε_i ≥ 0; ``float('inf')`` leaves a task unconstrained.
        warm_start: constraint indices active at the previous step (optional, for speed).

    Returns:
        float64 coefficients a of shape (m+1,).
    """
    return solve_frontier_qp(gram, tolerances, warm_start=warm_start).coefficients


def solve_frontier_qp(
    gram: torch.Tensor,
    tolerances: torch.Tensor | list[float],
    *,
    warm_start: Sequence[int] | None = None,
    max_solves: int = 400,
) -> FrontierSolution:
    """The frontier step of :func:`solve_frontier_step`, with its active set and status.

    Method. Scale so that ‖u‖ = 1 and write n_i = ĉ_i, b_i = ⟨n_i, u⟩, H = [⟨n_i, n_j⟩] and
    P = {z : ⟨n_i, z⟩ ≥ −ε_i}. The KKT conditions of max ⟨u, z⟩ over P ∩ {‖z‖ ≤ 1} read
    u + Σ λ_i n_i = 2μ z, so with s = 1/(2μ) the optimum is z(s) = proj_P(s·u), the Euclidean
    projection of a point on the ray through u, at the s where ‖z(s)‖ = 1 (Thm 4.3's form:
    with the active set A fixed, z(s) = z_A + s·P_{A⊥}u, the min-norm point on the active
    equalities plus the remaining budget along the part of u orthogonal to them).

    1. For a given s, proj_P(s·u) is the strictly convex box QP in the multipliers
       ν = sλ ≥ 0:  min ½ νᵀ(H + ρI)ν + νᵀ(s·b + ε)  (ρ = :data:`FRONTIER_RIDGE`, which keeps
       dependent directions solvable; two steps of iterative refinement then remove its
       relaxation of the active constraints). It is solved by a primal active-set method
       (Lawson–Hanson style: the coordinates with a negative gradient enter, the iterate steps
       back to the boundary when a multiplier would turn negative), warm started from the
       previous active set. Each iteration is one |A|×|A| linear solve.
    2. ‖z(s)‖ is nondecreasing in s, and on a fixed active set ‖z(s)‖² = s²(1 − b_Aᵀ H_AA⁻¹ b_A)
       + ε_Aᵀ H_AA⁻¹ ε_A, so the s with ‖z‖ = 1 is read off exactly and accepted when the box
       QP's KKT conditions hold there (ν_A ≥ 0, no inactive constraint violated); otherwise
       the box QP at that s gives the next active set. A bracket [lo, hi] with
       ‖z(lo)‖ ≤ 1 ≤ ‖z(hi)‖ (from box-QP active sets only) falls back to bisection when a
       guess leaves it. If u lies in the span of the active normals and −u is a nonnegative
       combination of them, the ball is inactive (KKT with μ = 0: a bounded optimum inside
       it, e.g. the zero step when ε = 0 and every capability opposes u) and
       z = −Σ y_i n_i is returned with a_0 = 0.

    Cost: a handful of box-QP solves of at most m unknowns, O(m³) each, on the Gram matrix
    alone (benchmarks/solver_benchmark.py: m = 64 in about 0.4–2 ms of CPU on one thread,
    where the former enumeration of active sets took 19 ms at m = 8 and 119 s at m = 20
    according to issue 12).

    The result is verified (primal feasibility to 1e-9‖u‖, ‖δ‖ ≤ ‖u‖); on failure (including
    a u that lies in span(C) to ~1e-7, where the step would need coefficients ~1e7 that
    cancel), or after ``max_solves`` linear solves, the null-space step at full budget is
    returned with ``converged=False`` and a warning is logged once per process.
    """
    G = _gram("gram", gram)
    m = G.shape[0] - 1
    eps = torch.as_tensor(tolerances, dtype=torch.float64).flatten()
    if eps.numel() != m:
        raise ValueError(
            f"tolerances must have one entry per capability direction: expected {m}, got {eps.numel()}"
        )
    if torch.isnan(eps).any() or (eps < 0).any():
        raise ValueError(f"tolerances must be >= 0 (or inf for an unconstrained task); got {eps.tolist()}")
    coeffs = torch.zeros(m + 1, dtype=torch.float64)
    coeffs[0] = 1.0
    u_norm2 = float(G[0, 0])
    if u_norm2 <= 0.0:
        return FrontierSolution(torch.zeros(m + 1, dtype=torch.float64), (), True, 0)
    Gn = (G / u_norm2).numpy()  # coefficients are invariant under this scaling
    c_norm = np.sqrt(np.clip(np.diagonal(Gn)[1:], 0.0, None))
    eps_np = eps.numpy()
    idx = np.array(
        [i for i in range(m) if math.isfinite(eps_np[i]) and c_norm[i] > math.sqrt(GRAM_RTOL)], dtype=np.int64
    )
    if idx.size == 0:
        return FrontierSolution(coeffs, (), True, 0)
    cn = c_norm[idx]
    b = Gn[idx + 1, 0] / cn
    e = eps_np[idx]
    feas_tol = 1e-10
    if bool(np.all(b + e >= -feas_tol)):
        return FrontierSolution(coeffs, (), True, 0)
    H = Gn[np.ix_(idx + 1, idx + 1)] / np.outer(cn, cn)
    A = H + FRONTIER_RIDGE * np.eye(idx.size)
    position = {int(i): k for k, i in enumerate(idx)}
    F = [position[int(i)] for i in (warm_start or ()) if int(i) in position]
    try:
        result = _frontier_path(A, H, b, e, F, max_solves)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        result = None
    if result is not None:
        s, nu, F, solves = result
        norm2 = s * s + 2.0 * s * float(b @ nu) + float(nu @ H @ nu)
        if 1.0 < norm2 <= 1.0 + 1e-6:  # rounding: shrink onto the ball (0 ∈ P keeps z feasible)
            s, nu = s / math.sqrt(norm2), nu / math.sqrt(norm2)
            norm2 = 1.0
        slack = H @ nu + s * b + e  # ⟨n_i, z⟩ + ε_i
        if (
            math.isfinite(s)
            and np.all(np.isfinite(nu))
            and float(slack.min()) >= -1e-9
            and norm2 <= 1.0 + 1e-9
        ):
            coeffs[0] = s
            coeffs[idx + 1] = torch.from_numpy(nu / cn)
            return FrontierSolution(coeffs, tuple(int(idx[k]) for k in sorted(F)), True, solves)
    return FrontierSolution(_nullspace_fallback(G), (), False, max_solves if result is None else result[3])


def _nullspace_fallback(G: torch.Tensor) -> torch.Tensor:
    """The null-space step P_{C⊥}u rescaled to ‖u‖ (Thm 4.3 with δ_C = 0): ⟨c_i, δ⟩ = 0 for
    every i, so it meets every tolerance; zero if u lies in span(C). Logs a warning once."""
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "solve_frontier_step did not converge; using the null-space step at full budget, which "
            "meets every capability tolerance (warned once per process)"
        )
    a = nullspace_coefficients(G)
    norm2 = float(a @ G @ a)
    if norm2 <= GRAM_RTOL * float(G[0, 0]):
        return torch.zeros_like(a)
    return a * math.sqrt(float(G[0, 0]) / norm2)


def _frontier_path(
    A: np.ndarray, H: np.ndarray, b: np.ndarray, e: np.ndarray, F: list[int], max_solves: int
) -> tuple[float, np.ndarray, list[int], int] | None:
    """The search over s of :func:`solve_frontier_qp`: returns (s, ν, active set, solves), or
    None when ``max_solves`` linear solves did not settle it.

    On an active set F (ν_F = −(s x + y) with x = A_FF⁻¹b_F, y = A_FF⁻¹ε_F) the norm is
    ‖z(s)‖² = s² (1 − b_Fᵀx) + ε_Fᵀy, so the s with ‖z‖ = 1 is read off; if ν_F ≥ 0 there and
    no other multiplier wants in, that (s, F) is the optimum. Otherwise the box QP at that s
    (warm started from F) gives the next active set.
    """
    n = b.size
    tol = 1e-12
    lo, hi = 1.0, math.inf  # ‖proj_P(u)‖ ≤ ‖u‖ = 1 since 0 ∈ P: s* ≥ 1
    s = 1.0
    solves = 0
    first = bool(F)
    while solves < max_solves:
        solved_at_s = not first
        if first:
            first = False  # try the warm start's own piece before any box QP
        else:
            nu, F, used = _box_qp(A, s * b + e, F, max_solves - solves)
            solves += used
            if nu is None:
                return None
        if F:
            xy = np.linalg.solve(A[np.ix_(F, F)], np.stack([b[F], e[F]], axis=1))
            solves += 1
            x, y = xy[:, 0], xy[:, 1]
            # ‖P_{F⊥}u‖² and ‖z_F‖² with H itself: the ridge's share ρ‖·‖² is taken out
            perp2 = 1.0 - float(b[F] @ x) - FRONTIER_RIDGE * float(x @ x)
            za2 = float(e[F] @ y) - FRONTIER_RIDGE * float(y @ y)
        else:
            x = y = np.zeros(0)
            perp2, za2 = 1.0, 0.0
        guess = math.inf  # when this active set cannot reach ‖z‖ = 1
        if perp2 <= 1e-10 and za2 <= 1.0 + tol:
            # u lies in span(active normals): on this set z = −Σ y_i n_i for every s. It is the
            # optimum with the ball inactive if −u is a nonnegative combination of these normals
            # (KKT with μ = 0); then δ needs no multiple of u at all (a_0 = 0, no cancellation).
            lam, _, used = _box_qp(A[np.ix_(F, F)], b[F], list(range(len(F))), max_solves)
            solves += used
            if lam is not None and 1.0 + 2.0 * float(b[F] @ lam) + float(lam @ H[np.ix_(F, F)] @ lam) <= 1e-14:
                # KKT with μ = 0: multipliers λ ≥ 0 on F (certified above), z on the F
                # equalities, and z feasible for every other constraint
                nu = np.zeros(n)
                nu[F] = -y
                _refine(A, H, e, F, nu)
                if float((H @ nu + e).min()) >= -tol:
                    return 0.0, nu, F, solves
        if perp2 > 1e-16 and za2 < 1.0:
            guess = math.sqrt((1.0 - za2) / perp2)
            nu = np.zeros(n)
            nu[F] = -(guess * x + y)
            if lo - tol <= guess <= hi + tol and _kkt_feasible(A, b, e, guess, nu, F, tol):
                _refine(A, H, guess * b + e, F, nu)
                return guess, nu, F, solves
        # the piece's s is not optimal: keep a bracket lo <= s* <= hi and move inside it (only
        # an active set from the box QP at s tells ‖z(s)‖; a warm start's set does not)
        if solved_at_s:
            norm2 = s * s * perp2 + za2 if F else s * s
            if norm2 < 1.0:
                lo = max(lo, s)
            else:
                hi = min(hi, s)
        if lo < guess < hi and guess != s:
            s = guess
        elif math.isfinite(hi):
            s = 0.5 * (lo + hi)
        else:
            s = 2.0 * max(s, lo)
        if s > 1e10:
            return None
    return None


def _refine(A: np.ndarray, H: np.ndarray, q: np.ndarray, F: list[int], nu: np.ndarray) -> None:
    """Two steps of iterative refinement of H_FF ν_F = −q_F preconditioned by A_FF = H_FF + ρI,
    in place: removes the ridge's relaxation ρν_F of the active constraints (it grows with ν,
    so with the step's scale s) wherever H_FF is not singular."""
    if not F:
        return
    AF, HF = A[np.ix_(F, F)], H[np.ix_(F, F)]
    for _ in range(2):
        nu[F] += np.linalg.solve(AF, -q[F] - HF @ nu[F])


def _kkt_feasible(
    A: np.ndarray, b: np.ndarray, e: np.ndarray, s: float, nu: np.ndarray, F: list[int], tol: float
) -> bool:
    """Whether ν (supported on F) solves the box QP at s: ν_F ≥ 0 and the gradient
    Aν + s·b + ε is ≥ 0 off F (every inactive constraint holds)."""
    if F and float(nu[F].min()) < -tol:
        return False
    w = A @ nu + s * b + e
    w[F] = np.inf
    return bool(w.min() >= -tol * max(1.0, s))


def _box_qp(
    A: np.ndarray, q: np.ndarray, F0: list[int], budget: int
) -> tuple[np.ndarray | None, list[int], int]:
    """min ½ νᵀAν + qᵀν over ν ≥ 0 for a positive definite A, by a primal active-set method
    (Lawson–Hanson's NNLS iteration on a general quadratic), warm started from the free set F0.

    Every coordinate whose gradient is negative enters at once; when the solution on the
    enlarged set has nonpositive entries the iterate steps back to the boundary and those
    leave (the objective decreases at every step). Returns (ν, free set, solves); ν is None
    if ``budget`` solves were not enough.
    """
    n = q.size
    tol = 1e-13 * max(1.0, float(np.abs(q).max()))
    nu = np.zeros(n)
    F = sorted(set(F0))
    solves = 0
    while F:  # warm start: the previous free set, shrunk until its solution is positive
        x = np.linalg.solve(A[np.ix_(F, F)], -q[F])
        solves += 1
        if np.all(x > 0):
            nu[F] = x
            break
        F = [f for f, xf in zip(F, x, strict=True) if xf > 0]
    refused: set[int] = set()
    while solves < budget:
        w = A @ nu + q
        w[F] = np.inf
        if refused:
            w[list(refused)] = np.inf
        entering = [int(j) for j in np.nonzero(w < -tol)[0]]
        if not entering:
            return nu, F, solves
        F = sorted([*F, *entering])
        while solves < budget:
            x = np.zeros(n)
            x[F] = np.linalg.solve(A[np.ix_(F, F)], -q[F])
            solves += 1
            Fa = np.array(F)
            bad = Fa[x[Fa] <= 0]
            if bad.size == 0:
                nu = x
                refused.clear()
                break
            ratios = nu[bad] / (nu[bad] - x[bad])
            alpha = float(ratios.min())
            nu = np.maximum(nu + alpha * (x - nu), 0.0)
            hit = set(bad[ratios <= alpha].tolist())
            F = [f for f in F if f not in hit and (nu[f] > 0 or x[f] > 0)]
            outside = np.ones(n, dtype=bool)
            outside[F] = False
            nu[outside] = 0.0
            if alpha == 0.0:
                refused.update(j for j in entering if j not in F)  # cannot enter here: do not retry
                if not any(j in F for j in entering):
                    break
    return None, F, solves


# --------------------------------------------------------------------------------------
# regimes and scaling (§5, §9.3)
# --------------------------------------------------------------------------------------


def regime(tau: float, free_max: float = FREE_MAX_TAU, entangled_min: float = ENTANGLED_MIN_TAU) -> Regime:
    """Taxonomy of §9.3 from a tax rate τ = cos²α.

    ``"free"`` if τ < ``free_max`` (α near π/2: safety nearly orthogonal to capability),
    ``"entangled"`` if τ > ``entangled_min`` (α near 0: one-to-one tradeoff), else
    ``"tradeoff"``. Defaults: :data:`FREE_MAX_TAU` = 0.05, :data:`ENTANGLED_MIN_TAU` = 0.95.
    """
    t = _finite_float("tau", tau)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"tau must be a tax rate in [0, 1], got {t}")
    if not 0.0 <= free_max <= entangled_min <= 1.0:
        raise ValueError(f"need 0 <= free_max <= entangled_min <= 1, got {free_max}, {entangled_min}")
    if t < free_max:
        return "free"
    if t > entangled_min:
        return "entangled"
    return "tradeoff"


@dataclass(frozen=True)
class ScalingFit:
    """Least-squares fit of τ(d) = τ₀ + k/d (Thm 5.4), with standard errors.

    ``tau0`` is the irreducible tax (the plateau), ``k`` the packing coefficient (≈ m′ under
    random packing, Prop 5.5). Standard errors are NaN when there are only two points.
    """

    tau0: float
    k: float
    tau0_stderr: float
    k_stderr: float
    residual_std: float
    n: int


def fit_scaling_law(dims: list[float] | torch.Tensor, taus: list[float] | torch.Tensor) -> ScalingFit:
    """Fit τ(d) = τ₀ + k/d by ordinary least squares on x = 1/d (Thm 5.4, Prop 5.5).

    Args:
        dims: model dimensions d > 0 (at least two distinct values).
        taus: measured tax rates in [0, 1], one per dimension.
    """
    d = torch.as_tensor(dims, dtype=torch.float64).flatten()
    t = torch.as_tensor(taus, dtype=torch.float64).flatten()
    if d.numel() != t.numel():
        raise ValueError(f"dims and taus must have the same length, got {d.numel()} and {t.numel()}")
    if d.numel() < 2 or torch.unique(d).numel() < 2:
        raise ValueError("dims needs at least two distinct model dimensions to fit tau0 + k/d")
    if not torch.isfinite(d).all() or (d <= 0).any():
        raise ValueError("dims must be finite and > 0")
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        raise ValueError("taus must be tax rates in [0, 1]")
    X = torch.stack([torch.ones_like(d), 1.0 / d], dim=1)
    beta = torch.linalg.lstsq(X, t.unsqueeze(1)).solution.squeeze(1)
    resid = t - X @ beta
    n = d.numel()
    if n > 2:
        sigma2 = float(resid @ resid) / (n - 2)
        cov = sigma2 * torch.linalg.inv(X.T @ X)
        se0, se1 = math.sqrt(max(float(cov[0, 0]), 0.0)), math.sqrt(max(float(cov[1, 1]), 0.0))
        res_std = math.sqrt(sigma2)
    else:
        se0 = se1 = res_std = math.nan
    return ScalingFit(
        tau0=float(beta[0]), k=float(beta[1]), tau0_stderr=se0, k_stderr=se1, residual_std=res_std, n=n
    )
