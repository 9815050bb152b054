"""Post-hoc baseline: uniform (linear) averaging of the base and the aligned model, through mergekit.

Source: weight interpolation / model averaging as evaluated by Lin et al., "Mitigating the
Alignment Tax of RLHF" (EMNLP 2024; their "uniform" baseline to HMA), run with arcee-ai mergekit's
``linear`` method (https://github.com/arcee-ai/mergekit): θ = (1 − t)·θ_base + t·θ_aligned for
every tensor, embeddings and head included.

Deviations: none in the arithmetic (mergekit does it); we merge in float32 and record the exact
mergekit YAML and the sha256 of every input file next to the result (``provenance.json``). A
LoRA-aligned model must first be materialised (:func:`materialise_adapter`): mergekit's own LoRA
path materialises it too (field notes §1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
CONFIG_FILE = "mergekit_config.yml"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _input_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every weight, config and tokenizer file of a model directory."""
    suffixes = (".safetensors", ".json", ".model", ".txt", ".bin")
    return {
        p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name.endswith(suffixes)
    }


def _check_model_dir(field: str, directory: Path) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"uniform_merge: {field}={str(directory)!r} is not a directory.")
    if not (directory / "config.json").is_file() or not any(directory.glob("*.safetensors")):
        raise ValueError(
            f"uniform_merge: {field}={str(directory)!r} needs config.json and *.safetensors weights "
            "(save_pretrained(..., safe_serialization=True)); for a LoRA adapter call materialise_adapter first."
        )


def linear_merge_config(base_dir: Path, aligned_dir: Path, t: float) -> dict[str, Any]:
    """The mergekit ``linear`` configuration θ = (1 − t)·base + t·aligned, in float32."""
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(base_dir), "parameters": {"weight": 1.0 - t}},
            {"model": str(aligned_dir), "parameters": {"weight": t}},
        ],
        "dtype": "float32",
        # no tokenizer_source: with one, mergekit resizes the embeddings and head to the tokenizer's
        # length (a padded vocabulary of 64 became 49 rows on the tiny model); copy_tokenizer copies
        # the base model's tokenizer files unchanged instead.
    }


def uniform_merge(base_dir: str | Path, aligned_dir: str | Path, t: float, out_dir: str | Path) -> Path:
    """Write θ = (1 − t)·θ_base + t·θ_aligned (mergekit ``linear``) with the tokenizer to ``out_dir``.

    Args:
        base_dir: the model before alignment (a saved directory with safetensors).
        aligned_dir: the aligned model with the same architecture (a merged LoRA: see
            :func:`materialise_adapter`).
        t: interpolation weight in [0, 1]: 0 gives the base, 1 the aligned model.
        out_dir: output directory (created), also given ``mergekit_config.yml`` and ``provenance.json``.

    Raises:
        ValueError: ``t`` outside [0, 1] or not finite, or an input is not a saved model.
    """
    if (
        isinstance(t, bool)
        or not isinstance(t, (int, float))
        or not math.isfinite(float(t))
        or not 0 <= t <= 1
    ):
        raise ValueError(f"uniform_merge: t={t!r} must be a number in [0, 1] (0 = base, 1 = aligned).")
    t = float(t)
    base, aligned, out = Path(base_dir).resolve(), Path(aligned_dir).resolve(), Path(out_dir).resolve()
    _check_model_dir("base_dir", base)
    _check_model_dir("aligned_dir", aligned)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = linear_merge_config(base, aligned, t)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False)
    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        options=MergeOptions(copy_tokenizer=True, lazy_unpickle=False, quiet=True, write_model_card=False),
        config_source=text,
    )
    (out / CONFIG_FILE).write_text(text)
    from importlib.metadata import version

    import mergekit  # noqa: F401  (its version goes into the provenance)

    provenance = {
        "method": "mergekit linear",
        "t": t,
        "mergekit_version": version("mergekit"),
        "mergekit_yaml": text,
        "inputs": {
            "base": {"path": str(base), "sha256": _input_hashes(base)},
            "aligned": {"path": str(aligned), "sha256": _input_hashes(aligned)},
        },
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    logger.info("uniform merge t=%.3f of %s and %s written to %s", t, base, aligned, out)
    return out


def materialise_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Load ``base_dir`` + the PEFT adapter in ``adapter_dir``, ``merge_and_unload`` it in float32 and
    save the full model and the tokenizer to ``out_dir`` (the input :func:`uniform_merge` needs)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"materialise_adapter: adapter_dir={str(adapter)!r} has no adapter_config.json.")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    (out / PROVENANCE_FILE).write_text(
        json.dumps(
            {
                "method": "peft merge_and_unload",
                "base": {"path": str(base.resolve()), "sha256": _input_hashes(base)},
                "adapter": {"path": str(adapter.resolve()), "sha256": _input_hashes(adapter)},
            },
            indent=2,
        )
    )
    return out
