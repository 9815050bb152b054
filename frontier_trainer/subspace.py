"""Capability subspaces that represent the task, not one small batch (issue 15 §2).

The batch estimator (:func:`frontier_trainer.directions.capability_gradients` on one batch per
direction) protects the gradient of *that batch*: an update orthogonal to it still moves the metric
of other rows of the same task (the generalisation leak, logged as
``frontier/generalisation_leak/<task>``). This module estimates, per task, the top-``k`` subspace
of the second moment of *many* micro-batch gradients

    S_i = E_b[ g_b g_bᵀ ],   g_b = ∇θ f_i(batch b)            (f_i as in eq. for c_i, §4)

with a streaming frequent-directions (FD) sketch [Liberty 2013; Ghashami et al. 2016] held as
``k + ℓ`` gradient-shaped tensors, so the null-space step (Thm 4.3) is orthogonal to the directions
along which the task's gradients actually vary, not to one sample of them. ``k`` is
``capability_rank`` (directions kept per task), ``ℓ`` the sketch's oversampling.

FD guarantee (Ghashami et al., Thm 1.1, applied to the weighted rows √w_b g_b): with ``m = k + ℓ``
rows and a shrink by the smallest (``m``-th) eigenvalue whenever the sketch is full,
``0 ⪯ AᵀA − BᵀB`` and ``‖AᵀA − BᵀB‖₂ ≤ ‖A − A_k‖_F² / ℓ`` — the error is the tail energy beyond
rank ``k`` shared over the ``ℓ`` spare rows.

Memory (documented, tested in tests/test_subspace.py): the sketch shrinks as soon as it holds
``k + ℓ`` rows, so while the next gradient is computed it holds at most ``k + ℓ − 1`` rows, plus
one running sum of the gradients (used only to orient each direction so that it improves the
metric): the peak is ``(k + ℓ + 1)×`` the trainable-parameter bytes, counting the incoming
gradient, against ``(k + 1)×`` for the batch estimator; with the default ``ℓ = 1`` it is
``(k + 2)×``, one parameter-sized tensor more than the batch estimator. Every operation
works per parameter tensor (a Gram matrix of ``m × m`` float64 and a rotation applied to one
parameter's ``m`` rows at a time, in chunks), nothing is concatenated over the model.

EMA across refreshes (``capability_ema``): the previous directions ``D`` (which satisfy
``DᵀD ≈ S_old`` restricted to its top ``k``) seed the next sketch with weight ``ema`` and the window's
gradients enter with weight ``(1 − ema) / n``, so the sketch estimates ``ema·S_old + (1−ema)·S_window``.

Under DDP (``torch.distributed`` initialised, world size N > 1) each rank draws its *own* rows for
every micro-batch (the rank-th of N consecutive batches of the shared, seeded sampler, so the data
position stays identical on every rank and the rows are disjoint), the micro-batch gradients are
averaged with ``all_reduce`` (N× the data per sketch row), and the final directions are broadcast
from rank 0, so every rank holds byte-identical directions whatever the kernels do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import distributed as dist
from torch import nn

from frontier_trainer.arguments import CAPABILITY_ESTIMATORS
from frontier_trainer.directions import CapabilitySampler, MetricFn, capability_gradients, completion_metric

logger = logging.getLogger(__name__)

ESTIMATORS = CAPABILITY_ESTIMATORS
"""``capability_estimator`` choices: one batch gradient per direction, or the FD sketch."""

_CHUNK = 1 << 22
"""Elements of one parameter processed at once by the Gram / rotation (bounds the float64 temporaries)."""


def _chunks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The rows' tensors for one parameter as one ``(m, numel)`` view-free stack, chunked by columns."""
    stacked = torch.stack([t.reshape(-1) for t in tensors])
    return list(stacked.split(_CHUNK, dim=1))


@dataclass
class GradientSketch:
    """A frequent-directions sketch of weighted gradient rows ``√w_b g_b`` (lists of tensors).

    Args:
        rank: ``k``, the directions kept (``capability_rank``).
        oversample: ``ℓ ≥ 1`` spare rows; the sketch shrinks whenever it reaches ``k + ℓ`` rows.

    :meth:`add` takes ownership of the gradient tensors (they are scaled in place and become a
    sketch row: no copy). :meth:`directions` rotates the rows onto their principal axes and returns
    the top ``k``, oriented to improve the metric; the sketch is empty afterwards.
    """

    rank: int
    oversample: int = 1
    rows: list[list[torch.Tensor]] = field(default_factory=list)
    weight_seen: float = 0.0
    _sum: list[torch.Tensor] | None = None
    shrinks: int = 0
    #: Σδ over the shrinks: a certificate of the sketch's error, ‖AᵀA − BᵀB‖₂ ≤ delta_total (FD).
    delta_total: float = 0.0
    #: Largest number of bytes held at once by the rows and the orienting sum (counted from the tensors).
    peak_bytes: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"GradientSketch: rank must be >= 1, got {self.rank}.")
        if self.oversample < 1:
            raise ValueError(f"GradientSketch: oversample must be >= 1, got {self.oversample}.")

    @property
    def capacity(self) -> int:
        return self.rank + self.oversample

    @torch.no_grad()
    def seed(self, directions: Sequence[Sequence[torch.Tensor]], weight: float) -> None:
        """Start from previous directions (EMA across refreshes), each scaled in place by √weight.

        They carry the previous second-moment estimate; they do not enter the orienting sum.
        """
        for direction in directions:
            if weight <= 0:
                break
            self._insert([t.mul_(math.sqrt(weight)) for t in direction])

    @torch.no_grad()
    def add(self, grads: list[torch.Tensor], weight: float = 1.0) -> None:
        """Add one micro-batch gradient with weight ``w`` (row ``√w g``); takes ownership of ``grads``."""
        if not weight > 0:
            raise ValueError(f"GradientSketch.add: weight must be > 0, got {weight}.")
        if self._sum is None:
            self._sum = [g.detach().mul(weight) for g in grads]
        else:
            for s, g in zip(self._sum, grads, strict=True):
                s.add_(g, alpha=weight)
        self.weight_seen += weight
        self._insert([g.mul_(math.sqrt(weight)) for g in grads])

    def _insert(self, row: list[torch.Tensor]) -> None:
        # shrink as soon as the sketch is full, so that it holds at most k + ℓ − 1 rows while the
        # next gradient is being computed: the peak stays (k + ℓ + 1)× the parameter bytes
        self.rows.append(row)
        self._track()
        if len(self.rows) >= self.capacity:
            self._rotate(shrink=True)

    def held_bytes(self) -> int:
        """Bytes of the sketch rows and the orienting sum."""
        tensors = [t for row in self.rows for t in row] + list(self._sum or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _track(self, extra: Sequence[torch.Tensor] = ()) -> None:
        held = self.held_bytes() + sum(t.numel() * t.element_size() for t in extra)
        self.peak_bytes = max(self.peak_bytes, held)

    def gram(self) -> torch.Tensor:
        """``G[i, j] = ⟨row_i, row_j⟩`` in float64 (one pass over the parameters)."""
        m = len(self.rows)
        gram = torch.zeros(m, m, dtype=torch.float64)
        if not m:
            return gram
        for p in range(len(self.rows[0])):
            for chunk in _chunks([row[p] for row in self.rows]):
                c = chunk.double()
                gram += (c @ c.T).cpu()
        return gram

    @torch.no_grad()
    def _rotate(self, shrink: bool) -> torch.Tensor:
        """Rotate the rows onto the principal axes of ``BᵀB`` (descending); with ``shrink`` subtract
        the smallest eigenvalue (FD) and drop the zeroed row(s). Returns the kept eigenvalues."""
        gram = self.gram()
        eigvals, eigvecs = torch.linalg.eigh(gram)
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
        delta = float(eigvals[-1]) if shrink else 0.0
        tiny = float(eigvals[0]) * 1e-12 if len(eigvals) else 0.0
        keep = [j for j in range(len(eigvals)) if float(eigvals[j]) - delta > tiny]
        if shrink:
            keep = keep[: self.capacity - 1]
            self.shrinks += 1
            self.delta_total += delta
        scale = torch.tensor([math.sqrt((float(eigvals[j]) - delta) / float(eigvals[j])) for j in keep], dtype=torch.float64)
        # new row j = scale_j · Σ_i U[i, j] row_i  (= √(λ_j − δ) v_jᵀ)
        mix = (eigvecs[:, keep] * scale).T.contiguous()  # (len(keep), m)
        new_rows: list[list[torch.Tensor]] = [[] for _ in keep]
        for p in range(len(self.rows[0])):
            tensors = [row[p] for row in self.rows]
            like = tensors[0]
            mixed = [
                (mix.to(device=chunk.device, dtype=torch.promote_types(chunk.dtype, torch.float32)) @ chunk.to(
                    torch.promote_types(chunk.dtype, torch.float32)
                )).to(like.dtype)
                for chunk in _chunks(tensors)
            ]
            full = torch.cat(mixed, dim=1) if mixed else torch.zeros(len(keep), 0, dtype=like.dtype, device=like.device)
            for j in range(len(keep)):
                new_rows[j].append(full[j].reshape(like.shape).clone())
            for row in self.rows:  # free this parameter's old rows now: peak stays one parameter's worth
                row[p] = torch.empty(0, dtype=like.dtype, device=like.device)
        self.rows = new_rows
        return eigvals[keep] - delta

    @torch.no_grad()
    def directions(self) -> tuple[list[list[torch.Tensor]], list[float]]:
        """The top-``k`` directions ``√λ_j v_j`` (``λ_j`` the sketch's eigenvalues of the weighted
        second moment), each oriented so that ``⟨v_j, Σ w_b g_b⟩ ≥ 0`` (moving along it improves the
        metric on average). Fewer than ``k`` when the data span fewer dimensions; zero-padded to ``k``
        with zero tensors so the projector's layout (``k`` per task) is kept.

        Returns ``(directions, eigenvalues)``. The sketch is empty afterwards.
        """
        if not self.rows:
            raise RuntimeError("GradientSketch.directions: nothing was added.")
        template = [(t.shape, t.dtype, t.device) for t in self.rows[0]]
        eigvals = self._rotate(shrink=False)
        rows = self.rows[: self.rank]
        if self._sum is not None:
            for row in rows:
                dot = sum(float(torch.dot(r.reshape(-1).double(), s.reshape(-1).double())) for r, s in zip(row, self._sum, strict=True))
                if dot < 0:
                    for t in row:
                        t.neg_()
        values = [float(v) for v in eigvals[: self.rank]]
        while len(rows) < self.rank:
            rows.append([torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in template])
            values.append(0.0)
        self.rows, self._sum, self.weight_seen = [], None, 0.0
        return rows, values


# --------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over ranks in place (no-op on one process)."""
    _, size = world()
    if size == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(size)


def broadcast_from_zero(directions: Sequence[Sequence[torch.Tensor]]) -> None:
    """Overwrite every rank's directions with rank 0's, so they are byte-identical everywhere."""
    _, size = world()
    if size == 1:
        return
    for direction in directions:
        for t in direction:
            dist.broadcast(t, src=0)


def draw_rank_batch(sampler: CapabilitySampler, task: str, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """One batch of ``task`` for this rank: the rank-th of ``world size`` consecutive batches.

    Every rank advances the sampler identically (its state stays rank-independent, so a checkpoint
    resumes the same on any rank) and the ranks' rows are disjoint within an epoch.
    """
    rank, size = world()
    drawn = [sampler.next_indices(task) for _ in range(size)]
    return sampler.collate(task, drawn[rank], device=device)


# --------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------


@dataclass
class SketchResult:
    """What :func:`sketch_task_directions` returns."""

    directions: list[list[torch.Tensor]]
    """``rank`` directions, each a list of tensors shaped like the parameters."""
    values: list[float]
    """The capability metric of each micro-batch (this rank's rows)."""
    eigenvalues: list[float]
    """The sketch's eigenvalues of the weighted second moment, per direction (0 for padding)."""
    peak_bytes: int
    """Largest number of bytes the sketch held at once (rows + orienting sum)."""


def sketch_task_directions(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    sampler: CapabilitySampler,
    task: str,
    *,
    rank: int,
    num_batches: int,
    oversample: int = 1,
    metric: MetricFn = completion_metric,
    previous: Sequence[Sequence[torch.Tensor]] = (),
    ema: float = 0.0,
    autocast: Callable[[], AbstractContextManager[object]] | None = None,
) -> SketchResult:
    """Estimate ``task``'s top-``rank`` subspace from ``num_batches`` micro-batch gradients.

    Each micro-batch gradient (averaged over ranks under DDP) enters the sketch with weight
    ``(1 − ema) / num_batches``; ``previous`` directions (consumed: scaled in place) seed it with
    weight ``ema``. ``autocast`` is an optional zero-argument context-manager factory (the trainer's
    ``autocast_smart_context_manager``).
    """
    if num_batches < 1:
        raise ValueError(f"capability_sketch_batches must be >= 1, got {num_batches}.")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"capability_ema must be in [0, 1), got {ema}.")
    sketch = GradientSketch(rank=rank, oversample=oversample)
    if ema > 0 and previous:
        sketch.seed(previous, ema)
    values: list[float] = []
    weight = (1.0 - ema) / num_batches
    for _ in range(num_batches):
        batch = draw_rank_batch(sampler, task)
        with autocast() if autocast is not None else nullcontext():
            value, grads = capability_gradients(model, params, batch, metric=metric)
        all_reduce_mean(grads)
        values.append(float(value))
        sketch.add(grads, weight=weight)
    directions, eigvals = sketch.directions()
    broadcast_from_zero(directions)
    return SketchResult(directions, values, eigvals, sketch.peak_bytes)


def principal_angle_sines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between the row spaces of ``a`` (p×P) and ``b`` (q×P), descending.

    For tests and benchmarks on small problems (flattened vectors). ``sin θ_max`` is the largest
    fraction of a unit vector of span(b) that lies outside span(a) when q ≤ p.
    """
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.sqrt(1.0 - cos**2).flip(0)


__all__ = [
    "ESTIMATORS",
    "GradientSketch",
    "SketchResult",
    "all_reduce_mean",
    "broadcast_from_zero",
    "draw_rank_batch",
    "principal_angle_sines",
    "sketch_task_directions",
    "world",
]
