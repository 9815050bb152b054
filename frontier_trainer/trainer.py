"""FrontierDPOTrainer's historical home: ``from frontier_trainer.trainer import FrontierDPOTrainer``.

The trainer is :class:`~frontier_trainer.mixin.FrontierMixin` on ``trl.DPOTrainer``
(:mod:`frontier_trainer.trainers`); the projection, directions, checkpoint state and
diagnostics live in :mod:`frontier_trainer.mixin`. This module re-exports them unchanged.
"""

from __future__ import annotations

from frontier_trainer.config import FrontierDPOConfig
from frontier_trainer.mixin import STATE_FILE, FrontierMixin, check_frontier_setup
from frontier_trainer.trainers import FrontierDPOTrainer

__all__ = ["STATE_FILE", "FrontierDPOConfig", "FrontierDPOTrainer", "FrontierMixin", "check_frontier_setup"]
