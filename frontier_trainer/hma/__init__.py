"""Heterogeneous model averaging (HMA): per-layer merge ratios chosen from geometry (paper §7.3, Prediction 3).

Planning is separate from execution (as in mergekit):

1. :func:`measure_geometry` (:mod:`.signals`): one backward per objective at the base model gives, per
   layer group ℓ, the safety gain ``s_ℓ``, capability changes ``c_iℓ``, budget weight ``w_ℓ`` and tax
   rate ``τ_ℓ`` of the update ``Δ = θ_aligned − θ_base``;
2. :func:`allocate` (:mod:`.allocate`): the exact QP ``max Σ α_ℓ s_ℓ`` under capability tolerances and
   the budget ``Σ w_ℓ α_ℓ² ≤ B``; :func:`uniform` is the baseline line α_ℓ = t;
3. :func:`merge` (:mod:`.merge`): streams ``θ_base + α_ℓ Δ_ℓ`` to safetensors shards, with a provenance
   file and a mergekit YAML (:mod:`.mergekit_yaml`) next to the weights.

Command line: ``frontier-hma`` (:mod:`.cli`).
"""

from __future__ import annotations

from .allocate import (
    Allocation,
    InfeasibleAllocationError,
    QPSolution,
    allocate,
    outer_alpha_for_budget,
    solve_allocation_qp,
    uniform,
)
from .groups import OUTER, Grouping
from .merge import MergeResult, MergeStats, merge, merge_tensor
from .mergekit_yaml import load_mergekit_yaml, write_mergekit_yaml
from .signals import LayerGeometry, measure_geometry, preference_margin
from .sources import LoraSource, SafetensorsDir, StateDictSource, open_source

__all__ = [
    "OUTER",
    "Allocation",
    "Grouping",
    "InfeasibleAllocationError",
    "LayerGeometry",
    "LoraSource",
    "MergeResult",
    "MergeStats",
    "QPSolution",
    "SafetensorsDir",
    "StateDictSource",
    "allocate",
    "load_mergekit_yaml",
    "measure_geometry",
    "merge",
    "merge_tensor",
    "open_source",
    "outer_alpha_for_budget",
    "preference_margin",
    "solve_allocation_qp",
    "uniform",
    "write_mergekit_yaml",
]
