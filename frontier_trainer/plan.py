"""The plan of a run, built before training: resolved sources, setting checks and a memory plan.

:class:`FrontierPlan` is the one place where a run's inputs are judged before any weight is
loaded. The dry run prints it, the training path writes it next to the outputs as provenance
(mergekit-style: settings, package versions, fingerprints of every source), and the trainer's
construction checks are :func:`check_arguments` / :func:`check_model` here.

Memory plan (extra state of the frontier machinery, on top of plain training; T = bytes of the
trainable parameters, k = tasks x ``capability_rank`` directions, m = tasks):

* projector: the snapshot θ_old plus k directions, (k+1) T held between refreshes; with
  ``capability_ema > 0`` a refresh holds one more fresh gradient, (k+2) T at its peak;
* degradation tracker (:class:`~frontier_trainer.tracking.DegradationCallback`): its own
  parameter snapshot plus one gradient per task, (m+1) T between measurements; while it
  re-linearises at an eval step the new m gradients exist next to the old ones, (2m+1) T;
* checkpoint: ``frontier_state.pt`` stores the k directions, k T on disk per checkpoint.

With the defaults (rank 1, tracking on) projector + tracker are 2(m+1) T, twice the (k+1) T
of the projector alone. T is counted from the real parameter set: the model is built on the
``meta`` device from its ``config.json`` (no weights read) and, with ``use_peft``, the real PEFT
config is applied with :func:`peft.get_peft_model`, so every trainable tensor and its dtype are
the ones training will have. A hub model whose config is not on this machine has an unknown
size offline, which is reported, not an error.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frontier_trainer import sources as source_registry
from frontier_trainer.distributed import (
    DEEPSPEED_REFUSAL,
    check_fsdp_arguments,
    check_fsdp_model,
    fsdp_requested,
    is_sharded,
    max_shard_bytes,
    sharded_projector_bytes,
)
from frontier_trainer.sources import OK, InputError, Resolved

logger = logging.getLogger(__name__)

PLAN_FILE = "frontier_plan.json"
"""Name of the provenance file :meth:`FrontierPlan.write` puts next to the outputs."""

PACKAGES = (
    "frontier-trainer",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "safetensors",
)
"""Packages whose versions the provenance records."""

UNSUPPORTED_OPTIM_MARKERS = ("lomo", "layerwise", "schedule_free")
"""Optimizers that update parameters inside ``backward`` (LOMO/AdaLomo, layer-wise GaLore/APOLLO)
or swap parameter values around evaluation (schedule-free): no optimizer step hook sees their
real update, so the projection cannot be exact."""


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def check_arguments(
    args: Any,
    sources: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    *,
    on_accelerator: bool | None = None,
) -> None:
    """Refuse, before any model is built, a setup under which the projection cannot be exact.

    ``on_accelerator`` (FSDP checks): whether the run will have a GPU; None decides from
    ``use_cpu`` and this machine (a dry run of a GPU recipe on a CPU machine passes True).

    ``args`` carries the frontier fields (``projection``, ``capability_tolerance``) and the
    ``transformers.TrainingArguments`` ones; ``sources`` is ``{task: source}``; ``metrics`` the
    optional ``{task: metric}``. Every message names the field and the fix. This is the one copy
    of the construction checks: the trainers' mixin and :meth:`FrontierPlan.build` both call it.

    Raises:
        ValueError: projection without capability data, bad task names, tolerances or metrics for
            unknown tasks, DeepSpeed, FSDP, an optimizer that steps inside backward, reentrant
            gradient checkpointing (which breaks ``torch.autograd.grad``), or fp16 without CUDA.
    """
    if args.projection != "none" and not sources:
        raise ValueError(
            f"projection={args.projection!r} needs capability data: pass capability_datasets={{task: dataset}} "
            "to the trainer or set the config's capability_datasets (or use projection='none')."
        )
    for task in sources:
        if not isinstance(task, str) or not task:
            raise ValueError(f"capability_datasets: task names must be non-empty strings, got {task!r}")
    if isinstance(args.capability_tolerance, dict):
        unknown = sorted(set(args.capability_tolerance) - set(sources))
        if unknown:
            raise ValueError(
                f"capability_tolerance names unknown task(s) {unknown}; the capability tasks are {sorted(sources)}."
            )
    unknown_metrics = sorted(set(metrics or {}) - set(sources))
    if unknown_metrics:
        raise ValueError(
            f"capability_metrics names unknown task(s) {unknown_metrics}; tasks are {sorted(sources)}."
        )
    refresh_tasks = getattr(args, "capability_refresh_tasks", None)
    if refresh_tasks is not None and sources and refresh_tasks > len(sources):
        raise ValueError(
            f"capability_refresh_tasks={refresh_tasks} is more than the {len(sources)} capability task(s) "
            f"{sorted(sources)}: a refresh cannot re-estimate more tasks than there are. Set "
            f"capability_refresh_tasks to at most {len(sources)}, or None to re-estimate every task at every refresh."
        )
    if args.projection == "none":
        return
    # DeepSpeed (refused: flat partitions, steps inside backward), FSDP on the CPU (silently DDP
    # or independent processes), FSDP1 (flat parameters): frontier_trainer.distributed
    check_fsdp_arguments(args, on_accelerator=on_accelerator)
    optim = str(getattr(getattr(args, "optim", ""), "value", getattr(args, "optim", "")))
    if any(marker in optim for marker in UNSUPPORTED_OPTIM_MARKERS):
        raise ValueError(
            f"optim={optim!r} updates parameters inside backward (or swaps them around evaluation), so the "
            "realised update is invisible to the projection. Use a step-based optimizer such as adamw_torch."
        )
    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*; read both
    ckpt_on = getattr(args, "activation_checkpointing", False) or getattr(
        args, "gradient_checkpointing", False
    )
    ckpt_kwargs = (
        getattr(args, "activation_checkpointing_kwargs", None)
        or getattr(args, "gradient_checkpointing_kwargs", None)
        or {}
    )
    if ckpt_on and ckpt_kwargs.get("use_reentrant", False):
        raise ValueError(
            "gradient_checkpointing_kwargs={'use_reentrant': True} breaks torch.autograd.grad, which the "
            "capability directions need. Use {'use_reentrant': False} (the transformers default)."
        )
    if getattr(args, "fp16", False) and (getattr(args, "use_cpu", False) or not torch.cuda.is_available()):
        raise ValueError(
            "fp16=True with the frontier projection needs CUDA: fp16 autocast with loss scaling is only "
            "supported (and tested) on a GPU. On the CPU use bf16=True (autocast over fp32 weights) or "
            "fp16=False."
        )


def check_model(
    model: torch.nn.Module,
    *,
    deepspeed_enabled: bool = False,
    fsdp_enabled: bool = False,
    owner: str = "FrontierDPOTrainer",
    fsdp_wanted: bool = False,
    num_processes: int | None = None,
    degradation_tracking: bool = False,
    capability_space: str = "gradient",
) -> None:
    """Refuse a built model the projection cannot move exactly (the checks after ``Trainer.__init__``).

    ``owner`` (the trainer's class name) starts the engine message. FSDP2 (DTensor parameters,
    ``Shard(0)`` on one mesh) is supported; a run that asked for FSDP (``fsdp_wanted``, or
    ``fsdp_enabled`` by accelerate) but got plain tensors, or whose launcher started more processes
    than accelerate trains with (``num_processes``), is refused (:func:`distributed.check_fsdp_model`).
    ``degradation_tracking`` and ``capability_space`` other than ``"gradient"`` under FSDP2 are
    refused (the tracker and the activation projector have no sharded path yet).

    Raises:
        ValueError: DeepSpeed/FSDP enabled through the accelerate config, or trainable parameters in
            pure low precision (θ_old + δ would be rounded).
    """
    if deepspeed_enabled:
        raise ValueError(f"{owner}: DeepSpeed was enabled through the accelerate config; {DEEPSPEED_REFUSAL}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    processes = num_processes if num_processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_fsdp_model(
            [p for _, p in named],
            fsdp_wanted=fsdp_wanted or fsdp_enabled,
            num_processes=processes,
            names=[n for n, _ in named],
        )
    except ValueError as err:
        raise ValueError(f"{owner} (DeepSpeed/FSDP engine check): {err}") from None
    if degradation_tracking and is_sharded([p for _, p in named]):
        raise ValueError(
            f"{owner}: degradation_tracking is not supported under FSDP2 yet (its gradients and snapshot have "
            "no sharded path, it would measure zeros). Set degradation_tracking=False; the projection itself "
            "is exact under FSDP2."
        )
    if capability_space != "gradient" and is_sharded([p for _, p in named]):
        raise ValueError(
            f"{owner}: capability_space={capability_space!r} is not supported under FSDP2 yet (the activation "
            "projector hooks whole weight matrices, FSDP2 holds row shards). Use capability_space='gradient', "
            "which is exact under FSDP2."
        )
    low = sorted(
        {
            str(p.dtype)
            for p in model.parameters()
            if p.requires_grad and p.dtype not in (torch.float32, torch.float64)
        }
    )
    if low:
        raise ValueError(
            f"trainable parameters are {low}: pure low-precision weights round θ_old + δ and break the "
            "projection's exactness. Load the model with dtype=torch.float32 and train with bf16=True "
            "(autocast over fp32 master weights)."
        )


def check_recipe_settings(
    training_args: Any, model_args: Any, tasks: Sequence[str], eval_tasks: Sequence[str]
) -> None:
    """Cross-key checks of a recipe, named by recipe key (the CLI's view of :func:`check_arguments`).

    Raises:
        InputError: projection without capability data, eval or tolerance tasks that are not
            capability tasks, or low-precision full weights (``dtype: bfloat16`` without PEFT).
    """
    if training_args.projection != "none" and not tasks:
        raise InputError(
            f"capability_datasets: projection={training_args.projection!r} needs capability data; "
            "set capability_datasets: {task: source} or projection: none."
        )
    stray = sorted(set(eval_tasks) - set(tasks))
    if stray:
        raise InputError(f"capability_eval_datasets: task(s) {stray} are not capability tasks {list(tasks)}.")
    if isinstance(training_args.capability_tolerance, dict):
        stray = sorted(set(training_args.capability_tolerance) - set(tasks))
        if stray:
            raise InputError(f"capability_tolerance: task(s) {stray} are not capability tasks {list(tasks)}.")
    if (
        training_args.projection != "none"
        and not model_args.use_peft
        and model_args.dtype in ("bfloat16", "float16")
    ):
        raise InputError(
            f"dtype: {model_args.dtype} makes the trainable weights low precision, which breaks the projection's "
            "exactness; use dtype: float32 with bf16: true (autocast over fp32 weights), or use_peft: true."
        )


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Extra memory of the frontier machinery, from the real trainable parameter set.

    Attributes:
        trainable_parameters: number of trainable scalars (``None``: unknown offline).
        trainable_bytes: T, their bytes in the dtype training keeps them in.
        num_directions: k = tasks x ``capability_rank`` (0 without projection).
        num_tasks: m.
        tracking: whether the degradation tracker runs.
        ema: whether ``capability_ema > 0`` (a refresh then holds one more gradient).
        source: where the parameter set came from (``config.json``, ``hub cache``, ...).
        activation_bytes: capability_space "activation"/"both": the bases and float64 step images
            the activation projector holds (``activation.activation_memory``'s ``activation_total``,
            an upper bound: r = ``activation_rank`` for every input group); 0 in gradient mode,
            ``None`` when unknown offline.
        activation_refresh_bytes: the float64 input covariances a refresh holds at once (one pass
            within ``DEFAULT_MAX_COVARIANCE_BYTES``, or the largest group if that alone is more):
            transient, counted in the peak only.
        activation_checkpoint_bytes: the bases ``frontier_state.pt`` stores with the state (the
            ``activation_basis`` part of ``activation_bytes``; same upper bound).
    """

    trainable_parameters: int | None
    trainable_bytes: int | None
    num_directions: int
    num_tasks: int
    tracking: bool
    ema: bool
    source: str
    #: FSDP2 runs: ``{world size: T per rank}``, the largest local shard set (rank 0's) of the
    #: trainable parameters under ``Shard(0)`` (:func:`distributed.max_shard_bytes`); empty otherwise.
    shard_bytes: dict[int, int] = field(default_factory=dict)
    activation_bytes: int | None = 0
    activation_refresh_bytes: int | None = 0
    activation_checkpoint_bytes: int | None = 0

    def projector_bytes_per_rank(self, world_size: int) -> int:
        """(k+1) T/rank under FSDP2 with ``world_size`` ranks: this rank's shards of the snapshot
        and of the k directions."""
        return sharded_projector_bytes(self.shard_bytes[world_size], self.num_directions)

    def _times(self, n: int) -> int | None:
        if n == 0:
            return 0
        return None if self.trainable_bytes is None else n * self.trainable_bytes

    @property
    def bytes_per_parameter(self) -> int | None:
        """Average bytes per trainable scalar (4 for fp32 weights or LoRA adapters)."""
        if not self.trainable_parameters or self.trainable_bytes is None:
            return None
        return self.trainable_bytes // self.trainable_parameters

    @property
    def projector_bytes(self) -> int | None:
        """(k+1) T between refreshes (snapshot + k directions); 0 without projection."""
        return self._times(self.num_directions + 1 if self.num_directions else 0)

    @property
    def projector_peak_bytes(self) -> int | None:
        """(k+2) T during a refresh with ``capability_ema > 0``, else (k+1) T."""
        extra = 1 if self.ema and self.num_directions else 0
        return self._times(self.num_directions + 1 + extra if self.num_directions else 0)

    @property
    def tracker_bytes(self) -> int | None:
        """(m+1) T between measurements (the tracker's snapshot + m gradients); 0 without tracking."""
        return self._times(self.num_tasks + 1 if self.tracking and self.num_tasks else 0)

    @property
    def tracker_peak_bytes(self) -> int | None:
        """(2m+1) T while the tracker re-linearises (old and new gradients at once)."""
        return self._times(2 * self.num_tasks + 1 if self.tracking and self.num_tasks else 0)

    @property
    def checkpoint_bytes(self) -> int | None:
        """k T + the activation bases: what ``frontier_state.pt`` stores per checkpoint (plus a small header)."""
        directions = self._times(self.num_directions)
        bases = self.activation_checkpoint_bytes
        return None if directions is None or bases is None else directions + bases

    @property
    def total_bytes(self) -> int | None:
        """Projector + activation bases + tracker held between steps (device memory on every process)."""
        parts = (self.projector_bytes, self.activation_bytes, self.tracker_bytes)
        return None if any(x is None for x in parts) else sum(parts)  # type: ignore[arg-type]

    @property
    def total_peak_bytes(self) -> int | None:
        """Upper bound: every peak at once (the activation refresh's covariances included)."""
        parts = (self.projector_peak_bytes, self.activation_bytes, self.activation_refresh_bytes, self.tracker_peak_bytes)
        return None if any(x is None for x in parts) else sum(parts)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """All counts, JSON-serialisable."""
        names = [f.name for f in dataclasses.fields(self)]
        props = [
            "projector_bytes",
            "projector_peak_bytes",
            "tracker_bytes",
            "tracker_peak_bytes",
            "checkpoint_bytes",
        ]
        return {
            **{n: getattr(self, n) for n in names},
            **{p: getattr(self, p) for p in [*props, "total_bytes"]},
            "projector_bytes_per_rank": {str(n): self.projector_bytes_per_rank(n) for n in self.shard_bytes},
        }


def load_config_file(path: str | os.PathLike[str]) -> Any:
    """A ``PretrainedConfig`` from a ``config.json`` file (or a directory holding one).

    Raises:
        InputError: the file is missing, not JSON, or has no ``model_type``.
    """
    from transformers import AutoConfig

    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        values = json.loads(file.read_text())
        model_type = values.pop("model_type")
    except (OSError, ValueError, KeyError) as err:
        raise InputError(
            f"model_config: cannot read a config.json with a model_type from {str(path)!r}: {err!r}"
        ) from None
    return AutoConfig.for_model(model_type, **values)


def model_config(model: Resolved, fallback: str | os.PathLike[str] | None = None) -> tuple[Any | None, str]:
    """The model's ``PretrainedConfig`` without weights, and where it came from.

    A local (or cached lab/real) directory's ``config.json``; the lab's default architecture when
    the lab model is not built yet; the hub cache for a hub name; else the ``fallback``
    ``config.json`` (a recipe's ``model_config``); else ``(None, reason)``.
    """
    from transformers import AutoConfig

    if model.path is not None:
        return AutoConfig.from_pretrained(model.path), "config.json"
    if model.scheme == "lab":
        from frontier_trainer.lab import build_model, build_tokenizer
        from frontier_trainer.lab.pretraining import LabConfig

        with torch.device("meta"):
            return build_model(LabConfig(), build_tokenizer()).config, "lab defaults"
    if model.scheme == "hub":
        try:
            return AutoConfig.from_pretrained(model.value, local_files_only=True), "hub cache"
        except Exception as err:  # not in the local hub cache: unknown offline, not an error
            logger.debug("no cached config for %s: %s", model.value, err)
    if fallback is not None:
        return load_config_file(fallback), f"model_config {os.fspath(fallback)}"
    return None, "unknown offline (no config.json on this machine)"


def _weights_dtype(model_args: Any, config: Any) -> torch.dtype:
    name = getattr(model_args, "dtype", None)
    if name in (None, "auto"):
        name = str(getattr(config, "dtype", None) or "float32") if name == "auto" else "float32"
    return getattr(torch, str(name).replace("torch.", ""))


def trainable_parameter_set(config: Any, model_args: Any) -> tuple[int, int]:
    """``(count, bytes)`` of :func:`trainable_meta_parameters`."""
    params = trainable_meta_parameters(config, model_args)
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def trainable_meta_parameters(config: Any, model_args: Any) -> list[torch.Tensor]:
    """The trainable parameters training will have, built on the meta device (no memory):
    those of :func:`meta_model`."""
    return [p for p in meta_model(config, model_args).parameters() if p.requires_grad]


def meta_model(config: Any, model_args: Any) -> torch.nn.Module:
    """The model training will have, built on the meta device (no memory).

    The model comes from ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` (no
    memory, no weights) in the dtype ``model_args.dtype`` loads; with ``use_peft`` the real PEFT
    config (:func:`trl.get_peft_config`) is applied with :func:`peft.get_peft_model`, so target
    matching, ``modules_to_save``, DoRA and the adapters' fp32 upcast are peft's own.

    Raises:
        InputError: PEFT cannot wrap the model (e.g. no default targets for the model type).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_weights_dtype(model_args, config))
        if getattr(model_args, "use_peft", False):
            from peft import get_peft_model
            from trl import get_peft_config

            try:
                model = get_peft_model(model, get_peft_config(model_args))
            except ValueError as err:
                raise InputError(f"lora_target_modules: peft cannot wrap this model: {err}") from None
    return model


def plan_memory(
    training_args: Any,
    model_args: Any,
    model: Resolved,
    num_tasks: int,
    trainable_parameters: int | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of a run.

    ``trainable_parameters`` overrides the count (at 4 bytes each); ``config_file`` is the
    ``config.json`` used when the model's own is not on this machine.
    """
    space = getattr(training_args, "capability_space", "gradient")
    projecting = training_args.projection != "none" and num_tasks > 0
    # capability_space="activation" holds no gradient directions (no UpdateProjector)
    k = num_tasks * int(training_args.capability_rank) if projecting and space != "activation" else 0
    uses_activation = projecting and space in ("activation", "both")
    tracking = bool(getattr(training_args, "degradation_tracking", False)) and num_tasks > 0
    ema = float(getattr(training_args, "capability_ema", 0.0) or 0.0) > 0
    unknown = None if uses_activation else 0
    if trainable_parameters is not None:
        return MemoryPlan(
            trainable_parameters,
            4 * trainable_parameters,
            k,
            num_tasks,
            tracking,
            ema,
            "trainable_parameters (given)",
            activation_bytes=unknown,
            activation_refresh_bytes=unknown,
            activation_checkpoint_bytes=unknown,
        )
    config, origin = model_config(model, config_file)
    if config is None:
        return MemoryPlan(None, None, k, num_tasks, tracking, ema, origin, activation_bytes=unknown,
                          activation_refresh_bytes=unknown, activation_checkpoint_bytes=unknown)  # fmt: skip
    built = meta_model(config, model_args)
    params = [p for p in built.parameters() if p.requires_grad]
    count, size = sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
    worlds = fsdp_world_sizes(training_args)
    shards = {n: max_shard_bytes(params, n) for n in worlds}
    activation_bytes = refresh_bytes = basis_bytes = 0
    if uses_activation:
        from frontier_trainer.activation import DEFAULT_MAX_COVARIANCE_BYTES, activation_memory

        estimate = activation_memory(built, rank=int(training_args.activation_rank), num_directions=k)
        activation_bytes, basis_bytes = estimate["activation_total"], estimate["activation_basis"]
        refresh_bytes = min(
            estimate["activation_refresh_one_pass"], max(estimate["activation_refresh"], DEFAULT_MAX_COVARIANCE_BYTES)
        )
    return MemoryPlan(
        count, size, k, num_tasks, tracking, ema, origin, shards, activation_bytes, refresh_bytes, basis_bytes
    )


def fsdp_world_sizes(training_args: Any) -> list[int]:
    """World sizes to plan FSDP2 shards for: none without FSDP; else the load-time
    ``distributed_config.fsdp_size`` (``model_init_kwargs``), the launched ``WORLD_SIZE``, or, in a
    single-process dry run, 2, 4 and 8."""
    kwargs = getattr(training_args, "model_init_kwargs", None) or {}
    dist_config = kwargs.get("distributed_config") if isinstance(kwargs, Mapping) else None
    if isinstance(dist_config, Mapping):
        size = dist_config.get("fsdp_size")
    else:
        size = getattr(dist_config, "fsdp_size", None)
    if size:
        return [int(size)]
    if not fsdp_requested(training_args):
        return []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return [world] if world > 1 else [2, 4, 8]


def _refresh_tasks_line(training_args: Any, num_tasks: int) -> str:
    """The plan's description of ``capability_refresh_tasks``: how many tasks a refresh re-estimates and how
    often each task is refreshed (every ceil(T/m) refreshes, round-robin)."""
    m = getattr(training_args, "capability_refresh_tasks", None)
    if m is None or num_tasks == 0 or m >= num_tasks:
        return f"capability_refresh_tasks={m} (every task at every refresh)"
    every = math.ceil(num_tasks / m) * training_args.capability_refresh_steps
    return (
        f"capability_refresh_tasks={m} of {num_tasks} (round-robin: each task re-estimated every {every} steps)"
    )


def human_bytes(n: float | None) -> str:
    """``1.5 MiB``-style size (``unknown`` for ``None``)."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (``None`` when one is not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(getattr(value, "value", value))


def _settings(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    raw = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    return {k: _jsonable(v) for k, v in raw.items() if not k.startswith("_") and "token" not in k.lower()}


@dataclass
class FrontierPlan:
    """Everything decided before training (see the module docstring).

    Attributes:
        model: the resolved model source.
        preferences: the resolved preference data (``None`` when none was asked for).
        capabilities: the resolved ``capability_datasets``, in task order.
        evaluations: the resolved ``capability_eval_datasets``.
        memory: the :class:`MemoryPlan`.
        settings: ``{"training": ..., "model": ..., "script": ...}`` as JSON values.
        world_size: processes that will train.
        forced_cpu: a dry run had to force ``use_cpu`` (bf16 recipe, no GPU here).
    """

    model: Resolved
    preferences: Resolved | None
    capabilities: list[Resolved]
    evaluations: list[Resolved]
    memory: MemoryPlan
    settings: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    forced_cpu: bool = False

    @classmethod
    def build(
        cls,
        training_args: Any,
        model_args: Any,
        script_args: Any = None,
        dataset_args: Any = None,
        *,
        offline: bool,
        trainable_parameters: int | None = None,
        model_config_file: str | os.PathLike[str] | None = None,
        forced_cpu: bool = False,
    ) -> FrontierPlan:
        """Resolve every source, check the settings and plan the memory; nothing is trained.

        ``offline=True`` (the dry run) resolves only what needs no network and no pretraining.

        Raises:
            InputError: a bad source or setting, naming the key and the fix.
        """
        model = source_registry.resolve_model(model_args.model_name_or_path, offline=offline)
        preferences = None
        if script_args is not None:
            preferences = source_registry.resolve_preferences(
                script_args.dataset_name,
                offline=offline,
                train_split=script_args.dataset_train_split,
                test_split=script_args.dataset_test_split,
                config=script_args.dataset_config,
                streaming=bool(getattr(script_args, "dataset_streaming", False)),
                mixture=dataset_args,
            )
        train_prefs: Any = (
            None  # the preferred responses a ``completions_from`` source pairs its prompts with
        )
        if (
            preferences is not None
            and preferences.status == source_registry.OK
            and preferences.data is not None
        ):
            train_prefs = preferences.data[script_args.dataset_train_split]
        elif preferences is not None:
            train_prefs = source_registry.OFFLINE  # a dry run: completions_from is paired at run time
        caps = source_registry.resolve_capabilities(
            "capability_datasets",
            training_args.capability_datasets,
            eval_split=False,
            offline=offline,
            preferences=train_prefs,
        )
        evals = source_registry.resolve_capabilities(
            "capability_eval_datasets",
            training_args.capability_eval_datasets,
            eval_split=True,
            offline=offline,
            preferences=train_prefs,
        )
        tasks = list(training_args.capability_datasets or {})
        check_recipe_settings(
            training_args, model_args, tasks, list(training_args.capability_eval_datasets or {})
        )
        try:
            check_arguments(training_args, dict.fromkeys(tasks), on_accelerator=True if forced_cpu else None)
        except InputError:
            raise
        except ValueError as err:
            raise InputError(str(err)) from None
        memory = plan_memory(
            training_args, model_args, model, len(tasks), trainable_parameters, model_config_file
        )
        settings = {
            "training": _settings(training_args),
            "model": _settings(model_args),
            "script": _settings(script_args),
        }
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(model, preferences, caps, evals, memory, settings, world, forced_cpu)

    # ------------------------------------------------------------------ views

    @property
    def resolutions(self) -> list[Resolved]:
        """Every resolved source, model first."""
        return [
            self.model,
            *([self.preferences] if self.preferences else []),
            *self.capabilities,
            *self.evaluations,
        ]

    @property
    def offline(self) -> list[str]:
        """Keys of the sources that are not resolvable offline (checked at run time)."""
        return [r.key for r in self.resolutions if r.status != OK]

    @property
    def capability_fingerprints(self) -> dict[str, str | None]:
        """``{task: fingerprint}`` of the capability data (what a resume compares)."""
        return {r.task or r.key: r.fingerprint for r in self.capabilities}

    def capability_data(self, evaluation: bool = False) -> dict[str, Any]:
        """``{task: Dataset}`` of the loaded capability (or evaluation) sources."""
        return source_registry.loaded(self.evaluations if evaluation else self.capabilities)

    def to_json(self) -> dict[str, Any]:
        """The provenance record: settings, package versions, sources with fingerprints, memory."""
        return {
            "format": "frontier-trainer plan v1",
            "versions": package_versions(),
            "python": platform.python_version(),
            "world_size": self.world_size,
            "forced_cpu": self.forced_cpu,
            "sources": [r.to_json() for r in self.resolutions],
            "memory": self.memory.to_json(),
            "settings": self.settings,
        }

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` as ``frontier_plan.json`` in ``directory`` (created); returns the path."""
        path = Path(directory) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        logger.info("wrote the run's plan (provenance) to %s", path)
        return path

    def lines(self, training_args: Any, model_args: Any) -> list[str]:
        """The plan as text lines (what ``--dry-run`` prints)."""
        lines = []
        for res in self.resolutions:
            tag = "ok" if res.status == OK else "not resolvable offline"
            fp = f" ({res.fingerprint[:23]}...)" if res.fingerprint else ""
            lines.append(f"  {res.key}: {res.value}  [{tag}] {res.detail}{fp}")
        tasks = [r.task for r in self.capabilities]
        if model_args.use_peft:
            targets = model_args.lora_target_modules or "peft default"
            training = f"LoRA r={model_args.lora_r} alpha={model_args.lora_alpha} targets={targets}"
        else:
            training = "full fine-tune"
        if training_args.projection == "frontier":
            tolerance: Any = {t: training_args.tolerance_for(t) for t in tasks}
        else:
            tolerance = "n/a (projection is not 'frontier')"
        if training_args.max_steps > 0:
            steps = f"max_steps={training_args.max_steps}"
        else:
            steps = f"num_train_epochs={training_args.num_train_epochs}"
        per_device, accum = (
            training_args.per_device_train_batch_size,
            training_args.gradient_accumulation_steps,
        )
        scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
        mode = "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "fp32"
        device = "cpu" if training_args.use_cpu else "accelerator if present"
        if self.forced_cpu:
            device = "GPU (none here: parsed with use_cpu for this dry run)"
        lines += [
            f"  training: {training}",
            f"  projection: {training_args.projection}; capability tasks: {tasks or 'none'}; "
            f"rank {training_args.capability_rank}",
            f"  capability_tolerance: {tolerance}",
            f"  refusal holds (scored with refusal_avoidance_metric): "
            f"{source_registry.refusal_hold_tasks(training_args.capability_datasets) or 'none'}",
            f"  steps: {steps}, learning_rate={training_args.learning_rate}, lr_scheduler={scheduler}",
            f"  batch: per_device_train_batch_size={per_device} x gradient_accumulation_steps={accum} x "
            f"world_size={self.world_size} = {per_device * accum * self.world_size}; "
            f"capability_batch_size={training_args.capability_batch_size}, "
            f"capability_refresh_steps={training_args.capability_refresh_steps}, "
            f"{_refresh_tasks_line(training_args, len(tasks) if tasks else 0)}",
            f"  precision: {mode}, weights dtype={model_args.dtype}, device={device}",
            f"  output_dir: {training_args.output_dir}; report_to: {training_args.report_to}",
        ]
        mem = self.memory
        space = getattr(training_args, "capability_space", "gradient")
        if mem.trainable_bytes is None:
            lines.append(f"  memory: unknown ({mem.source}; pass --trainable_parameters N)")
        else:
            lines += [
                f"  trainable parameters: {mem.trainable_parameters:,}, {human_bytes(mem.trainable_bytes)} "
                f"(T; from {mem.source}, built on the meta device)",
                (
                    "  projector: none (capability_space='activation' holds no gradient directions)"
                    if space == "activation"
                    else f"  projector: (k+1) T, k = {mem.num_tasks} tasks x rank {training_args.capability_rank} = "
                    f"{mem.num_directions}: {human_bytes(mem.projector_bytes)} "
                    f"(peak {human_bytes(mem.projector_peak_bytes)}) per process"
                ),
                *(
                    [
                        f"  activation projector (capability_space={space!r}): float64 bases and step images "
                        f"with r = activation_rank {training_args.activation_rank} in every input group (an upper "
                        f"bound: activation_energy may keep fewer): {human_bytes(mem.activation_bytes)} per process; "
                        f"a refresh adds {human_bytes(mem.activation_refresh_bytes)} of float64 input covariances "
                        "(transient)"
                    ]
                    if space in ("activation", "both")
                    else []
                ),
                f"  degradation tracker: (m+1) T = {human_bytes(mem.tracker_bytes)} "
                f"(peak (2m+1) T = {human_bytes(mem.tracker_peak_bytes)}) per process",
                f"  total extra: {human_bytes(mem.total_bytes)} per process; checkpoint frontier_state.pt: "
                f"{human_bytes(mem.checkpoint_bytes)}",
            ]
        for n, shard in mem.shard_bytes.items():
            lines.append(
                f"  FSDP2 over {n} ranks (Shard(0)): T per rank {human_bytes(shard)}; projector (k+1) T/rank = "
                f"{human_bytes(mem.projector_bytes_per_rank(n))} per rank (instead of "
                f"{human_bytes(mem.projector_bytes)} unsharded); checkpoint frontier_state.rank<r>.pt: "
                f"{human_bytes(mem.num_directions * shard)}"
            )
        counts = {
            "directions_extra_bytes": mem.projector_bytes,  # (k+1) T, the projector alone
            **({"activation_extra_bytes": mem.activation_bytes} if space in ("activation", "both") else {}),
            "tracker_extra_bytes": mem.tracker_bytes,
            "total_extra_bytes": mem.total_bytes,
            "checkpoint_bytes": mem.checkpoint_bytes,
        }
        lines += [f"  {name}: {value if value is not None else 'unknown'}" for name, value in counts.items()]
        lines += [
            f"  directions_extra_bytes_per_rank[{n}]: {mem.projector_bytes_per_rank(n)}"
            for n in mem.shard_bytes
        ]
        offline = self.offline
        lines.append(
            f"  not resolvable offline (checked at run time): {offline}"
            if offline
            else "  everything resolved."
        )
        return lines


__all__ = [
    "PLAN_FILE",
    "UNSUPPORTED_OPTIM_MARKERS",
    "FrontierPlan",
    "MemoryPlan",
    "check_arguments",
    "check_model",
    "check_recipe_settings",
    "human_bytes",
    "load_config_file",
    "model_config",
    "package_versions",
    "plan_memory",
    "trainable_parameter_set",
]
