"""frontier_trainer: alignment training on the safety/capability frontier.

A plugin for Hugging Face TRL built on "What Is the Geometry of the Alignment Tax?".
``frontier_trainer.geometry`` holds the paper's mathematics as pure tensor functions;
``frontier_trainer.lab`` is an offline model organism with controlled safety/capability
overlap. Heavy modules (anything importing TRL) are imported lazily.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
