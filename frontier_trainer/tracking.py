"""Predicted versus observed per-task capability degradation during alignment (Prediction 1, §8).

:class:`DegradationCallback` turns the paper's Prediction 1 into a measurement every run makes:

1. **Step 0 (before any update).** The safety direction v is the DPO update direction −∇L_DPO,
   averaged over ``safety_batches`` seeded batches of the training set (computed with the
   trainer's own ``compute_loss``, so any ``loss_type`` works). The capability directions c_i
   are gradients of f_i (mean completion log-likelihood, larger is better) on the
   *direction-estimation* sets. From their Gram matrix: τ_i = cos²(v, c_i) (Cor 4.5, eq. 6),
   the principal angle, the §9.3 regime and the first-order rate ⟨∇f_i, v̂⟩ (the change of f_i
   per unit step along the safety direction; Δ_Ci ∝ −τ_i in Prediction 1).
2. **During training: the predicted change** Σ_t ⟨∇f_i(θ_t), Δθ_t⟩ over the updates actually
   applied. Between two evaluation points t_k < t_{k+1} the gradient is held at θ_{t_k}, and
   then Σ_{t=t_k}^{t_{k+1}−1} ⟨g_i, Δθ_t⟩ = ⟨g_i, θ_{t_{k+1}} − θ_{t_k}⟩ telescopes: one
   parameter snapshot and m gradients suffice, no per-step hook. The prediction is therefore
   the first-order (linearised) change with gradients refreshed at every evaluation; it is
   exact to O(‖Δθ‖²) per evaluation interval.
3. **Every ``eval_steps`` and at the end: the observed change** f_i(θ_t) − f_i(θ_0) of the same
   metric on the held-out evaluation sets (``eval_datasets``, separate from the direction
   sets), and the change of each user metric (e.g. the lab's exact-match accuracy).

Degradation is reported as −change (f is a log-likelihood): positive means capability lost.
Logged per task: ``degradation/tau/<task>``, ``degradation/angle/<task>``,
``degradation/predicted/<task>``, ``degradation/observed/<task>``, user metrics under
``degradation/user/<name>`` (value) and ``degradation/user_change/<name>``; at the end a
``wandb.Table`` (task, tau, angle_deg, regime, predicted, observed) with a scatter plot, and
Spearman/Kendall rank correlations of τ_i (and of the prediction) with observed degradation.
Tables go through ``wandb.log`` on the main process only, never ``Trainer.log`` (a Table in
``log_history`` breaks checkpoint serialisation; field notes §3). The same table is always
written to ``<output_dir>/degradation/`` as JSON and CSV with a PNG scatter plot.

Distributed: every rank does the same deterministic work (same seeded batches, no dropout,
RNG state restored), so the collectives inside ``compute_loss`` match and training RNG streams
are unchanged; only the main process logs and writes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback

from frontier_trainer.directions import (
    IGNORE_INDEX,
    CapabilitySampler,
    build_capability_sampler,
    completion_metric,
    deterministic_forward,
    list_dot,
    validate_task_names,
)
from frontier_trainer.geometry_report import (
    average_gradient,
    capability_directions,
    gram_matrix,
    task_geometry,
)

logger = logging.getLogger(__name__)

UserMetric = Callable[[nn.Module, Any], "float | Mapping[str, float]"]
"""``fn(model, tokenizer) -> float`` or ``{name: float}`` (e.g. ``lab.evaluate``)."""

TABLE_COLUMNS = ["task", "tau", "angle_deg", "regime", "predicted", "observed"]
OUTPUT_SUBDIR = "degradation"


# --------------------------------------------------------------------------------------
# rank correlations (pure)
# --------------------------------------------------------------------------------------


def rankdata(x: Sequence[float]) -> list[float]:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    saa = sum((x - ma) ** 2 for x in a)
    sbb = sum((y - mb) ** 2 for y in b)
    return sab / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else math.nan


def _finite_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(x) != len(y):
        raise ValueError(f"rank correlation needs equal lengths, got {len(x)} and {len(y)}")
    pairs = [(float(a), float(b)) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of average ranks. NaN for < 2 finite pairs or a constant side."""
    a, b = _finite_pairs(x, y)
    return _pearson(rankdata(a), rankdata(b)) if len(a) >= 2 else math.nan


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ_b (tie-corrected, as ``scipy.stats.kendalltau``). NaN when undefined."""
    a, b = _finite_pairs(x, y)
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom > 0 else math.nan


# --------------------------------------------------------------------------------------
# metric over a whole evaluation set
# --------------------------------------------------------------------------------------


def dataset_metric(
    model: nn.Module,
    sampler: CapabilitySampler,
    task: str,
    params: Sequence[nn.Parameter] | None = None,
    max_rows: int | None = None,
) -> tuple[float, list[torch.Tensor] | None]:
    """f over the first ``max_rows`` rows of ``task`` (token-weighted mean log-likelihood), and ∇f.

    Batches are weighted by their scored-token counts, so the value is the metric of
    :func:`completion_metric` pooled over the whole set, whatever the batch size, and the
    gradient (when ``params`` is given) is the gradient of that value.
    """
    rows = sampler.rows[task][:max_rows] if max_rows else sampler.rows[task]
    counts = [sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX) for row in rows]
    total_tokens = sum(counts)
    device = next(model.parameters()).device
    value = 0.0
    grads: list[torch.Tensor] | None = None
    for start in range(0, len(rows), sampler.batch_size):
        idx = list(range(start, min(start + sampler.batch_size, len(rows))))
        batch = sampler.collate(task, idx, device=device)
        weight = sum(counts[i] for i in idx) / total_tokens
        if params is None:
            with torch.no_grad():
                value += weight * float(completion_metric(model, batch))
            continue
        v, g = average_gradient(model, params, [batch])
        value += weight * v
        if grads is None:
            grads = [t.mul_(weight) for t in g]
        else:
            for acc, t in zip(grads, g, strict=True):
                acc.add_(t, alpha=weight)
    return value, grads


@contextmanager
def _preserve_rng(device: torch.device) -> Iterator[None]:
    """Restore torch's CPU (and the device's CUDA) RNG state: tracking must not shift training's stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _flatten_user(name: str, value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {f"{name}/{k}": float(v) for k, v in value.items() if isinstance(v, int | float)}
    return {name: float(value)}


# --------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------


class DegradationCallback(TrainerCallback):
    """Predicted (first-order, from τ geometry) versus observed per-task capability degradation.

    Use with any ``trl.DPOTrainer`` (``FrontierDPOTrainer`` adds one by default)::

        callback = DegradationCallback(capability_datasets, eval_datasets=evals)
        callback.attach(trainer)   # needs the trainer for its DPO loss and tokenizer
        trainer.train()

    Args:
        capability_datasets: ``{task: Dataset or source}`` used to estimate c_i (τ_i, angles).
        eval_datasets: ``{task: Dataset or source}`` held-out sets on which f_i is evaluated
            (observed change) and differentiated (predicted change); each task must be a
            capability task. ``None``: observed degradation is not measured and predictions use
            the direction sets.
        metrics: ``{name: fn(model, tokenizer) -> float | {key: float}}`` user metrics whose
            change is logged at every evaluation (e.g. the lab's exact-match accuracy).
        eval_steps: evaluate every this many optimizer steps (and always at the end).
        safety_batches: training batches averaged into the safety direction.
        capability_batches: batches averaged into each capability direction.
        batch_size: rows per capability/eval batch.
        max_length: capability/eval rows longer than this many tokens are dropped.
        max_eval_rows: rows per evaluation set used (``None``: all).
        seed: seed of every row selection (identical on every rank).
        budget: B for the tax-free safety B√(1 − τ_i) in the table.

    Raises:
        ValueError: no capability dataset, an eval task that is not a capability task, or a
            non-positive count.
    """

    def __init__(
        self,
        capability_datasets: Mapping[str, Any],
        eval_datasets: Mapping[str, Any] | None = None,
        metrics: Mapping[str, UserMetric] | None = None,
        eval_steps: int = 50,
        safety_batches: int = 4,
        capability_batches: int = 2,
        batch_size: int = 8,
        max_length: int | None = 512,
        max_eval_rows: int | None = 256,
        seed: int = 0,
        budget: float = 1.0,
    ) -> None:
        if not capability_datasets:
            raise ValueError(
                "DegradationCallback needs capability_datasets={task: dataset} to estimate the capability "
                "directions c_i (and therefore τ_i)."
            )
        self.capability_sources = dict(capability_datasets)
        self.tasks = validate_task_names(self.capability_sources)
        self.eval_sources = dict(eval_datasets or {})
        unknown = [t for t in self.eval_sources if t not in self.capability_sources]
        if unknown:
            raise ValueError(
                f"capability_eval_datasets names task(s) {unknown} that are not capability tasks "
                f"{self.tasks}; every evaluated task needs a direction-estimation set under the same name."
            )
        for name, value in (
            ("eval_steps", eval_steps),
            ("safety_batches", safety_batches),
            ("capability_batches", capability_batches),
            ("batch_size", batch_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DegradationCallback: {name} must be an integer >= 1, got {value!r}")
        self.metrics = dict(metrics or {})
        self.eval_steps = eval_steps
        self.safety_batches = safety_batches
        self.capability_batches = capability_batches
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_eval_rows = max_eval_rows
        self.seed = seed
        self.budget = budget

        self.trainer: Any = None
        self.tokenizer: Any = None
        self.direction_sampler: CapabilitySampler | None = None
        self.eval_sampler: CapabilitySampler | None = None
        self.geometry: dict[str, Any] | None = None
        self.predicted_rate: dict[str, float] = {}
        self.predicted: dict[str, float] = {}
        self.observed: dict[str, float] = {}
        self.user_initial: dict[str, float] = {}
        self.user_change: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self._params: list[nn.Parameter] = []
        self._snapshot: list[torch.Tensor] = []
        self._grads: dict[str, list[torch.Tensor]] = {}
        self._f0: dict[str, float] = {}
        self._last_step: int | None = None
        self._active = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ setup

    @property
    def measures_observed(self) -> bool:
        """Whether held-out evaluation sets were given (observed degradation is measured)."""
        return bool(self.eval_sources)

    def attach(self, trainer: Any) -> DegradationCallback:
        """Bind to ``trainer``, load and tokenise every dataset now (bad input fails before training),
        and register as its callback (replacing any other :class:`DegradationCallback`)."""
        self.trainer = trainer
        self.tokenizer = trainer.processing_class
        self.direction_sampler = build_capability_sampler(
            self.capability_sources, self.tokenizer, self.max_length, self.batch_size, self.seed
        )
        if self.eval_sources:
            self.eval_sampler = build_capability_sampler(
                self.eval_sources, self.tokenizer, self.max_length, self.batch_size, self.seed
            )
        else:
            logger.warning(
                "degradation tracking: no capability_eval_datasets, so observed degradation is NOT measured; "
                "predicted changes are still logged (computed on the direction-estimation sets)."
            )
        for other in [c for c in trainer.callback_handler.callbacks if isinstance(c, DegradationCallback)]:
            if other is not self:
                logger.info("degradation tracking: replacing an earlier DegradationCallback on this trainer.")
                trainer.remove_callback(other)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _model(self) -> nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    @contextmanager
    def _quiet(self, model: nn.Module) -> Iterator[None]:
        """Deterministic, side-effect-free evaluation: no dropout, RNG restored, autocast as in training."""
        trainer = self.trainer
        autocast = getattr(trainer, "autocast_smart_context_manager", None)
        with _preserve_rng(self._params[0].device), deterministic_forward(model):
            if autocast is None:
                yield
            else:
                with autocast():
                    yield

    def _safety_direction(self, model: nn.Module) -> list[torch.Tensor]:
        """−∇L_DPO averaged over ``safety_batches`` seeded training batches (rank-identical).

        Uses the trainer's ``compute_loss`` on the unwrapped model, then restores the metrics
        and token count it updates, so nothing of this measurement reaches the training logs.
        """
        t = self.trainer
        dataset = t.train_dataset
        if getattr(dataset, "column_names", None) is not None:  # an IterableDataset may not know its columns
            dataset = t._remove_unused_columns(dataset, description="safety direction")
        bs = t.args.per_device_train_batch_size
        n = self.safety_batches * bs
        if hasattr(dataset, "__len__"):
            gen = torch.Generator().manual_seed(self.seed)
            dataset = Subset(dataset, torch.randperm(len(dataset), generator=gen)[:n].tolist())
        loader = DataLoader(dataset, batch_size=bs, collate_fn=t.data_collator, shuffle=False)
        saved_metrics = {k: list(v) for k, v in t._metrics["train"].items()}
        saved_tokens = getattr(t, "_total_train_tokens", None)
        total: list[torch.Tensor] | None = None
        count = 0
        try:
            for raw in loader:
                if count >= self.safety_batches:
                    break
                batch = t._prepare_inputs(raw)
                with torch.enable_grad():
                    loss = t.compute_loss(model, batch)
                    grads = torch.autograd.grad(loss, self._params, allow_unused=True)
                grads = [
                    torch.zeros_like(p) if g is None else -g for p, g in zip(self._params, grads, strict=True)
                ]
                total = grads if total is None else [a.add_(g) for a, g in zip(total, grads, strict=True)]
                count += 1
        finally:
            t._metrics["train"].clear()
            t._metrics["train"].update(saved_metrics)
            if saved_tokens is not None:
                t._total_train_tokens = saved_tokens
        if total is None:
            raise ValueError(
                "degradation tracking: the training set yielded no batch for the safety direction"
            )
        return [g.div_(count) for g in total]

    def _eval_gradients(self, model: nn.Module) -> dict[str, tuple[float | None, list[torch.Tensor]]]:
        """(f_i, ∇f_i) on the eval sets; for tasks without one, (None, ∇f_i) on a direction batch."""
        out: dict[str, tuple[float | None, list[torch.Tensor]]] = {}
        for task in self.tasks:
            if self.eval_sampler is not None and task in self.eval_sampler.rows:
                value, grads = dataset_metric(
                    model, self.eval_sampler, task, self._params, self.max_eval_rows
                )
                assert grads is not None
                out[task] = (value, grads)
            else:
                assert self.direction_sampler is not None
                batch = self.direction_sampler.next_batch(task, device=self._params[0].device)
                out[task] = (None, average_gradient(model, self._params, [batch])[1])
        return out

    def _user_metrics(self, model: nn.Module) -> dict[str, float]:
        values: dict[str, float] = {}
        modes = [(m, m.training) for m in model.modules()]
        try:
            for name, fn in self.metrics.items():
                values.update(_flatten_user(name, fn(model, self.tokenizer)))
        finally:
            for m, flag in modes:
                m.training = flag
        return values

    # ------------------------------------------------------------------ callback events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            logger.warning(
                "DegradationCallback was added without attach(trainer): it needs the trainer's DPO loss. "
                "Use DegradationCallback(...).attach(trainer); degradation tracking is off for this run."
            )
            return
        if state.global_step > 0:
            logger.warning(
                "degradation tracking: resuming at step %d; predictions and observations are measured from "
                "the resumed parameters, not from the pre-alignment model.",
                state.global_step,
            )
        model = self._model()
        self._params = [p for p in model.parameters() if p.requires_grad]
        with self._quiet(model):
            v = self._safety_direction(model)
            assert self.direction_sampler is not None
            caps = capability_directions(model, self._params, self.direction_sampler, self.capability_batches)
            G = gram_matrix([v, *(caps[t] for t in self.tasks)])
            del caps
            self.geometry = task_geometry(G, self.tasks, self.budget)
            evals = self._eval_gradients(model)
            v_norm = math.sqrt(float(G[0, 0]))
            for task, (value, grads) in evals.items():
                self.predicted_rate[task] = float(list_dot(grads, v)) / v_norm if v_norm > 0 else math.nan
                self.predicted[task] = 0.0
                self._grads[task] = grads
                if value is not None:
                    self._f0[task] = value
                    self.observed[task] = 0.0
            del v
            self.user_initial = self._user_metrics(model) if self.metrics else {}
        self.user_change = dict.fromkeys(self.user_initial, 0.0)
        self._snapshot = [p.detach().clone() for p in self._params]
        self._last_step = state.global_step
        self._active = True
        record = {"train/global_step": state.global_step}
        for row in self.geometry["tasks"]:
            task = row["task"]
            record[f"degradation/tau/{task}"] = row["tau"]
            record[f"degradation/angle/{task}"] = row["angle_deg"]
            record[f"degradation/predicted_rate/{task}"] = -self.predicted_rate[task]
        record["degradation/joint_tau"] = self.geometry["joint_tau"]
        record.update(self._record(state.global_step))
        self._emit(args, state, record)
        self._log_geometry(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._active and state.global_step % self.eval_steps == 0 and state.global_step != self._last_step:
            self._emit(args, state, self._measure(state.global_step, final=False))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._active:
            return
        if state.global_step != self._last_step:
            self._emit(args, state, self._measure(state.global_step, final=True))
        self._active = False
        self._grads, self._snapshot = {}, []
        self.summary = self._summary(state.global_step)
        if state.is_world_process_zero:
            self._guard("write the degradation table", lambda: self._write_outputs(args))
            self._guard("log the degradation table to wandb", lambda: self._log_table(args, state))

    # ------------------------------------------------------------------ measurement

    def _measure(self, step: int, final: bool) -> dict[str, Any]:
        """Advance the telescoped prediction to θ_step, evaluate, and (unless final) re-linearise."""
        model = self._model()
        with torch.no_grad():
            delta = [p.detach() - s for p, s in zip(self._params, self._snapshot, strict=True)]
            for task, grads in self._grads.items():
                self.predicted[task] += float(list_dot(grads, delta))
        del delta
        with self._quiet(model):
            if final:
                for task in self._f0:
                    assert self.eval_sampler is not None
                    value, _ = dataset_metric(model, self.eval_sampler, task, None, self.max_eval_rows)
                    self.observed[task] = value - self._f0[task]
            else:
                for task, (value, grads) in self._eval_gradients(model).items():
                    self._grads[task] = grads
                    if value is not None:
                        self.observed[task] = value - self._f0[task]
            if self.metrics:
                now = self._user_metrics(model)
                self.user_change = {k: now[k] - self.user_initial[k] for k in now if k in self.user_initial}
        if not final:
            for snap, p in zip(self._snapshot, self._params, strict=True):
                snap.copy_(p.detach())
        self._last_step = step
        return self._record(step)

    def _record(self, step: int) -> dict[str, Any]:
        """Scalars at ``step``; degradation = −change of f (positive: capability lost)."""
        record: dict[str, Any] = {"train/global_step": step}
        for task in self.tasks:
            record[f"degradation/predicted/{task}"] = -self.predicted[task]
            if task in self.observed:
                record[f"degradation/observed/{task}"] = -self.observed[task]
        for key, change in self.user_change.items():
            record[f"degradation/user/{key}"] = self.user_initial[key] + change
            record[f"degradation/user_change/{key}"] = change
        self.history.append(dict(record))
        return record

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per task: τ_i, angle, regime, predicted and observed degradation (None: not measured)."""
        assert self.geometry is not None
        rows = []
        for row in self.geometry["tasks"]:
            task = row["task"]
            rows.append(
                {
                    "task": task,
                    "tau": row["tau"],
                    "angle_deg": row["angle_deg"],
                    "regime": row["regime"],
                    "predicted": -self.predicted[task],
                    "observed": -self.observed[task] if task in self.observed else None,
                }
            )
        return rows

    def _summary(self, step: int) -> dict[str, Any]:
        rows = self.table_rows()
        measured = [r for r in rows if r["observed"] is not None]
        tau = [r["tau"] for r in measured]
        obs = [r["observed"] for r in measured]
        pred = [r["predicted"] for r in measured]
        ranks = {
            "spearman_tau_vs_observed": spearman(tau, obs),
            "kendall_tau_vs_observed": kendall(tau, obs),
            "spearman_predicted_vs_observed": spearman(pred, obs),
            "kendall_predicted_vs_observed": kendall(pred, obs),
        }
        if len(measured) < 2:
            logger.warning(
                "degradation tracking: observed degradation measured on %d task(s); rank correlations need "
                "at least 2 (give capability_eval_datasets for more tasks).",
                len(measured),
            )
        return {
            "global_step": step,
            "observed_measured": bool(measured),
            "rows": rows,
            "rank_correlations": ranks,
            "geometry": self.geometry,
            "predicted_rate": self.predicted_rate,
            "user_initial": self.user_initial,
            "user_change": self.user_change,
        }

    # ------------------------------------------------------------------ outputs

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        """Run a logging/writing action; an error there is logged, never raised into training."""
        try:
            fn()
        except Exception as err:
            logger.warning("degradation tracking: could not %s: %s: %s", what, type(err).__name__, err)

    def _emit(self, args: Any, state: Any, record: dict[str, Any]) -> None:
        if state.is_world_process_zero:
            self._guard("log degradation scalars to wandb", lambda: self._wandb_log(args, record))

    def _log_geometry(self, state: Any) -> None:
        if not state.is_world_process_zero or self.geometry is None:
            return
        lines = [f"{'task':<14} {'tau_i':>8} {'angle':>8} {'regime':>10} {'pred. rate':>11}"]
        for row in self.geometry["tasks"]:
            lines.append(
                f"{row['task']:<14} {row['tau']:>8.4f} {row['angle_deg']:>7.1f}° {row['regime']:>10} "
                f"{-self.predicted_rate[row['task']]:>+11.4f}"
            )
        logger.info(
            "degradation tracking, pre-alignment geometry (step %d):\n%s", state.global_step, "\n".join(lines)
        )

    def _wandb(self, args: Any) -> Any:
        """The wandb module when ``report_to`` has wandb and a run is active, else None (warned once)."""
        report_to = args.report_to or []
        if isinstance(report_to, str):
            report_to = [report_to]
        if "wandb" not in report_to and "all" not in report_to:
            return None
        try:
            import wandb
        except ImportError:
            self._warn_once(
                "no-wandb",
                "report_to includes 'wandb' but wandb is not installed: degradation results are written to "
                "output_dir only (pip install wandb).",
            )
            return None
        if wandb.run is None:
            self._warn_once(
                "no-run",
                "report_to includes 'wandb' but no wandb run is active (not logged in, or wandb.init failed): "
                "degradation results are written to output_dir only.",
            )
            return None
        return wandb

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("degradation tracking: %s", message)

    def _wandb_log(self, args: Any, data: dict[str, Any]) -> None:
        """The one place that calls ``wandb.log`` (tests replace it)."""
        wandb = self._wandb(args)
        if wandb is not None:
            wandb.log(data)

    def _log_table(self, args: Any, state: Any) -> None:
        wandb = self._wandb(args)
        if wandb is None or self.summary is None:
            return
        rows = self.summary["rows"]
        table = wandb.Table(columns=TABLE_COLUMNS, data=[[r[c] for c in TABLE_COLUMNS] for r in rows])
        data: dict[str, Any] = {"train/global_step": state.global_step, "degradation/table": table}
        for key, value in self.summary["rank_correlations"].items():
            data[f"degradation/rank/{key}"] = value
        if self.summary["observed_measured"]:
            measured = [[r[c] for c in TABLE_COLUMNS] for r in rows if r["observed"] is not None]
            scatter_table = wandb.Table(columns=TABLE_COLUMNS, data=measured)
            data["degradation/scatter"] = wandb.plot.scatter(
                scatter_table, "predicted", "observed", title="predicted vs observed degradation"
            )
        self._wandb_log(args, data)

    def output_dir(self, args: Any) -> Path:
        """Where the table, history and plot are written: ``<output_dir>/degradation``."""
        return Path(args.output_dir) / OUTPUT_SUBDIR

    def _write_outputs(self, args: Any) -> None:
        assert self.summary is not None
        out = self.output_dir(args)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.summary["rows"]
        (out / "degradation_table.json").write_text(
            json.dumps({**self.summary, "history": self.history}, indent=2, default=str)
        )
        with open(out / "degradation_table.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        plot_degradation(rows, self.summary["rank_correlations"], out / "degradation.png")
        logger.info("degradation tracking: wrote %s", os.fspath(out))


def plot_degradation(rows: Sequence[Mapping[str, Any]], ranks: Mapping[str, float], path: Path) -> None:
    """Scatter of predicted against observed degradation (or against τ_i when not observed), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["observed"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ax = axes[0]
    if measured:
        xs = [r["predicted"] for r in measured]
        ys = [r["observed"] for r in measured]
        ax.scatter(xs, ys)
        for r in measured:
            ax.annotate(r["task"], (r["predicted"], r["observed"]), fontsize=8)
        lo, hi = min(xs + ys), max(xs + ys)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="observed = predicted")
        ax.legend(fontsize=8)
        ax.set_title(f"Spearman(pred, obs) = {ranks.get('spearman_predicted_vs_observed', math.nan):.2f}")
    else:
        ax.set_title("observed degradation not measured (no eval sets)")
    ax.set_xlabel("predicted degradation  -Σ⟨∇f_i, Δθ⟩")
    ax.set_ylabel("observed degradation  f_i(θ0) - f_i(θ)")
    ax = axes[1]
    ys_key = "observed" if measured else "predicted"
    shown = measured or list(rows)
    ax.scatter([r["tau"] for r in shown], [r[ys_key] for r in shown])
    for r in shown:
        ax.annotate(r["task"], (r["tau"], r[ys_key]), fontsize=8)
    ax.set_xlabel("τ_i (before alignment)")
    ax.set_ylabel(f"{ys_key} degradation")
    ax.set_title(f"Spearman(τ, obs) = {ranks.get('spearman_tau_vs_observed', math.nan):.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "TABLE_COLUMNS",
    "DegradationCallback",
    "dataset_metric",
    "kendall",
    "plot_degradation",
    "rankdata",
    "spearman",
]
