"""FrontierArguments: the frontier projection's knobs as a dataclass mixin for any trainer config.

Combine it with a TRL (or transformers) config by multiple inheritance, frontier fields first in
the bases so that their ``__post_init__`` runs and then defers to the config's own::

    @dataclass
    class FrontierDPOConfig(FrontierArguments, DPOConfig): ...

Every knob is a documented dataclass field (``metadata["help"]``), so TRL's parser
(``TrlParser`` / ``HfArgumentParser``), YAML recipes and any script that builds
``Trainer(model=..., args=cfg, ...)`` keep working. Fields that take a mapping accept a dict in
Python and YAML, and a JSON string (or ``task=value,task=value``) on the command line, which
``__post_init__`` parses. Validation happens in ``__post_init__``: a bad value raises a
``ValueError`` naming the field before any model is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

PROJECTIONS = ("none", "nullspace", "frontier")

#: How the degradation tracker gets the safety direction v (see ``tracking.DegradationCallback``).
SAFETY_DIRECTIONS = ("auto", "loss", "updates")

#: What the projection does when the set of parameters the optimizer updates changes mid-run.
PARAM_CHANGE_POLICIES = ("retrack", "error")

#: How capability directions are estimated (issue 15 §2); the estimator itself is frontier_trainer.subspace.
CAPABILITY_ESTIMATORS = ("batch", "sketch")

#: Which geometry protects the capabilities (issue 13 §1): gradient directions, activation subspaces, or both.
CAPABILITY_SPACES = ("gradient", "activation", "both")


def _parse_mapping(name: str, value: Any) -> dict[str, Any] | None:
    """Accept a dict, a JSON object string, or ``k=v,k=v``; return a dict (or None)."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{name}: could not parse {value!r} as a JSON object ({err})") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"{name} must be a mapping, got {value!r}")
            return parsed
        out: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(
                    f"{name}: expected 'task=value[,task=value...]' or a JSON object, got {value!r}"
                )
            if key.strip() in out:
                raise ValueError(f"{name}: task {key.strip()!r} is named twice")
            out[key.strip()] = val.strip()
        return out
    raise ValueError(
        f"{name} must be a mapping (dict, JSON string or 'task=value,...'), got {type(value).__name__}"
    )


def _tolerance(name: str, value: Any) -> float:
    try:
        tol = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0 or 'inf', got {value!r}") from None
    if math.isnan(tol) or tol < 0:
        raise ValueError(f"{name} must be >= 0 (or inf for no constraint), got {value!r}")
    return tol


def _parse_tolerance(value: Any) -> float | dict[str, float] | None:
    """A number (or numeric string such as 'inf') for every task, or a mapping {task: number}."""
    if value is None or isinstance(value, int | float):
        return None if value is None else _tolerance("capability_tolerance", value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None  # not a single number: a mapping string (or an error from _parse_mapping)
        if number is not None:
            return _tolerance("capability_tolerance", number)
    mapping = _parse_mapping("capability_tolerance", value)
    if mapping is None:
        return None
    return {task: _tolerance(f"capability_tolerance[{task!r}]", v) for task, v in mapping.items()}


@dataclass
class FrontierArguments:
    """The frontier projection's fields, to combine with any ``TrainingArguments`` subclass.

    Used alone it is a plain dataclass (its ``__post_init__`` only validates its own fields).
    """

    projection: str = field(
        default="nullspace",
        metadata={
            "help": "How each optimizer update is constrained: 'none' (bitwise the plain trainer), 'nullspace' "
            "(move only in the null space of the capability directions, Thm 4.3 with δ_C = 0), or 'frontier' "
            "(the best safety step with per-task capability loss at most capability_tolerance, Thm 4.1/4.3).",
            "choices": list(PROJECTIONS),
        },
    )
    capability_tolerance: dict | str | None = field(
        default=None,
        metadata={
            "help": "Frontier mode: ε_i, the largest allowed capability loss per step in units of the step norm "
            "(⟨ĉ_i, δ⟩ ≥ −ε_i‖u‖). A number for every task or a mapping {task: number}; 'inf' leaves a task "
            "unconstrained; tasks not in the mapping get 0. Default 0 (no capability loss to first order)."
        },
    )
    capability_datasets: dict | str | None = field(
        default=None,
        metadata={
            "help": "Capability data {task: source}; a source is a local .json/.jsonl/.csv/.parquet file, a "
            "local dataset directory, or a hub dataset name. Rows are prompt/completion or text. The "
            "trainer's capability_datasets keyword overrides this."
        },
    )
    capability_refresh_steps: int = field(
        default=10, metadata={"help": "Re-estimate capability directions every this many optimizer steps."}
    )
    capability_refresh_tasks: int | None = field(
        default=None,
        metadata={
            "help": "How many tasks are re-estimated at each scheduled refresh, round-robin in task order; the "
            "others keep the directions they hold. None (default) re-estimates every task (today's behaviour, "
            "bitwise unchanged). With m tasks per refresh and T tasks, each task is refreshed every "
            "ceil(T/m)·capability_refresh_steps steps and a refresh costs m·capability_rank (batch) or "
            "m·capability_sketch_batches (sketch) passes. Refresh n = global_step // capability_refresh_steps "
            "re-estimates tasks (n·m + j) mod T, j = 0..m-1 (derived from the step: identical on every DDP rank "
            "and across a resume). The first refresh, a forced one (the trained parameter set changed) and any "
            "refresh while no directions are held re-estimate every task. capability_ema smooths the refreshed "
            "tasks only; frontier/capability_loss/<task> and frontier/generalisation_leak/<task> are logged for "
            "the refreshed tasks only. capability_space='both': the unrestricted directions are kept too "
            "(k more gradient-sized tensors), so that kept directions are restricted by the current activation "
            "bases at every install. The activation bases themselves are still rebuilt from every task. "
            "An integer in 1..T (T = number of capability tasks)."
        },
    )
    capability_batch_size: int = field(
        default=8, metadata={"help": "Rows per task in each capability batch used to estimate a direction."}
    )
    capability_max_length: int = field(
        default=512, metadata={"help": "Capability rows longer than this many tokens are dropped."}
    )
    capability_ema: float = field(
        default=0.0,
        metadata={"help": "Direction smoothing: new = ema·old + (1−ema)·fresh; 0 uses the fresh gradient."},
    )
    capability_rank: int = field(
        default=1,
        metadata={
            "help": "Directions kept per task: the gradients of this many disjoint capability batches "
            "(capability_estimator='batch'), or the top this many directions of the task's sketch ('sketch')."
        },
    )
    capability_estimator: str = field(
        default="batch",
        metadata={
            "help": "How a task's directions are estimated at a refresh (issue 15 §2): 'batch' (the gradient of "
            "capability_rank batches of capability_batch_size rows: protects those rows), or 'sketch' (the top "
            "capability_rank directions of a frequent-directions sketch of capability_sketch_batches micro-batch "
            "gradients of capability_batch_size rows each: protects the directions the task's gradients vary "
            "along, so the protection carries over to rows not used; see frontier_trainer.subspace). Under DDP "
            "'sketch' draws different rows on every rank and all-reduces the gradients.",
            "choices": list(CAPABILITY_ESTIMATORS),
        },
    )
    capability_sketch_batches: int = field(
        default=8,
        metadata={
            "help": "capability_estimator='sketch': micro-batches (of capability_batch_size rows) per task per "
            "refresh; the refresh costs this many capability forward/backward passes per task."
        },
    )
    capability_sketch_oversample: int = field(
        default=1,
        metadata={
            "help": "capability_estimator='sketch': spare sketch rows ℓ; the sketch holds at most "
            "capability_rank + ℓ gradient-sized tensors (peak (capability_rank + ℓ + 1)× the trainable bytes)."
        },
    )
    capability_param_change: str = field(
        default="retrack",
        metadata={
            "help": "When the set of parameters the optimizer updates changes between steps (a parameter frozen "
            "or unfrozen, a param group's lr set to 0 or back): 'retrack' projects over the new set and "
            "re-estimates the directions at once; 'error' stops training with a message naming the parameters.",
            "choices": list(PARAM_CHANGE_POLICIES),
        },
    )

    capability_space: str = field(
        default="gradient",
        metadata={
            "help": "Which geometry protects the capabilities. 'gradient' (default): the null space (or frontier) "
            "of the capability gradient directions; holds (k+1)x the trainable bytes. 'activation': every protected "
            "linear module's realised update is projected off the top subspace U of its inputs on the capability "
            "rows, ΔW ← ΔW(I − UUᵀ) (every decoder-block linear and the LM head; embedding rows of the most frequent "
            "capability tokens; LoRA: A and B restricted so the adapter's output on span U is unchanged); holds "
            "Σ r·(d_in + d_out) float64 values. 'both': activation first, then the gradient projection over "
            "directions restricted to the allowed updates, so both guarantees hold. Needs projection='nullspace' "
            "('activation') or 'nullspace'/'frontier' ('both').",
            "choices": list(CAPABILITY_SPACES),
        },
    )
    activation_rank: int = field(
        default=32,
        metadata={
            "help": "capability_space='activation'/'both': the largest number r of input directions kept per "
            "protected module (1 <= r <= the smallest protected input width); activation_energy may keep fewer."
        },
    )
    activation_energy: float = field(
        default=0.99,
        metadata={
            "help": "capability_space='activation'/'both': keep the smallest r <= activation_rank whose "
            "input-covariance eigenvalues capture at least this fraction of the trace, in (0, 1]; 1 keeps every "
            "direction the inputs reach."
        },
    )

    degradation_tracking: bool = field(
        default=True,
        metadata={
            "help": "Log predicted (first-order, from pre-alignment τ_i) versus observed per-task capability "
            "degradation (Prediction 1, §8) to wandb and output_dir/degradation. Needs capability_datasets."
        },
    )
    capability_eval_datasets: dict | str | None = field(
        default=None,
        metadata={
            "help": "Held-out {task: source} sets on which the observed change of f_i is measured; every task "
            "must be a capability task. None: observed degradation is not measured (predictions still logged)."
        },
    )
    degradation_eval_steps: int = field(
        default=50,
        metadata={
            "help": "Measure predicted/observed degradation every this many optimizer steps (and at the end)."
        },
    )
    safety_direction: str = field(
        default="auto",
        metadata={
            "help": "The degradation tracker's safety direction v: 'loss' (−∇ of the trainer's loss on "
            "safety_direction_batches seeded training batches, before any step; needs a static preference "
            "dataset), 'updates' (the sum of the optimizer's raw updates over the first "
            "safety_direction_batches steps: works for every trainer, GRPO included), or 'auto' ('loss' "
            "for DPO trainers, 'updates' otherwise).",
            "choices": list(SAFETY_DIRECTIONS),
        },
    )
    safety_direction_batches: int = field(
        default=4,
        metadata={
            "help": "Training batches ('loss') or optimizer steps ('updates') summed into the tracker's "
            "safety direction."
        },
    )
    degradation_probe_harmless: str | None = field(
        default=None,
        metadata={
            "help": "Harmless prompts for representation-space tax rates (issue 13 §2): a source with a 'prompt' "
            "column (a local .jsonl/.json/.csv/.parquet file or dataset directory, 'lab:benign' for the lab's benign "
            "look-alike prompts, or real:<...>). The tracker then also logs τ_i = cos²(v*, c_i) from residual-stream "
            "probes before step 0 (safety probe: difference of means of the training prompts against these at the "
            "last prompt token, Arditi et al. 2024; task probes on the capability prompts; frontier_trainer.probes): "
            "degradation/tau_repr/<task>, a tau_repr column and spearman_tau_repr_vs_observed. Needs "
            "degradation_tracking, at least two capability tasks with prompts, and training rows with a plain-text "
            "'prompt' column. None (default): gradient-space τ_i only."
        },
    )

    def __post_init__(self) -> None:
        """Validate the frontier fields (first, so their errors are not masked by the base
        config's), then run the base config's own ``__post_init__``."""
        self._validate_frontier_fields()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def _validate_frontier_fields(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.capability_param_change not in PARAM_CHANGE_POLICIES:
            raise ValueError(
                f"capability_param_change must be one of {PARAM_CHANGE_POLICIES}, got "
                f"{self.capability_param_change!r}"
            )
        if self.capability_space not in CAPABILITY_SPACES:
            raise ValueError(
                f"capability_space must be one of {CAPABILITY_SPACES}, got {self.capability_space!r}"
            )
        if isinstance(self.activation_rank, bool) or not isinstance(self.activation_rank, int) or self.activation_rank < 1:
            raise ValueError(f"activation_rank must be an integer >= 1, got {self.activation_rank!r}")
        if not 0.0 < float(self.activation_energy) <= 1.0:
            raise ValueError(f"activation_energy must be in (0, 1], got {self.activation_energy!r}")
        if self.capability_space == "activation" and self.projection == "frontier":
            raise ValueError(
                "capability_space='activation' with projection='frontier': frontier tolerances need gradient "
                "directions. Use capability_space='both' (activation subspaces plus the gradient frontier), or "
                "projection='nullspace'."
            )
        if self.safety_direction not in SAFETY_DIRECTIONS:
            raise ValueError(f"safety_direction must be one of {SAFETY_DIRECTIONS}, got {self.safety_direction!r}")
        self._validate_probe_harmless()
        self.capability_datasets = _parse_mapping("capability_datasets", self.capability_datasets)
        self.capability_eval_datasets = _parse_mapping(
            "capability_eval_datasets", self.capability_eval_datasets
        )
        self.capability_tolerance = _parse_tolerance(self.capability_tolerance)
        for name in (
            "capability_refresh_steps",
            "capability_batch_size",
            "capability_max_length",
            "capability_rank",
            "capability_sketch_batches",
            "capability_sketch_oversample",
            "degradation_eval_steps",
            "safety_direction_batches",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        refresh_tasks = self.capability_refresh_tasks
        if refresh_tasks is not None and (
            isinstance(refresh_tasks, bool) or not isinstance(refresh_tasks, int) or refresh_tasks < 1
        ):
            raise ValueError(
                f"capability_refresh_tasks must be None (every task at every refresh) or an integer >= 1 (tasks "
                f"re-estimated per refresh, round-robin), got {refresh_tasks!r}"
            )
        if not 0.0 <= float(self.capability_ema) < 1.0:
            raise ValueError(f"capability_ema must be in [0, 1), got {self.capability_ema!r}")
        if self.capability_estimator not in CAPABILITY_ESTIMATORS:
            raise ValueError(
                f"capability_estimator must be one of {CAPABILITY_ESTIMATORS}, got {self.capability_estimator!r}"
            )

    def _validate_probe_harmless(self) -> None:
        """``degradation_probe_harmless``: a non-blank source string, and only with degradation tracking
        (the source itself is loaded and checked when the trainer is built, before training)."""
        value = self.degradation_probe_harmless
        if value is None:
            return
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"degradation_probe_harmless must be a source string with a 'prompt' column (a file, a dataset "
                f"directory, 'lab:benign', real:<...>) or None, got {value!r}"
            )
        if not self.degradation_tracking:
            raise ValueError(
                "degradation_probe_harmless is set but degradation_tracking=False: the representation-space τ_i are "
                "logged by the degradation tracker. Set degradation_tracking=True or unset degradation_probe_harmless."
            )

    def tolerance_for(self, task: str) -> float:
        """ε for one task: the scalar, the mapping's entry, or 0 when absent."""
        tol = self.capability_tolerance
        if tol is None:
            return 0.0
        if isinstance(tol, dict):
            return float(tol.get(task, 0.0))
        return float(tol)


__all__ = ["CAPABILITY_SPACES", "PARAM_CHANGE_POLICIES", "PROJECTIONS", "SAFETY_DIRECTIONS", "FrontierArguments"]
