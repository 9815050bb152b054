"""Projection of the realised optimizer displacement onto the capability null space or frontier.

Projecting the *gradient* is not enough: AdamW's moments, per-coordinate scaling and decoupled
weight decay put the blocked component back (field notes §2). :class:`UpdateProjector` acts on
what the optimizer really did instead. Around each real optimizer step it

1. snapshots θ_old (``before_step``),
2. lets the optimizer run, then reads the raw displacement u = θ_new − θ_old,
3. forms the Gram matrix of [u, c_1, …, c_m] by per-parameter dot products (nothing is
   concatenated: extra memory is one snapshot plus the m directions, the (m+1)× floor),
4. gets coefficients from the Gram matrix alone: the null-space ones are
   ``geometry.nullspace_coefficients``'s formula with the directions' generalised inverse
   cached per refresh; frontier ones come from ``geometry.solve_frontier_step``, and
5. writes θ = θ_old + a_0 u + Σ a_i c_i in place (``after_step``).

Cost: per step, a handful of ``torch._foreach_*`` calls per *bucket* of parameters (one
device and dtype, at most :data:`BUCKET_NUMEL` elements) plus one reduction per parameter and
direction for the Gram row, instead of a Python loop issuing several small ops per parameter.
u is materialised one bucket at a time, so the projection's transient memory is bounded by a
bucket (or the largest parameter), not by the model.

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

#: Most elements per bucket of parameters processed by one set of ``torch._foreach_*`` calls:
#: bounds each transient (u = θ − θ_old; on the CPU also the products summed into ⟨u, c_i⟩)
#: to 2**26 elements, 256 MiB in fp32. A larger parameter gets a bucket of its own.
BUCKET_NUMEL = 2**26


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
        self._direction_pinv = torch.zeros(0, 0, dtype=torch.float64)
        #: θ_old, one buffer per parameter in ``params`` order (allocated at the first step).
        self._snapshot: list[torch.Tensor] | None = None
        #: Parameter indices grouped for foreach calls (see :func:`_buckets`); fixed when the
        #: directions are installed, which is also when they are moved to the parameters' devices.
        self._buckets: list[list[int]] = _buckets(self.params)
        self._armed = False

    # ------------------------------------------------------------------ directions

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    def set_directions(self, directions: Sequence[Sequence[torch.Tensor]]) -> None:
        """Install capability directions: each is a list of tensors shaped like ``params``.

        Tensors already on the parameter's device and in its dtype are held as they are (no
        copy). The directions' own Gram block and its generalised inverse (geometry's rank
        rule) are computed once here and reused every step.
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
        buckets = _buckets(self.params)
        if buckets != self._buckets:  # a parameter changed device or dtype since the last step
            self._buckets, self._snapshot = buckets, None
        self.directions = checked
        m = len(checked)
        gram = torch.zeros(m, m, dtype=torch.float64)
        for i in range(m):
            row = self._dots(checked[i], checked[i + 1 :])  # [⟨c_i, c_i⟩, ⟨c_i, c_j⟩ for j > i]
            gram[i, i:] = row
            gram[i:, i] = row
        self._direction_gram = gram
        self._direction_pinv = geometry.pinv_psd(gram) if m else gram.clone()

    def clear_directions(self) -> None:
        """Drop the current directions (their memory is freed once no one else holds them)."""
        self.directions = []
        self._direction_gram = torch.zeros(0, 0, dtype=torch.float64)
        self._direction_pinv = torch.zeros(0, 0, dtype=torch.float64)

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
            for idx in self._buckets:
                torch._foreach_copy_([self._snapshot[k] for k in idx], [self.params[k] for k in idx])
        self._armed = True

    @torch.no_grad()
    def after_step(self, measure: bool = False) -> StepReport | None:
        """Replace θ_new by θ_old + δ, δ the projection of u = θ_new − θ_old. Returns a report."""
        if not self._armed or self._snapshot is None:
            return None
        self._armed = False
        row = self._inner_products_with_update()
        u_row = row.tolist()
        if not all(map(math.isfinite, u_row)):
            raise ValueError("the optimizer's update u = θ_new − θ_old is not finite (NaN or inf)")
        gram = [u_row] + [[u_row[i + 1], *c_row] for i, c_row in enumerate(self._direction_gram.tolist())]
        # w = (G_CC)⁺ G_Cu: the projection of u onto span(c) is Σ w_i c_i (G_CC⁺ cached per refresh)
        w = self._direction_pinv @ row[1:]
        if self.mode == "nullspace":
            a = [1.0, *(-w).tolist()]  # geometry.nullspace_coefficients(gram), bit for bit
        else:
            assert self.tolerances is not None
            gram_t = torch.tensor(gram, dtype=torch.float64)
            a = geometry.solve_frontier_step(gram_t, self.tolerances).tolist()
        report = _report(gram, a, raw_tax_rate=_tax_rate(u_row, w))
        if a[0] == 1.0 and not any(a[1:]):
            # δ = u: leave θ_new untouched so an unconstrained step is bitwise the optimizer's own
            if measure:
                report.realised_leak = self.measure_leak()
            return report
        self._write(a)
        if measure:
            report.realised_leak = self.measure_leak()
        return report

    @torch.no_grad()
    def _write(self, a: list[float]) -> None:
        """θ = θ_old + a_0 u + Σ a_i c_i, written as θ_new + [(a_0 − 1) u + Σ a_i c_i], bucket by
        bucket with foreach ops.

        The correction in brackets is formed in a temporary and added once, so each coordinate
        of θ is rounded once, as in θ_old + δ. In null-space mode a_0 = 1 and u is not re-read.
        """
        assert self._snapshot is not None
        for idx in self._buckets:
            params = [self.params[k] for k in idx]
            correction: list[torch.Tensor] | None = None
            if a[0] != 1.0:
                correction = torch._foreach_sub(params, [self._snapshot[k] for k in idx])
                torch._foreach_mul_(correction, a[0] - 1.0)
            for coeff, direction in zip(a[1:], self.directions, strict=True):
                if coeff == 0.0:
                    continue
                part = [direction[k] for k in idx]
                if correction is None:
                    correction = torch._foreach_mul(part, coeff)
                else:
                    torch._foreach_add_(correction, part, alpha=coeff)
            if correction is not None:
                torch._foreach_add_(params, correction)

    @torch.no_grad()
    def _inner_products_with_update(self) -> torch.Tensor:
        """[⟨d, d⟩, ⟨d, c_1⟩, …, ⟨d, c_m⟩] for d = θ − θ_old, on the CPU in float64."""
        assert self._snapshot is not None
        return self._dots(None, self.directions)

    @torch.no_grad()
    def _dots(self, x: Sequence[torch.Tensor] | None, ys: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """[⟨x, x⟩, ⟨x, y_1⟩, …] over all parameters, float64 on the CPU; x = None means
        the update d = θ − θ_old (formed one bucket at a time, then dropped).

        Per-parameter values (⟨x, x⟩ = ‖x‖² through ``torch._foreach_norm``, ⟨x, y⟩ through
        :func:`_paired_dots`) are computed in the parameters' precision on their device, then
        cast to float64 and summed there: the sum across parameters is in float64 and the host
        sees one transfer per device, not one synchronisation per dot product.
        """
        per_device: dict[torch.device, torch.Tensor] = {}
        for idx in self._buckets:
            if x is None:
                assert self._snapshot is not None
                xs = torch._foreach_sub([self.params[k] for k in idx], [self._snapshot[k] for k in idx])
            else:
                xs = [x[k] for k in idx]
            values = list(torch._foreach_norm(xs))
            for y in ys:
                values += _paired_dots(xs, [y[k] for k in idx])
            table = torch.stack(values).double().view(1 + len(ys), len(idx))
            table[0].square_()
            bucket = table.sum(dim=1)
            acc = per_device.get(bucket.device)
            per_device[bucket.device] = bucket if acc is None else acc + bucket
        return torch.stack([acc.cpu() for acc in per_device.values()]).sum(dim=0)

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


def _paired_dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """[⟨x_k, y_k⟩ for each k] as 0-d tensors in the tensors' precision, on their (one) device.

    On accelerators, one ``torch.dot`` per pair: a single kernel, no temporary. On the CPU,
    ``torch.dot`` calls the BLAS (MKL), which runs its own threads and stalls on a loaded
    host (measured on 2 busy cores, 2 threads: mean 10–40× its median); there the products
    come from one ``torch._foreach_mul`` and are summed by native kernels, which stay on one
    thread for parameters below ATen's grain size.
    """
    if xs and xs[0].device.type == "cpu":
        return [prod.sum() for prod in torch._foreach_mul(xs, ys)]
    return [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys, strict=True)]


def _buckets(params: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped for foreach calls: one device and dtype per bucket, at most
    :data:`BUCKET_NUMEL` elements each (a larger parameter alone), in parameter order."""
    open_buckets: dict[tuple[torch.device, torch.dtype], tuple[list[int], int]] = {}
    done: list[list[int]] = []
    for k, p in enumerate(params):
        key = (p.device, p.dtype)
        idx, numel = open_buckets.get(key, ([], 0))
        if idx and numel + p.numel() > BUCKET_NUMEL:
            done.append(idx)
            idx, numel = [], 0
        idx.append(k)
        open_buckets[key] = (idx, numel + p.numel())
    buckets = done + [idx for idx, _ in open_buckets.values()]
    return sorted(buckets, key=lambda idx: idx[0])


def _tax_rate(u_row: list[float], w: torch.Tensor) -> float:
    """``geometry.tax_rate_from_gram`` of [u, c_1, …, c_m], τ = G_uC (G_CC)⁺ G_Cu / ‖u‖², given
    w = (G_CC)⁺ G_Cu. 0 for a zero u or when every direction is zero (then w = 0)."""
    if u_row[0] <= 0 or len(u_row) < 2:
        return 0.0
    return min(max(_dot(u_row[1:], w.tolist()) / u_row[0], 0.0), 1.0)


def _dot(x: Sequence[float], y: Sequence[float]) -> float:
    return sum(xi * yi for xi, yi in zip(x, y, strict=True))


def _report(gram: list[list[float]], a: list[float], raw_tax_rate: float) -> StepReport:
    """The step's diagnostics from the (m+1)×(m+1) Gram matrix of [u, c_1, …, c_m] and the
    coefficients a of δ = a_0 u + Σ a_i c_i, in float64 Python arithmetic (a few dozen
    multiplications: cheaper than tensor ops at this size)."""
    m = len(a) - 1
    Ga = [_dot(g_row, a) for g_row in gram]
    raw2 = gram[0][0]
    proj2 = max(_dot(a, Ga), 0.0)
    diff = [a[0] - 1.0, *a[1:]]  # δ − u
    removed2 = max(_dot(diff, [_dot(g_row, diff) for g_row in gram]), 0.0)
    leak, task_taus = [], []
    for i in range(1, m + 1):
        cn2 = gram[i][i]
        leak.append(abs(Ga[i]) / math.sqrt(proj2 * cn2) if proj2 > 0 and cn2 > 0 else 0.0)
        task_taus.append(gram[0][i] ** 2 / (raw2 * cn2) if raw2 > 0 and cn2 > 0 else 0.0)
    return StepReport(
        raw_norm=math.sqrt(raw2),
        projected_norm=math.sqrt(proj2),
        raw_tax_rate=raw_tax_rate,
        raw_task_tax_rates=task_taus,
        leak=leak,
        fraction_removed=math.sqrt(removed2 / raw2) if raw2 > 0 else 0.0,
        safety_retained=Ga[0] / raw2 if raw2 > 0 else 0.0,
        coefficients=list(a),
    )
