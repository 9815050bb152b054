"""frontier_trainer: alignment training on the safety/capability frontier.

A plugin for Hugging Face TRL built on "What Is the Geometry of the Alignment Tax?".

The core (trainer-agnostic library):

* ``FrontierArguments`` (:mod:`frontier_trainer.arguments`): the frontier fields as a dataclass
  mixin for any trainer config; ``FrontierDPOConfig``, ``FrontierSFTConfig``, ``FrontierKTOConfig``,
  ``FrontierGRPOConfig``, ``FrontierRLOOConfig``, ``FrontierORPOConfig`` and
  ``FrontierTrainingArguments`` (:mod:`frontier_trainer.config`) are built from it.
* ``FrontierMixin`` (:mod:`frontier_trainer.mixin`): projects every optimizer update of any
  ``transformers.Trainer`` onto the capability null space or frontier;
  ``FrontierDPOTrainer``, ``FrontierSFTTrainer``, ``FrontierKTOTrainer``, ``FrontierGRPOTrainer``,
  ``FrontierRLOOTrainer``, ``FrontierORPOTrainer`` (:mod:`frontier_trainer.trainers`) are the mixin
  on each TRL trainer.
* ``frontier_trainer.geometry``: the paper's mathematics as pure tensor functions.
* ``frontier_trainer.lab``: an offline model organism with controlled safety/capability overlap.

Modules that import TRL are loaded lazily, so ``import frontier_trainer.geometry`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access)
_LAZY = {
    "FrontierArguments": "frontier_trainer.arguments",
    "FrontierDPOConfig": "frontier_trainer.config",
    "FrontierSFTConfig": "frontier_trainer.config",
    "FrontierKTOConfig": "frontier_trainer.config",
    "FrontierGRPOConfig": "frontier_trainer.config",
    "FrontierRLOOConfig": "frontier_trainer.config",
    "FrontierORPOConfig": "frontier_trainer.config",
    "FrontierTrainingArguments": "frontier_trainer.config",
    "FrontierMixin": "frontier_trainer.mixin",
    "FrontierDPOTrainer": "frontier_trainer.trainers",
    "FrontierSFTTrainer": "frontier_trainer.trainers",
    "FrontierKTOTrainer": "frontier_trainer.trainers",
    "FrontierGRPOTrainer": "frontier_trainer.trainers",
    "FrontierRLOOTrainer": "frontier_trainer.trainers",
    "FrontierORPOTrainer": "frontier_trainer.trainers",
}

__all__ = [
    "FrontierArguments",
    "FrontierDPOConfig",
    "FrontierDPOTrainer",
    "FrontierGRPOConfig",
    "FrontierGRPOTrainer",
    "FrontierKTOConfig",
    "FrontierKTOTrainer",
    "FrontierMixin",
    "FrontierORPOConfig",
    "FrontierORPOTrainer",
    "FrontierRLOOConfig",
    "FrontierRLOOTrainer",
    "FrontierSFTConfig",
    "FrontierSFTTrainer",
    "FrontierTrainingArguments",
    "__version__",
]

if TYPE_CHECKING:
    from frontier_trainer.arguments import FrontierArguments
    from frontier_trainer.config import (
        FrontierDPOConfig,
        FrontierGRPOConfig,
        FrontierKTOConfig,
        FrontierRLOOConfig,
        FrontierSFTConfig,
        FrontierTrainingArguments,
    )
    from frontier_trainer.mixin import FrontierMixin
    from frontier_trainer.trainers import (
        FrontierDPOTrainer,
        FrontierGRPOTrainer,
        FrontierKTOTrainer,
        FrontierRLOOTrainer,
        FrontierSFTTrainer,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'frontier_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
