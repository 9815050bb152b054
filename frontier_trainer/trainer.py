"""FrontierDPOTrainer: trl.DPOTrainer whose every optimizer step is projected exactly.

The glue between TRL and the pure parts of this package. Data flows one way:

    capability datasets --(directions.build_capability_sampler)--> batches
        --(directions.capability_gradients, every ``capability_refresh_steps``)--> directions c_i
        --(projection.UpdateProjector around each real optimizer step)--> θ_old + δ
        --> diagnostics appended to the trainer's own metrics (every reporter sees them).

The seam is the raw torch optimizer (field notes §3): ``create_optimizer`` registers a step
pre-hook and post-hook on it. The pre-hook fires once per real optimizer step — after gradient
accumulation, DDP all-reduce, unscaling and clipping, never per micro-batch, and not at all
when the AMP scaler skips a step — so the projection acts on the displacement the optimizer
really applies, AdamW moments and weight decay included (field notes §2).

``projection="none"`` registers nothing and computes nothing during training: it is bitwise
``trl.DPOTrainer``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from frontier_trainer.config import FrontierDPOConfig
from frontier_trainer.directions import (
    CapabilitySampler,
    MetricFn,
    build_capability_sampler,
    capability_gradients,
    completion_metric,
)
from frontier_trainer.projection import StepReport, UpdateProjector
from frontier_trainer.tracking import DegradationCallback

logger = logging.getLogger(__name__)

STATE_FILE = "frontier_state.pt"

#: Optimizers that update parameters inside ``backward`` (LOMO/AdaLomo, layer-wise GaLore/APOLLO)
#: or swap parameter values around evaluation (schedule-free): no optimizer step hook sees their
#: real update, so the projection cannot be exact.
_UNSUPPORTED_OPTIM_MARKERS = ("lomo", "layerwise", "schedule_free")


class FrontierDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` that moves the model only in the null space of capability directions
    (``projection="nullspace"``), or to the best point of the safety/capability frontier within
    per-task tolerances (``projection="frontier"``), with directions estimated online.

    Same constructor as :class:`trl.DPOTrainer`, plus:

    Args:
        capability_datasets: ``{task: Dataset or source}``; overrides ``args.capability_datasets``.
            Rows are ``prompt``/``completion`` (the prompt's tokens are masked) or ``text``.
        capability_metrics: optional ``{task: metric(model, batch) -> scalar}``, a differentiable
            metric to use instead of the default mean completion log-likelihood for that task.
        capability_eval_datasets: held-out ``{task: Dataset or source}`` for the degradation
            tracker's observed change; overrides ``args.capability_eval_datasets``.
        degradation_metrics: ``{name: fn(model, tokenizer) -> float}`` user metrics whose change the
            degradation tracker logs (e.g. the lab's exact-match accuracy).
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: DPOConfig | None = None,
        *pos_args: Any,
        capability_datasets: Mapping[str, Any] | None = None,
        capability_metrics: Mapping[str, MetricFn] | None = None,
        capability_eval_datasets: Mapping[str, Any] | None = None,
        degradation_metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        args = _as_frontier_config(args, model)
        sources = (
            dict(capability_datasets)
            if capability_datasets is not None
            else dict(args.capability_datasets or {})
        )
        self.capability_tasks: list[str] = list(sources)
        self._check_setup_before_init(args, sources, capability_metrics)
        super().__init__(model, ref_model, args, *pos_args, **kwargs)

        self.projector: UpdateProjector | None = None
        self.capability_sampler: CapabilitySampler | None = None
        self.capability_metrics: dict[str, MetricFn] = dict(capability_metrics or {})
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self._hook_handles: list[Any] = []
        self._last_report: StepReport | None = None
        self._directions_step: int | None = None
        self._projection_seconds = 0.0
        #: Largest number of bytes held at once by the projection state (snapshot and directions,
        #: including fresh directions during a refresh), counted from the tensors themselves.
        self.peak_state_bytes = 0
        if sources:
            # Load, validate and tokenise now: every bad-input error comes before training.
            self.capability_sampler = build_capability_sampler(
                sources,
                self.processing_class,
                max_length=args.capability_max_length,
                batch_size=args.capability_batch_size,
                seed=args.seed,
            )
        self.degradation_callback: DegradationCallback | None = None
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
            ).attach(self)
        elif args.degradation_tracking:
            logger.info("degradation tracking is off: no capability_datasets to measure τ_i against.")
        if args.projection != "none":
            self._check_setup_after_init()
            params = [p for p in self._unwrapped_model().parameters() if p.requires_grad]
            tolerances = None
            if args.projection == "frontier":
                tolerances = [
                    args.tolerance_for(t) for t in self.capability_tasks for _ in range(args.capability_rank)
                ]
            try:
                self.projector = UpdateProjector(params, mode=args.projection, tolerances=tolerances)
            except ValueError as err:
                raise ValueError(f"FrontierDPOTrainer(projection={args.projection!r}): {err}") from None

    # ------------------------------------------------------------------ construction checks

    @staticmethod
    def _check_setup_before_init(
        args: FrontierDPOConfig, sources: Mapping[str, Any], metrics: Mapping[str, MetricFn] | None
    ) -> None:
        if args.projection != "none" and not sources:
            raise ValueError(
                f"projection={args.projection!r} needs capability data: pass capability_datasets={{task: dataset}} "
                "to FrontierDPOTrainer or set FrontierDPOConfig.capability_datasets (or use projection='none')."
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
        if args.projection == "none":
            return
        fix = "Run without it, or set projection='none' for plain DPO."
        if args.deepspeed:
            raise ValueError(
                "FrontierDPOTrainer does not support DeepSpeed yet: the DeepSpeed engine steps the optimizer inside "
                f"accelerator.backward, where no optimizer hook sees the update, so the projection could not be exact. {fix}"
            )
        if args.fsdp:
            raise ValueError(
                "FrontierDPOTrainer does not support FSDP yet: parameters are sharded and no sharded projection "
                f"path is implemented and tested. Use DDP (torchrun / accelerate launch --multi_gpu). {fix}"
            )
        optim = str(getattr(args.optim, "value", args.optim))
        if any(marker in optim for marker in _UNSUPPORTED_OPTIM_MARKERS):
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

    def _check_setup_after_init(self) -> None:
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "FrontierDPOTrainer: DeepSpeed/FSDP was enabled through the accelerate config; the projection "
                "supports single-process and DDP training only. Use projection='none' or plain DDP."
            )
        low = sorted(
            {
                str(p.dtype)
                for p in self._unwrapped_model().parameters()
                if p.requires_grad and p.dtype not in (torch.float32, torch.float64)
            }
        )
        if low:
            raise ValueError(
                f"trainable parameters are {low}: pure low-precision weights round θ_old + δ and break the "
                "projection's exactness. Load the model with dtype=torch.float32 and train with bf16=True/fp16=True "
                "(autocast over fp32 master weights)."
            )

    # ------------------------------------------------------------------ optimizer seam

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.projector is not None:
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

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self.projector is not None
        step = self.state.global_step
        refresh = self.args.capability_refresh_steps
        refreshed = self.projector.num_directions == 0 or (step % refresh == 0 and self._directions_step != step)
        if refreshed:
            self.refresh_directions()
        start = time.perf_counter()
        self.projector.before_step()
        self._projection_seconds = time.perf_counter() - start
        if refreshed:  # the held state (snapshot + directions) changes only when directions do
            self.peak_state_bytes = max(self.peak_state_bytes, self.projector.extra_memory_bytes())

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self.projector is not None
        start = time.perf_counter()
        report = self.projector.after_step()
        if report is None:
            return
        projection_seconds = self._projection_seconds + time.perf_counter() - start
        metrics = self._metrics["train"]
        # the realised leak costs one more pass over the parameters: measure it on logging steps,
        # and time it apart so that projection_seconds is the projection's own cost
        if (self.state.global_step + 1) % max(1, int(self.args.logging_steps or 1)) == 0:
            start = time.perf_counter()
            report.realised_leak = self.projector.measure_leak()
            metrics["frontier/leak_seconds"].append(time.perf_counter() - start)
        self._last_report = report
        metrics["frontier/projection_seconds"].append(projection_seconds)
        metrics["frontier/raw_tax_rate"].append(report.raw_tax_rate)
        metrics["frontier/fraction_removed"].append(report.fraction_removed)
        metrics["frontier/safety_retained"].append(report.safety_retained)
        rank = self.args.capability_rank
        for i, task in enumerate(self.capability_tasks):
            block = slice(i * rank, (i + 1) * rank)
            metrics[f"frontier/tau/{task}"].append(max(report.raw_task_tax_rates[block]))
            if report.realised_leak is not None:
                metrics[f"frontier/leak/{task}"].append(max(report.realised_leak[block]))

    # ------------------------------------------------------------------ directions

    def _unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def refresh_directions(self) -> None:
        """Re-estimate every capability direction at the current parameters.

        For each task, ``capability_rank`` batches are drawn from the seeded sampler (identical
        on every rank, so DDP replicas stay byte-identical with no communication) and their
        metric gradients become the task's directions, smoothed by ``capability_ema``.
        """
        assert self.projector is not None and self.capability_sampler is not None
        start = time.perf_counter()
        model = self._unwrapped_model()
        params = self.projector.params
        ema = float(self.args.capability_ema)
        old = self.projector.directions
        if ema == 0:
            # drop the previous directions before computing new ones: peak stays (k+1)x parameters
            self.projector.clear_directions()
            old = []
        fresh: list[list[torch.Tensor]] = []
        metrics = self._metrics["train"]
        for t_index, task in enumerate(self.capability_tasks):
            metric = self.capability_metrics.get(task, completion_metric)
            values = []
            for r in range(self.args.capability_rank):
                batch = self.capability_sampler.next_batch(task)
                with self.autocast_smart_context_manager():
                    value, grads = capability_gradients(model, params, batch, metric=metric)
                values.append(float(value))
                j = t_index * self.args.capability_rank + r
                if ema > 0 and len(old) > j:
                    for prev, g in zip(old[j], grads, strict=True):
                        prev.mul_(ema).add_(g.to(prev.dtype), alpha=1.0 - ema)
                    fresh.append(old[j])
                else:
                    fresh.append(grads)
                held = _tensor_bytes(fresh) + _tensor_bytes(old[len(fresh) :])
                held += self.projector.extra_memory_bytes() - _tensor_bytes(self.projector.directions)
                self.peak_state_bytes = max(self.peak_state_bytes, held)
            metrics[f"frontier/capability_loss/{task}"].append(-sum(values) / len(values))
        self.projector.set_directions(fresh)
        self._directions_step = self.state.global_step
        metrics["frontier/refresh_seconds"].append(time.perf_counter() - start)

    # ------------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.projector is None or not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        state = {
            "directions": self.projector.state_dict(),
            "directions_step": self._directions_step,
            "sampler": self.capability_sampler.state_dict() if self.capability_sampler else None,
            "tasks": self.capability_tasks,
        }
        torch.save(state, os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.projector is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
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
        self.projector.load_state_dict(state["directions"])
        self._directions_step = state["directions_step"]
        if state["sampler"] is not None and self.capability_sampler is not None:
            self.capability_sampler.load_state_dict(state["sampler"])


def _tensor_bytes(groups: list[list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for group in groups for t in group)


def _as_frontier_config(args: DPOConfig | None, model: Any) -> FrontierDPOConfig:
    """Accept a FrontierDPOConfig, a plain DPOConfig (upgraded with default frontier fields), or None."""
    if isinstance(args, FrontierDPOConfig):
        return args
    if args is None:
        name = (
            model
            if isinstance(model, str)
            else getattr(getattr(model, "config", None), "_name_or_path", "model")
        )
        return FrontierDPOConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-FrontierDPO")
    if isinstance(args, DPOConfig):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DPOConfig) if f.init}
        return FrontierDPOConfig(**values)
    raise TypeError(f"args must be a FrontierDPOConfig or trl.DPOConfig, got {type(args).__name__}")


__all__ = ["STATE_FILE", "FrontierDPOTrainer"]
