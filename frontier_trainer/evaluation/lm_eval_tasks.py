"""Capability tasks as EleutherAI lm-evaluation-harness task configs over local JSONL files.

Scoring is lm-eval's, not ours: a :class:`LmEvalTask` is turned into an lm-eval task config (a Python
dict) whose data is a JSONL file written to a temporary directory and loaded by absolute path
(``dataset_path: json``, ``dataset_kwargs: {data_files: {test: /abs/path.jsonl}}``; a relative path
would resolve from the current directory, field notes §8). :func:`run_tasks` runs them with
``lm_eval.simple_evaluate`` on an in-memory model wrapped in ``HFLM`` and returns the per-document
outcomes read from lm-eval's logged samples, so intervals can be computed over documents.

Two kinds, both with lm-eval's built-in metrics only (a metric lm-eval does not register falls back to
``evaluate.load`` and fails offline):

* ``multiple_choice``: rows ``{"query", "choices", "gold"}``; lm-eval scores each choice by the
  log-likelihood of ``target_delimiter + choice`` after ``query`` and the document is correct when
  the gold choice has the highest one (``acc``).
* ``generate_until``: rows ``{"query", "answer"}``; greedy generation until a stop string or
  ``max_gen_toks`` tokens, then (optionally) a regex filter extracts the answer (group 1 of
  ``regex``, e.g. GSM8K's ``#### (-?[0-9.,]+)``), compared with ``answer`` by ``exact_match``
  (leading/trailing whitespace removed by ``regexes_to_ignore``; ``ignore_case`` and
  ``ignore_punctuation`` as set).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("multiple_choice", "generate_until")
MC_METRICS = ("acc", "acc_norm")
_TASK_PREFIX = "frontier_"
_FILTER = "extract"


@dataclass(frozen=True)
class LmEvalTask:
    """One capability task: its documents and how lm-eval scores them (module docstring).

    Attributes:
        name: our task name (the report key is ``capability/<name>``); letters, digits, ``_`` and ``-``.
        output_type: ``"multiple_choice"`` or ``"generate_until"``.
        docs: the documents (see the module docstring for the fields of each kind).
        until: stop strings of ``generate_until``.
        max_gen_toks: generation budget of ``generate_until``.
        regex: ``generate_until`` only: a pattern whose group 1 is the answer (``None``: the whole
            stripped response is compared).
        group_select: which match of ``regex`` is the answer: ``0`` the first, ``-1`` the last (lm-eval's
            "flexible-extract" takes the last number).
        ignore_case, ignore_punctuation, regexes_to_ignore: ``exact_match`` options (the default
            ``regexes_to_ignore`` strips leading and trailing whitespace from response and answer).
        target_delimiter: text between the query and a choice (multiple choice) or the answer.
        metric: ``"acc"`` (default) or ``"acc_norm"`` (log-likelihood per byte of the choice, lm-eval's
            length-normalised accuracy, the usual one for HellaSwag) for multiple choice;
            ``"exact_match"`` (the only one) for generation. Empty means the default.
        source: where the documents come from (package, file, split), for the report's provenance.
    """

    name: str
    output_type: str
    docs: tuple[dict[str, Any], ...]
    until: tuple[str, ...] = ("\n\n",)
    max_gen_toks: int = 32
    regex: str | None = None
    group_select: int = 0
    ignore_case: bool = False
    ignore_punctuation: bool = False
    regexes_to_ignore: tuple[str, ...] = (r"^\s+", r"\s+$")
    target_delimiter: str = " "
    metric: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"task name={self.name!r} must be non-empty letters, digits, '_' or '-'.")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"task {self.name!r}: output_type={self.output_type!r} is not one of {OUTPUT_TYPES}."
            )
        allowed = MC_METRICS if self.output_type == "multiple_choice" else ("exact_match",)
        if self.metric and self.metric not in allowed:
            raise ValueError(
                f"task {self.name!r}: metric={self.metric!r} is not one of {allowed} for {self.output_type}."
            )
        if not self.docs:
            raise ValueError(f"task {self.name!r}: docs is empty; a task needs at least one document.")
        if self.max_gen_toks < 1:
            raise ValueError(
                f"task {self.name!r}: max_gen_toks={self.max_gen_toks} must be a positive integer."
            )
        for i, doc in enumerate(self.docs):
            if not isinstance(doc.get("query"), str):
                raise ValueError(f"task {self.name!r}: docs[{i}] needs a string field 'query'.")
            if self.output_type == "multiple_choice":
                choices = doc.get("choices")
                if (
                    not isinstance(choices, list)
                    or len(choices) < 2
                    or not all(isinstance(c, str) for c in choices)
                ):
                    raise ValueError(
                        f"task {self.name!r}: docs[{i}]['choices'] must be a list of >= 2 strings."
                    )
                gold = doc.get("gold")
                if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                    raise ValueError(
                        f"task {self.name!r}: docs[{i}]['gold']={gold!r} must index 'choices' (0..{len(choices) - 1})."
                    )
            elif not isinstance(doc.get("answer"), str) or not doc["answer"].strip():
                raise ValueError(f"task {self.name!r}: docs[{i}] needs a non-empty string field 'answer'.")

    @property
    def score(self) -> str:
        """The lm-eval metric read per document."""
        return self.metric or ("acc" if self.output_type == "multiple_choice" else "exact_match")

    @property
    def lm_eval_name(self) -> str:
        """The name lm-eval knows the task by."""
        return _TASK_PREFIX + self.name.replace("-", "_")

    def docs_sha256(self) -> str:
        """SHA-256 of the documents as written to JSONL (provenance)."""
        return hashlib.sha256(_jsonl(self.docs).encode()).hexdigest()

    def config(self, data_file: Path) -> dict[str, Any]:
        """The lm-eval task config (a dict), reading its documents from ``data_file`` (absolute)."""
        path = Path(data_file)
        if not path.is_absolute():
            raise ValueError(
                f"data_file={str(data_file)!r} must be absolute: lm-eval resolves it from the cwd."
            )
        cfg: dict[str, Any] = {
            "task": self.lm_eval_name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test",
            "output_type": self.output_type,
            "doc_to_text": "{{query}}",
            "target_delimiter": self.target_delimiter,
            "metadata": {"version": 1},
        }
        if self.output_type == "multiple_choice":
            cfg["doc_to_choice"] = "{{choices}}"
            cfg["doc_to_target"] = "{{gold}}"
            cfg["metric_list"] = [{"metric": self.score, "aggregation": "mean", "higher_is_better": True}]
        else:
            cfg["doc_to_target"] = "{{answer}}"
            cfg["generation_kwargs"] = {
                "until": list(self.until),
                "max_gen_toks": self.max_gen_toks,
                "do_sample": False,
                "temperature": 0.0,
            }
            cfg["metric_list"] = [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": self.ignore_case,
                    "ignore_punctuation": self.ignore_punctuation,
                    "regexes_to_ignore": list(self.regexes_to_ignore),
                }
            ]
            steps: list[dict[str, Any]] = []
            if self.regex is not None:
                steps.append(
                    {"function": "regex", "regex_pattern": self.regex, "group_select": self.group_select}
                )
            steps.append({"function": "take_first"})
            cfg["filter_list"] = [{"name": _FILTER, "filter": steps}]
        return cfg


def _jsonl(docs: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(doc, sort_keys=True) + "\n" for doc in docs)


def _check_unique(tasks: Sequence[LmEvalTask]) -> None:
    names = [t.lm_eval_name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tasks: duplicate task names {dupes}; give every task its own name.")


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[LmEvalTask],
    *,
    batch_size: int = 16,
    limit: int | None = None,
    workdir: str | Path | None = None,
) -> dict[str, list[float]]:
    """Run ``tasks`` through lm-eval on ``model``; return per-document outcomes (0/1) per task name.

    Args:
        model: a Hugging Face causal LM in memory (a ``peft`` model or a merged model too).
        tokenizer: its tokenizer.
        tasks: the tasks; at most one per name.
        batch_size: lm-eval's batch size.
        limit: at most this many documents per task (lm-eval's ``limit``: the first ones).
        workdir: where the JSONL files go (default: a temporary directory removed afterwards).

    Returns:
        ``{task.name: [outcome of doc 0, doc 1, ...]}`` in document order, from lm-eval's logged
        samples (``acc`` for multiple choice, ``exact_match`` after the filter for generation).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("tasks is empty: pass at least one LmEvalTask.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    _check_unique(tasks)
    with tempfile.TemporaryDirectory(prefix="frontier-lm-eval-") as tmp:
        root = Path(workdir).resolve() if workdir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        configs = []
        for task in tasks:
            path = root / f"{task.lm_eval_name}.jsonl"
            path.write_text(_jsonl(task.docs))
            configs.append(task.config(path.resolve()))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        was_training = model.training
        try:
            result = lm_eval.simple_evaluate(
                model=lm,
                tasks=configs,
                task_manager=TaskManager(include_defaults=False),
                limit=limit,
                log_samples=True,
                bootstrap_iters=0,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
        finally:
            model.train(was_training)
    out: dict[str, list[float]] = {}
    for task in tasks:
        samples = result["samples"][task.lm_eval_name]
        metric = task.score
        if task.output_type == "generate_until":
            samples = [s for s in samples if s.get("filter") == _FILTER]
        samples = sorted(samples, key=lambda s: s["doc_id"])
        out[task.name] = [float(s[metric]) for s in samples]
        logger.info(
            "lm-eval %s: %s = %.4f over %d docs",
            task.name,
            metric,
            sum(out[task.name]) / max(len(out[task.name]), 1),
            len(out[task.name]),
        )
    return out
