"""frontier_trainer: alignment training on the safety/capability frontier.

A plugin for Hugging Face TRL built on "What Is the Geometry of the Alignment Tax?".

* ``FrontierDPOTrainer`` / ``FrontierDPOConfig``: drop-in ``trl.DPOTrainer`` / ``DPOConfig``
  that project every optimizer update onto the capability null space or frontier.
* ``frontier_trainer.geometry``: the paper's mathematics as pure tensor functions.
* ``frontier_trainer.lab``: an offline model organism with controlled safety/capability overlap.

Modules that import TRL are loaded lazily, so ``import frontier_trainer.geometry`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["FrontierDPOConfig", "FrontierDPOTrainer", "__version__"]

if TYPE_CHECKING:
    from frontier_trainer.config import FrontierDPOConfig
    from frontier_trainer.trainer import FrontierDPOTrainer


def __getattr__(name: str) -> Any:
    if name == "FrontierDPOConfig":
        from frontier_trainer.config import FrontierDPOConfig

        return FrontierDPOConfig
    if name == "FrontierDPOTrainer":
        from frontier_trainer.trainer import FrontierDPOTrainer

        return FrontierDPOTrainer
    raise AttributeError(f"module 'frontier_trainer' has no attribute {name!r}")
