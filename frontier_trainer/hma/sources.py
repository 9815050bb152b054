"""Weight sources read tensor by tensor: a safetensors directory, an in-memory model, base + LoRA adapter.

The streaming merge and the geometry measurement never ask a source for more than one tensor at a time;
a directory source reads it from disk with ``safetensors.safe_open`` (no full model is loaded).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


class WeightSource:
    """Read-only access to named tensors. Subclasses implement :meth:`names`, :meth:`shape`, :meth:`get`."""

    ref: str = "<memory>"
    """How the source is named in provenance files and the mergekit YAML."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def model_dir(self) -> Path | None:
        """The directory holding ``config.json`` etc., if any."""
        return None


class SafetensorsDir(WeightSource):
    """A Hugging Face model directory: ``model.safetensors`` or sharded with ``model.safetensors.index.json``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.ref = str(self.path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file = {k: self.path / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self._file = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(
                f"{self.path}: no model.safetensors or model.safetensors.index.json (save with "
                "save_pretrained(safe_serialization=True))."
            )
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self._file.values())):
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self._shapes[k] = tuple(f.get_slice(k).get_shape())

    def names(self) -> list[str]:
        return list(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._file[name]), framework="pt") as f:
            return f.get_tensor(name)

    def model_dir(self) -> Path | None:
        return self.path


class StateDictSource(WeightSource):
    """An in-memory model or state dict (tied parameters appear once, under their first name)."""

    def __init__(self, model: nn.Module | Mapping[str, torch.Tensor], ref: str = "<memory>") -> None:
        if isinstance(model, nn.Module):
            self._model: nn.Module | None = model
            tensors = dict(model.named_parameters(remove_duplicate=True))
            tensors.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
        else:
            self._model = None
            tensors = dict(model)
        self._t = {k: v.detach() for k, v in tensors.items()}
        self.ref = ref

    def names(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]

    def model_dir(self) -> Path | None:
        p = (
            getattr(getattr(self._model, "config", None), "_name_or_path", "")
            if self._model is not None
            else ""
        )
        return Path(p) if p and Path(p).is_dir() else None

    @property
    def model(self) -> nn.Module | None:
        return self._model


class LoraSource(WeightSource):
    """``base + scaling · B @ A`` per adapted tensor (plain LoRA; DoRA and per-module rank patterns refused).

    :meth:`factors` exposes ``(B, A, scaling)`` so that the merge can scale ``B`` per layer without ever
    forming ``B @ A``; :meth:`get` materialises one adapted tensor at a time (geometry measurement only).
    """

    def __init__(self, base: WeightSource, adapter_dir: str | os.PathLike[str]) -> None:
        self.base = base
        self.path = Path(adapter_dir)
        self.ref = f"{base.ref}+{self.path}"
        cfg = json.loads((self.path / ADAPTER_CONFIG).read_text())
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
            raise ValueError(
                f"{self.path}: only plain LoRA adapters are supported (got {cfg.get('peft_type')}, dora)."
            )
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
            raise ValueError(f"{self.path}: rank_pattern/alpha_pattern/modules_to_save are not supported.")
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        self.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        self.config = cfg
        file = self.path / "adapter_model.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{file} missing (save the adapter with safe_serialization=True).")
        self.file = file
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
        self._pairs: dict[str, tuple[str, str]] = {}
        for k in keys:
            if ".lora_A." in k:
                target = _adapter_target(k, ".lora_A.")
                self._pairs[target] = (k, k.replace(".lora_A.", ".lora_B."))
        unknown = [t for t in self._pairs if t not in set(base.names())]
        if unknown:
            raise ValueError(f"{self.path}: adapter targets {unknown[:3]} are not tensors of the base model.")

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def adapted(self) -> list[str]:
        return list(self._pairs)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if name not in self._pairs:
            return None
        ka, kb = self._pairs[name]
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(kb), f.get_tensor(ka), self.scaling

    def get(self, name: str) -> torch.Tensor:
        base = self.base.get(name)
        fac = self.factors(name)
        if fac is None:
            return base
        B, A, sc = fac
        return (base.double() + sc * (B.double() @ A.double())).to(base.dtype)


def _adapter_target(key: str, marker: str) -> str:
    """Base tensor name of a LoRA key: ``base_model.model.X.lora_A.weight`` -> ``X.weight``."""
    stem = key.split(marker)[0]
    for prefix in ("base_model.model.",):
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
    return stem + ".weight"


def is_adapter_dir(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and (Path(x) / ADAPTER_CONFIG).is_file()


def open_source(x: Any, base: WeightSource | None = None) -> WeightSource:
    """A source from a directory, an ``nn.Module``, a state dict, or (with ``base``) a LoRA adapter dir."""
    if isinstance(x, WeightSource):
        return x
    if is_adapter_dir(x):
        if base is None:
            raise ValueError(f"{x} is a PEFT adapter: give it as the aligned model, with a base model.")
        return LoraSource(base, x)
    if isinstance(x, (str, os.PathLike)):
        if not Path(x).is_dir():
            raise FileNotFoundError(f"model directory {x} does not exist.")
        return SafetensorsDir(x)
    if isinstance(x, (nn.Module, Mapping)):
        return StateDictSource(x)
    raise TypeError(
        f"cannot read weights from {type(x).__name__}: give a directory, a model or a state dict."
    )


def check_compatible(base: WeightSource, aligned: WeightSource) -> list[str]:
    """Tensor names common to both, after checking that the architectures match exactly.

    Raises:
        ValueError: a tensor missing on either side, or a shape mismatch, named in the message.
    """
    bn, an = base.names(), set(aligned.names())
    missing = [n for n in bn if n not in an]
    extra = sorted(an - set(bn))
    if missing or extra:
        raise ValueError(
            f"base and aligned models do not have the same tensors: missing from aligned {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, missing from base {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''} (different architectures, or a truncated checkpoint)."
        )
    bad = [
        (n, base.shape(n), aligned.shape(n)) for n in bn if tuple(base.shape(n)) != tuple(aligned.shape(n))
    ]
    if bad:
        n, a, b = bad[0]
        raise ValueError(f"shape mismatch for {n}: base {a} vs aligned {b} ({len(bad)} tensor(s) differ).")
    return bn
