"""Frontier configs: each TRL config plus :class:`~frontier_trainer.arguments.FrontierArguments`.

``FrontierDPOConfig`` is ``trl.DPOConfig`` plus the frontier fields (its historical home, kept
importable from here); the same mixin makes the SFT, KTO, ORPO, GRPO and RLOO configs and one
for a plain ``transformers.Trainer`` (``FrontierTrainingArguments``). Each is a real dataclass
defined at import time, so ``Trainer`` can pickle it into ``training_args.bin``.

ORPO lives in ``trl.experimental`` in TRL 1.16; its config is imported lazily (attribute access on
this module) so that importing the stable configs does not import the experimental package.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, KTOConfig, RLOOConfig, SFTConfig

from frontier_trainer.arguments import (
    PARAM_CHANGE_POLICIES,
    PROJECTIONS,
    SAFETY_DIRECTIONS,
    FrontierArguments,
    _parse_mapping,
    _parse_tolerance,
    _tolerance,
)


@dataclass
class FrontierDPOConfig(FrontierArguments, DPOConfig):
    """Configuration for :class:`~frontier_trainer.FrontierDPOTrainer`: all of :class:`trl.DPOConfig`
    plus the fields of :class:`~frontier_trainer.arguments.FrontierArguments`."""


@dataclass
class FrontierSFTConfig(FrontierArguments, SFTConfig):
    """:class:`trl.SFTConfig` plus the frontier fields (for :class:`~frontier_trainer.trainers.FrontierSFTTrainer`)."""


@dataclass
class FrontierKTOConfig(FrontierArguments, KTOConfig):
    """:class:`trl.KTOConfig` plus the frontier fields (for :class:`~frontier_trainer.trainers.FrontierKTOTrainer`)."""


@dataclass
class FrontierGRPOConfig(FrontierArguments, GRPOConfig):
    """:class:`trl.GRPOConfig` plus the frontier fields (for :class:`~frontier_trainer.trainers.FrontierGRPOTrainer`)."""


@dataclass
class FrontierRLOOConfig(FrontierArguments, RLOOConfig):
    """:class:`trl.RLOOConfig` plus the frontier fields (for :class:`~frontier_trainer.trainers.FrontierRLOOTrainer`)."""


@dataclass
class FrontierTrainingArguments(FrontierArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus the frontier fields: for a plain ``Trainer`` wearing
    :class:`~frontier_trainer.mixin.FrontierMixin`."""


_ORPO: dict[str, type] = {}


def _orpo_config() -> type:
    """``FrontierORPOConfig``, built on first use (ORPO is in ``trl.experimental`` in TRL 1.16)."""
    if "config" not in _ORPO:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            from trl.experimental.orpo import ORPOConfig

        @dataclass
        class FrontierORPOConfig(FrontierArguments, ORPOConfig):
            """``trl.experimental.orpo.ORPOConfig`` plus the frontier fields."""

        FrontierORPOConfig.__module__ = __name__
        FrontierORPOConfig.__qualname__ = "FrontierORPOConfig"
        globals()["FrontierORPOConfig"] = FrontierORPOConfig  # picklable as config.FrontierORPOConfig
        _ORPO["config"] = FrontierORPOConfig
    return _ORPO["config"]


def __getattr__(name: str) -> Any:
    if name == "FrontierORPOConfig":
        return _orpo_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PARAM_CHANGE_POLICIES",
    "PROJECTIONS",
    "SAFETY_DIRECTIONS",
    "FrontierArguments",
    "FrontierDPOConfig",
    "FrontierGRPOConfig",
    "FrontierKTOConfig",
    "FrontierRLOOConfig",
    "FrontierSFTConfig",
    "FrontierTrainingArguments",
    "_parse_mapping",
    "_parse_tolerance",
    "_tolerance",
]
