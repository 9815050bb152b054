"""The exact projection under FSDP2, and the refusals of the setups where it cannot hold.

Under PyTorch FSDP2 (``fully_shard``; in ``transformers`` the load-time sharding of
``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))``) every trainable
parameter is a ``DTensor`` placed ``Shard(0)`` on a 1-D device mesh: each rank holds rows
``[r·⌈d₀/N⌉, (r+1)·⌈d₀/N⌉)`` of it. :class:`ShardedUpdateProjector` runs the projection of
:class:`~frontier_trainer.projection.UpdateProjector` on those local shards:

* the snapshot θ_old and the capability directions c_i are held as local shards, so the extra
  memory per rank is (k+1)/N × the trainable bytes (:func:`max_shard_bytes`);
* every inner product of the Gram matrix (Def 3.3; the (m+1)-vector [⟨u,u⟩, ⟨u,c_i⟩] per step,
  one row of the m×m direction block per direction at a refresh) is the float64 sum over the
  local shard, followed by ONE ``all_reduce`` (SUM) of the vector over the mesh: every rank
  gets the same bits, so the step rule (Thm 4.1/4.3) gives identical coefficients on every
  rank, and each rank writes θ_old + δ into its own shard;
* the write goes into ``p.to_local()`` in place (FSDP2 all-gathers from that storage; rebinding
  ``p._local_tensor`` would be silently ignored, field notes §4).

Capability gradients: ``torch.autograd.grad`` with respect to FSDP2's sharded parameters returns
``None`` for every one of them (the forward runs on the all-gathered unsharded copies, which are
not the leaves the caller names; measured here with torch 2.13), so
``directions.capability_gradients`` would silently give zero directions and the projection would
do nothing. :func:`sharded_capability_gradients` runs ``backward()`` instead: FSDP2 reduce-scatters
the gradient into the sharded ``p.grad`` (the mean over ranks of identical batches, i.e. the
gradient itself), the local shards are taken, and the training gradients are put back.

Setups refused at construction (:func:`check_fsdp_arguments`, :func:`check_fsdp_model`), each
silently something else today (field notes §4):

* ``fsdp="full_shard"`` with ``use_cpu=True`` (or no GPU): transformers/accelerate run plain DDP;
* ``accelerate launch --use_fsdp`` without an accelerator: N independent single-process trainings;
* any run that asks for FSDP but whose trainable parameters are not DTensors;
* FSDP1 (``fsdp_version`` 1): the optimizer sees flattened ``FlatParameter`` shards;
* DeepSpeed: the engine steps the optimizer inside ``backward`` and its optimizer sees one flat
  1-D fp32 partition per param group, not parameters.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from frontier_trainer.directions import MetricFn, completion_metric, deterministic_forward
from frontier_trainer.projection import ProjectionMode, UpdateProjector

logger = logging.getLogger(__name__)

#: How to get real FSDP2, quoted by every refusal.
HOW_TO_FSDP2 = (
    "For real FSDP2 on CPU, load the model sharded at load time under torchrun: "
    "`AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, "
    "distributed_config=DistributedConfig(fsdp_size=N))` (from transformers.distributed) with "
    "use_cpu=True, and pass that model to the trainer (no `fsdp` argument). On GPUs use accelerate's "
    "FSDP2 (`fsdp='full_shard'`, `fsdp_config={'fsdp_version': 2}`, or `accelerate launch --use_fsdp "
    "--fsdp_version 2`)."
)

DEEPSPEED_REFUSAL = (
    "the frontier projection does not support DeepSpeed: the DeepSpeed engine steps the optimizer inside "
    "accelerator.backward, where no optimizer hook sees the update, and its inner optimizer holds one flat "
    "1-D fp32 partition per param group instead of parameters, so θ_old + δ cannot be formed per parameter. "
    "To train a model that does not fit one GPU, use FSDP2 instead (supported and tested). " + HOW_TO_FSDP2
)


# --------------------------------------------------------------------------------------
# Sharded parameters
# --------------------------------------------------------------------------------------


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """True when any of ``params`` is a ``DTensor`` (FSDP2-managed)."""
    return any(isinstance(p, DTensor) for p in params)


def shard_group(params: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> dist.ProcessGroup:
    """The process group of the one 1-D mesh every parameter is ``Shard(0)`` on.

    Raises:
        ValueError: naming the first parameter that is not a DTensor, is not placed ``Shard(0)``
            (e.g. ``Replicate`` under HSDP or tensor parallelism), or lives on another mesh.
    """
    labels = list(names) if names is not None else [f"parameter {i}" for i in range(len(params))]
    mesh = None
    for label, p in zip(labels, params, strict=True):
        if not isinstance(p, DTensor):
            raise ValueError(
                f"{label} is not sharded (a plain tensor among FSDP2 DTensors): the sharded projection needs every "
                "trainable parameter managed by FSDP2. Shard the whole model (fully_shard on the root, or "
                "DistributedConfig(fsdp_size=N)) or freeze that parameter."
            )
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"{label} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh: the sharded projection "
                "supports FSDP2's Shard(0) on a 1-D mesh only (no HSDP, tensor or expert parallelism yet)."
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(
                f"{label} lives on another device mesh than the first parameter: one FSDP2 mesh only."
            )
    if mesh is None:
        raise ValueError("params is empty: there are no trainable parameters to project")
    return mesh.get_group()


def local_shards(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard of each parameter (``p.to_local()``, a view of FSDP2's storage), detached."""
    return [p.to_local().detach() if isinstance(p, DTensor) else p.detach() for p in params]


def shard_rows(dim0: int, world_size: int, rank: int) -> int:
    """Rows of a dim-0 size ``dim0`` on ``rank`` under FSDP2's ``Shard(0)`` (``torch.chunk``
    sizes: ⌈d₀/N⌉ on the first ranks, the remainder then 0 on the last)."""
    size = math.ceil(dim0 / world_size) if dim0 else 0
    return max(0, min(size, dim0 - rank * size))


def max_shard_bytes(params: Sequence[torch.Tensor], world_size: int) -> int:
    """Bytes of the largest local shard set (rank 0's) of ``params`` under FSDP2 with
    ``world_size`` ranks: the T of one rank. Works on ``meta`` tensors (no memory)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    total = 0
    for p in params:
        if p.dim() == 0:
            total += p.element_size()  # a scalar is not split
            continue
        rest = p.numel() // p.shape[0] if p.shape[0] else 0
        total += shard_rows(p.shape[0], world_size, 0) * rest * p.element_size()
    return total


def sharded_projector_bytes(shard_bytes: int, num_directions: int) -> int:
    """(k+1) × one rank's trainable shard bytes: the projector's snapshot plus k directions."""
    return (num_directions + 1) * shard_bytes if num_directions else 0


# --------------------------------------------------------------------------------------
# The projector
# --------------------------------------------------------------------------------------


class ShardedUpdateProjector(UpdateProjector):
    """:class:`UpdateProjector` on FSDP2's local shards, with one all-reduce per Gram vector.

    ``params`` stays the list of DTensor parameters (what the optimizer and the trainer see);
    the snapshot, the directions and every buffer are local shards. All ranks must call every
    method in the same order (each inner product is a collective).

    Args:
        params: the trainable DTensor parameters, ``Shard(0)`` on one 1-D mesh, fp32/fp64.
        mode, tolerances: as for :class:`UpdateProjector`.
        names: optional parameter names for the error messages.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        mode: ProjectionMode = "nullspace",
        tolerances: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        sharded = list(params)
        if not sharded:
            raise ValueError("params is empty: there are no trainable parameters to project")
        self.group = shard_group(sharded, names)
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        super().__init__(local_shards(sharded), mode=mode, tolerances=tolerances)
        self.sharded_params = sharded
        self.params = sharded
        #: All-reduces issued (one per Gram vector); a test counts them.
        self.all_reduce_count = 0

    @contextmanager
    def _on_shards(self) -> Iterator[None]:
        """Run the base class on fresh local views (FSDP2 may re-point a shard's storage).
        Re-entrant: a base method calling an overridden one keeps the local views."""
        if self.params is not self.sharded_params:
            yield
            return
        self.params = local_shards(self.sharded_params)
        try:
            yield
        finally:
            self.params = self.sharded_params

    def _dots(self, x: Sequence[torch.Tensor] | None, ys: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """The base class's float64 local sums, then ONE all_reduce (SUM) over the mesh: the
        global inner products, bit-identical on every rank."""
        row = super()._dots(x, ys)
        dist.all_reduce(row, op=dist.ReduceOp.SUM, group=self.group)
        self.all_reduce_count += 1
        return row

    def _check_directions(
        self, directions: Sequence[Sequence[torch.Tensor]], labels: Sequence[str]
    ) -> list[list[torch.Tensor]]:
        """Directions given as DTensors (e.g. sharded gradients) are taken as their local shards;
        plain tensors must already be shaped like the local shards."""
        local = [[c.to_local() if isinstance(c, DTensor) else c for c in d] for d in directions]
        return super()._check_directions(local, labels)

    def set_directions(
        self, directions: Sequence[Sequence[torch.Tensor]], *, names: Sequence[str] | None = None
    ) -> None:
        with self._on_shards():
            super().set_directions(directions, names=names)

    def before_step(self) -> None:
        with self._on_shards():
            super().before_step()

    def after_step(self, measure: bool = False):
        with self._on_shards():
            return super().after_step(measure=measure)

    def measure_leak(self) -> list[float]:
        with self._on_shards():
            return super().measure_leak()

    def update_leak(
        self, directions: Sequence[Sequence[torch.Tensor]], *, names: Sequence[str] | None = None
    ) -> list[float]:
        with self._on_shards():
            return super().update_leak(directions, names=names)

    def extra_memory_bytes(self) -> int:
        """Bytes this rank holds: its shard of the snapshot plus its shards of the directions."""
        with self._on_shards():
            return super().extra_memory_bytes()

    def capability_gradients(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], metric: MetricFn = completion_metric
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:func:`sharded_capability_gradients` over this projector's parameters."""
        return sharded_capability_gradients(model, self.sharded_params, batch, metric=metric)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """This rank's shards of the directions, with the layout they belong to."""
        state = super().state_dict()
        state.update(
            rank=self.rank,
            world_size=self.world_size,
            local_shapes=[tuple(t.shape) for t in local_shards(self.sharded_params)],
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Install this rank's saved shards; refuses another world size, rank or shard layout.

        Raises:
            ValueError: the state was saved by another rank or world size, or its shard shapes
                differ from this run's (another model or sharding).
        """
        if "world_size" not in state:
            raise ValueError(
                "this frontier state was saved without sharding (full tensors); resume it without FSDP, "
                "or start the FSDP2 run from the model weights without resume_from_checkpoint."
            )
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise ValueError(
                f"frontier state of rank {state['rank']}/{state['world_size']} loaded on rank "
                f"{self.rank}/{self.world_size}: resume with the same number of processes."
            )
        shapes = [tuple(t.shape) for t in local_shards(self.sharded_params)]
        if [tuple(s) for s in state["local_shapes"]] != shapes:
            raise ValueError(
                "the saved direction shards do not match this run's parameter shards (another model?)"
            )
        self.set_directions(state["directions"], names=state.get("names"))


def state_file_name(rank: int) -> str:
    """Per-rank file of the sharded frontier state beside a checkpoint."""
    return f"frontier_state.rank{rank}.pt"


def make_projector(
    params: Sequence[torch.nn.Parameter],
    mode: ProjectionMode = "nullspace",
    tolerances: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> UpdateProjector:
    """A :class:`ShardedUpdateProjector` when the parameters are DTensors, else an
    :class:`UpdateProjector` (DDP and single process)."""
    if is_sharded(params):
        return ShardedUpdateProjector(params, mode=mode, tolerances=tolerances, names=names)
    return UpdateProjector(params, mode=mode, tolerances=tolerances)


# --------------------------------------------------------------------------------------
# Capability gradients on the sharded model
# --------------------------------------------------------------------------------------


def sharded_capability_gradients(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batch: Mapping[str, torch.Tensor],
    metric: MetricFn = completion_metric,
    deterministic: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(f, ∇f)`` of ``metric(model, batch)`` over FSDP2 parameters, as local shards.

    Why not ``torch.autograd.grad``: it returns ``None`` for every FSDP2 sharded parameter
    (the forward runs on all-gathered copies), which would give zero directions. Here
    ``backward()`` runs through FSDP2's hooks, which reduce-scatter the gradient (the mean over
    ranks; every rank evaluates the same batch, so the mean is the gradient) into ``p.grad``;
    each local shard is taken and the training gradients in ``p.grad`` are restored, so
    gradient accumulation and the coming optimizer step are unaffected. Every rank must call it
    with the same batch (a collective). Must run with gradient sync on (true at an optimizer step).

    Returns:
        The detached metric value and one local-shard gradient per parameter (zeros where the
        metric does not depend on it).

    Raises:
        ValueError: a parameter does not require grad, or the metric is not a scalar.
    """
    params = list(params)
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"sharded_capability_gradients: {len(frozen)} parameter(s) do not require grad (first at index "
            f"{frozen[0]}); pass only trainable parameters."
        )
    device = params[0].device if params else torch.device("cpu")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            if deterministic:
                with deterministic_forward(model):
                    value = metric(model, batch)
                    _check_scalar(value)
                    value.backward()
            else:
                value = metric(model, batch)
                _check_scalar(value)
                value.backward()
        grads = []
        for p, local in zip(params, local_shards(params), strict=True):
            g = p.grad
            if g is None:
                grads.append(torch.zeros_like(local))
            else:
                grads.append((g.to_local() if isinstance(g, DTensor) else g).detach())
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    return value.detach(), grads


def _check_scalar(value: torch.Tensor) -> None:
    if value.dim() != 0:
        raise ValueError(f"capability metric must return a scalar, got shape {tuple(value.shape)}.")


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


def _fsdp_version(args: Any) -> int:
    config = getattr(args, "fsdp_config", None) or {}
    version = config.get("fsdp_version", config.get("version"))
    if version is None:
        version = os.environ.get("FSDP_VERSION", 1)
    return int(version)


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def fsdp_requested(args: Any) -> bool:
    """Whether the run asks for FSDP: a ``fsdp`` training argument or ``accelerate launch --use_fsdp``."""
    return bool(getattr(args, "fsdp", None)) or _truthy(os.environ.get("ACCELERATE_USE_FSDP"))


def _on_cpu(args: Any) -> bool:
    return bool(getattr(args, "use_cpu", False)) or not (
        torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


def check_fsdp_arguments(args: Any, *, on_accelerator: bool | None = None) -> None:
    """Refuse, before the model is built, FSDP/DeepSpeed settings the projection cannot hold under.

    ``on_accelerator``: whether the run will have a GPU; None decides from ``use_cpu`` and this
    machine (a dry run of a GPU recipe on a CPU machine passes True).

    Raises:
        ValueError: DeepSpeed (why, and FSDP2 instead); ``fsdp`` (or ``accelerate launch
            --use_fsdp``) on the CPU, which silently runs DDP or independent processes; FSDP1.
    """
    if getattr(args, "deepspeed", None) or _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
        raise ValueError(DEEPSPEED_REFUSAL)
    if not fsdp_requested(args):
        return
    source = (
        f"fsdp={getattr(args, 'fsdp', None)!r}"
        if getattr(args, "fsdp", None)
        else "accelerate launch --use_fsdp (ACCELERATE_USE_FSDP=true)"
    )
    if (not on_accelerator) if on_accelerator is not None else _on_cpu(args):
        what = (
            "transformers/accelerate then run plain DDP (accelerate never promotes a CPU run to FSDP)"
            if getattr(args, "fsdp", None)
            else "each launched process then trains alone on all the data (independent single-process runs)"
        )
        raise ValueError(
            f"the frontier projection does not support FSDP on the CPU: {source} does not shard anything "
            f"there, {what}, with no warning. " + HOW_TO_FSDP2
        )
    if _fsdp_version(args) != 2:
        raise ValueError(
            f"{source} with fsdp_version {_fsdp_version(args)} (FSDP1): the optimizer holds flattened FlatParameter "
            "shards, not parameters, so the projection cannot be exact. Set fsdp_config={'fsdp_version': 2} "
            "(or accelerate launch --fsdp_version 2)."
        )


def check_fsdp_model(
    params: Sequence[torch.Tensor],
    *,
    fsdp_wanted: bool,
    num_processes: int,
    names: Sequence[str] | None = None,
) -> None:
    """Refuse, after the trainer is built, a run that asked for FSDP (or several processes) and got
    something else.

    Args:
        params: the trainable parameters of the built (unwrapped) model.
        fsdp_wanted: the run asked for FSDP (:func:`fsdp_requested`, or accelerate's FSDP plugin).
        num_processes: the processes accelerate trains with (``accelerator.num_processes``).
        names: parameter names for the messages.

    Raises:
        ValueError: the launcher started ``WORLD_SIZE`` processes but each trains alone; FSDP
            asked for but the parameters are plain tensors; a partly sharded or non-``Shard(0)``
            parameter set (see :func:`shard_group`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and num_processes != world:
        raise ValueError(
            f"the launcher started WORLD_SIZE={world} processes but accelerate trains with {num_processes}: "
            "each process would train alone on all the data, with no synchronisation and no error. This is "
            "what `accelerate launch --use_fsdp` (or --cpu) does without an accelerator. " + HOW_TO_FSDP2
        )
    if is_sharded(params):
        shard_group(params, names)
        return
    if fsdp_wanted:
        raise ValueError(
            "the run asks for FSDP (argument, launcher or accelerate config) but the trainable parameters are "
            "plain tensors, not FSDP2 DTensors: it would silently train without sharding (e.g. DDP on the CPU). "
            + HOW_TO_FSDP2
        )


__all__ = [
    "DEEPSPEED_REFUSAL",
    "HOW_TO_FSDP2",
    "ShardedUpdateProjector",
    "check_fsdp_arguments",
    "check_fsdp_model",
    "fsdp_requested",
    "is_sharded",
    "local_shards",
    "make_projector",
    "max_shard_bytes",
    "shard_group",
    "shard_rows",
    "sharded_capability_gradients",
    "sharded_projector_bytes",
    "state_file_name",
]
