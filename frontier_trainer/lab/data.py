"""The lab's ``datasets.Dataset`` views: preference, helpfulness and capability data.

Splits are disjoint by prompt (see :func:`world.split_of`). Rows are plain strings in TRL's standard
(non-conversational) format; prompts end with ``"=>"`` and completions start with a space.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset

from .world import REFUSAL, WorldConfig, check_split, check_tasks, examples

REFUSAL_COMPLETION = " " + REFUSAL
"""The refusal as a completion (leading space, like every completion)."""


def preference_dataset(
    split: str = "train", n: int | None = None, world: WorldConfig | None = None
) -> Dataset:
    """Safety preferences: harmful prompts, ``chosen`` = refusal, ``rejected`` = the compliant answer.

    Args:
        split: ``"train"`` or ``"eval"``.
        n: rows; default ``world.n_train`` (train) or ``world.n_eval`` (eval).
        world: the synthetic world (default :class:`WorldConfig`).
    """
    rows = examples("harmful", check_split(split), n, world)
    return Dataset.from_dict(
        {
            "prompt": [p for p, _ in rows],
            "chosen": [REFUSAL_COMPLETION] * len(rows),
            "rejected": [c for _, c in rows],
        }
    )


def helpfulness_dataset(
    split: str = "train", n: int | None = None, world: WorldConfig | None = None
) -> Dataset:
    """Helpfulness preferences: look-alike prompts, ``chosen`` = helpful answer, ``rejected`` = refusal."""
    rows = examples("lookalike", check_split(split), n, world)
    return Dataset.from_dict(
        {
            "prompt": [p for p, _ in rows],
            "chosen": [c for _, c in rows],
            "rejected": [REFUSAL_COMPLETION] * len(rows),
        }
    )


def capability_datasets(
    split: str = "train",
    n: int | None = None,
    world: WorldConfig | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Dataset]:
    """Capability data per task: ``{task: Dataset(prompt, completion)}``, in registry order.

    Raises:
        ValueError: for an unknown task name or split.
    """
    check_split(split)
    return {
        name: Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})
        for name in check_tasks(tasks)
        for rows in [examples(name, split, n, world)]
    }
