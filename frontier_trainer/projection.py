"""Projection of the realised optimizer displacement onto the capability null space or frontier.

Projecting the *gradient* is not enough: AdamW's moments, per-coordinate scaling and decoupled
weight decay put the blocked component back (field notes §2). :class:`UpdateProjector` acts on
what the optimizer really did instead. Around each real optimizer step it

1. snapshots θ_old (``before_step``),
2. lets the optimizer run, then reads the raw displacement u = θ_new − θ_old,
3. forms the Gram matrix of [u, c_1, …, c_m] by per-parameter dot products (nothing is
   concatenated: extra memory is one snapshot plus the m directions, the (m+1)× floor),
4. asks :mod:`frontier_trainer.geometry` for coefficients (``nullspace_coefficients`` or
   ``solve_frontier_step``), and
5. writes θ = θ_old + a_0 u + Σ a_i c_i in place (``after_step``).

Everything is pure torch on a list of parameters: no Trainer, so it can be tested and reused
with any optimizer loop. Under DDP every rank holds identical parameters, updates and
directions, so every rank computes the identical Gram matrix and coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from frontier_trainer import geometry

ProjectionMode = Literal["nullspace", "frontier"]


@dataclass
class StepReport:
    """What one projected step did, computed from the Gram matrix (cheap) and optionally
    measured on the parameters after the write (``realised_*``, ``measure=True``)."""

    raw_norm: float
    projected_norm: float
    #: τ of the raw update against the capability span (Def 3.4 applied to u).
    raw_tax_rate: float
    #: τ_i of the raw update against each direction, cos²(u, c_i).
    raw_task_tax_rates: list[float]
    #: |cos(c_i, δ)| predicted from the Gram matrix for the projected step.
    leak: list[float]
    #: ‖u − δ‖ / ‖u‖.
    fraction_removed: float
    #: ⟨δ, u⟩ / ‖u‖².
    safety_retained: float
    coefficients: list[float]
    #: |cos(c_i, θ_after − θ_old)| measured on the written parameters (None unless measured).
    realised_leak: list[float] | None = None


class UpdateProjector:
    """Applies the null-space or frontier projection to each realised optimizer displacement.

    Args:
        params: the trainable parameters, in a fixed order (fp32 or fp64: the write
            θ_old + δ must not round away the guarantee; pure bf16/fp16 is refused).
        mode: ``"nullspace"`` (δ = P_{C⊥}u, Thm 4.3 with δ_C = 0) or ``"frontier"``
            (δ maximises ⟨u, δ⟩ with ‖δ‖ ≤ ‖u‖ and ⟨ĉ_i, δ⟩ ≥ −ε_i‖u‖).
        tolerances: in frontier mode, one ε ≥ 0 (or inf) per direction, in the order of the
            directions passed to :meth:`set_directions`.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        mode: ProjectionMode = "nullspace",
        tolerances: Sequence[float] | None = None,
    ) -> None:
        if mode not in ("nullspace", "frontier"):
            raise ValueError(f"mode must be 'nullspace' or 'frontier', got {mode!r}")
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("params is empty: there are no trainable parameters to project")
        for i, p in enumerate(self.params):
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(
                    f"parameter {i} has dtype {p.dtype}: the projection is exact only on fp32/fp64 master "
                    "weights (θ_old + δ rounds away the guarantee in low precision). Load the model in "
                    "float32 and use bf16/fp16 autocast (`bf16=True` / `fp16=True`) instead."
                )
        self.mode: ProjectionMode = mode
        self.tolerances = None if tolerances is None else [float(t) for t in tolerances]
        self.directions: list[list[torch.Tensor]] = []
        self._direction_gram = torch.zeros(0, 0, dtype=torch.float64)
        self._snapshot: list[torch.Tensor] | None = None
        self._armed = False

    # ------------------------------------------------------------------ directions

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    def set_directions(self, directions: Sequence[Sequence[torch.Tensor]]) -> None:
        """Install capability directions: each is a list of tensors shaped like ``params``.

        The directions' own Gram block is computed once here and reused every step.
        """
        checked: list[list[torch.Tensor]] = []
        for j, direction in enumerate(directions):
            if len(direction) != len(self.params):
                raise ValueError(
                    f"direction {j} has {len(direction)} tensors for {len(self.params)} parameters"
                )
            parts = []
            for p, c in zip(self.params, direction, strict=True):
                if c.shape != p.shape:
                    raise ValueError(
                        f"direction {j} has a tensor of shape {tuple(c.shape)} for a parameter of {tuple(p.shape)}"
                    )
                parts.append(c.detach().to(device=p.device, dtype=p.dtype))
            checked.append(parts)
        if self.mode == "frontier" and (self.tolerances is None or len(self.tolerances) != len(checked)):
            got = None if self.tolerances is None else len(self.tolerances)
            raise ValueError(
                f"frontier mode needs one tolerance per direction: {len(checked)} directions, {got} tolerances"
            )
        self.directions = checked
        m = len(checked)
        gram = torch.zeros(m, m, dtype=torch.float64)
        for i in range(m):
            for j in range(i, m):
                gram[i, j] = gram[j, i] = _dot(checked[i], checked[j])
        self._direction_gram = gram

    def clear_directions(self) -> None:
        """Drop the current directions (their memory is freed once no one else holds them)."""
        self.directions = []
        self._direction_gram = torch.zeros(0, 0, dtype=torch.float64)

    # ------------------------------------------------------------------ step hooks

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot θ_old into a buffer that is allocated once and reused."""
        if not self.directions:
            self._armed = False
            return
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in self.params]
        else:
            for buf, p in zip(self._snapshot, self.params, strict=True):
                buf.copy_(p.detach())
        self._armed = True

    @torch.no_grad()
    def after_step(self, measure: bool = False) -> StepReport | None:
        """Replace θ_new by θ_old + δ, δ the projection of u = θ_new − θ_old. Returns a report."""
        if not self._armed or self._snapshot is None:
            return None
        self._armed = False
        m = self.num_directions
        row = self._inner_products_with_update()
        gram = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        gram[1:, 1:] = self._direction_gram
        gram[0, :] = row
        gram[1:, 0] = row[1:]
        if self.mode == "nullspace":
            coeffs = geometry.nullspace_coefficients(gram)
        else:
            assert self.tolerances is not None
            coeffs = geometry.solve_frontier_step(gram, self.tolerances)
        a = coeffs.tolist()
        report = _report(gram, coeffs)
        if a[0] == 1.0 and not any(a[1:]):
            # δ = u: leave θ_new untouched so an unconstrained step is bitwise the optimizer's own
            if measure:
                report.realised_leak = self.measure_leak()
            return report
        for k, (p, old) in enumerate(zip(self.params, self._snapshot, strict=True)):
            step = (p.detach() - old).mul_(a[0])
            for i, direction in enumerate(self.directions):
                if a[i + 1] != 0.0:
                    step.add_(direction[k], alpha=a[i + 1])
            p.detach().copy_(old + step)
        if measure:
            report.realised_leak = self.measure_leak()
        return report

    @torch.no_grad()
    def _inner_products_with_update(self) -> torch.Tensor:
        """[⟨d, d⟩, ⟨d, c_1⟩, …, ⟨d, c_m⟩] for d = θ − θ_old, on the CPU in float64.

        Per-parameter dot products run in the parameters' precision on their device and are
        accumulated across parameters in float64 there; the host sees one transfer, not one
        synchronisation per dot product.
        """
        assert self._snapshot is not None
        m = self.num_directions
        acc = torch.zeros(m + 1, dtype=torch.float64, device=self.params[0].device)
        for k, (p, old) in enumerate(zip(self.params, self._snapshot, strict=True)):
            d = (p.detach() - old).reshape(-1)
            acc[0] += torch.dot(d, d).to(acc.device)  # .to: parameters may sit on several devices
            for i, direction in enumerate(self.directions):
                acc[i + 1] += torch.dot(d, direction[k].reshape(-1)).to(acc.device)
        return acc.cpu()

    @torch.no_grad()
    def measure_leak(self) -> list[float]:
        """|cos(c_i, θ − θ_old)| measured on the current parameters against the last snapshot."""
        if self._snapshot is None:
            raise RuntimeError("measure_leak needs a snapshot: call before_step first")
        row = self._inner_products_with_update()
        norm2 = float(row[0])
        out = []
        for i in range(self.num_directions):
            denom = math.sqrt(norm2 * float(self._direction_gram[i, i]))
            out.append(abs(float(row[i + 1])) / denom if denom > 0 else 0.0)
        return out

    def extra_memory_bytes(self) -> int:
        """Bytes held by the projector: the snapshot plus the directions."""
        per = sum(p.numel() * p.element_size() for p in self.params)
        return per * (self.num_directions + (1 if self._snapshot is not None else 0))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"directions": [[c.cpu() for c in d] for d in self.directions]}

    def load_state_dict(self, state: dict) -> None:
        self.set_directions(state["directions"])


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    """Σ over parameters of per-parameter dot products, accumulated in float64 on the device."""
    acc = torch.zeros((), dtype=torch.float64, device=xs[0].device)
    for x, y in zip(xs, ys, strict=True):
        acc += torch.dot(x.reshape(-1), y.reshape(-1)).to(acc.device)
    return float(acc)


def _report(gram: torch.Tensor, coeffs: torch.Tensor) -> StepReport:
    m = gram.shape[0] - 1
    Ga = gram @ coeffs
    raw2 = float(gram[0, 0])
    proj2 = max(float(coeffs @ Ga), 0.0)
    diff = coeffs.clone()
    diff[0] -= 1.0
    removed2 = max(float(diff @ gram @ diff), 0.0)
    leak, task_taus = [], []
    for i in range(1, m + 1):
        cn2 = float(gram[i, i])
        leak.append(abs(float(Ga[i])) / math.sqrt(proj2 * cn2) if proj2 > 0 and cn2 > 0 else 0.0)
        task_taus.append(float(gram[0, i]) ** 2 / (raw2 * cn2) if raw2 > 0 and cn2 > 0 else 0.0)
    return StepReport(
        raw_norm=math.sqrt(raw2),
        projected_norm=math.sqrt(proj2),
        raw_tax_rate=geometry.tax_rate_from_gram(gram),
        raw_task_tax_rates=task_taus,
        leak=leak,
        fraction_removed=math.sqrt(removed2 / raw2) if raw2 > 0 else 0.0,
        safety_retained=float(Ga[0]) / raw2 if raw2 > 0 else 0.0,
        coefficients=coeffs.tolist(),
    )
