"""Arena presets: every size of every run, chosen to fit the machine each preset is meant for.

A preset fixes the suite (the lab or the real SmolLM2 suite), the seeds, the learning-rate sweep,
the training length and the evaluation sizes. Methods are named by :data:`METHODS`; the frontier
trainer appears once per tolerance ε as ``frontier-eps<ε>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

BASELINE_METHODS = ("vanilla", "replay", "ogpsa", "nspo")
"""Trained baselines (``benchmarks.baselines``; ``vanilla`` is ``trl.DPOTrainer`` itself)."""
MERGE_METHODS = ("uniform-merge", "hma")
"""Post-hoc methods applied to the vanilla-aligned model: mergekit's linear average and our HMA."""
OURS_VARIANTS: dict[str, dict[str, Any]] = {
    "nullspace": {},
    "nullspace-every-step": {"capability_refresh_steps": 1},
    "sketch": {"capability_estimator": "sketch", "capability_rank": 4, "capability_refresh_steps": 1},
    "activation": {"capability_space": "activation"},
    "activation-r8": {"capability_space": "activation", "activation_rank": 8},
    # issue 15 §3 on SmolLM2: activation mode (which kept refusal and capability in smollm2-cpu-long) with the
    # recipe's benign rows, alone or with its refusal hold. In activation mode a task's rows add their inputs to
    # every module's subspace: the benign prompts and the model's answers, and with the hold also the refusal
    # text itself; in "both" the hold is in addition a gradient direction (the one that cut look-alike
    # over-refusal in gradient mode)
    "activation-r8-benign": {"capability_space": "activation", "activation_rank": 8, "protect_benign": True},
    "activation-r8-hold": {
        "capability_space": "activation",
        "activation_rank": 8,
        "protect_benign": True,
        "hold_refusal": True,
    },
    "both-r8-hold": {"capability_space": "both", "activation_rank": 8, "protect_benign": True, "hold_refusal": True},
    # round-robin (issue 15 §4): one task re-estimated per refresh from 4 rows
    "nullspace-rr": {
        "capability_refresh_steps": 5,
        "capability_batch_size": 4,
        "capability_refresh_tasks": 1,
    },
    "nullspace-rr-every-step": {
        "capability_refresh_steps": 1,
        "capability_batch_size": 4,
        "capability_refresh_tasks": 1,
    },
    "nullspace-benign": {"protect_benign": True},
    "nullspace-hold": {"protect_benign": True, "hold_refusal": True},
    "nullspace-hold-every-step": {
        "protect_benign": True,
        "hold_refusal": True,
        "capability_refresh_steps": 1,
    },
    # issue 15 §1/§2: more rows behind each task's directions, against the held-out leak
    "nullspace-every-step-b32": {"capability_refresh_steps": 1, "capability_batch_size": 32},
    "nullspace-every-step-r4": {"capability_refresh_steps": 1, "capability_rank": 4},
    # ...and more directions still: is the held-out leak's 10x target a matter of rank?
    "nullspace-every-step-r8": {"capability_refresh_steps": 1, "capability_rank": 8},
    "nullspace-every-step-r16": {"capability_refresh_steps": 1, "capability_rank": 16},
    # one direction per row (benchmarks/leak_ceiling.py: at equal rows, per-row directions cover more of a
    # held-out gradient than means of 8)
    "nullspace-every-step-r32-b1": {
        "capability_refresh_steps": 1,
        "capability_rank": 32,
        "capability_batch_size": 1,
    },
    # issue 15 §3: does the hold generalise to held-out look-alikes with more rows behind each direction?
    "nullspace-hold-every-step-r4": {  # 4 directions per task, each from its own batch of 8 rows
        "protect_benign": True,
        "hold_refusal": True,
        "capability_refresh_steps": 1,
        "capability_rank": 4,
    },
    "nullspace-hold-every-step-r8": {
        "protect_benign": True,
        "hold_refusal": True,
        "capability_refresh_steps": 1,
        "capability_rank": 8,
    },
    "nullspace-hold-every-step-b32": {  # one direction per task from 32 rows
        "protect_benign": True,
        "hold_refusal": True,
        "capability_refresh_steps": 1,
        "capability_batch_size": 32,
    },
    # ...and the hold relaxed in frontier mode: the refusal on benign prompts may rise by ε per step
    # (frontier_trainer.directions.refusal_avoidance_metric), every other task held at ε = 0
    **{
        f"frontier-hold-b32-eps{eps:g}": {
            "protect_benign": True,
            "hold_refusal": True,
            "capability_refresh_steps": 1,
            "capability_batch_size": 32,
            "projection": "frontier",
            "capability_tolerance": {"refusal_on_benign": eps},
        }
        for eps in (0.1, 0.3)
    },
}
"""Our trainer's null-space variants: ``FrontierDPOConfig`` fields on top of the library defaults
(``nullspace`` is the defaults themselves). ``protect_benign`` and ``hold_refusal`` are the arena's own switches, not
config fields (:func:`benchmarks.arena.protocol.ours_settings`): the first adds the suite's prompt-only
benign source (``lab:benign`` / ``real:benign``), which the trainer completes with the model itself before
training (issue 15 §3); the second holds the refusal's likelihood on those prompts
(:mod:`frontier_trainer.benign`). ``frontier-eps<ε>`` entries are added per
preset and use the defaults."""
OURS_TRAINED = tuple(OURS_VARIANTS)
"""Our trainer's modes without a tolerance."""


def frontier_name(eps: float) -> str:
    """``frontier-eps0.03`` for ε = 0.03."""
    return f"frontier-eps{eps:g}"


def is_ours(method: str) -> bool:
    """Whether a method name is one of this project's (null-space, frontier at any ε, HMA)."""
    return method in OURS_TRAINED or method == "hma" or method.startswith("frontier-eps")


@dataclass(frozen=True)
class Preset:
    """Every setting of one arena run.

    Attributes:
        name: the preset's name.
        suite: ``"lab"`` (built-in synthetic world) or ``"real"`` (SmolLM2-135M-Instruct + LoRA).
        pretrain_seeds: lab model pretraining seeds (the real suite has one base model: ``(0,)``).
        train_seeds: training seeds; the sweep uses the first, the chosen setting runs them all.
        learning_rates: the sweep (>= 3 values), the same for every trained method.
        tolerances: the frontier trainer's capability tolerances ε (>= 2 values).
        methods: methods run by default.
        steps: optimizer steps per training run.
        batch_size: preference pairs per step.
        eval_limit: prompts per evaluation set (per task and per safety set), per split.
        capability_rows: capability rows per task handed to the trainers (directions, replay, NSPO).
        merge_ts: the sweep of the post-hoc methods (uniform-equivalent mean ratio t).
        lab_model: lab pretraining settings (``frontier_trainer.lab.pretrain`` keyword arguments).
        max_length: token budget of a training sequence (real suite).
        lora_r: LoRA rank (real suite; 0 = full fine-tuning).
        replicates: bootstrap replicates.
        method_options: extra keyword arguments per method (for example the replay weight λ).
        real_tasks, real_nll_sets: real suite only: the capability tasks and NLL sets of
            ``frontier_trainer.evaluation``'s real suite to score (``None``: all of them).
        leak_rows: held-out capability rows per task for the generalisation-leak probe
            (:mod:`benchmarks.arena.leak`, run on every trained cell; 0 turns it off).
        scorer: lab only: ``"fast"`` (the evaluation suite's prompts, judge and exact match with one
            batched generation) or ``"library"`` (``evaluate_model`` itself, through lm-eval).
    """

    name: str
    suite: str
    pretrain_seeds: tuple[int, ...]
    train_seeds: tuple[int, ...]
    learning_rates: tuple[float, ...]
    tolerances: tuple[float, ...]
    methods: tuple[str, ...]
    steps: int
    batch_size: int
    eval_limit: int
    capability_rows: int
    merge_ts: tuple[float, ...] = (0.25, 0.5, 0.75)
    lab_model: dict[str, Any] = field(default_factory=dict)
    max_length: int = 128
    lora_r: int = 0
    replicates: int = 2000
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    scorer: str = "fast"
    leak_rows: int = 16
    real_tasks: tuple[str, ...] | None = None
    real_nll_sets: tuple[str, ...] | None = None

    @property
    def all_methods(self) -> tuple[str, ...]:
        """Every method this preset knows (its tolerances expanded)."""
        return (
            *BASELINE_METHODS,
            *OURS_TRAINED,
            *(frontier_name(e) for e in self.tolerances),
            *MERGE_METHODS,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON settings (written to ``results.json`` and ``provenance.json``)."""
        return asdict(self)

    def validate(self) -> Preset:
        """Check the protocol's minimums; raise ``ValueError`` naming the field and the fix."""
        if self.scorer not in ("fast", "library"):
            raise ValueError(f"{self.name}: scorer={self.scorer!r}; use 'fast' or 'library'.")
        if self.suite not in ("lab", "real"):
            raise ValueError(f"{self.name}: suite={self.suite!r}; use 'lab' or 'real'.")
        if len(self.learning_rates) < 3:
            raise ValueError(
                f"{self.name}: learning_rates={self.learning_rates}; the sweep needs >= 3 values."
            )
        if len(self.train_seeds) < 1 or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError(f"{self.name}: train_seeds={self.train_seeds} must be distinct and non-empty.")
        if len(set(self.pretrain_seeds)) != len(self.pretrain_seeds) or not self.pretrain_seeds:
            raise ValueError(
                f"{self.name}: pretrain_seeds={self.pretrain_seeds} must be distinct and non-empty."
            )
        if self.suite == "real" and len(self.pretrain_seeds) != 1:
            raise ValueError(f"{self.name}: the real suite has one base model; set pretrain_seeds=(0,).")
        if any(m.startswith("frontier-eps") for m in self.methods) and len(self.tolerances) < 2:
            raise ValueError(
                f"{self.name}: tolerances={self.tolerances}; the frontier runs at >= 2 values of ε."
            )
        unknown = [m for m in self.methods if m not in self.all_methods]
        if unknown:
            raise ValueError(f"{self.name}: methods {unknown} unknown; choose from {list(self.all_methods)}.")
        if any(m in MERGE_METHODS for m in self.methods) and "vanilla" not in self.methods:
            raise ValueError(f"{self.name}: merge methods need 'vanilla' in methods (they merge its model).")
        if self.leak_rows < 0:
            raise ValueError(
                f"{self.name}: leak_rows={self.leak_rows}; use 0 (off) or a positive number of rows."
            )
        for key in ("steps", "batch_size", "eval_limit", "capability_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"{self.name}: {key}={getattr(self, key)} must be a positive integer.")
        return self

    def with_overrides(
        self, *, seeds: int | None = None, methods: Sequence[str] | None = None, leak_rows: int | None = None
    ) -> Preset:
        """The preset with ``--seeds N`` (first N of 0, 1, 2, ...), ``--methods`` and/or ``--leak-rows`` applied."""
        p = self
        if leak_rows is not None:
            p = replace(p, leak_rows=leak_rows)
        if seeds is not None:
            if seeds < 1:
                raise ValueError(f"--seeds {seeds}: pass a positive number of training seeds.")
            p = replace(p, train_seeds=tuple(range(seeds)))
        if methods:
            p = replace(p, methods=tuple(methods))
        return p.validate()


_LAB_TOLERANCES = (0.03, 0.06)
_LAB_TRAINED = (
    "vanilla",
    "nullspace",
    *(frontier_name(e) for e in _LAB_TOLERANCES),
    "ogpsa",
    "nspo",
    "replay",
)
"""Run order: vanilla and ours first, so an interrupted run has the headline comparison finished."""

PRESETS: dict[str, Preset] = {
    # <= 10 min on the 2-core machine with a warm lab cache (3 lab models pretrained): 7 trained methods
    # x (3 learning rates at seed 0 + 2 more seeds at the chosen rate) x 3 pretraining seeds = 105 runs of
    # 30 steps (~1-3 s each on one thread), each evaluated on 50 prompts per set per split.
    "lab-quick": Preset(
        name="lab-quick",
        suite="lab",
        pretrain_seeds=(0, 1, 2),
        train_seeds=(0, 1, 2),
        learning_rates=(1e-4, 3e-4, 1e-3),
        tolerances=_LAB_TOLERANCES,
        methods=_LAB_TRAINED,
        steps=30,
        batch_size=16,
        eval_limit=50,
        capability_rows=128,
        replicates=1000,
    ),
    # the full lab arena: the demo's training length (60 steps), the lab's full held-out sets (100 prompts
    # per set and split), and the post-hoc methods on the vanilla-aligned model.
    "lab": Preset(
        name="lab",
        suite="lab",
        pretrain_seeds=(0, 1, 2),
        train_seeds=(0, 1, 2),
        learning_rates=(1e-4, 3e-4, 1e-3),
        tolerances=_LAB_TOLERANCES,
        methods=(*_LAB_TRAINED, "uniform-merge", "hma"),
        steps=60,
        batch_size=16,
        eval_limit=100,
        capability_rows=256,
    ),
    # SmolLM2-135M-Instruct + LoRA r=16, 10 steps of batch 2 at length 128, three of the real suite's
    # capability tasks and 16 prompts per set per split; 5 methods x (3 rates + 2 seeds) = 25 cells of
    # ~4 min each on the 2-core CPU (measured: benchmarks/README.md §5), about 104 min with the base cell:
    # above the 90-minute target; pass four methods with --methods to fit it.
    "smollm2-cpu": Preset(
        name="smollm2-cpu",
        suite="real",
        pretrain_seeds=(0,),
        train_seeds=(0, 1, 2),
        learning_rates=(2e-4, 5e-4, 1e-3),
        tolerances=(0.02, 0.05),
        methods=("vanilla", "nullspace", "nullspace-hold", "nspo", "ogpsa"),
        steps=10,
        batch_size=2,
        eval_limit=16,
        capability_rows=32,
        max_length=128,
        lora_r=16,
        replicates=1000,
        # the protected tasks (BIG-bench addition, HumanEval NLL) plus two held-out multiple-choice
        # tasks; GSM8K's 128-token chain of thought, HellaSwag and PIQA are left to the gpu preset
        real_tasks=("bigbench_arithmetic", "arc_easy", "mmlu"),
        real_nll_sets=("humaneval",),
        # the leak probe adds two held-out gradient passes per step (rows of up to 512 tokens): off in the
        # preset, already over its time target; `--leak-rows 4` turns it on. SmolLM2's held-out leak is
        # measured by benchmarks/subspace_benchmark.py (benchmarks/README.md §8)
        leak_rows=0,
    ),
    # issue 13 §1: activation mode where it is meant to pay, full fine-tuning of SmolLM2 (no LoRA), against
    # vanilla, NSPO-style and gradient mode; smollm2-cpu's data, steps and evaluation, full-fine-tuning rates
    "smollm2-cpu-full": Preset(
        name="smollm2-cpu-full",
        suite="real",
        pretrain_seeds=(0,),
        train_seeds=(0, 1, 2),
        learning_rates=(1e-5, 3e-5, 1e-4),
        tolerances=(0.02, 0.05),
        methods=("vanilla", "activation", "nspo", "nullspace"),
        steps=10,
        batch_size=2,
        eval_limit=16,
        capability_rows=32,
        max_length=128,
        lora_r=0,
        replicates=1000,
        real_tasks=("bigbench_arithmetic", "arc_easy", "mmlu"),
        real_nll_sets=("humaneval",),
        leak_rows=0,
    ),
    # a lent GPU: the full real evaluation sets, 100 steps of batch 8, every method (not run here).
    "gpu": Preset(
        name="gpu",
        suite="real",
        pretrain_seeds=(0,),
        train_seeds=(0, 1, 2),
        learning_rates=(1e-4, 2e-4, 5e-4, 1e-3),
        tolerances=(0.02, 0.05),
        methods=("vanilla", "replay", "ogpsa", "nspo", "nullspace", frontier_name(0.02), frontier_name(0.05)),
        steps=100,
        batch_size=8,
        eval_limit=320,
        capability_rows=200,
        max_length=256,
        lora_r=16,
        leak_rows=8,
    ),
}

# issue 15's capability target in the arena: smollm2-cpu's 10 steps moved no method's capability, so
# there was no loss to divide by. Three times the steps (the subspace benchmark's 20 steps at 5e-4
# raised vanilla's held-out addition NLL by ~0.9 nats/token), a sweep one step lower for vanilla's sake,
# and the methods that led on one axis each: the recipe's hold, activation mode (which held code
# outside the arena, benchmarks/README.md §8) and NSPO-style. 4 methods x (3 rates + 2 seeds) = 20 cells.
PRESETS["smollm2-cpu-long"] = replace(
    PRESETS["smollm2-cpu"],
    name="smollm2-cpu-long",
    learning_rates=(1e-4, 2e-4, 5e-4),
    methods=("vanilla", "nullspace-hold", "activation-r8", "nspo"),
    steps=30,
)


def get_preset(name: str) -> Preset:
    """The named preset, validated; ``ValueError`` names the choices for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not a preset; choose from {sorted(PRESETS)}.")
    return PRESETS[name].validate()
