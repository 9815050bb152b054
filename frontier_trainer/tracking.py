"""Predicted versus observed per-task capability degradation during alignment (Prediction 1, §8).

:class:`DegradationCallback` turns the paper's Prediction 1 into a measurement every run makes:

1. **The safety direction v and the geometry.** Where v comes from (``safety_direction``):
   ``"loss"`` — the update direction −∇L of the trainer's own ``compute_loss``, averaged over
   ``safety_batches`` seeded batches of the training set at θ_0 (any DPO ``loss_type``; needs a
   static preference dataset); ``"updates"`` — the sum of the optimizer's raw updates
   u = θ_new − θ_old over the first ``safety_batches`` steps (a trainer wearing ``FrontierMixin``
   hands over u before its projection, for free; on any other trainer it is θ_t − θ_0), which
   works for every trainer, GRPO/RLOO and other online ones included; or a user callable
   ``fn(model, params)`` giving v at θ_0. ``"auto"`` is ``"loss"`` for a ``trl.DPOTrainer`` and
   ``"updates"`` otherwise. The capability directions c_i are gradients of f_i (mean completion
   log-likelihood, larger is better) on the *direction-estimation* sets at θ_0. From their Gram
   matrix: τ_i = cos²(v, c_i) (Cor 4.5, eq. 6), the principal angle, the §9.3 regime and the
   first-order rate ⟨∇f_i, v̂⟩ (the change of f_i per unit step along the safety direction;
   Δ_Ci ∝ −τ_i in Prediction 1). With ``"updates"`` the geometry is logged at step
   ``safety_batches``; until then the c_i and the step-0 gradients are held (m + 1 extra
   parameter-sized tensors, plus the running sum of u).
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

Representation space (issue 13 §2): with ``probe_harmless`` (harmless prompts; the trainer's
``degradation_probe_harmless``) the tracker also measures, before step 0, the representation-space
τ_i = cos²(v*_ℓ*, c_i,ℓ*) of :mod:`frontier_trainer.probes` (safety probe: difference of means of
the harmful — by default the training prompts — and the harmless prompts at the last prompt token,
Arditi et al. 2024; task probes on the capability prompts; ℓ* the best-separating layer) and logs
it next to the gradient-space τ_i: ``degradation/tau_repr/<task>`` and ``degradation/tau_repr_layer``
in the step-0 record, a ``tau_repr`` column in the table (wandb, JSON, CSV),
``spearman_tau_repr_vs_observed`` / ``kendall_tau_repr_vs_observed`` in the rank correlations and
the whole probe result under ``representation`` in the JSON. Without it nothing of this is logged.

Distributed: every rank does the same deterministic work (same seeded batches, no dropout,
RNG state restored), so the collectives inside ``compute_loss`` match and training RNG streams
are unchanged; only the main process logs and writes.

Resume: :meth:`DegradationCallback.state_dict` holds the whole measurement (θ snapshot,
gradients, predictions, observations, sampler positions, fingerprints of the data);
``FrontierMixin`` saves it in each checkpoint and restores it, so a resumed run continues the
measurement from θ_0 instead of restarting it at the checkpoint. This module is library code:
it never imports the ``geometry_report`` command; the Gram geometry comes from the library
module :mod:`frontier_trainer.report`.
"""

from __future__ import annotations

import csv
import hashlib
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

from frontier_trainer import probes
from frontier_trainer.directions import (
    IGNORE_INDEX,
    CapabilitySampler,
    build_capability_sampler,
    completion_metric,
    deterministic_forward,
    list_dot,
    validate_task_names,
)
from frontier_trainer.report import (
    PROBE_ROWS,
    average_gradient,
    capability_directions,
    gram_matrix,
    load_probe_prompts,
    probe_prompts,
    representation_geometry,
    task_geometry,
    task_probe_prompts,
)

logger = logging.getLogger(__name__)

UserMetric = Callable[[nn.Module, Any], "float | Mapping[str, float]"]
"""``fn(model, tokenizer) -> float`` or ``{name: float}`` (e.g. ``lab.evaluate``)."""

SafetyFn = Callable[[nn.Module, Sequence[nn.Parameter]], Sequence[torch.Tensor]]
"""``fn(model, params) -> [tensor per parameter]``: a user-given safety direction v at θ_0."""

SafetyDirection = "str | SafetyFn"
"""``"auto"``, ``"loss"``, ``"updates"`` or a :data:`SafetyFn` (see :class:`DegradationCallback`)."""

SAFETY_MODES = ("auto", "loss", "updates")

Grads = list[torch.Tensor]
"""A vector over the trainable parameters, stored as one tensor per parameter."""

TABLE_COLUMNS = ["task", "tau", "angle_deg", "regime", "predicted", "observed"]
REPR_COLUMN = "tau_repr"
"""The representation-space τ_i column, after ``tau``; present only when harmless prompts are given."""
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
# geometry helpers of the tracker's own (the Gram geometry itself is frontier_trainer.report's)
# --------------------------------------------------------------------------------------


def _undefined_row(task: str) -> dict[str, Any]:
    return dict(task=task, tau=math.nan, cos=math.nan, angle_deg=math.nan, regime="undefined", free_safety=math.nan)


def undefined_geometry(tasks: Sequence[str], budget: float = 1.0) -> dict[str, Any]:
    """:func:`task_geometry`'s shape with NaN everywhere: no safety direction could be measured."""
    return {
        "budget": budget,
        "tasks": [_undefined_row(t) for t in tasks],
        "joint_tau": math.nan,
        "joint_free_safety": math.nan,
        "sum_of_task_taus": math.nan,
    }


def data_fingerprints(sampler: CapabilitySampler) -> dict[str, str]:
    """{task: sha256 of its tokenised rows (input ids and labels, in order)}: what directions or
    measurements were computed from. A resume compares it, not only the task names."""
    out: dict[str, str] = {}
    for task, rows in sampler.rows.items():
        digest = hashlib.sha256()
        for row in rows:
            for key in ("input_ids", "labels"):
                digest.update(key.encode())
                digest.update(",".join(map(str, row.get(key, []))).encode())
            digest.update(b";")
        out[task] = digest.hexdigest()
    return out


def check_fingerprints(where: str, saved: Mapping[str, str] | None, sampler: CapabilitySampler | None) -> None:
    """Raise naming the task when ``sampler``'s data differs from the ``saved`` fingerprints."""
    if not saved or sampler is None:
        return
    for task, digest in data_fingerprints(sampler).items():
        if task in saved and saved[task] != digest:
            raise ValueError(
                f"{where}: capability task {task!r} has different data than the run that saved the checkpoint "
                "(the fingerprint of its tokenised rows differs); resume with the same data for "
                f"{task!r}, the same tokenizer and the same capability_max_length."
            )


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


def probe_geometry_from_dict(data: Mapping[str, Any]) -> probes.ProbeGeometry:
    """Inverse of :meth:`probes.ProbeGeometry.to_dict` (string layer keys back to ints): a resumed
    run restores the representation-space τ_i measured at θ_0."""
    return probes.ProbeGeometry(
        layers=[int(x) for x in data["layers"]],
        layer=int(data["layer"]),
        separation={int(k): float(v) for k, v in data["separation"].items()},
        separation_held_out=bool(data["separation_held_out"]),
        tau_by_layer={t: {int(k): float(v) for k, v in by.items()} for t, by in data["tau_by_layer"].items()},
        tau={t: float(v) for t, v in data["tau"].items()},
        cos={t: float(v) for t, v in data["cos"].items()},
        baseline=str(data["baseline"]),
    )


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
        safety_batches: training batches averaged into the safety direction (``"loss"``), or
            optimizer steps whose raw updates are summed into it (``"updates"``).
        safety_direction: where v comes from. ``"loss"``: −∇ of the trainer's ``compute_loss``
            on seeded training batches at θ_0 (static preference data; geometry at step 0).
            ``"updates"``: the sum of the optimizer's raw updates u = θ_new − θ_old over the first
            ``safety_batches`` steps (a trainer wearing ``FrontierMixin`` hands over u before its
            projection; on any other trainer it is θ_t − θ_0); works for every trainer, GRPO and
            other online ones included; the geometry is logged at that step. A callable
            ``fn(model, params) -> tensors`` gives v at θ_0 directly. ``"auto"``: ``"loss"`` for a
            ``trl.DPOTrainer``, ``"updates"`` otherwise.
        capability_batches: batches averaged into each capability direction.
        batch_size: rows per capability/eval batch.
        max_length: capability/eval rows longer than this many tokens are dropped.
        max_eval_rows: rows per evaluation set used (``None``: all).
        seed: seed of every row selection (identical on every rank).
        budget: B for the tax-free safety B√(1 − τ_i) in the table.
        probe_harmless: harmless prompts for representation-space τ_i (a list of strings, a
            Dataset or a source with a ``prompt`` column, e.g. ``lab:benign``); ``None``: off.
        probe_harmful: the harmful prompts of the safety probe; ``None``: the ``prompt`` column of
            the trainer's training set (the preference prompts; TRL keeps it next to the token ids).
        probe_rows: prompts per probe set (a seeded subset of larger sets).
        probe_harmless_name: what the error messages call ``probe_harmless`` (the trainer passes
            its config field, ``degradation_probe_harmless``).

    Raises:
        ValueError: no capability dataset, an eval task that is not a capability task, a
            non-positive count, or (with ``probe_harmless``) a probe set that cannot be loaded, is
            empty, has blank prompts or fewer than 2, fewer than two capability tasks, or a task
            without prompts; the probe errors name ``probe_harmless_name``. Raised here or in
            :meth:`attach`, before training.
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
        safety_direction: SafetyDirection = "auto",
        probe_harmless: Any = None,
        probe_harmful: Any = None,
        probe_rows: int = PROBE_ROWS,
        probe_harmless_name: str = "probe_harmless",
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
        if not callable(safety_direction) and safety_direction not in SAFETY_MODES:
            raise ValueError(
                f"DegradationCallback: safety_direction must be one of {SAFETY_MODES} or a callable "
                f"fn(model, params) -> tensors, got {safety_direction!r}"
            )
        self.safety_direction = safety_direction
        self.metrics = dict(metrics or {})
        self.eval_steps = eval_steps
        self.safety_batches = safety_batches
        self.capability_batches = capability_batches
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_eval_rows = max_eval_rows
        self.seed = seed
        self.budget = budget
        self.probe_rows = probe_rows
        self.probe_harmless_name = probe_harmless_name
        #: harmless / harmful / per-task prompts of the representation probes (None: off).
        self.probe_harmless: list[str] | None = None
        self.probe_harmful: list[str] | None = None
        self.probe_tasks: dict[str, list[str]] | None = None
        if probe_harmless is not None:
            self.probe_harmless = load_probe_prompts(probe_harmless_name, probe_harmless, probe_rows, seed)
            if probe_harmful is not None:
                self.probe_harmful = load_probe_prompts("probe_harmful", probe_harmful, probe_rows, seed)
        elif probe_harmful is not None:
            raise ValueError(
                "DegradationCallback: probe_harmful is given without probe_harmless; the safety probe needs both "
                "(pass probe_harmless=[...] harmless prompts)."
            )
        #: representation-space geometry at θ_0 (:func:`probes.probe_tax_rates`), when probed.
        self.repr_geometry: probes.ProbeGeometry | None = None

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
        self._restored = False
        #: "loss", "updates" or "callable": resolved from ``safety_direction`` at attach.
        self.safety_mode: str | None = None
        #: While the "updates" safety direction is being summed: start step, the capability
        #: directions and eval gradients at θ_0, and (without a FrontierMixin) the summed Δθ.
        self._pending: dict[str, Any] | None = None
        self._raw_from_trainer = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ setup

    @property
    def active(self) -> bool:
        """Whether the callback is measuring (between train begin and end)."""
        return self._active

    @property
    def measures_observed(self) -> bool:
        """Whether held-out evaluation sets were given (observed degradation is measured)."""
        return bool(self.eval_sources)

    def attach(self, trainer: Any) -> DegradationCallback:
        """Bind to ``trainer``, load and tokenise every dataset now (bad input fails before training),
        and register as its callback (replacing any other :class:`DegradationCallback`)."""
        self.trainer = trainer
        self.tokenizer = trainer.processing_class
        self.safety_mode = self._resolve_safety_mode(trainer)
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
        if self.probe_harmless is not None:
            self._prepare_probes(trainer)
        for other in [c for c in trainer.callback_handler.callbacks if isinstance(c, DegradationCallback)]:
            if other is not self:
                logger.info("degradation tracking: replacing an earlier DegradationCallback on this trainer.")
                trainer.remove_callback(other)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _prepare_probes(self, trainer: Any) -> None:
        """Load and check every prompt set of the representation probes now (before training): the
        harmful prompts default to the training set's ``prompt`` column, the task prompts are the
        capability direction sets' prompts."""
        name = self.probe_harmless_name
        if self.probe_harmful is None:
            dataset = getattr(trainer, "train_dataset", None)
            columns = getattr(dataset, "column_names", None)
            if dataset is None or (columns is not None and "prompt" not in columns):
                raise ValueError(
                    f"{name}: the safety probe's harmful prompts are the training prompts, and this trainer's "
                    f"train_dataset has {'no dataset' if dataset is None else f'columns {list(columns)}'} with no "
                    f"'prompt' column. Train on prompt/chosen/rejected rows, or leave {name} unset."
                )
            self.probe_harmful = probe_prompts(
                f"{name} (harmful side: train_dataset['prompt'])", dataset, self.probe_rows, self.seed
            )
        self.probe_tasks = task_probe_prompts(self.capability_sources, name, self.probe_rows, self.seed)
        logger.info(
            "degradation tracking: representation probes on %d harmful, %d harmless prompts and %s task prompts.",
            len(self.probe_harmful),
            len(self.probe_harmless or []),
            {t: len(p) for t, p in self.probe_tasks.items()},
        )

    def _representation_geometry(self, model: nn.Module) -> probes.ProbeGeometry | None:
        """Representation-space τ_i at θ_0 (Prediction 1 with probes); None (warned) when a probe is
        undefined on this model, e.g. two probe sets whose means coincide: training goes on."""
        assert self.probe_harmful is not None and self.probe_harmless is not None and self.probe_tasks
        try:
            return representation_geometry(
                model, self.tokenizer, self.probe_harmful, self.probe_harmless, self.probe_tasks, self.batch_size
            )
        except ValueError as err:
            logger.warning("degradation tracking: representation-space τ_i undefined, not logged: %s", err)
            return None

    def _resolve_safety_mode(self, trainer: Any) -> str:
        if callable(self.safety_direction):
            return "callable"
        mode = self.safety_direction
        online = hasattr(trainer, "reward_funcs")  # GRPO/RLOO: training inputs are rollouts
        if mode == "auto":
            from trl import DPOTrainer

            mode = "loss" if isinstance(trainer, DPOTrainer) else "updates"
        if mode == "loss" and (online or getattr(trainer, "train_dataset", None) is None):
            raise ValueError(
                f"DegradationCallback(safety_direction='loss') needs a static training dataset to evaluate "
                f"{type(trainer).__name__}.compute_loss on, and this trainer's inputs are generated during "
                "training. Use safety_direction='updates' (the optimizer's own raw updates) or a callable."
            )
        return mode

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
        store = getattr(t, "_metrics", None)  # TRL trainers' metric buffer: left as it was
        store = store.get("train") if isinstance(store, dict) else None
        saved_metrics = {k: list(v) for k, v in store.items()} if store is not None else None
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
            if store is not None and saved_metrics is not None:
                store.clear()
                store.update(saved_metrics)
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
        if self._restored:
            self._active = True
            logger.info("degradation tracking: resumed at step %d from the checkpoint's state.", state.global_step)
            return
        if state.global_step > 0:
            logger.warning(
                "degradation tracking: resuming at step %d without the tracker's saved state; predictions and "
                "observations are measured from the resumed parameters, not from the pre-alignment model.",
                state.global_step,
            )
        model = self._model()
        self._params = [p for p in model.parameters() if p.requires_grad]
        with self._quiet(model):
            if self.probe_harmless is not None:
                self.repr_geometry = self._representation_geometry(model)
            v = None
            if self.safety_mode == "loss":
                v = self._safety_direction(model)
            elif self.safety_mode == "callable":
                v = self._callable_direction(model)
            assert self.direction_sampler is not None
            caps = capability_directions(model, self._params, self.direction_sampler, self.capability_batches)
            evals = self._eval_gradients(model)
            for task, (value, grads) in evals.items():
                self.predicted[task] = 0.0
                self._grads[task] = grads
                if value is not None:
                    self._f0[task] = value
                    self.observed[task] = 0.0
            if v is not None:
                self._set_geometry(v, caps, self._grads)
                del v
            else:
                self._pending = {"start": state.global_step, "caps": caps, "grads0": dict(self._grads), "acc": None}
                start = getattr(self.trainer, "start_raw_update_sum", None)
                self._raw_from_trainer = bool(start()) if callable(start) else False
            del caps
            self.user_initial = self._user_metrics(model) if self.metrics else {}
        self.user_change = dict.fromkeys(self.user_initial, 0.0)
        self._snapshot = [p.detach().clone() for p in self._params]
        self._last_step = state.global_step
        self._active = True
        record: dict[str, Any] = {"train/global_step": state.global_step}
        if self.geometry is not None:
            record.update(self._geometry_record())
        if self.repr_geometry is not None:  # measured at θ_0 whatever the safety mode
            record.update(probes.tax_rate_logs(self.repr_geometry))
        record.update(self._record(state.global_step))
        self._emit(args, state, record)
        self._log_geometry(state)

    def _callable_direction(self, model: nn.Module) -> list[torch.Tensor]:
        assert callable(self.safety_direction)
        v = list(self.safety_direction(model, self._params))
        if len(v) != len(self._params) or any(
            t.shape != p.shape for t, p in zip(v, self._params, strict=True)
        ):
            raise ValueError(
                "degradation tracking: safety_direction(model, params) must return one tensor per trainable "
                f"parameter, shaped like it ({len(self._params)} parameters), got {len(v)} tensors"
            )
        return [t.detach().to(device=p.device, dtype=p.dtype) for t, p in zip(v, self._params, strict=True)]

    def _set_geometry(
        self, v: Sequence[torch.Tensor], caps: Mapping[str, Grads], grads0: Mapping[str, Grads]
    ) -> None:
        """τ_i, angles, regimes from the Gram matrix of [v, c_1, …]; first-order rates ⟨∇f_i, v̂⟩."""
        G = gram_matrix([v, *(caps[t] for t in self.tasks)])
        v_norm = math.sqrt(max(float(G[0, 0]), 0.0))
        if not v_norm > 0:
            logger.warning("degradation tracking: the safety direction is zero (no update?); τ_i are undefined.")
            self.geometry = undefined_geometry(self.tasks, self.budget)
            self.predicted_rate = dict.fromkeys(grads0, math.nan)
            return
        self.geometry = task_geometry(G, self.tasks, self.budget)
        for task, grads in grads0.items():
            self.predicted_rate[task] = float(list_dot(grads, v)) / v_norm

    def _geometry_record(self) -> dict[str, Any]:
        assert self.geometry is not None
        record: dict[str, Any] = {}
        for row in self.geometry["tasks"]:
            task = row["task"]
            record[f"degradation/tau/{task}"] = row["tau"]
            record[f"degradation/angle/{task}"] = row["angle_deg"]
            record[f"degradation/predicted_rate/{task}"] = -self.predicted_rate[task]
        record["degradation/joint_tau"] = self.geometry["joint_tau"]
        return record

    def _finish_pending(self, args: Any, state: Any) -> None:
        """The "updates" safety direction is complete: v = Σ raw u; log the geometry now."""
        pending, self._pending = self._pending, None
        assert pending is not None
        v = self.trainer.pop_raw_update_sum(self._params) if self._raw_from_trainer else None
        if v is None:
            with torch.no_grad():
                v = [p.detach() - s for p, s in zip(self._params, self._snapshot, strict=True)]
                if pending["acc"] is not None:
                    v = [a + d for a, d in zip(pending["acc"], v, strict=True)]
        self._set_geometry(v, pending["caps"], pending["grads0"])
        del v, pending
        record = {"train/global_step": state.global_step, **self._geometry_record()}
        self._emit(args, state, record)
        self._log_geometry(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pending = self._pending
        if self._active and pending is not None and state.global_step - pending["start"] >= self.safety_batches:
            self._finish_pending(args, state)
        if self._active and state.global_step % self.eval_steps == 0 and state.global_step != self._last_step:
            self._emit(args, state, self._measure(state.global_step, final=False))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._active:
            return
        if self._pending is not None:
            if state.global_step > self._pending["start"]:
                self._finish_pending(args, state)
            else:
                self._pending = None
                self.geometry = undefined_geometry(self.tasks, self.budget)
                self.predicted_rate = dict.fromkeys(self.tasks, math.nan)
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
            if self._pending is not None and not self._raw_from_trainer and not final:
                acc = self._pending["acc"]
                self._pending["acc"] = delta if acc is None else [a.add_(d) for a, d in zip(acc, delta, strict=True)]
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

    @property
    def table_columns(self) -> list[str]:
        """:data:`TABLE_COLUMNS`, with :data:`REPR_COLUMN` after ``tau`` when representation τ_i were measured."""
        if self.repr_geometry is None:
            return list(TABLE_COLUMNS)
        at = TABLE_COLUMNS.index("tau") + 1
        return [*TABLE_COLUMNS[:at], REPR_COLUMN, *TABLE_COLUMNS[at:]]

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per task: τ_i (and ``tau_repr`` when probed), angle, regime, predicted and
        observed degradation (None: not measured)."""
        assert self.geometry is not None
        rows = []
        for row in self.geometry["tasks"]:
            task = row["task"]
            out = {
                "task": task,
                "tau": row["tau"],
                "angle_deg": row["angle_deg"],
                "regime": row["regime"],
                "predicted": -self.predicted[task],
                "observed": -self.observed[task] if task in self.observed else None,
            }
            if self.repr_geometry is not None:
                out[REPR_COLUMN] = self.repr_geometry.tau[task]
            rows.append({c: out[c] for c in self.table_columns})
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
        if self.repr_geometry is not None:
            tau_repr = [r[REPR_COLUMN] for r in measured]
            ranks["spearman_tau_repr_vs_observed"] = spearman(tau_repr, obs)
            ranks["kendall_tau_repr_vs_observed"] = kendall(tau_repr, obs)
        if len(measured) < 2:
            logger.warning(
                "degradation tracking: observed degradation measured on %d task(s); rank correlations need "
                "at least 2 (give capability_eval_datasets for more tasks).",
                len(measured),
            )
        summary = {
            "global_step": step,
            "observed_measured": bool(measured),
            "rows": rows,
            "rank_correlations": ranks,
            "geometry": self.geometry,
            "predicted_rate": self.predicted_rate,
            "user_initial": self.user_initial,
            "user_change": self.user_change,
        }
        if self.repr_geometry is not None:
            summary["representation"] = self.repr_geometry.to_dict()
        return summary

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the same measurement: the telescoped
        predictions, observations, θ snapshot and gradients, sampler positions, the pending
        "updates" safety direction, and fingerprints of the data (tensors on the CPU)."""

        def cpu(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return [t.detach().cpu() for t in tensors]

        pending = None
        if self._pending is not None:
            pending = {
                "start": self._pending["start"],
                "caps": {t: cpu(g) for t, g in self._pending["caps"].items()},
                "grads0": {t: cpu(g) for t, g in self._pending["grads0"].items()},
                "acc": None if self._pending["acc"] is None else cpu(self._pending["acc"]),
            }
        return {
            "tasks": list(self.tasks),
            "safety_mode": self.safety_mode,
            "representation": None if self.repr_geometry is None else self.repr_geometry.to_dict(),
            "raw_from_trainer": self._raw_from_trainer,
            "geometry": self.geometry,
            "predicted_rate": dict(self.predicted_rate),
            "predicted": dict(self.predicted),
            "observed": dict(self.observed),
            "f0": dict(self._f0),
            "user_initial": dict(self.user_initial),
            "user_change": dict(self.user_change),
            "history": [dict(r) for r in self.history],
            "last_step": self._last_step,
            "snapshot": cpu(self._snapshot),
            "grads": {t: cpu(g) for t, g in self._grads.items()},
            "pending": pending,
            "direction_sampler": self.direction_sampler.state_dict() if self.direction_sampler else None,
            "eval_sampler": self.eval_sampler.state_dict() if self.eval_sampler else None,
            "fingerprints": {
                "direction": data_fingerprints(self.direction_sampler) if self.direction_sampler else None,
                "eval": data_fingerprints(self.eval_sampler) if self.eval_sampler else None,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], checkpoint: str = "checkpoint") -> None:
        """Restore :meth:`state_dict` (after :meth:`attach`); ``on_train_begin`` then continues
        instead of re-measuring at the resumed parameters.

        Raises:
            ValueError: other tasks, or a task whose data fingerprint differs (named).
        """
        if list(state["tasks"]) != self.tasks:
            raise ValueError(
                f"{checkpoint}: the degradation tracker measured tasks {state['tasks']}, this run has {self.tasks}"
            )
        where = f"{checkpoint} (degradation tracker)"
        check_fingerprints(where, state["fingerprints"]["direction"], self.direction_sampler)
        check_fingerprints(where, state["fingerprints"]["eval"], self.eval_sampler)
        params = [p for p in self._model().parameters() if p.requires_grad]
        if len(params) != len(state["snapshot"]):
            raise ValueError(
                f"{where}: saved {len(state['snapshot'])} trainable parameters, this model has {len(params)}"
            )

        def on(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, params, strict=True)]

        self._params = params
        self.safety_mode = state["safety_mode"]
        self._raw_from_trainer = bool(state["raw_from_trainer"])
        self.geometry = state["geometry"]
        saved_repr = state.get("representation")  # absent in checkpoints from before issue 13 §2
        self.repr_geometry = None if saved_repr is None else probe_geometry_from_dict(saved_repr)
        self.predicted_rate = dict(state["predicted_rate"])
        self.predicted = dict(state["predicted"])
        self.observed = dict(state["observed"])
        self._f0 = dict(state["f0"])
        self.user_initial = dict(state["user_initial"])
        self.user_change = dict(state["user_change"])
        self.history = [dict(r) for r in state["history"]]
        self._last_step = state["last_step"]
        self._snapshot = on(state["snapshot"])
        self._grads = {t: on(g) for t, g in state["grads"].items()}
        pending = state["pending"]
        self._pending = None
        if pending is not None:
            self._pending = {
                "start": pending["start"],
                "caps": {t: on(g) for t, g in pending["caps"].items()},
                "grads0": {t: on(g) for t, g in pending["grads0"].items()},
                "acc": None if pending["acc"] is None else on(pending["acc"]),
            }
        if state["direction_sampler"] is not None and self.direction_sampler is not None:
            self.direction_sampler.load_state_dict(state["direction_sampler"])
        if state["eval_sampler"] is not None and self.eval_sampler is not None:
            self.eval_sampler.load_state_dict(state["eval_sampler"])
        self._restored = True

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
        rep = self.repr_geometry
        lines = [
            f"{'task':<14} {'tau_i':>8} {'angle':>8} {'regime':>10} {'pred. rate':>11}"
            + (f" {'tau_repr':>9}" if rep is not None else "")
        ]
        for row in self.geometry["tasks"]:
            lines.append(
                f"{row['task']:<14} {row['tau']:>8.4f} {row['angle_deg']:>7.1f}° {row['regime']:>10} "
                f"{-self.predicted_rate[row['task']]:>+11.4f}"
                + (f" {rep.tau[row['task']]:>9.4f}" if rep is not None else "")
            )
        if rep is not None:
            lines.append(
                f"tau_repr: representation-space τ_i at layer {rep.layer} "
                f"(safety-probe d′ {rep.separation[rep.layer]:.2f})"
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
        columns = self.table_columns
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        data: dict[str, Any] = {"train/global_step": state.global_step, "degradation/table": table}
        for key, value in self.summary["rank_correlations"].items():
            data[f"degradation/rank/{key}"] = value
        if self.summary["observed_measured"]:
            measured = [[r[c] for c in columns] for r in rows if r["observed"] is not None]
            scatter_table = wandb.Table(columns=columns, data=measured)
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
            writer = csv.DictWriter(handle, fieldnames=self.table_columns)
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
    "REPR_COLUMN",
    "TABLE_COLUMNS",
    "DegradationCallback",
    "check_fingerprints",
    "data_fingerprints",
    "dataset_metric",
    "kendall",
    "plot_degradation",
    "probe_geometry_from_dict",
    "rankdata",
    "spearman",
    "undefined_geometry",
]
