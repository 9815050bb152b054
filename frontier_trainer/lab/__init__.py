"""The alignment-tax lab: tiny offline language models with controlled safety/capability overlap.

A synthetic world (:mod:`.world`) of six exact-answer capability tasks, two of them entangled with a
harmful-request distribution through a tunable ``entanglement`` knob; a word-level tokenizer built in
code (:mod:`.tokenizer`); tiny Llama models pretrained from scratch and cached (:mod:`.pretraining`);
preference and capability datasets (:mod:`.data`); and an evaluation (:mod:`.evaluation`).

Typical use::

    from frontier_trainer import lab
    model_dir = lab.pretrain()                      # cached after the first call
    model, tokenizer = lab.load(model_dir)
    print(lab.evaluate(model, tokenizer))
    prefs = lab.preference_dataset("train")         # prompt / chosen (refusal) / rejected
"""

from .data import REFUSAL_COMPLETION, capability_datasets, helpfulness_dataset, preference_dataset
from .evaluation import evaluate, is_correct, is_refusal
from .pretraining import (
    FAMILY_HIDDEN_SIZES,
    LabConfig,
    build_model,
    default_cache_dir,
    load,
    pretrain,
    pretrain_config,
    read_manifest,
)
from .tokenizer import build_tokenizer
from .world import REFUSAL, SEP, TASKS, Task, WorldConfig, examples, overlap_report, split_of

__all__ = [
    "FAMILY_HIDDEN_SIZES",
    "REFUSAL",
    "REFUSAL_COMPLETION",
    "SEP",
    "TASKS",
    "LabConfig",
    "Task",
    "WorldConfig",
    "build_model",
    "build_tokenizer",
    "capability_datasets",
    "default_cache_dir",
    "evaluate",
    "examples",
    "helpfulness_dataset",
    "is_correct",
    "is_refusal",
    "load",
    "overlap_report",
    "preference_dataset",
    "pretrain",
    "pretrain_config",
    "read_manifest",
    "split_of",
]
