"""Frontier trainers: :class:`~frontier_trainer.mixin.FrontierMixin` on each TRL trainer.

Each class is the mixin first in the bases (cooperative MRO) on the TRL class, plus the
argument plumbing: the TRL constructor's leading positional arguments, the frontier keywords,
and the Frontier config a plain TRL config (or None) is upgraded to. Nothing else: the
projection, directions, checkpoint state and diagnostics all live in the mixin.

``FrontierORPOTrainer`` wraps ``trl.experimental.orpo.ORPOTrainer`` and is built on first access
(``frontier_trainer.trainers.FrontierORPOTrainer``), so the experimental package is imported
only by those who use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RLOOTrainer, SFTTrainer

from frontier_trainer import config
from frontier_trainer.directions import MetricFn
from frontier_trainer.mixin import FrontierMixin
from frontier_trainer.tracking import SafetyDirection


class FrontierDPOTrainer(FrontierMixin, DPOTrainer):
    """``trl.DPOTrainer`` that moves the model only in the null space of capability directions
    (``projection="nullspace"``), or to the best point of the safety/capability frontier within
    per-task tolerances (``projection="frontier"``), with directions estimated online.

    Same constructor as :class:`trl.DPOTrainer`, plus the keywords of
    :class:`~frontier_trainer.mixin.FrontierMixin` (``capability_datasets``,
    ``capability_metrics``, ``capability_eval_datasets``, ``degradation_metrics``).
    """

    frontier_config_class = config.FrontierDPOConfig

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        *pos_args: Any,
        capability_datasets: Mapping[str, Any] | None = None,
        capability_metrics: Mapping[str, MetricFn] | None = None,
        capability_eval_datasets: Mapping[str, Any] | None = None,
        degradation_metrics: Mapping[str, Any] | None = None,
        safety_direction: SafetyDirection | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            ref_model,
            args,
            *pos_args,
            capability_datasets=capability_datasets,
            capability_metrics=capability_metrics,
            capability_eval_datasets=capability_eval_datasets,
            degradation_metrics=degradation_metrics,
            safety_direction=safety_direction,
            **kwargs,
        )

    @staticmethod
    def _check_setup_before_init(args: Any, sources: Mapping[str, Any], metrics: Mapping[str, MetricFn] | None) -> None:
        """The construction checks (kept here for scripts that call them on this class)."""
        from frontier_trainer.mixin import check_frontier_setup

        check_frontier_setup(args, sources, metrics)


class FrontierKTOTrainer(FrontierMixin, KTOTrainer):
    """``trl.KTOTrainer`` with every optimizer step projected (see :class:`FrontierDPOTrainer`)."""

    frontier_config_class = config.FrontierKTOConfig


class FrontierSFTTrainer(FrontierMixin, SFTTrainer):
    """``trl.SFTTrainer`` with every optimizer step projected: fine-tune on new data while the
    named capabilities' directions are left untouched to first order."""

    frontier_config_class = config.FrontierSFTConfig


class FrontierGRPOTrainer(FrontierMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with every optimizer step projected. Its inputs are rollouts, so the
    degradation tracker's safety direction comes from the optimizer's raw updates by default."""

    frontier_config_class = config.FrontierGRPOConfig


class FrontierRLOOTrainer(FrontierMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with every optimizer step projected (as :class:`FrontierGRPOTrainer`)."""

    frontier_config_class = config.FrontierRLOOConfig


_LAZY: dict[str, type] = {}


def _orpo_trainer() -> type:
    if "orpo" not in _LAZY:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            from trl.experimental.orpo import ORPOTrainer

        class FrontierORPOTrainer(FrontierMixin, ORPOTrainer):
            """``trl.experimental.orpo.ORPOTrainer`` with every optimizer step projected."""

            frontier_config_class = config._orpo_config()

        FrontierORPOTrainer.__module__ = __name__
        globals()["FrontierORPOTrainer"] = FrontierORPOTrainer
        _LAZY["orpo"] = FrontierORPOTrainer
    return _LAZY["orpo"]


def __getattr__(name: str) -> Any:
    if name == "FrontierORPOTrainer":
        return _orpo_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FrontierDPOTrainer",
    "FrontierGRPOTrainer",
    "FrontierKTOTrainer",
    "FrontierRLOOTrainer",
    "FrontierSFTTrainer",
]
