"""The mergekit configuration of an HMA merge, and our own loader that applies it.

Format written (mergekit ``task_arithmetic``: ``θ = base + Σ_m weight_m · (θ_m − base)``, one model)::

    merge_method: task_arithmetic
    base_model: /path/base
    models:
      - model: /path/aligned            # or /path/base+/path/adapter (mergekit's LoRA syntax)
        parameters:
          weight:
            - filter: model.layers.0.   # one conditional value per block (or module) prefix
              value: 0.4123
            - value: 0.35               # no filter: the outer tensors (embeddings, norm, head)
    parameters:
      normalize: false
      lambda: 1.0
    dtype: float32

mergekit evaluates a list of conditional parameters by taking the first entry whose ``filter`` is a
substring of the tensor name (no filter = always). Filters end with a dot, so ``layers.1.`` never
matches ``layers.11.``. :func:`load_mergekit_yaml` implements exactly these semantics, streaming tensor
by tensor, so that a config can be checked without installing mergekit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from .sources import LoraSource, SafetensorsDir, WeightSource, check_compatible


def merge_tensor(base: torch.Tensor, aligned: torch.Tensor, alpha: float) -> torch.Tensor:
    """``base + α (aligned − base)``: task_arithmetic's rule for one tensor with one model.

    Computed in float32 (float64 for float64 weights) and cast back to the stored dtype; α = 0 and
    α = 1 copy the base or aligned tensor bit for bit. Lives here, below :mod:`.merge`, so that both
    the merge and this loader use one rule and the import graph points one way (merge -> mergekit_yaml).
    """
    if alpha == 0.0:
        return base.clone()
    if alpha == 1.0:
        return aligned.clone()
    if not base.is_floating_point():
        raise ValueError(f"cannot interpolate a {base.dtype} tensor with α={alpha}.")
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    return (b + alpha * (aligned.to(work) - b)).to(base.dtype)


def write_mergekit_yaml(
    path: str | os.PathLike[str],
    base_ref: str,
    aligned_ref: str,
    filters: Sequence[tuple[str, float]],
    default: float,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Write the config described in the module docstring; returns it as a dict."""
    weight = [{"filter": f, "value": float(v)} for f, v in filters] + [{"value": float(default)}]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base_ref,
        "models": [{"model": aligned_ref, "parameters": {"weight": weight}}],
        "parameters": {"normalize": False, "lambda": 1.0},
        "dtype": dtype,
    }
    Path(path).write_text(
        "# Written by frontier_trainer.hma: reproduces the HMA merge with mergekit (task_arithmetic).\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return config


def weight_for(tensor_name: str, setting: Any) -> float:
    """mergekit's ``evaluate_setting`` for scalars and lists of conditional values (first match wins)."""
    if isinstance(setting, (int, float)):
        return float(setting)
    if isinstance(setting, list):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return weight_for(tensor_name, cond["value"])
        raise ValueError(f"no weight matches tensor {tensor_name!r} and no default entry is given.")
    raise ValueError(f"unsupported weight setting {setting!r} (scalars and conditional lists only).")


def _open_ref(ref: str) -> WeightSource:
    if "+" in ref and not Path(ref).exists():
        base, adapter = ref.split("+", 1)
        return LoraSource(SafetensorsDir(base), adapter)
    return SafetensorsDir(ref)


def load_mergekit_yaml(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Apply a ``task_arithmetic`` config with one model; yields ``(name, merged tensor)`` one at a time.

    Raises:
        ValueError: another merge method, several models, ``normalize: true`` with a weight ≠ 1, or
            mismatched models.
    """
    cfg = yaml.safe_load(Path(path).read_text())
    if cfg.get("merge_method") != "task_arithmetic":
        raise ValueError(
            f"{path}: merge_method {cfg.get('merge_method')!r}; this loader reads task_arithmetic."
        )
    models = cfg.get("models") or []
    if len(models) != 1:
        raise ValueError(f"{path}: expected exactly one model besides base_model, got {len(models)}.")
    params = cfg.get("parameters") or {}
    lam = float(params.get("lambda", 1.0))
    normalize = bool(params.get("normalize", False))
    base = _open_ref(cfg["base_model"])
    aligned = _open_ref(models[0]["model"])
    setting = (models[0].get("parameters") or {}).get("weight")
    if setting is None:
        raise ValueError(f"{path}: the model has no weight parameter.")
    for name in check_compatible(base, aligned):
        w = weight_for(name, setting)
        if normalize and w != 0:
            w = 1.0  # mergekit divides by the sum of weights: a single model's delta is taken whole
        yield name, merge_tensor(base.get(name), aligned.get(name), lam * w)
