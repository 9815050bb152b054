"""FrontierMixin: the exact projection of every optimizer step, for any ``transformers.Trainer``.

The projection is an optimizer-seam feature, not a DPO one. Put the mixin first in the bases of
any trainer class (cooperative MRO; every override calls ``super()``)::

    class FrontierSFTTrainer(FrontierMixin, SFTTrainer):
        frontier_config_class = FrontierSFTConfig

Data flows one way:

    capability datasets --(directions.build_capability_sampler)--> batches
        --(directions.capability_gradients, every ``capability_refresh_steps``)--> directions c_i
        --(projection.UpdateProjector around each real optimizer step)--> θ_old + δ
        --> diagnostics in the mixin's own metric buffer, averaged and merged into ``log()``.

The seam is the raw torch optimizer (field notes §3): ``create_optimizer`` registers a step
pre-hook and post-hook on it. The pre-hook fires once per real optimizer step — after gradient
accumulation, DDP all-reduce, unscaling and clipping, never per micro-batch, and not at all
when the AMP scaler skips a step — so the projection acts on the displacement the optimizer
really applies, AdamW moments and weight decay included (field notes §2). Nothing here reads
TRL internals: a plain ``transformers.Trainer`` wearing the mixin is projected the same way.

Coverage: the projection acts on exactly the parameters the optimizer updates — those in its
param groups with ``requires_grad`` and a base learning rate (``initial_lr``) above 0. Groups
with lr 0 are excluded (they do not move at all; before, the correction moved them). When the
set changes between steps (a parameter frozen or unfrozen, a group's base lr set to 0),
``capability_param_change`` decides: ``"retrack"`` projects over the new set and re-estimates
the directions at once; ``"error"`` raises naming the parameters.

Diagnostics per logging window: ``frontier/leak/<task>`` (the realised |cos(c_i, δ)|),
``frontier/tau/<task>``, ``frontier/raw_tax_rate``, ``frontier/fraction_removed``,
``frontier/safety_retained``, timings, and at every refresh ``frontier/generalisation_leak/<task>``:
max |cos| between the last applied update and the *fresh* directions, estimated from rows that
were not used to project it (issue 15 §1: what the guarantee covers beyond the rows it held).

``projection="none"`` registers nothing and computes nothing during training: the trainer is
bitwise the base class.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from frontier_trainer.activation import ActivationProjector
from frontier_trainer.arguments import FrontierArguments
from frontier_trainer.directions import (
    CapabilitySampler,
    MetricFn,
    build_capability_sampler,
    capability_gradients,
    complete_prompt_only_sources,
    completion_metric,
    refusal_avoidance_metric,
)
from frontier_trainer.distributed import (
    HOW_TO_FSDP2,
    fsdp_requested,
    is_sharded,
    make_projector,
    state_file_name,
)
from frontier_trainer.plan import check_arguments, check_model
from frontier_trainer.projection import StepReport, UpdateProjector
from frontier_trainer.sources import refusal_hold_tasks
from frontier_trainer.subspace import sketch_task_directions
from frontier_trainer.tracking import (
    DegradationCallback,
    SafetyDirection,
    check_fingerprints,
    data_fingerprints,
)

logger = logging.getLogger(__name__)


def default_capability_metrics(
    sources: Mapping[str, Any], metrics: Mapping[str, MetricFn] | None
) -> dict[str, MetricFn]:
    """The metrics the trainer differentiates: ``metrics`` as given, plus
    :func:`~frontier_trainer.directions.refusal_avoidance_metric` for every refusal-hold task it does not name
    (:func:`frontier_trainer.sources.refusal_hold_tasks`). Why: frontier mode bounds a capability's *loss*, so
    with the default metric a hold would bound only a fall of the refusal on benign prompts, a hold in name
    only (``frontier_trainer.benign``). Tasks left out use ``completion_metric``."""
    resolved = dict(metrics or {})
    for task in refusal_hold_tasks(sources):
        if task not in resolved:
            resolved[task] = refusal_avoidance_metric
            logger.info("capability task %r is a refusal hold: scored with refusal_avoidance_metric.", task)
    return resolved

STATE_FILE = "frontier_state.pt"

# --------------------------------------------------------------------------------------
# construction checks: one copy, in the planning layer (plan.check_arguments / check_model)
# --------------------------------------------------------------------------------------

#: Refuse, before any model is built, a setup the projection cannot make exact (the capability
#: tasks against tolerances and metrics; DeepSpeed, FSDP on the CPU or FSDP1 (FSDP2 is supported:
#: frontier_trainer.distributed), optimizers stepping inside backward, reentrant checkpointing,
#: fp16 without CUDA). Kept under this name for existing callers.
check_frontier_setup = check_arguments


def _tensor_bytes(groups: list[list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for group in groups for t in group)


def as_frontier_args(args: Any, model: Any, config_class: type | None) -> FrontierArguments:
    """Accept a config carrying :class:`FrontierArguments`, a plain config of ``config_class``'s base
    (upgraded with default frontier fields, its own values kept), or None (defaults).

    Raises:
        TypeError: a config that cannot be upgraded, with the fix.
    """
    if isinstance(args, FrontierArguments):
        return args
    if config_class is None:
        from frontier_trainer.config import FrontierTrainingArguments

        config_class = FrontierTrainingArguments
    if args is None:
        name = (
            model
            if isinstance(model, str)
            else getattr(getattr(model, "config", None), "_name_or_path", "model")
        )
        suffix = config_class.__name__.removesuffix("Config").removesuffix("Arguments")
        return config_class(output_dir=f"{str(name).split('/')[-1] or 'model'}-{suffix}")
    bases = tuple(c for c in config_class.__mro__[1:] if c not in (FrontierArguments, object))
    if isinstance(args, bases) and dataclasses.is_dataclass(args):
        own = {f.name for f in dataclasses.fields(config_class)}
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        if set(values) <= own:
            return config_class(**values)
    raise TypeError(
        f"args must carry the frontier fields: a {config_class.__name__} (or a plain "
        f"{next(c.__name__ for c in config_class.__mro__[1:] if c is not FrontierArguments)}), got "
        f"{type(args).__name__}. For another config class define "
        f"`@dataclass class MyConfig(FrontierArguments, {type(args).__name__})`."
    )


# --------------------------------------------------------------------------------------
# the mixin
# --------------------------------------------------------------------------------------


class FrontierMixin:
    """Projects every optimizer step of the trainer it is mixed into (first in the bases).

    Constructor: the base trainer's, plus the keywords below (``args`` may be positional; it is
    found by the base constructor's signature and upgraded to :attr:`frontier_config_class`).

    Args:
        capability_datasets: ``{task: Dataset or source}``; overrides ``args.capability_datasets``.
            Rows are ``prompt``/``completion`` (the prompt's tokens are masked) or ``text``.
        capability_metrics: optional ``{task: metric(model, batch) -> scalar}``, a differentiable
            metric to use instead of the default for that task: the mean completion log-likelihood, or for
            refusal-hold rows (:func:`frontier_trainer.benign.refusal_hold_dataset`) its negative,
            :func:`~frontier_trainer.directions.refusal_avoidance_metric` (:func:`default_capability_metrics`).
        capability_eval_datasets: held-out ``{task: Dataset or source}`` for the degradation
            tracker's observed change; overrides ``args.capability_eval_datasets``.
        degradation_metrics: ``{name: fn(model, tokenizer) -> float}`` user metrics whose change the
            degradation tracker logs (e.g. the lab's exact-match accuracy).
        safety_direction: the tracker's safety direction: ``"loss"``, ``"updates"``, ``"auto"``
            or a callable ``fn(model, params) -> list[Tensor]``; overrides ``args.safety_direction``.
    """

    #: The config class a plain config (or None) is upgraded to; None: FrontierTrainingArguments.
    frontier_config_class: ClassVar[type | None] = None

    def __init__(
        self,
        *args: Any,
        capability_datasets: Mapping[str, Any] | None = None,
        capability_metrics: Mapping[str, MetricFn] | None = None,
        capability_eval_datasets: Mapping[str, Any] | None = None,
        degradation_metrics: Mapping[str, Any] | None = None,
        safety_direction: SafetyDirection | None = None,
        **kwargs: Any,
    ) -> None:
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        config = as_frontier_args(
            bound.arguments.get("args"), bound.arguments.get("model"), self.frontier_config_class
        )
        bound.arguments["args"] = config
        sources = (
            dict(capability_datasets)
            if capability_datasets is not None
            else dict(config.capability_datasets or {})
        )
        self.capability_tasks: list[str] = list(sources)
        check_arguments(config, sources, capability_metrics)
        # state the hooks read, set before the base constructor in case it calls an override
        self.projector: UpdateProjector | None = None
        #: capability_space "activation"/"both": the activation-subspace projector (issue 13 §1).
        self.activation_projector: ActivationProjector | None = None
        self._activation_step: int | None = None
        self._activation_names: list[str] | None = None
        self.capability_sampler: CapabilitySampler | None = None
        self.capability_metrics: dict[str, MetricFn] = default_capability_metrics(sources, capability_metrics)
        self.degradation_callback: DegradationCallback | None = None
        self._frontier_metrics: defaultdict[str, list[float]] = defaultdict(list)
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self._hook_handles: list[Any] = []
        self._last_report: StepReport | None = None
        self._directions_step: int | None = None
        self._projection_seconds = 0.0
        self._tracked_names: list[str] | None = None
        self._force_refresh = False
        self._has_applied_update = False
        self._raw_update_sum: dict[int, torch.Tensor] | None = None
        #: capability_space="both" with capability_refresh_tasks: the unrestricted directions, so that
        #: a kept task's direction is restricted again by the current activation bases at each install.
        self._raw_directions: list[list[torch.Tensor]] | None = None
        #: Largest number of bytes held at once by the projection state (snapshot and directions,
        #: including fresh directions during a refresh), counted from the tensors themselves.
        self.peak_state_bytes = 0
        super().__init__(*bound.args, **bound.kwargs)

        args = self.args
        if sources:
            # A prompt-only source (rows with only 'prompt', or user-only 'messages') is completed once by
            # the model itself, cached with provenance (issue 15 §3); the tracker and the sampler see the
            # completed rows. Bad input (an empty prompt, mixed rows) is refused here, naming the task.
            sources = complete_prompt_only_sources(sources, self._unwrapped_model(), self.processing_class)
            # Load, validate and tokenise now: every bad-input error comes before training.
            self.capability_sampler = build_capability_sampler(
                sources,
                self.processing_class,
                max_length=args.capability_max_length,
                batch_size=args.capability_batch_size,
                seed=args.seed,
            )
        if args.degradation_tracking and sources:
            evals = (
                capability_eval_datasets
                if capability_eval_datasets is not None
                else args.capability_eval_datasets
            )
            self.degradation_callback = DegradationCallback(
                sources,
                eval_datasets=evals,
                metrics=degradation_metrics,
                eval_steps=args.degradation_eval_steps,
                safety_batches=args.safety_direction_batches,
                batch_size=args.capability_batch_size,
                max_length=args.capability_max_length,
                seed=args.seed,
                safety_direction=safety_direction if safety_direction is not None else args.safety_direction,
                probe_harmless=args.degradation_probe_harmless,
                probe_harmless_name="degradation_probe_harmless",
            ).attach(self)
        elif args.degradation_tracking:
            logger.info("degradation tracking is off: no capability_datasets to measure τ_i against.")
        if args.projection != "none":
            self._check_setup_after_init()
            named = [(n, p) for n, p in self._unwrapped_model().named_parameters() if p.requires_grad]
            if args.capability_space != "activation":
                self.projector = self._new_projector([p for _, p in named])
                self._check_estimator_supported()
            if args.capability_space in ("activation", "both"):
                self.activation_projector = self._new_activation_projector()

    # ------------------------------------------------------------------ construction

    def _check_estimator_supported(self) -> None:
        """The sketch estimator has no sharded path: refused with a sharded (FSDP2) projector."""
        if self.args.capability_estimator == "sketch" and getattr(self.projector, "capability_gradients", None):
            raise ValueError(
                "capability_estimator='sketch' does not support a sharded (FSDP2) projector yet: its capability "
                "gradients are local shards, which the sketch would all-reduce as if they were whole. Use "
                "capability_estimator='batch' with FSDP2."
            )

    def _new_projector(self, params: list[torch.nn.Parameter]) -> UpdateProjector:
        args = self.args
        tolerances = None
        if args.projection == "frontier":
            tolerances = [args.tolerance_for(t) for t in self.capability_tasks for _ in range(args.capability_rank)]
        try:
            # FSDP2 (DTensor parameters): the sharded projector on local shards, else UpdateProjector
            return make_projector(params, mode=args.projection, tolerances=tolerances)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}(projection={args.projection!r}): {err}") from None

    def _new_activation_projector(self) -> ActivationProjector:
        args = self.args
        assert self.capability_sampler is not None
        try:
            projector = ActivationProjector(
                self._unwrapped_model(), rank=args.activation_rank, energy=args.activation_energy
            )
            ActivationProjector.check_rows(self.capability_sampler.rows)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}(capability_space={args.capability_space!r}): {err}") from None
        return projector

    def _check_setup_after_init(self) -> None:
        """DeepSpeed/FSDP enabled through accelerate, or low-precision trainable weights: refused.

        With accelerate's FSDP plugin (GPUs) the model is sharded later, in ``train()``'s prepare:
        the projector is rebuilt over the DTensors at the first step (``_sync_tracked_parameters``)
        and :meth:`_before_optimizer_step` refuses it if they are still plain tensors then."""
        #: accelerate's FSDP plugin shards at prepare: the first step must see DTensors
        self._expect_sharded = bool(getattr(self, "is_fsdp_enabled", False))
        check_model(
            self._unwrapped_model(),
            deepspeed_enabled=bool(getattr(self, "is_deepspeed_enabled", False)),
            owner=type(self).__name__,
            fsdp_wanted=fsdp_requested(self.args) and not self._expect_sharded,
            num_processes=self.accelerator.num_processes,
            degradation_tracking=self.degradation_callback is not None,
            capability_space=getattr(self.args, "capability_space", "gradient"),
        )

    def _unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ metrics

    def _record(self, name: str, value: float) -> None:
        """Buffer a scalar; :meth:`log` averages the buffer per logging window."""
        self._frontier_metrics[name].append(float(value))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Merge the buffered frontier scalars (mean per window) into training logs, then log."""
        if self._frontier_metrics and not any(str(k).startswith("eval_") for k in logs):
            for name, values in self._frontier_metrics.items():
                if values:
                    logs[name] = sum(values) / len(values)
            self._frontier_metrics.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ optimizer seam

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.projector is not None or self.activation_projector is not None:
            self._hook_optimizer(optimizer)
        return optimizer

    def _hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper is not a torch Optimizer
        if raw is self._hooked_optimizer:
            return  # create_optimizer runs on every train(): register once
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = [
            raw.register_step_pre_hook(self._before_optimizer_step),
            raw.register_step_post_hook(self._after_optimizer_step),
        ]
        self._hooked_optimizer = raw

    def _updated_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) the optimizer updates: in a param group whose base lr (``initial_lr``,
        else ``lr``) is above 0, with ``requires_grad``; in the model's parameter order."""
        optimizer = self._hooked_optimizer
        if optimizer is None:
            return [(n, p) for n, p in self._unwrapped_model().named_parameters() if p.requires_grad]
        stepped: set[int] = set()
        for group in optimizer.param_groups:
            if float(group.get("initial_lr", group.get("lr", 0.0))) > 0:
                stepped.update(id(p) for p in group["params"])
        return [
            (n, p) for n, p in self._unwrapped_model().named_parameters() if p.requires_grad and id(p) in stepped
        ]

    def _sync_tracked_parameters(self) -> None:
        """Make the projector cover exactly the parameters the optimizer updates now.

        At the first step the set is fixed silently (lr-0 groups excluded, logged). A change at a
        later step follows ``capability_param_change``: retrack (new projector over the new set,
        directions re-estimated at this step) or raise naming the parameters.
        """
        assert self.projector is not None
        named = self._updated_parameters()
        names = [n for n, _ in named]
        if names == self._tracked_names:
            return
        if not named:
            raise ValueError(
                "the optimizer updates no parameter (every param group has lr 0 or no parameter requires grad): "
                "nothing to project. Give the trainable parameters a learning rate above 0."
            )
        current = {id(p) for p in self.projector.params}
        same = len(named) == len(current) and all(id(p) in current for _, p in named)
        if self._tracked_names is None:
            if not same:
                excluded = [
                    n for n, p in self._unwrapped_model().named_parameters()
                    if p.requires_grad and n not in set(names)
                ]
                logger.info(
                    "frontier projection: %d trainable parameter(s) in param groups with lr 0 are not projected "
                    "(the optimizer never moves them): %s",
                    len(excluded),
                    excluded[:8],
                )
        else:
            before, now = set(self._tracked_names), set(names)
            added, removed = sorted(now - before), sorted(before - now)
            change = f"parameters now updated: {added[:8]}; no longer updated: {removed[:8]}"
            if self.args.capability_param_change == "error":
                raise ValueError(
                    f"the set of parameters the optimizer updates changed at step {self.state.global_step} "
                    f"({change}); the projection's directions cover the old set. Freeze/unfreeze before "
                    "training, or set capability_param_change='retrack' to re-estimate the directions."
                )
            logger.warning(
                "frontier projection: %s at step %d; re-estimating the capability directions now.",
                change,
                self.state.global_step,
            )
            self._force_refresh = True
        if not same:
            params = [p for _, p in named]
            if self.projector.num_directions:
                self._force_refresh = True
            self.projector = self._new_projector(params)
            self._raw_directions = None  # they cover the old parameter set
            self._has_applied_update = False  # the previous update lives on another parameter set
            if self._raw_update_sum is not None:
                logger.warning("degradation tracking: the parameter set changed while summing raw updates.")
        self._tracked_names = names

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step = self.state.global_step
        refresh = self.args.capability_refresh_steps
        activation = self.activation_projector
        if activation is not None:
            # bases first: in "both" mode the gradient directions are restricted by them at install
            self._check_activation_parameters()
            if not activation.ready or (step % refresh == 0 and self._activation_step != step):
                self.refresh_activation()
        refreshed = False
        if self.projector is not None:
            self._sync_tracked_parameters()
            if getattr(self, "_expect_sharded", False) and not is_sharded(self.projector.params):
                raise ValueError(
                    f"{type(self).__name__}: accelerate's FSDP plugin is enabled but the parameters the optimizer "
                    "updates are plain tensors at the first step, not FSDP2 DTensors: the run is not sharded "
                    "(FSDP1, or a fallback). " + HOW_TO_FSDP2
                )
            refreshed = (
                self._force_refresh
                or self.projector.num_directions == 0
                or (step % refresh == 0 and self._directions_step != step)
            )
            if refreshed:
                self.refresh_directions()
        start = time.perf_counter()
        if activation is not None:
            activation.before_step()
        if self.projector is not None:
            self.projector.before_step()
        self._projection_seconds = time.perf_counter() - start
        if refreshed:  # the held state (snapshot + directions) changes only when directions do
            assert self.projector is not None
            held = self.projector.extra_memory_bytes() + self._raw_direction_bytes()
            self.peak_state_bytes = max(self.peak_state_bytes, held)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        start = time.perf_counter()
        self._accumulate_raw_update()  # the tracker's raw update, before any projection
        if self.activation_projector is not None:
            # activation first: the gradient projector then projects the allowed update u' (see
            # ActivationProjector.project_directions for why both guarantees hold)
            activation_report = self.activation_projector.after_step()
            if activation_report is not None:
                self._record("frontier/activation_removed", activation_report.max_removed)
                if self.projector is None:
                    self._record(
                        "frontier/projection_seconds", self._projection_seconds + time.perf_counter() - start
                    )
        if self.projector is None:
            return
        report = self.projector.after_step()
        if report is None:
            return
        self._has_applied_update = True
        projection_seconds = self._projection_seconds + time.perf_counter() - start
        # the realised leak costs one more pass over the parameters: measure it on logging steps,
        # and time it apart so that projection_seconds is the projection's own cost
        if (self.state.global_step + 1) % max(1, int(self.args.logging_steps or 1)) == 0:
            start = time.perf_counter()
            report.realised_leak = self.projector.measure_leak()
            self._record("frontier/leak_seconds", time.perf_counter() - start)
        self._last_report = report
        self._record("frontier/projection_seconds", projection_seconds)
        self._record("frontier/raw_tax_rate", report.raw_tax_rate)
        self._record("frontier/fraction_removed", report.fraction_removed)
        self._record("frontier/safety_retained", report.safety_retained)
        rank = self.args.capability_rank
        for i, task in enumerate(self.capability_tasks):
            block = slice(i * rank, (i + 1) * rank)
            self._record(f"frontier/tau/{task}", max(report.raw_task_tax_rates[block]))
            if report.realised_leak is not None:
                self._record(f"frontier/leak/{task}", max(report.realised_leak[block]))

    # ------------------------------------------------------------------ activation subspaces

    def _check_activation_parameters(self) -> None:
        """The activation bases are built for the modules trainable at the first step: a later change
        of the set the optimizer updates is refused (no re-tracking in activation modes)."""
        names = [n for n, _ in self._updated_parameters()]
        if self._activation_names is None:
            self._activation_names = names
        elif names != self._activation_names:
            raise ValueError(
                f"the set of parameters the optimizer updates changed at step {self.state.global_step}; "
                f"capability_space={self.args.capability_space!r} protects the modules trainable at the start and "
                "does not re-track. Freeze/unfreeze before training, or use capability_space='gradient'."
            )

    def refresh_activation(self) -> None:
        """Re-estimate every protected module's input subspace U_ℓ at the current weights, from
        ``capability_rank`` seeded capability batches per task (identical on every DDP rank)."""
        assert self.activation_projector is not None and self.capability_sampler is not None
        start = time.perf_counter()
        batches = [
            self.capability_sampler.next_batch(task)
            for task in self.capability_tasks
            for _ in range(self.args.capability_rank)
        ]
        self.activation_projector.refresh(batches)
        held = self.activation_projector.memory_bytes() + self.activation_projector.peak_covariance_bytes
        self.peak_state_bytes = max(self.peak_state_bytes, held)
        self._activation_step = self.state.global_step
        self._record("frontier/activation_refresh_seconds", time.perf_counter() - start)

    # ------------------------------------------------------------------ raw updates (tracker)

    def start_raw_update_sum(self) -> bool:
        """Start summing the optimizer's raw updates u = θ_new − θ_old (before projection).

        Returns False when there is no projector (then θ_t − θ_0 already is the raw sum)."""
        if self.projector is None:
            if self.activation_projector is not None:
                logger.warning(
                    "degradation tracking with capability_space='activation': there is no raw-update snapshot, so "
                    "the 'updates' safety direction is the sum of the projected updates θ_t − θ_0."
                )
            return False
        self._raw_update_sum = {}
        return True

    def pop_raw_update_sum(self, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor] | None:
        """Σ u over the steps since :meth:`start_raw_update_sum`, one tensor per ``params`` entry
        (zeros for parameters the optimizer did not update); stops summing. None if not started."""
        acc, self._raw_update_sum = self._raw_update_sum, None
        if acc is None:
            return None
        return [acc[id(p)] if id(p) in acc else torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def _accumulate_raw_update(self) -> None:
        if self._raw_update_sum is None or self.projector is None:
            return
        snapshot = getattr(self.projector, "_snapshot", None)
        if snapshot is None or not self.projector.num_directions:
            return
        for p, s in zip(self.projector.params, snapshot, strict=True):
            d = p.detach() - s
            acc = self._raw_update_sum.get(id(p))
            self._raw_update_sum[id(p)] = d if acc is None else acc.add_(d)

    # ------------------------------------------------------------------ directions

    def _refresh_task_indices(self) -> list[int]:
        """Indices (in task order) of the tasks this refresh re-estimates (``capability_refresh_tasks``).

        Refresh number n = ``global_step // capability_refresh_steps`` re-estimates tasks
        (n·m + j) mod T for j = 0..m-1: derived from the step, so identical on every DDP rank and across
        a checkpoint resume with no new state. Every task: m None (or m >= T), a forced refresh
        (``_force_refresh``: the parameter set changed), a projector not holding every task's
        directions (the first refresh, a retrack), or, in ``capability_space='both'``, no unrestricted
        directions held to restrict again (a checkpoint saved without them).
        """
        assert self.projector is not None
        num_tasks = len(self.capability_tasks)
        every = list(range(num_tasks))
        m = self._subset_refresh()
        if m is None or self._force_refresh:
            return every
        if self.projector.num_directions != num_tasks * self.args.capability_rank:
            return every
        if self.activation_projector is not None and not self._raw_directions_valid():
            return every
        n = self.state.global_step // self.args.capability_refresh_steps
        return sorted({(n * m + j) % num_tasks for j in range(m)})

    def _subset_refresh(self) -> int | None:
        """``capability_refresh_tasks`` when it is below the number of tasks, else None (every task)."""
        m = getattr(self.args, "capability_refresh_tasks", None)
        if m is None or m >= len(self.capability_tasks):
            return None
        return int(m)

    def _raw_directions_valid(self) -> bool:
        """Whether the held unrestricted directions (``capability_space='both'``) match the projector's."""
        assert self.projector is not None
        raw = self._raw_directions
        return raw is not None and len(raw) == self.projector.num_directions and all(
            len(d) == len(self.projector.params) for d in raw
        )

    def _raw_direction_bytes(self) -> int:
        """Bytes of the held unrestricted directions not shared with the installed ones (``'both'``:
        the activation restriction returns unprotected parameters' tensors uncopied)."""
        if not self._raw_directions or self.projector is None:
            return 0
        installed = {t.untyped_storage().data_ptr() for d in self.projector.directions for t in d}
        return sum(
            t.numel() * t.element_size()
            for d in self._raw_directions
            for t in d
            if t.untyped_storage().data_ptr() not in installed
        )

    def refresh_directions(self) -> None:
        """Re-estimate the capability directions at the current parameters: every task's, or with
        ``capability_refresh_tasks`` = m the m tasks of this refresh, round-robin.

        ``capability_estimator='batch'``: for each re-estimated task, ``capability_rank`` batches are
        drawn from the seeded sampler (identical on every rank, so DDP replicas stay byte-identical with
        no communication) and their metric gradients become the task's directions, smoothed by
        ``capability_ema``. ``'sketch'``: the task's top ``capability_rank`` directions of a
        frequent-directions sketch of ``capability_sketch_batches`` micro-batch gradients
        (:func:`frontier_trainer.subspace.sketch_task_directions`; under DDP each rank draws its own
        rows, the gradients are all-reduced and rank 0's directions broadcast), seeded with the
        previous directions at weight ``capability_ema``. Before they are installed, the
        generalisation leak of the last applied update against them is logged (they come from rows
        that did not project it).

        Round-robin (``capability_refresh_tasks`` = m < T tasks): refresh n =
        ``global_step // capability_refresh_steps`` re-estimates tasks (n·m + j) mod T, j < m
        (:meth:`_refresh_task_indices`); the other tasks keep the directions they hold, bitwise, and
        all are installed together (the null-space/frontier step of Thm 4.3 is over every task's
        held directions). The first refresh, a forced one and one with no directions held re-estimate
        every task. ``capability_ema`` smooths the re-estimated tasks only, and
        ``frontier/capability_loss/<task>`` and ``frontier/generalisation_leak/<task>`` are logged for
        them only. With ``capability_ema`` = 0 the re-estimated tasks' old tensors are dropped before
        the new ones are computed, so the peak stays (k+1)× the trainable bytes. In
        ``capability_space='both'`` the unrestricted directions are held as well (the installed ones
        are restricted by the activation bases of their install; a kept direction must be restricted
        again by the current bases from its unrestricted form, see
        :meth:`ActivationProjector.project_directions`), counted in ``peak_state_bytes``.
        """
        assert self.projector is not None and self.capability_sampler is not None
        start = time.perf_counter()
        model = self._unwrapped_model()
        params = self.projector.params
        ema = float(self.args.capability_ema)
        sketch = self.args.capability_estimator == "sketch"
        rank = self.args.capability_rank
        self._check_estimator_supported()  # again: accelerate's FSDP rebuilds the projector at step 0
        chosen = self._refresh_task_indices()
        # capability_space="both" with a subset refresh: hold the unrestricted directions
        keep_raw = self.activation_projector is not None and self._subset_refresh() is not None
        if keep_raw and self._raw_directions_valid():
            assert self._raw_directions is not None
            old = list(self._raw_directions)
            # the installed (restricted) copies are rebuilt at install: drop them now
            self.projector.clear_directions()
        else:
            old = list(self.projector.directions)
        self._raw_directions = None
        refreshed = {t * rank + r for t in chosen for r in range(rank)}
        # slots[j]: direction j once known (kept ones now, re-estimated ones as they are computed)
        slots: list[list[torch.Tensor] | None] = [
            old[j] if j < len(old) and j not in refreshed else None for j in range(len(self.capability_tasks) * rank)
        ]
        # previous[j]: the re-estimated direction j's old value, for the EMA / the sketch's seed
        previous: dict[int, list[torch.Tensor]] = {j: old[j] for j in sorted(refreshed) if j < len(old)}
        del old
        if ema == 0:
            # drop the re-estimated tasks' previous directions before computing new ones: the peak
            # stays (k+1)x parameters (the kept tasks' tensors are held in slots)
            self.projector.clear_directions()
            previous = {}
        base = self.projector.extra_memory_bytes() - _tensor_bytes(self.projector.directions)

        def held_now(pending_after: int) -> int:
            """Bytes held: known slots, previous values of directions after ``pending_after``, snapshot."""
            known = _tensor_bytes([d for d in slots if d is not None])
            pending = _tensor_bytes([d for j, d in previous.items() if j > pending_after and slots[j] is None])
            return known + pending + base

        for t_index in chosen:
            task = self.capability_tasks[t_index]
            metric = self.capability_metrics.get(task, completion_metric)
            block = range(t_index * rank, (t_index + 1) * rank)
            if sketch:
                result = sketch_task_directions(
                    model,
                    params,
                    self.capability_sampler,
                    task,
                    rank=rank,
                    num_batches=self.args.capability_sketch_batches,
                    oversample=self.args.capability_sketch_oversample,
                    metric=metric,
                    previous=[previous[j] for j in block if j in previous],
                    ema=ema,
                    autocast=self.autocast_smart_context_manager,
                )
                held = held_now(block[-1]) + result.peak_bytes
                self.peak_state_bytes = max(self.peak_state_bytes, held)
                for j, direction in zip(block, result.directions, strict=True):
                    slots[j] = direction
                    previous.pop(j, None)
                self._record(f"frontier/capability_loss/{task}", -sum(result.values) / len(result.values))
                continue
            values = []
            for j in block:
                batch = self.capability_sampler.next_batch(task)
                with self.autocast_smart_context_manager():
                    # under FSDP2 autograd.grad gives None for sharded parameters: the sharded
                    # projector computes them through backward, as local shards
                    sharded_grads = getattr(self.projector, "capability_gradients", None)
                    if sharded_grads is not None:
                        value, grads = sharded_grads(model, batch, metric=metric)
                    else:
                        value, grads = capability_gradients(model, params, batch, metric=metric)
                values.append(float(value))
                prev = previous.pop(j, None)
                if ema > 0 and prev is not None:
                    for p_old, g in zip(prev, grads, strict=True):
                        p_old.mul_(ema).add_(g.to(p_old.dtype), alpha=1.0 - ema)
                    slots[j] = prev
                else:
                    slots[j] = grads
                self.peak_state_bytes = max(self.peak_state_bytes, held_now(j))
            self._record(f"frontier/capability_loss/{task}", -sum(values) / len(values))
        directions = [d for d in slots if d is not None]
        assert len(directions) == len(slots), "a direction was neither kept nor re-estimated"
        if self._has_applied_update:
            self._log_generalisation_leak([directions[j] for j in sorted(refreshed)], chosen)
        self._install_directions(directions)
        if keep_raw:
            self._raw_directions = directions
        self._directions_step = self.state.global_step
        self._force_refresh = False
        self._record("frontier/refresh_seconds", time.perf_counter() - start)

    def _direction_names(self, tasks: Sequence[int] | None = None) -> list[str]:
        """``"task 'name' direction r"`` for every direction of ``tasks`` (indices; default every task)."""
        rank = self.args.capability_rank
        chosen = range(len(self.capability_tasks)) if tasks is None else tasks
        return [f"task {self.capability_tasks[t]!r} direction {r}" for t in chosen for r in range(rank)]

    def _install_directions(self, directions: list[list[torch.Tensor]]) -> None:
        """``projector.set_directions`` with direction names (its NaN/inf error names the task); in
        ``capability_space="both"`` the directions are first restricted to the allowed updates, by the
        activation bases held now (kept directions too: they are passed unrestricted)."""
        assert self.projector is not None
        if self.activation_projector is not None:
            directions = self.activation_projector.project_directions(self.projector.params, directions)
        self.projector.set_directions(directions, names=self._direction_names())

    def _log_generalisation_leak(
        self, fresh: list[list[torch.Tensor]], tasks: Sequence[int] | None = None
    ) -> None:
        """``frontier/generalisation_leak/<task>``: max |cos| of the last applied update against the
        task's fresh directions (issue 15 §1), measured before they are installed.

        ``fresh`` holds ``capability_rank`` directions per task of ``tasks`` (indices, in order;
        default every task): with ``capability_refresh_tasks`` only the re-estimated tasks are logged."""
        assert self.projector is not None
        rank = self.args.capability_rank
        chosen = list(range(len(self.capability_tasks))) if tasks is None else list(tasks)
        leaks = self.projector.update_leak(fresh, names=self._direction_names(chosen))
        for i, t in enumerate(chosen):
            self._record(
                f"frontier/generalisation_leak/{self.capability_tasks[t]}", max(leaks[i * rank : (i + 1) * rank])
            )

    # ------------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        sharded = self.projector is not None and is_sharded(self.projector.params)
        if not self.args.should_save and not sharded:  # FSDP2: every rank saves its own shards
            return
        tracker = self.degradation_callback
        if self.projector is None and self.activation_projector is None and tracker is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        state: dict[str, Any] = {"tasks": self.capability_tasks}
        if self.projector is not None:
            state.update(
                directions=self.projector.state_dict(),
                directions_step=self._directions_step,
                sampler=self.capability_sampler.state_dict() if self.capability_sampler else None,
                fingerprints=data_fingerprints(self.capability_sampler) if self.capability_sampler else None,
                tracked=self._tracked_names,
                raw_directions=(
                    None if self._raw_directions is None else [[c.cpu() for c in d] for d in self._raw_directions]
                ),
                raw_update_sum=(
                    None
                    if self._raw_update_sum is None
                    else [self._raw_update_sum[id(p)].cpu() for p in self.projector.params if id(p) in self._raw_update_sum]
                ),
            )
        if self.activation_projector is not None and self.activation_projector.ready:
            state["activation"] = self.activation_projector.state_dict()
            state["activation_step"] = self._activation_step
            if self.projector is None:
                state["sampler"] = self.capability_sampler.state_dict() if self.capability_sampler else None
        if tracker is not None and tracker.active:
            state["tracker"] = tracker.state_dict()
        name = state_file_name(self.args.process_index) if sharded else STATE_FILE
        torch.save(state, os.path.join(output_dir, name))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or (
            self.projector is None and self.activation_projector is None and self.degradation_callback is None
        ):
            return
        sharded = self.projector is not None and is_sharded(self.projector.params)
        path = os.path.join(checkpoint, state_file_name(self.args.process_index) if sharded else STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s: capability directions will be re-estimated.", checkpoint, STATE_FILE
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if list(state["tasks"]) != self.capability_tasks:
            raise ValueError(
                f"checkpoint {checkpoint} was trained with capability tasks {state['tasks']}, "
                f"this run has {self.capability_tasks}; resume with the same capability_datasets."
            )
        if self.projector is not None and "directions" in state:
            check_fingerprints(f"checkpoint {checkpoint}", state.get("fingerprints"), self.capability_sampler)
            self._sync_tracked_parameters()
            if state.get("tracked") is not None and list(state["tracked"]) != self._tracked_names:
                raise ValueError(
                    f"checkpoint {checkpoint} projected {len(state['tracked'])} parameters, this run's optimizer "
                    f"updates {len(self._tracked_names or [])}: resume with the same trainable parameters."
                )
            self.projector.load_state_dict(state["directions"])
            self._directions_step = state["directions_step"]
            raw = state.get("raw_directions")
            self._raw_directions = (
                None
                if raw is None
                else [
                    [t.to(device=p.device, dtype=p.dtype) for p, t in zip(self.projector.params, d, strict=True)]
                    for d in raw
                ]
            )
            if state["sampler"] is not None and self.capability_sampler is not None:
                self.capability_sampler.load_state_dict(state["sampler"])
            if state.get("raw_update_sum") is not None:
                self._raw_update_sum = {
                    id(p): t.to(device=p.device, dtype=p.dtype)
                    for p, t in zip(self.projector.params, state["raw_update_sum"], strict=False)
                }
        if self.activation_projector is not None and "activation" in state:
            self.activation_projector.load_state_dict(state["activation"])
            self._activation_step = state["activation_step"]
            if self.projector is None and state.get("sampler") is not None and self.capability_sampler is not None:
                self.capability_sampler.load_state_dict(state["sampler"])
        if self.degradation_callback is not None and "tracker" in state:
            self.degradation_callback.load_state_dict(state["tracker"], checkpoint=checkpoint)


__all__ = [
    "STATE_FILE",
    "FrontierMixin",
    "as_frontier_args",
    "check_frontier_setup",
    "data_fingerprints",
]
