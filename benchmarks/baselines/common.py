"""Shared pieces of the baselines: option validation and the capability data they all use.

Every baseline reuses the project's capability pipeline (:mod:`frontier_trainer.directions`):
rows are ``prompt``/``completion`` (prompt tokens masked) or ``text``, tokenised and validated
before training, drawn by a seeded sampler that is identical on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from frontier_trainer.directions import CapabilitySampler, build_capability_sampler

logger = logging.getLogger(__name__)


def check_positive_int(name: str, value: Any, baseline: str) -> int:
    """Return ``value`` as an int, or raise naming the option when it is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{baseline}: option {name}={value!r} must be an integer >= 1.")
    return int(value)


def check_nonnegative_float(name: str, value: Any, baseline: str, upper: float | None = None) -> float:
    """Return ``value`` as a float, or raise naming the option when it is negative, NaN or too large."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{baseline}: option {name}={value!r} must be a finite number.")
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{baseline}: option {name}={value!r} must be {bound}.")
    return float(value)


def make_sampler(
    baseline: str,
    capability_datasets: Mapping[str, Any] | None,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int | None,
    seed: int,
) -> CapabilitySampler:
    """Validate the capability data and build the project's sampler (all errors before training)."""
    if not capability_datasets:
        raise ValueError(
            f"{baseline} needs capability data: pass capability_datasets={{task: Dataset}} "
            "(rows 'prompt'/'completion' or 'text')."
        )
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    return build_capability_sampler(
        dict(capability_datasets), tokenizer, max_length=max_length, batch_size=batch_size, seed=seed
    )


def reference_batches(
    sampler: CapabilitySampler, task: str, n_reference: int, device: torch.device | None = None
) -> list[dict[str, torch.Tensor]]:
    """The fixed reference set of ``task``: its first ``n_reference`` tokenised rows in dataset
    order (all rows if it has fewer), as right-padded batches of the sampler's batch size.

    Fixed, not resampled: OGPSA refreshes its anchor gradients on the same reference examples at
    new parameters, and NSPO computes its covariance once; a fixed set also lets a test rebuild
    exactly the tokens the baseline saw.
    """
    available = len(sampler.rows[task])
    if available < n_reference:
        logger.info("task %r has %d rows < n_reference=%d: using all of them.", task, available, n_reference)
    indices = list(range(min(n_reference, available)))
    size = sampler.batch_size
    return [sampler.collate(task, indices[i : i + size], device=device) for i in range(0, len(indices), size)]


def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (which is not a torch Optimizer; field notes §3)."""
    return getattr(optimizer, "optimizer", optimizer)


def refuse_unsupported_setup(baseline: str, args: Any) -> None:
    """Optimizer-hook baselines cannot see the update under DeepSpeed (field notes §3)."""
    if getattr(args, "deepspeed", None):
        raise ValueError(
            f"{baseline}: DeepSpeed steps the optimizer inside backward, where no optimizer hook sees the "
            "update; run without deepspeed."
        )
    if getattr(args, "fsdp", None):
        raise ValueError(f"{baseline}: FSDP shards parameters and is not supported; use DDP or one process.")
