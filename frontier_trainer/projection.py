"""Projection of the realised optimizer displacement onto the capability null space or frontier.

Projecting the *gradient* is not enough: AdamW's moments, per-coordinate scaling and decoupled
weight decay put the blocked component back (field notes §2). :class:`UpdateProjector` acts on
what the optimizer really did instead. Around each real optimizer step it

1. snapshots θ_old (``before_step``),
2. lets the optimizer run, then reads the raw displacement u = θ_new − θ_old,
3. forms the Gram matrix of [u, c_1, …, c_m] by dot products over the parameters, with every
   product and sum in float64 (nothing is concatenated: extra memory is one snapshot plus the
   m directions, the (m+1)× floor, plus two small float64 chunk buffers),
4. gets coefficients from the Gram matrix alone, through the step rule registered under
   ``mode`` in :mod:`frontier_trainer.rules` (null space: ``geometry.nullspace_coefficients``'s
   formula with the directions' generalised inverse cached per refresh; frontier:
   ``geometry.solve_frontier_step``), and
5. writes θ = θ_old + a_0 u + Σ a_i c_i in place (``after_step``), formed in float64 and
   rounded to the parameter's dtype once.

Precision (issue 12 §3): a float32 accumulation (``torch._foreach_norm`` on the CPU) has a
relative error of 1.3e-3 in ‖x‖² at 16M elements, which left a realised leak of 1.7e-3 on a
4096×4096 parameter; forming the correction in float32 loses the coefficients' low bits, a
systematic 4e-8. Both are computed in float64 chunks of :data:`CHUNK_NUMEL` elements now
(leak ~2e-10 on the same parameter; tests/test_projection.py).

Cost: per step, a few ops per *chunk* (:data:`CHUNK_NUMEL` elements, in cache) per vector,
instead of a Python loop issuing several small ops per parameter; see
benchmarks/solver_benchmark.py for the measured cost against the float32 accumulation.

Everything is pure torch on a list of parameters: no Trainer, so it can be tested and reused
with any optimizer loop. Under DDP every rank holds identical parameters, updates and
directions, so every rank computes the identical Gram matrix and coefficients. Under FSDP2
(DTensor parameters) use :class:`frontier_trainer.distributed.ShardedUpdateProjector`, which
runs this class on the local shards and all-reduces each Gram vector; this class refuses
DTensors rather than compute per-shard inner products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from frontier_trainer import geometry, rules

#: A step rule's name in :mod:`frontier_trainer.rules` ("nullspace", "frontier" or a registered one).
ProjectionMode = str

#: Most elements per bucket of parameters processed by one set of ``torch._foreach_*`` calls:
#: bounds each transient (u = θ − θ_old; on the CPU also the products summed into ⟨u, c_i⟩)
#: to 2**26 elements, 256 MiB in fp32. A larger parameter gets a bucket of its own.
BUCKET_NUMEL = 2**26

#: Elements per float64 chunk of the Gram computation on the CPU (two (1 + m) × chunk float64
#: buffers, 1 MiB per row pair): small enough to stay in cache, large enough that Python
#: overhead stays below the memory traffic (measured in benchmarks/solver_benchmark.py).
CHUNK_NUMEL = 2**16
#: The same on accelerators (each op is a kernel launch, so fewer, larger chunks): 2 MiB per
#: float64 row, 2 × (1 + m) rows. Not yet measured on a GPU.
ACCELERATOR_CHUNK_NUMEL = 2**18


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
        mode: the name of a step rule in :mod:`frontier_trainer.rules`: ``"nullspace"``
            (δ = P_{C⊥}u, Thm 4.3 with δ_C = 0), ``"frontier"`` (δ maximises ⟨u, δ⟩ with
            ‖δ‖ ≤ ‖u‖ and ⟨ĉ_i, δ⟩ ≥ −ε_i‖u‖, Thm 4.1/4.3) or any rule registered with
            :func:`frontier_trainer.rules.register_step_rule`.
        tolerances: for a rule that needs them (frontier), one ε ≥ 0 (or inf) per direction,
            in the order of the directions passed to :meth:`set_directions`.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        mode: ProjectionMode = "nullspace",
        tolerances: Sequence[float] | None = None,
    ) -> None:
        self._rule = rules.get_step_rule(mode)  # the error lists the registered rules
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("params is empty: there are no trainable parameters to project")
        if any(isinstance(p, DTensor) for p in self.params):
            raise ValueError(
                "the parameters are FSDP2 DTensors (sharded): UpdateProjector works on whole tensors and would "
                "compute per-shard inner products. Use frontier_trainer.distributed.ShardedUpdateProjector "
                "(or make_projector), which all-reduces them."
            )
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
        #: One label per direction for error messages (``set_directions(names=...)``).
        self.direction_names: list[str] = []
        #: Scratch the step rule keeps between steps (warm starts); emptied with new directions.
        self._rule_state: dict = {}
        #: True between an after_step that projected an update and the next before_step:
        #: θ − θ_old is then the last applied update (see :meth:`update_leak`).
        self._applied = False
        self._direction_gram = torch.zeros(0, 0, dtype=torch.float64)
        self._direction_pinv = torch.zeros(0, 0, dtype=torch.float64)
        #: θ_old, one buffer per parameter in ``params`` order (allocated at the first step).
        self._snapshot: list[torch.Tensor] | None = None
        #: Parameter indices grouped for foreach calls (see :func:`_buckets`); fixed when the
        #: directions are installed, which is also when they are moved to the parameters' devices.
        self._buckets: list[list[int]] = []
        #: Per bucket, the chunks of the float64 Gram computation (see :func:`_chunk_plan`).
        self._chunks: list[list[list[tuple[int, int, int, int]]]] = []
        #: Float64 scratch rows per device for :meth:`_dots`, allocated once.
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._set_buckets(_buckets(self.params))
        self._armed = False

    # ------------------------------------------------------------------ directions

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    def set_directions(
        self, directions: Sequence[Sequence[torch.Tensor]], *, names: Sequence[str] | None = None
    ) -> None:
        """Install capability directions: each is a list of tensors shaped like ``params``.

        Tensors already on the parameter's device and in its dtype are held as they are (no
        copy). The directions' own Gram block and its generalised inverse (geometry's rank
        rule) are computed once here and reused every step.

        Args:
            directions: the capability directions c_1 … c_m.
            names: optional label per direction for error messages, e.g.
                ``"task 'code' direction 0"``; defaults to ``"direction j"``.

        Raises:
            ValueError: before anything is installed (the previous directions stay), if a
                direction has the wrong number or shapes of tensors, if it contains NaN or inf
                (the message names it and says what to check), or if the mode needs one
                tolerance per direction and the counts differ.
        """
        labels = self._labels(len(directions), names)
        checked = self._check_directions(directions, labels)
        if self._rule.needs_tolerances and (self.tolerances is None or len(self.tolerances) != len(checked)):
            got = None if self.tolerances is None else len(self.tolerances)
            raise ValueError(
                f"{self.mode} mode needs one tolerance per direction: {len(checked)} directions, {got} tolerances"
            )
        buckets = _buckets(self.params)
        if buckets != self._buckets:  # a parameter changed device or dtype since the last step
            self._set_buckets(buckets)
            self._snapshot = None
            self._applied = False
        m = len(checked)
        gram = torch.zeros(m, m, dtype=torch.float64)
        for i in range(m):
            row = self._dots(checked[i], checked[i + 1 :])  # [⟨c_i, c_i⟩, ⟨c_i, c_j⟩ for j > i]
            gram[i, i:] = row
            gram[i:, i] = row
        for i in range(m):
            if not math.isfinite(float(gram[i, i])):
                raise ValueError(
                    f"{labels[i]} contains NaN or inf, so it cannot be projected against. Check the "
                    "capability rows it was computed from (an empty or fully masked batch, a metric "
                    "that returns NaN or inf) and the loss scaling (an fp16 overflow gives inf "
                    "gradients). Nothing was installed; the previous directions are kept."
                )
        self.directions = checked
        self.direction_names = labels
        self._direction_gram = gram
        self._direction_pinv = geometry.pinv_psd(gram) if m else gram.clone()
        self._rule_state = {}

    def _labels(self, count: int, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return [f"direction {j}" for j in range(count)]
        labels = [str(n) for n in names]
        if len(labels) != count:
            raise ValueError(f"names has {len(labels)} entries for {count} directions: give one name per direction")
        return labels

    def _check_directions(
        self, directions: Sequence[Sequence[torch.Tensor]], labels: Sequence[str]
    ) -> list[list[torch.Tensor]]:
        """Each direction's tensors, checked against ``params`` and moved to their device and dtype."""
        checked: list[list[torch.Tensor]] = []
        for label, direction in zip(labels, directions, strict=True):
            if len(direction) != len(self.params):
                raise ValueError(f"{label} has {len(direction)} tensors for {len(self.params)} parameters")
            parts = []
            for p, c in zip(self.params, direction, strict=True):
                if c.shape != p.shape:
                    raise ValueError(
                        f"{label} has a tensor of shape {tuple(c.shape)} for a parameter of {tuple(p.shape)}"
                    )
                parts.append(c.detach().to(device=p.device, dtype=p.dtype))
            checked.append(parts)
        return checked

    def _set_buckets(self, buckets: list[list[int]]) -> None:
        self._buckets = buckets
        self._chunks = [
            _chunk_plan(self.params, idx, _chunk_numel(self.params[idx[0]].device)) for idx in buckets
        ]

    def clear_directions(self) -> None:
        """Drop the current directions (their memory is freed once no one else holds them)."""
        self.directions = []
        self._direction_gram = torch.zeros(0, 0, dtype=torch.float64)
        self._direction_pinv = torch.zeros(0, 0, dtype=torch.float64)

    # ------------------------------------------------------------------ step hooks

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot θ_old into a buffer that is allocated once and reused."""
        self._applied = False
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
        context = rules.RuleContext(
            tolerances=self.tolerances, direction_pinv=self._direction_pinv, state=self._rule_state
        )
        a = self._rule(torch.tensor(gram, dtype=torch.float64), context)
        report = _report(gram, a, raw_tax_rate=_tax_rate(u_row, w))
        self._applied = True
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
        """θ = θ_old + a_0 u + Σ a_i c_i, formed in float64 chunk by chunk and rounded once.

        Each chunk of θ_new is cast into a float64 row, the correction (a_0 − 1) u + Σ a_i c_i
        is added there with the float64 coefficients, and the row is copied back: every
        coordinate of θ is rounded once, as in θ_old + δ. Forming the correction in float32
        instead loses what a coefficient contributes below half a float32 unit of the
        correction (a_i is rounded to float32 by the kernel, and adding its remainder to a
        float32 sum rounds straight back): a systematic component along c_i, measured as a
        4e-8 leak on a 16M-element parameter. In null-space mode a_0 = 1 and u is not read.
        """
        assert self._snapshot is not None
        moves = [(coeff, direction) for coeff, direction in zip(a[1:], self.directions, strict=True) if coeff]
        for b, idx in enumerate(self._buckets):
            device = self.params[idx[0]].device
            rows, _ = self._chunk_buffers(device, 2)
            pflat = [self.params[k].detach().reshape(-1) for k in idx]  # a copy if not contiguous
            sflat = [self._snapshot[k].reshape(-1) for k in idx]
            dflats = [(coeff, [direction[k].reshape(-1) for k in idx]) for coeff, direction in moves]
            for chunk in self._chunks[b]:
                n = chunk[-1][3]
                segments = [(pos, start, stop, end - (stop - start), end) for pos, start, stop, end in chunk]
                torch._foreach_copy_(
                    [rows[0, off:end] for _, _, _, off, end in segments],
                    [pflat[pos][start:stop] for pos, start, stop, _, _ in segments],
                )
                if a[0] != 1.0:
                    torch._foreach_copy_(
                        [rows[1, off:end] for _, _, _, off, end in segments],
                        [sflat[pos][start:stop] for pos, start, stop, _, _ in segments],
                    )
                    torch.sub(rows[0, :n], rows[1, :n], out=rows[1, :n])  # u, exact in float64
                    rows[0, :n].add_(rows[1, :n], alpha=a[0] - 1.0)
                for coeff, dflat in dflats:
                    torch._foreach_copy_(
                        [rows[1, off:end] for _, _, _, off, end in segments],
                        [dflat[pos][start:stop] for pos, start, stop, _, _ in segments],
                    )
                    rows[0, :n].add_(rows[1, :n], alpha=coeff)
                torch._foreach_copy_(
                    [pflat[pos][start:stop] for pos, start, stop, _, _ in segments],
                    [rows[0, off:end] for _, _, _, off, end in segments],
                )
            for pos, k in enumerate(idx):
                p = self.params[k]
                if pflat[pos].data_ptr() != p.data_ptr():  # non-contiguous: written to a copy
                    p.detach().copy_(pflat[pos].view(p.shape))

    @torch.no_grad()
    def _inner_products_with_update(self) -> torch.Tensor:
        """[⟨d, d⟩, ⟨d, c_1⟩, …, ⟨d, c_m⟩] for d = θ − θ_old, on the CPU in float64."""
        assert self._snapshot is not None
        return self._dots(None, self.directions)

    @torch.no_grad()
    def _dots(self, x: Sequence[torch.Tensor] | None, ys: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """[⟨x, x⟩, ⟨x, y_1⟩, …] over all parameters, float64 on the CPU; x = None means
        the update d = θ − θ_old.

        Every product and every sum is in float64 (issue 12 §3): each bucket is walked in
        chunks of :data:`CHUNK_NUMEL` elements that are cast into preallocated float64 rows
        (x, or θ then minus θ_old, in row 0; y_j in row j), multiplied by row 0 and summed
        along the chunk. A float32 product is exact in float64, so the only rounding is the
        float64 accumulation (relative error ~1e-13 at 16M elements, where the float32
        accumulation of ``torch._foreach_norm`` on the CPU is off by 1.3e-3). The transient
        memory is the (1 + len(ys)) × chunk buffer, not a copy of the model, and the host
        sees one transfer per device.
        """
        n_rows = 1 + len(ys)
        per_device: dict[torch.device, torch.Tensor] = {}
        for b, idx in enumerate(self._buckets):
            device = self.params[idx[0]].device
            rows, prods = self._chunk_buffers(device, n_rows)
            acc = per_device.get(device)
            if acc is None:
                acc = per_device[device] = torch.zeros(n_rows, dtype=torch.float64, device=device)
            if x is None:
                assert self._snapshot is not None
                xflat = [self.params[k].detach().reshape(-1) for k in idx]
                sflat = [self._snapshot[k].reshape(-1) for k in idx]
            else:
                xflat = [x[k].detach().reshape(-1) for k in idx]
            yflats = [[y[k].detach().reshape(-1) for k in idx] for y in ys]
            for chunk in self._chunks[b]:
                n = chunk[-1][3]
                dst: list[torch.Tensor] = []
                src: list[torch.Tensor] = []
                for pos, start, stop, end in chunk:
                    off = end - (stop - start)
                    dst.append(rows[0, off:end])
                    src.append(xflat[pos][start:stop])
                    for j, yflat in enumerate(yflats, start=1):
                        dst.append(rows[j, off:end])
                        src.append(yflat[pos][start:stop])
                torch._foreach_copy_(dst, src)
                if x is None:
                    for pos, start, stop, end in chunk:
                        rows[0, end - (stop - start) : end].sub_(sflat[pos][start:stop])
                view = rows[:, :n]
                torch.mul(view, view[0:1], out=prods[:, :n])
                acc.add_(prods[:, :n].sum(dim=1))
        return torch.stack([acc.cpu() for acc in per_device.values()]).sum(dim=0)

    def _chunk_buffers(self, device: torch.device, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 (rows, products) buffers of ``n_rows`` × chunk on ``device``, reused across calls."""
        held = self._buffers.get(device)
        if held is None or held[0].shape[0] < n_rows:
            size = _chunk_numel(device)
            held = (
                torch.empty(n_rows, size, dtype=torch.float64, device=device),
                torch.empty(n_rows, size, dtype=torch.float64, device=device),
            )
            self._buffers[device] = held
        return held[0][:n_rows], held[1][:n_rows]

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

    @torch.no_grad()
    def update_leak(
        self, directions: Sequence[Sequence[torch.Tensor]], *, names: Sequence[str] | None = None
    ) -> list[float]:
        """Generalisation leak (issue 15 §1): |cos(Δ, d_j)| for the last applied update
        Δ = θ − θ_old and each given direction d_j, in float64.

        The realised leak (:meth:`measure_leak`) is measured against the directions that
        projected Δ, so it is ~0 by construction. Measured against *fresh* directions, from
        capability rows that were not used to project Δ, it says how much of the protection
        carries over to the task rather than to one batch. The trainer calls this at a refresh,
        after computing the new directions and before installing them.

        Valid between :meth:`after_step` (which applied Δ) and the next :meth:`before_step`;
        a zero Δ or a zero direction gives 0.

        Raises:
            RuntimeError: if there is no applied update to measure.
            ValueError: if a direction has the wrong shapes or contains NaN or inf (named as
                in :meth:`set_directions`).
        """
        if not self._applied or self._snapshot is None:
            raise RuntimeError(
                "update_leak measures the last applied update: call it after after_step() and "
                "before the next before_step()"
            )
        labels = self._labels(len(directions), names)
        checked = self._check_directions(directions, labels)
        if not checked:
            return []
        row = self._dots(None, checked).tolist()  # [‖Δ‖², ⟨Δ, d_1⟩, …]
        out = []
        for label, direction, dot in zip(labels, checked, row[1:], strict=True):
            norm2 = float(self._dots(direction, [])[0])
            if not math.isfinite(norm2):
                raise ValueError(
                    f"{label} contains NaN or inf: check the capability rows it was computed from and "
                    "the loss scaling (an fp16 overflow gives inf gradients)"
                )
            denom = math.sqrt(max(row[0], 0.0) * norm2)
            out.append(abs(dot) / denom if denom > 0 else 0.0)
        return out

    def extra_memory_bytes(self) -> int:
        """Bytes held by the projector: the snapshot plus the directions.

        Not counted: the float64 scratch of the Gram computation and the write, 2 × (1 + m)
        rows of :data:`CHUNK_NUMEL` elements (1 MiB per direction on the CPU), see
        :meth:`scratch_bytes`."""
        per = sum(p.numel() * p.element_size() for p in self.params)
        return per * (self.num_directions + (1 if self._snapshot is not None else 0))

    def scratch_bytes(self) -> int:
        """Bytes of float64 chunk buffers currently allocated (bounded, independent of model size)."""
        return sum(t.numel() * t.element_size() for pair in self._buffers.values() for t in pair)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"directions": [[c.cpu() for c in d] for d in self.directions], "names": list(self.direction_names)}

    def load_state_dict(self, state: dict) -> None:
        self.set_directions(state["directions"], names=state.get("names"))


def _chunk_numel(device: torch.device) -> int:
    """Elements per float64 chunk of :meth:`UpdateProjector._dots` on ``device``: small on the
    CPU (the rows stay in cache and Python overhead is ~5 ops per chunk), larger on
    accelerators, where each op is a kernel launch."""
    return CHUNK_NUMEL if device.type == "cpu" else ACCELERATOR_CHUNK_NUMEL


def _chunk_plan(params: Sequence[torch.Tensor], idx: list[int], size: int) -> list[list[tuple[int, int, int, int]]]:
    """Split the flattened parameters ``idx`` into chunks of at most ``size`` elements.

    Each chunk is a list of segments (pos, start, stop, end): elements [start, stop) of the
    parameter ``idx[pos]`` go to [end − (stop − start), end) of the chunk buffer. Small
    parameters share a chunk; a large one spans several.
    """
    chunks: list[list[tuple[int, int, int, int]]] = []
    current: list[tuple[int, int, int, int]] = []
    fill = 0
    for pos, k in enumerate(idx):
        numel = params[k].numel()
        start = 0
        while start < numel:
            take = min(numel - start, size - fill)
            fill += take
            current.append((pos, start, start + take, fill))
            start += take
            if fill == size:
                chunks.append(current)
                current, fill = [], 0
    if current:
        chunks.append(current)
    return chunks


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
