"""The arena's baselines: what a user would pick instead of FrontierDPOTrainer, on the same TRL loop.

Interface (the arena codes against it)::

    from benchmarks.baselines import BASELINES, build_trainer, uniform_merge
    trainer = build_trainer("ogpsa", model=..., args=DPOConfig(...), train_dataset=...,
                            processing_class=tok, capability_datasets={"task": ds}, refresh_steps=5)
    trainer.train()
    uniform_merge(base_dir, aligned_dir, t=0.5, out_dir)

Each :class:`BaselineSpec` names its trainer class, default options, source and deviations.
These live with the benchmarks, not in ``frontier_trainer`` (which never imports them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from benchmarks.baselines.merge import materialise_adapter, uniform_merge
from benchmarks.baselines.nspo import NSPODPOTrainer
from benchmarks.baselines.ogpsa import OGPSADPOTrainer
from benchmarks.baselines.replay import ReplayDPOTrainer


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """One baseline: its trainer class, default options (every accepted option), source, deviations."""

    name: str
    trainer_class: type[DPOTrainer]
    default_options: Mapping[str, Any]
    source: str
    deviations: str
    uses_capability_data: bool = True


_CAP = {"capability_batch_size": 8, "capability_max_length": 512}

BASELINES: dict[str, BaselineSpec] = {
    "vanilla": BaselineSpec(
        name="vanilla",
        trainer_class=DPOTrainer,
        default_options={},
        source="Rafailov et al. 2023, Direct Preference Optimization (NeurIPS); trl.DPOTrainer "
        "(https://github.com/huggingface/trl)",
        deviations="none: the unmodified TRL trainer",
        uses_capability_data=False,
    ),
    "replay": BaselineSpec(
        name="replay",
        trainer_class=ReplayDPOTrainer,
        default_options={"replay_weight": 1.0, **_CAP},
        source="InstructGPT PTX term (Ouyang et al. 2022, eq. 2); RPO NLL term (Pang et al. 2024, α=1); "
        "related built-in: trl DPOConfig(loss_type=['sigmoid','sft']) on chosen responses only",
        deviations="replays the capability tasks (not pretraining text or chosen responses), tasks weighted "
        "equally, one batch per task per micro-batch, training loss only",
    ),
    "ogpsa": BaselineSpec(
        name="ogpsa",
        trainer_class=OGPSADPOTrainer,
        default_options={"refresh_steps": 5, "n_reference": 200, **_CAP},
        source="Sun et al. 2026, OGPSA: Orthogonal Gradient Projection for Safety Alignment (arXiv 2602.07892); "
        "code https://github.com/SunGL001/OGPSA (LLaMA-Factory dpo_pg trainer)",
        deviations="projects the accumulated, clipped gradient once per optimizer step (step pre-hook) instead "
        "of per micro-batch in tensor hooks; any number of tasks (Gram-Schmidt per tensor); a fixed reference "
        "set (first n_reference rows per task); anchors kept on the parameters' device",
    ),
    "nspo": BaselineSpec(
        name="nspo",
        trainer_class=NSPODPOTrainer,
        default_options={
            "reproject_steps": 5,
            "eig_threshold": 1e-2,
            "n_reference": 200,
            "mlp_modules": ("gate_proj", "up_proj", "down_proj"),
            **_CAP,
        },
        source="Niu et al. 2026, Mitigating the Safety Alignment Tax with Null-Space Constrained Policy "
        "Optimization (NSPO, ICLR 2026, arXiv 2512.11391)",
        deviations="DPO on TRL instead of GRPO on verl; fp32 weights and a float64 projection instead of bf16; "
        "K includes completion tokens; re-projection also on the last step before the trainer returns; "
        "eig_threshold default 1e-2 chosen here, not read from the released code",
    ),
}


def build_trainer(
    name: str,
    *,
    model: Any,
    ref_model: Any = None,
    args: DPOConfig,
    train_dataset: Dataset,
    processing_class: Any,
    capability_datasets: Mapping[str, Dataset] | None = None,
    peft_config: Any = None,
    **options: Any,
) -> DPOTrainer:
    """Construct baseline ``name`` (a ``trl.DPOTrainer`` or subclass), ready to ``.train()``.

    ``options`` override the spec's ``default_options``; an unknown option, an unknown name or a
    missing ``capability_datasets`` is refused here, before any training.
    """
    if name not in BASELINES:
        raise ValueError(f"build_trainer: unknown baseline name={name!r}; choose one of {sorted(BASELINES)}.")
    spec = BASELINES[name]
    unknown = sorted(set(options) - set(spec.default_options))
    if unknown:
        allowed = sorted(spec.default_options) or "none"
        raise ValueError(
            f"build_trainer({name!r}): unknown option(s) {unknown}; this baseline accepts: {allowed}."
        )
    if not isinstance(args, DPOConfig):
        raise TypeError(f"build_trainer({name!r}): args must be a trl.DPOConfig, got {type(args).__name__}.")
    kwargs: dict[str, Any] = dict(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    if spec.uses_capability_data:
        if not capability_datasets:
            raise ValueError(
                f"build_trainer({name!r}): capability_datasets={{task: Dataset}} is required by this baseline."
            )
        kwargs["capability_datasets"] = dict(capability_datasets)
        kwargs.update({**spec.default_options, **options})
    return spec.trainer_class(**kwargs)


__all__ = ["BASELINES", "BaselineSpec", "build_trainer", "materialise_adapter", "uniform_merge"]
