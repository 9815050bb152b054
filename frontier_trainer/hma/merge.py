"""Execution: stream ``θ_base + α_ℓ (θ_aligned − θ_base)`` group by group to safetensors shards.

Separated from planning (:mod:`.allocate`) as in mergekit. The merge reads one group's tensors from both
models, writes them as one shard, and releases them before the next group: at most one group is held at
a time (:class:`MergeStats` counts it; the tests assert on the counter). Next to the weights it writes

* ``hma_provenance.json``: inputs, grouping and outer rule, every α, the predicted frontier point;
* ``mergekit_config.yml``: a mergekit ``task_arithmetic`` config reproducing the same weights
  (:mod:`.mergekit_yaml`).

Arithmetic: ``merged = base + α (aligned − base)`` computed in float32 (float64 for float64 weights) and
cast back to the stored dtype; α = 0 and α = 1 copy the base or aligned tensor bit for bit. Uniform
averaging at t is the same function with every α = t.

A LoRA aligned model (``base + adapter``) is not materialised: the merge writes a new adapter whose
``lora_B`` of each adapted module is multiplied by its group's α (``α · B A`` per layer).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .allocate import Allocation
from .groups import OUTER, Grouping, alpha_of_tensor
from .mergekit_yaml import merge_tensor, write_mergekit_yaml
from .sources import LoraSource, StateDictSource, WeightSource, check_compatible, open_source

logger = logging.getLogger(__name__)

PROVENANCE = "hma_provenance.json"
YAML_NAME = "mergekit_config.yml"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja")  # fmt: skip


@dataclass
class MergeStats:
    """Counters of the streaming merge.

    Attributes:
        groups_written: shards written.
        tensors_read: tensors read from the inputs.
        held: groups currently resident.
        max_groups_held: the most groups resident at once (the streaming bound: 1).
    """

    groups_written: int = 0
    tensors_read: int = 0
    held: int = 0
    max_groups_held: int = 0

    def acquire(self) -> None:
        self.held += 1
        self.max_groups_held = max(self.max_groups_held, self.held)

    def release(self) -> None:
        self.held -= 1


@dataclass
class MergeResult:
    """What :func:`merge` wrote."""

    out_dir: Path
    stats: MergeStats
    alphas: dict[str, float]
    outer_alpha: float
    files: list[str] = field(default_factory=list)


def _resolve(
    alphas: Allocation | Mapping[str, float] | float, groups: list[str], outer_alpha: float | None
) -> tuple[dict[str, float], float]:
    if isinstance(alphas, Allocation):
        return dict(alphas.alphas), float(alphas.outer_alpha if outer_alpha is None else outer_alpha)
    if isinstance(alphas, (int, float)):
        t = float(alphas)
        return dict.fromkeys(groups, t), t if outer_alpha is None else float(outer_alpha)
    a = {k: float(v) for k, v in alphas.items()}
    missing = [g for g in groups if g not in a]
    if missing:
        raise ValueError(f"no α for group(s) {missing[:5]}; expected keys {groups[:5]}...")
    if outer_alpha is None and OUTER not in a:
        raise ValueError("give outer_alpha= (the ratio of embeddings, final norm and LM head).")
    return a, float(a.get(OUTER, outer_alpha))  # type: ignore[arg-type]


def merge(
    base: Any,
    aligned: Any,
    alphas: Allocation | Mapping[str, float] | float,
    out_dir: str | os.PathLike[str],
    *,
    grouping: Grouping | None = None,
    outer_alpha: float | None = None,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
    stats: MergeStats | None = None,
) -> MergeResult:
    """Write the per-group merge of ``base`` and ``aligned`` to ``out_dir`` (streaming, see module doc).

    Args:
        base: base model directory, in-memory model or state dict.
        aligned: aligned model (same forms) or a LoRA adapter directory (then a scaled adapter is written).
        alphas: an :class:`Allocation`, ``{group: α}`` (plus ``outer_alpha``), or one float t (uniform).
        grouping: must be the grouping the α were planned with (default per block).
        outer_alpha: ratio of the outer tensors; default the allocation's, or t for a float.
        provenance: extra entries for ``hma_provenance.json`` (e.g. the predicted point).
        stats: a :class:`MergeStats` to fill (tests read ``max_groups_held``).
    """
    grouping = grouping or Grouping()
    stats = stats if stats is not None else MergeStats()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_src = open_source(base)
    aligned_src = open_source(aligned, base=base_src)
    names = check_compatible(base_src, aligned_src)
    assignment = grouping.assign(names)
    groups = grouping.groups(names)
    a, t_out = _resolve(alphas, groups, outer_alpha)
    for g, v in [*a.items(), (OUTER, t_out)]:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"α[{g}]={v} is outside [0, 1].")
    ordered: dict[str, list[str]] = {}
    for n in names:
        ordered.setdefault(assignment[n], []).append(n)
    files: list[str] = []
    dtype_name = "float32"
    started = time.time()
    if isinstance(aligned_src, LoraSource):
        files = _scale_adapter(aligned_src, assignment, a, t_out, out, stats)
        dtype_name = _dtype_name(base_src, names)
    else:
        keys = list(ordered)
        total = len(keys)
        weight_map: dict[str, str] = {}
        for k, group in enumerate(tqdm(keys, desc="merge", disable=not progress)):
            stats.acquire()
            shard: dict[str, torch.Tensor] = {}
            for n in ordered[group]:
                alpha = alpha_of_tensor(n, group, a, t_out)
                bt, at = base_src.get(n), aligned_src.get(n)
                stats.tensors_read += 2
                shard[n] = merge_tensor(bt, at, alpha).contiguous()
                if bt.is_floating_point():
                    dtype_name = str(bt.dtype).replace("torch.", "")
                del bt, at
            fname = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
            files.append(fname)
            del shard
            stats.groups_written += 1
            stats.release()
        total_size = sum((out / f).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
        )
        _copy_config(base_src, out)
    filters = [(f, alpha_of_tensor(f, g, a, t_out)) for f, g in grouping.filters(names)]
    write_mergekit_yaml(out / YAML_NAME, base_src.ref, aligned_src.ref, filters, t_out, dtype_name)
    record = {
        "tool": "frontier_trainer.hma",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "base": base_src.ref,
        "aligned": aligned_src.ref,
        "grouping": {"mode": grouping.mode, "outer": grouping.outer},
        "formula": "theta = base + alpha_group * (aligned - base), float32 arithmetic, cast to stored dtype",
        "alphas": a,
        "outer_alpha": t_out,
        "outer_tensors": [n for n in names if assignment[n] == OUTER],
        "allocation": alphas.to_dict() if isinstance(alphas, Allocation) else None,
        "stats": asdict(stats),
        "seconds": round(time.time() - started, 3),
        **dict(provenance or {}),
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2, default=str))
    logger.info(
        "HMA merge written to %s (%d files, max %d group(s) held).", out, len(files), stats.max_groups_held
    )
    return MergeResult(out, stats, a, t_out, files)


def _dtype_name(src: WeightSource, names: list[str]) -> str:
    for n in names:
        t = src.get(n)
        if t.is_floating_point():
            return str(t.dtype).replace("torch.", "")
    return "float32"


def _copy_config(src: WeightSource, out: Path) -> None:
    d = src.model_dir()
    if d is not None:
        for name in _COPY:
            if (d / name).is_file():
                shutil.copy2(d / name, out / name)
    elif isinstance(src, StateDictSource) and src.model is not None and hasattr(src.model, "config"):
        src.model.config.save_pretrained(out)


def _scale_adapter(
    src: LoraSource,
    assignment: dict[str, str],
    a: dict[str, float],
    t_out: float,
    out: Path,
    stats: MergeStats,
) -> list[str]:
    """Write ``lora_B ← α_ℓ lora_B`` per adapted module (never forms B @ A)."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(src.file), framework="pt") as f:
        keys = list(f.keys())
        scale_of: dict[str, float] = {}
        for target in src.adapted():
            _, kb = src._pairs[target]
            scale_of[kb] = alpha_of_tensor(target, assignment[target], a, t_out)
        for k in keys:  # an adapter is small (rank r): it is held whole, the base never is
            t = f.get_tensor(k)
            stats.tensors_read += 1
            tensors[k] = (t * scale_of[k]).to(t.dtype) if k in scale_of else t
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(src.path / "adapter_config.json", out / "adapter_config.json")
    stats.groups_written += 1
    return ["adapter_model.safetensors", "adapter_config.json"]
