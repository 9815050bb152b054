"""Load a model to evaluate from a name or a directory: full model dirs, PEFT adapter dirs, ``lab``, ``real:``.

:func:`load_model` accepts

* ``"lab"``: the lab's default model (:func:`frontier_trainer.lab.pretrain`, cached after the first build);
* ``"real:smollm2-135m-instruct"`` (any name of :mod:`frontier_trainer.real.sources`);
* a directory holding ``adapter_config.json`` (a PEFT adapter): its ``base_model_name_or_path`` is
  loaded by the same rules (a directory, ``lab`` or ``real:...``) and the adapter applied on top with
  ``peft.PeftModel.from_pretrained`` (not merged); the tokenizer is the adapter directory's if it has
  one, else the base's;
* a directory holding ``config.json``: ``AutoModelForCausalLM`` and ``AutoTokenizer`` from it.

Hub names are refused: nothing here reaches the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LAB = "lab"


def _tokenizer_files(path: Path) -> bool:
    return any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def resolve_dir(spec: str) -> Path:
    """The local directory behind ``spec`` (``lab``, ``real:<model>`` or a path), fetching/building if needed."""
    from frontier_trainer.real import sources

    if spec == LAB:
        from frontier_trainer import lab

        return Path(lab.pretrain())
    if sources.is_real(spec):
        return Path(sources.model_dir(spec))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"MODEL={spec!r} is not a directory, 'lab' or a real: name; pass a saved model or PEFT adapter "
            f"directory (hub names are not reachable here)."
        )
    return path


def load_model(spec: str, *, torch_dtype: Any = None) -> tuple[Any, Any, Path]:
    """``(model, tokenizer, directory)`` for ``spec`` (module docstring); the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_dir(spec)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_spec = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base_spec:
            raise ValueError(
                f"{adapter}: base_model_name_or_path is empty; set it to the base model's directory."
            )
        base, base_tok, _ = load_model(str(base_spec), torch_dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path)) if _tokenizer_files(path) else base_tok
        logger.info("loaded PEFT adapter %s on base %s", path, base_spec)
    elif (path / "config.json").is_file():
        model = (
            AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
            if torch_dtype
            else (AutoModelForCausalLM.from_pretrained(str(path)))
        )
        if not _tokenizer_files(path):
            raise FileNotFoundError(f"{path} has no tokenizer files; save the tokenizer next to the model.")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        raise FileNotFoundError(
            f"{path} holds neither config.json (a model) nor adapter_config.json (a PEFT adapter)."
        )
    model.eval()
    return model, tokenizer, path


def lab_world(path: Path) -> Any:
    """The lab world a model directory was pretrained in (``lab_manifest.json``, followed through a PEFT
    adapter's base), else ``None`` (then the default world is assumed)."""
    from frontier_trainer.lab.pretraining import MANIFEST
    from frontier_trainer.lab.world import WorldConfig

    manifest = path / MANIFEST
    if manifest.is_file():
        world = json.loads(manifest.read_text()).get("settings", {}).get("world")
        return WorldConfig(**world) if world else None
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base and base != LAB and Path(base).is_dir():
            return lab_world(Path(base))
    return None
