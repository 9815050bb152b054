"""The held-out generalisation leak of every applied update, for any trainer (issue 15 §1).

The frontier trainer's exactness holds against the directions it holds; what matters to a user is
the task. :class:`HeldOutLeakProbe` measures, at every optimizer step of *any* ``transformers.Trainer``
(vanilla DPO, the baselines, ours), |cos(Δθ, ∇f_i)| where Δθ is the update the optimizer really applied
(projection, AdamW moments and weight decay included) and ∇f_i the gradient of task i's completion
log-likelihood at θ before the step, on capability rows that no trainer sees (the suite's eval split).
An unprojected step's value (vanilla's) is the reference: the issue's target is a leak at least 10×
below it. The value has a floor above 0 even for a perfect protection of the task's mean gradient
(a few held-out rows carry their own sampling noise), so the ratio cannot reach 0.

The probe does not change training: its gradients are ``torch.autograd.grad`` calls (``p.grad`` is
untouched) with dropout off, under a forked RNG, and its own time is recorded so that the arena
subtracts it from the step time. It also reads the trainer's own diagnostics from the log history
(:func:`trainer_diagnostics`): the realised leak against the held directions (``frontier/leak/<task>``)
and the trainer's generalisation leak against fresh directions at each refresh
(``frontier/generalisation_leak/<task>``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from frontier_trainer.directions import build_capability_sampler, capability_gradients, completion_metric


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in _unwrap(model).parameters() if p.requires_grad]


def update_cosine(delta: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> float:
    """|cos| between an update and a gradient, both given per parameter (float64 sums); NaN if either is 0."""
    dd = sum(float((d.double() ** 2).sum()) for d in delta)
    gg = sum(float((g.double() ** 2).sum()) for g in grads)
    if dd == 0.0 or gg == 0.0:
        return math.nan
    dg = sum(float((d.double() * g.double()).sum()) for d, g in zip(delta, grads, strict=True))
    return abs(dg) / math.sqrt(dd * gg)


class HeldOutLeakProbe(TrainerCallback):
    """Per task and step, |cos(applied update, held-out capability gradient)|; see the module docstring.

    Args:
        held_out: ``{task: source}`` of capability rows no trainer sees (any source
            ``frontier_trainer.directions.build_capability_sampler`` reads).
        tokenizer: the model's tokenizer.
        max_length: rows longer than this many tokens are dropped.
        rows: held-out rows per task (one fixed batch per task, the same at every step and for every
            method, so methods are compared on the same rows).

    Attributes:
        leaks: ``{task: [leak at each step]}`` (steps where the update or the gradient is zero are skipped).
        seconds: the probe's own wall time per optimizer step (to subtract from a step timer's).
        nll_rise: after training, the held-out mean completion NLL rise per task (> 0 is damage).
    """

    def __init__(self, held_out: Mapping[str, Any], tokenizer: Any, max_length: int, rows: int) -> None:
        sampler = build_capability_sampler(
            held_out, tokenizer, max_length=max_length, batch_size=rows, seed=0
        )
        self.batches = {t: sampler.next_batch(t) for t in sampler.tasks}
        self.leaks: dict[str, list[float]] = {t: [] for t in sampler.tasks}
        self.seconds: list[float] = []
        self.nll_rise: dict[str, float] = {}
        self._before: list[torch.Tensor] | None = None
        self._grads: dict[str, list[torch.Tensor]] = {}
        self._model: Any = None
        self._start_metrics: dict[str, float] = {}

    def _device_batch(self, batch: Mapping[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def _metrics(self, model: Any) -> dict[str, float]:
        model = _unwrap(model)
        was_training = model.training
        model.eval()
        try:
            return {
                t: float(completion_metric(model, self._device_batch(b, model)))
                for t, b in self.batches.items()
            }
        finally:
            model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start_metrics = self._metrics(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        after = self._metrics(model)
        self.nll_rise = {t: self._start_metrics[t] - after[t] for t in after}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        start = time.perf_counter()
        model = _unwrap(model)
        params = _trainable(model)
        with torch.random.fork_rng(devices=[]):
            self._grads = {
                t: capability_gradients(model, params, self._device_batch(b, model))[1]
                for t, b in self.batches.items()
            }
        self._before = [p.detach().clone() for p in params]
        self._model = model
        self.seconds.append(time.perf_counter() - start)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._before is None:
            return
        start = time.perf_counter()
        delta = [p.detach() - b for p, b in zip(_trainable(self._model), self._before, strict=True)]
        for task, grads in self._grads.items():
            cos = update_cosine(delta, grads)
            if not math.isnan(cos):
                self.leaks[task].append(cos)
        self._before, self._grads = None, {}
        self.seconds[-1] += time.perf_counter() - start

    def summary(self) -> dict[str, Any]:
        """Plain-JSON means: ``held_out_leak`` per task and over tasks, and ``held_out_nll_rise`` per task."""
        per_task = {t: statistics.fmean(v) for t, v in self.leaks.items() if v}
        return {
            "held_out_leak": per_task,
            "held_out_leak_mean": statistics.fmean(per_task.values()) if per_task else math.nan,
            "held_out_nll_rise": dict(self.nll_rise),
        }


def trainer_diagnostics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over the log history of the frontier trainer's ``frontier/leak/<task>`` (realised, against
    the held directions) and ``frontier/generalisation_leak/<task>`` (against fresh directions at each
    refresh), each averaged over tasks: ``{"realised_leak": ..., "generalisation_leak": ...}``; a key
    is absent when the trainer logged none (a baseline)."""
    out: dict[str, float] = {}
    for key, prefix in (
        ("realised_leak", "frontier/leak/"),
        ("generalisation_leak", "frontier/generalisation_leak/"),
    ):
        values = [float(v) for row in log_history for k, v in row.items() if k.startswith(prefix)]
        values = [v for v in values if math.isfinite(v)]
        if values:
            out[key] = statistics.fmean(values)
    return out
