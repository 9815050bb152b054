"""Capability directions: data loading, tokenisation, sampling and metric gradients.

A *capability direction* ``c_i`` is the gradient, over the trainable parameters, of a
differentiable capability metric ``f_i`` evaluated on a batch of task ``i``'s data. The
trainer projects each realised optimizer update onto the null space of these directions,
so that, to first order, the update leaves every capability metric unchanged.

Default metric (the issue's contract): for a capability batch,

    f_i = -(sum of token NLL over completion tokens) / (number of completion tokens)

where a ``{"prompt", "completion"}`` row is tokenised as ``tokenizer(prompt + completion)``
with the prompt's tokens masked and nothing appended, and a ``{"text"}`` row scores all its
tokens. The metric is a mean log-likelihood, so larger is better and ``c_i`` points in the
direction that improves the capability.

This module is pure torch + ``datasets`` + a ``transformers`` tokenizer: it imports no
Trainer, so it can be unit-tested and reused outside TRL. The pieces, in pipeline order:

1. :func:`load_capability_source` (from :mod:`frontier_trainer.sources`) turns a source (a
   ``Dataset``, a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a local dataset
   directory, ``lab:<task>``, ``real:<name>`` or a hub name) into a ``datasets.Dataset``;
2. :func:`tokenize_capability_dataset` validates it and turns it into token rows with
   ``input_ids`` and ``labels`` (``-100`` on unscored tokens);
3. :class:`CapabilitySampler` draws right-padded batches per task from per-task
   permutations that depend only on ``(seed, task name, epoch)``: every rank draws the same
   batches with no communication, and ``state_dict`` captures the data position for resume;
4. :func:`completion_metric` computes ``f_i`` and :func:`capability_gradients` returns
   ``(f_i, c_i)`` with ``torch.autograd.grad``, leaving ``p.grad`` untouched.

:func:`build_capability_sampler` runs steps 1-3 for every task so that every bad-input error
is raised before training starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import datasets
import torch
from torch import nn
from torch.nn import functional
from transformers.modeling_layers import GradientCheckpointingLayer

from frontier_trainer.self_completion import complete_rows, is_prompt_only
from frontier_trainer.sources import load_capability_source

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value of tokens that are not scored (prompt tokens and padding)."""

MetricFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""A differentiable capability metric: ``metric(model, batch) -> scalar tensor``."""

TokenRow = dict[str, list[int]]
"""One tokenised capability example: ``{"input_ids": [...], "labels": [...]}``."""


# --------------------------------------------------------------------------------------
# Task names
# --------------------------------------------------------------------------------------


def validate_task_names(tasks: Iterable[str]) -> list[str]:
    """Check capability task names and return them as a list, in order.

    Why: a ``dict`` silently keeps the last of two sources given under one name (e.g. two
    ``--capability code=...`` flags), which would drop a capability the user asked to
    protect. Callers that parse ``(task, source)`` pairs pass the names here first.

    Raises:
        ValueError: a name is not a non-empty string, or a task is named twice.
    """
    names = list(tasks)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"capability_datasets: task name {name!r} must be a non-empty string.")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(
            f"capability_datasets: task {duplicates[0]!r} is named more than once "
            f"(duplicated tasks: {duplicates}); give each capability task a unique name."
        )
    return names


def parse_capability_specs(specs: Sequence[str]) -> dict[str, str]:
    """Parse ``["task=source", ...]`` (a CLI form) into ``{task: source}``.

    The first ``=`` separates the task name from the source, so sources may contain ``=``.

    Raises:
        ValueError: an item has no ``=``, an empty side, or a task is named twice.
    """
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        task, sep, source = spec.partition("=")
        task, source = task.strip(), source.strip()
        if not sep or not task or not source:
            raise ValueError(
                f"capability_datasets: cannot parse {spec!r}; expected 'task=source', e.g. "
                "'code=data/humaneval.jsonl'."
            )
        pairs.append((task, source))
    validate_task_names(task for task, _ in pairs)
    return dict(pairs)


def _as_pairs(
    capability_datasets: Mapping[str, str | os.PathLike | datasets.Dataset]
    | Sequence[tuple[str, str | os.PathLike | datasets.Dataset]],
) -> list[tuple[str, str | os.PathLike | datasets.Dataset]]:
    """Normalise a mapping or a sequence of ``(task, source)`` pairs, rejecting duplicates."""
    pairs = (
        list(capability_datasets.items())
        if isinstance(capability_datasets, Mapping)
        else [tuple(pair) for pair in capability_datasets]
    )
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"capability_datasets: expected (task, source) pairs, got {pair!r}.")
    validate_task_names(task for task, _ in pairs)
    return pairs  # type: ignore[return-value]


# Loading (step 1) lives in :mod:`frontier_trainer.sources`, the one registry of source schemes;
# ``load_capability_source`` stays importable from here.


# --------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _string_column(task: str, dataset: datasets.Dataset, column: str) -> list[str]:
    """Read a column as a list of strings, rejecting nulls and non-strings by row index."""
    values = list(dataset[column])
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(
                f"capability_datasets[{task!r}]: column {column!r} row {index} is "
                f"{type(value).__name__} ({value!r:.60}), expected a string. Give conversational "
                "rows as a 'messages' column (scored with the chat template)."
            )
    return values


def conversations_to_prompt_completion(task: str, dataset: datasets.Dataset, tokenizer: Any) -> datasets.Dataset:
    """Render conversational rows (``messages`` ending with an assistant turn) with the chat template.

    Why: DPO trains on conversations in the chat-template format, so the capability a user protects
    must be scored in that format (issue 15 §3). The prompt is
    ``apply_chat_template(messages[:-1], add_generation_prompt=True)``; the completion is the rest of
    ``apply_chat_template(messages)`` after that prompt (the answer and the template's end-of-turn
    text), or the assistant's content when the full rendering does not start with the prompt.

    Raises:
        ValueError: naming the task, when the tokenizer has no chat template, or a row is not a
            non-empty list of ``{"role", "content"}`` messages ending with an assistant turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"capability_datasets[{task!r}]: conversational rows ('messages') are scored with the chat template, "
            "but the tokenizer has none; set tokenizer.chat_template or give prompt/completion rows."
        )
    rows: list[dict[str, str]] = []
    for index, messages in enumerate(dataset["messages"]):
        valid = (
            isinstance(messages, Sequence)
            and len(messages) >= 2
            and all(isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in messages)
        )
        if not valid or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"capability_datasets[{task!r}]: column 'messages' row {index} must be a list of at least two "
                "{'role', 'content'} messages ending with an 'assistant' turn (a conversation ending with a user "
                "turn is prompt-only: the trainer completes it with the model itself, for the whole source)."
            )
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        prompt = tokenizer.apply_chat_template(clean[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(clean, tokenize=False)
        completion = full[len(prompt) :] if full.startswith(prompt) else clean[-1]["content"]
        rows.append({"prompt": prompt, "completion": completion})
    return datasets.Dataset.from_list(rows)


def tokenize_capability_dataset(
    task: str,
    dataset: datasets.Dataset,
    tokenizer: Any,
    max_length: int | None,
) -> list[TokenRow]:
    """Validate and tokenise one task's rows into ``input_ids`` / ``labels`` lists.

    Row formats (checked in this order):

    * ``{"prompt", "completion"}``: ``ids = tokenizer(prompt + completion)["input_ids"]``
      with the tokenizer's default special tokens (e.g. a BOS it prepends, or an EOS its
      post-processor appends) and nothing else appended. ``labels`` copy ``ids`` with the
      prompt part set to ``-100``. The prompt part is the longest common prefix of
      ``tokenizer(prompt)`` and ``tokenizer(prompt + completion)``: when tokens merge across
      the boundary (byte-level BPE with the leading space at the end of the prompt) the
      prompt's last token is not a prefix, and the merged token is then scored as part of
      the completion. Same rule as TRL's DPO tokenisation; put the leading space on the
      completion to avoid it. A leading BOS is part of the common prefix, so it is masked.
    * ``{"text"}``: ``labels == input_ids``; every token is scored except the first, which
      no position predicts (the metric uses the next-token shift).
    * ``{"messages"}`` ending with an assistant turn: rendered with the chat template by
      :func:`conversations_to_prompt_completion`, then scored as prompt/completion.

    ``max_length`` (the trainer's ``capability_max_length``) is applied to the full
    sequence; longer rows are dropped, not truncated, with a logged count, because
    truncating would silently change what the metric measures. Rows with no scored token
    (empty completion, one-token text) are dropped too.

    Returns:
        One ``{"input_ids": list[int], "labels": list[int]}`` per kept row, in dataset order.

    Raises:
        ValueError: naming the task and field, for an empty dataset, missing columns,
            non-string values, or when no row is left (all too long / nothing to score).
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"capability_max_length must be at least 2 or None, got {max_length}.")
    columns = list(dataset.column_names)
    if "messages" in columns and not ({"prompt", "completion"} <= set(columns) or "text" in columns):
        if len(dataset) == 0:
            raise ValueError(f"capability_datasets[{task!r}]: the dataset is empty (0 rows).")
        dataset = conversations_to_prompt_completion(task, dataset, tokenizer)
        columns = list(dataset.column_names)
    if {"prompt", "completion"} <= set(columns):
        kind = "prompt/completion"
    elif "text" in columns:
        kind = "text"
    else:
        missing = [c for c in ("prompt", "completion") if c not in columns]
        raise ValueError(
            f"capability_datasets[{task!r}]: missing column(s) {missing} (or a 'text' column); a "
            f"capability dataset needs 'prompt' and 'completion' columns, or a 'text' column. "
            f"Found columns: {columns}."
        )
    if len(dataset) == 0:
        raise ValueError(f"capability_datasets[{task!r}]: the dataset is empty (0 rows).")

    if kind == "prompt/completion":
        prompts = _string_column(task, dataset, "prompt")
        completions = _string_column(task, dataset, "completion")
        full_ids = tokenizer([p + c for p, c in zip(prompts, completions, strict=True)])["input_ids"]
        prompt_ids = tokenizer(prompts)["input_ids"]
    else:
        full_ids = tokenizer(_string_column(task, dataset, "text"))["input_ids"]
        prompt_ids = [[] for _ in full_ids]

    rows: list[TokenRow] = []
    too_long = nothing_scored = merged_boundary = 0
    for ids, p_ids in zip(full_ids, prompt_ids, strict=True):
        ids = list(ids)
        if max_length is not None and len(ids) > max_length:
            too_long += 1
            continue
        boundary = _common_prefix_length(p_ids, ids)
        if boundary < len(p_ids):
            merged_boundary += 1
        labels = [IGNORE_INDEX] * boundary + ids[boundary:]
        # Position 0 is never predicted (next-token shift), so it never counts as scored.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            nothing_scored += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})

    if merged_boundary:
        logger.warning(
            "capability task %r: in %d row(s) the tokenised prompt is not a prefix of the tokenised "
            "prompt+completion (tokens merged across the boundary); the mask boundary is their "
            "longest common prefix. Put the leading space on the completion to avoid this.",
            task,
            merged_boundary,
        )
    if too_long:
        logger.warning(
            "capability task %r: dropped %d of %d row(s) longer than capability_max_length=%s tokens.",
            task,
            too_long,
            len(full_ids),
            max_length,
        )
    if nothing_scored:
        logger.warning(
            "capability task %r: dropped %d row(s) with no scored token (empty completion or "
            "one-token text).",
            task,
            nothing_scored,
        )
    if not rows:
        if too_long:
            raise ValueError(
                f"capability_datasets[{task!r}]: every row is longer than capability_max_length="
                f"{max_length} tokens ({too_long} too long, {nothing_scored} with nothing to score); "
                "raise capability_max_length or shorten the rows."
            )
        field = "completion" if kind == "prompt/completion" else "text"
        raise ValueError(
            f"capability_datasets[{task!r}]: no row has a token to score in column {field!r} "
            "(empty completions, or texts of one token)."
        )
    return rows


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def _permutation_seed(seed: int, task: str, epoch: int) -> int:
    """A 63-bit generator seed that depends only on ``(seed, task name, epoch)``.

    The task *name*, not its position, enters the seed, so reordering the tasks between
    runs or ranks does not change any task's batches. SHA-256 keeps it stable across
    Python processes (``hash(str)`` is salted per process).
    """
    digest = hashlib.sha256(f"{seed}\x00{task}\x00{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class CapabilitySampler:
    """Draws right-padded capability batches per task, identically on every rank.

    Each task walks through a fresh random permutation of its rows every epoch, taking
    ``batch_size`` rows at a time. The permutation is drawn from a ``torch.Generator``
    seeded from ``(seed, task name, epoch)`` only, so samplers built on different ranks
    with the same rows and seed yield byte-identical batches with no communication; the
    resulting capability directions are then identical on every rank (given identical
    weights), and DDP replicas cannot drift apart.

    A task with fewer rows than ``batch_size`` uses batches of all its rows. An epoch ends
    when fewer than one batch of rows is left (drop-last), so a batch never repeats a row;
    the rows left out differ from epoch to epoch.

    ``state_dict()`` captures the data position (epoch and cursor per task);
    ``load_state_dict()`` restores it, so a resumed run draws exactly the batches the
    uninterrupted run would have drawn.

    Memory: the token rows are held as Python lists of ints (capability sets are small);
    one permutation of ``len(rows)`` int64 per task.
    """

    STATE_VERSION = 1

    def __init__(
        self,
        rows: Mapping[str, Sequence[TokenRow]],
        batch_size: int = 8,
        seed: int = 0,
        pad_token_id: int = 0,
    ) -> None:
        """Build a sampler over ``{task: tokenised rows}`` (see :func:`tokenize_capability_dataset`).

        Raises:
            ValueError: no task, a task with no rows, or ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"capability batch_size must be >= 1, got {batch_size}.")
        if not rows:
            raise ValueError("CapabilitySampler needs at least one capability task.")
        for task, task_rows in rows.items():
            if len(task_rows) == 0:
                raise ValueError(f"capability_datasets[{task!r}]: no tokenised rows to sample from.")
        self.rows: dict[str, list[TokenRow]] = {task: list(task_rows) for task, task_rows in rows.items()}
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pad_token_id = int(pad_token_id)
        self._epoch: dict[str, int] = dict.fromkeys(self.rows, 0)
        self._cursor: dict[str, int] = dict.fromkeys(self.rows, 0)
        self._perm: dict[str, torch.Tensor] = {}

    @property
    def tasks(self) -> list[str]:
        """Task names, in construction order."""
        return list(self.rows)

    def task_batch_size(self, task: str) -> int:
        """Rows per batch for ``task``: ``min(batch_size, number of rows)``."""
        return min(self.batch_size, len(self.rows[task]))

    def _permutation(self, task: str) -> torch.Tensor:
        """The row order of ``task``'s current epoch (cached)."""
        perm = self._perm.get(task)
        if perm is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(_permutation_seed(self.seed, task, self._epoch[task]))
            perm = torch.randperm(len(self.rows[task]), generator=generator)
            self._perm[task] = perm
        return perm

    def next_indices(self, task: str) -> list[int]:
        """Advance ``task``'s position by one batch and return the row indices drawn."""
        if task not in self.rows:
            raise KeyError(f"unknown capability task {task!r}; known tasks: {self.tasks}.")
        size = self.task_batch_size(task)
        if self._cursor[task] + size > len(self.rows[task]):
            self._epoch[task] += 1
            self._cursor[task] = 0
            self._perm.pop(task, None)
        start = self._cursor[task]
        indices = self._permutation(task)[start : start + size].tolist()
        self._cursor[task] = start + size
        return indices

    def collate(
        self, task: str, indices: Sequence[int], device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-pad the given rows of ``task`` into ``input_ids``, ``attention_mask``, ``labels``.

        Right padding keeps position ids of real tokens at ``0..len-1`` without needing
        ``position_ids``; padded positions get ``labels == -100``.
        """
        batch_rows = [self.rows[task][i] for i in indices]
        width = max(len(row["input_ids"]) for row in batch_rows)
        input_ids = torch.full((len(batch_rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
        labels = torch.full((len(batch_rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(batch_rows):
            n = len(row["input_ids"])
            input_ids[r, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            attention_mask[r, :n] = 1
            labels[r, :n] = torch.tensor(row["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if device is not None:
            batch = {key: value.to(device) for key, value in batch.items()}
        return batch

    def next_batch(self, task: str, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Draw ``task``'s next batch (advancing its data position)."""
        return self.collate(task, self.next_indices(task), device=device)

    def state_dict(self) -> dict[str, Any]:
        """The data position: plain Python values, safe for ``torch.save(weights_only=True)``."""
        return {
            "version": self.STATE_VERSION,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "tasks": {
                task: {"epoch": self._epoch[task], "cursor": self._cursor[task], "num_rows": len(rows)}
                for task, rows in self.rows.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a data position saved by :meth:`state_dict`.

        The saved seed and batch size win over the constructor's, with a warning when they
        differ, because resuming must draw the batches the interrupted run would have drawn.
        A task absent from the state starts at its beginning; a saved task that no longer
        exists is ignored; a task whose row count changed (the data or the tokenizer
        changed) keeps its epoch but restarts at cursor 0, all with a warning.
        """
        version = state.get("version")
        if version != self.STATE_VERSION:
            raise ValueError(f"unsupported capability sampler state version {version!r}.")
        if int(state["seed"]) != self.seed or int(state["batch_size"]) != self.batch_size:
            logger.warning(
                "capability sampler: resuming with the checkpoint's seed=%s batch_size=%s instead of "
                "seed=%s batch_size=%s.",
                state["seed"],
                state["batch_size"],
                self.seed,
                self.batch_size,
            )
            self.seed, self.batch_size = int(state["seed"]), int(state["batch_size"])
        saved_tasks: Mapping[str, Mapping[str, int]] = state["tasks"]
        for task in saved_tasks:
            if task not in self.rows:
                logger.warning("capability sampler: checkpoint task %r is not configured; ignored.", task)
        self._perm.clear()
        for task, rows in self.rows.items():
            saved = saved_tasks.get(task)
            if saved is None:
                logger.warning("capability sampler: task %r is not in the checkpoint; starting afresh.", task)
                self._epoch[task], self._cursor[task] = 0, 0
                continue
            self._epoch[task], self._cursor[task] = int(saved["epoch"]), int(saved["cursor"])
            if int(saved["num_rows"]) != len(rows):
                logger.warning(
                    "capability sampler: task %r had %s rows at checkpoint time and has %d now; "
                    "restarting its epoch %d at the beginning.",
                    task,
                    saved["num_rows"],
                    len(rows),
                    self._epoch[task],
                )
                self._cursor[task] = 0


def complete_prompt_only_sources(
    capability_datasets: Mapping[str, str | os.PathLike | datasets.Dataset]
    | Sequence[tuple[str, str | os.PathLike | datasets.Dataset]],
    model: nn.Module,
    tokenizer: Any,
    *,
    split: str = "train",
    max_new_tokens: int = 64,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, str | os.PathLike | datasets.Dataset]:
    """Complete every prompt-only capability source once with ``model`` itself (issue 15 §3).

    A source whose rows have only ``prompt`` (or ``messages`` ending with a user turn) has no
    answer to protect; its rows become ``prompt``/``completion`` rows with the model's own greedy
    answers (:func:`frontier_trainer.self_completion.complete_rows`, cached with provenance under
    ``$FRONTIER_TRAINER_CACHE/completions``), so the null-space step keeps what the model would
    have said — e.g. its helpful answers to benign prompts (over-refusal). Other sources are
    returned unchanged (not loaded twice: only prompt-only ones are replaced by a Dataset).

    Called by the trainer after the model is built and before the capability sampler, so the
    degradation tracker and the sampler see the same completed rows.

    Raises:
        ValueError: naming the task, for an empty prompt, or a source mixing prompt-only and
            completed rows (before any training).
    """
    out: dict[str, str | os.PathLike | datasets.Dataset] = {}
    for task, source in _as_pairs(capability_datasets):
        dataset = load_capability_source(task, source, split=split)
        if is_prompt_only(task, dataset):
            out[task] = complete_rows(
                task,
                dataset,
                model,
                tokenizer,
                max_new_tokens=max_new_tokens,
                cache_dir=cache_dir,
            )
        else:
            out[task] = source
    return out


def build_capability_sampler(
    capability_datasets: Mapping[str, str | os.PathLike | datasets.Dataset]
    | Sequence[tuple[str, str | os.PathLike | datasets.Dataset]],
    tokenizer: Any,
    max_length: int | None,
    batch_size: int = 8,
    seed: int = 0,
    split: str = "train",
) -> CapabilitySampler:
    """Load, validate and tokenise every capability source, and build the sampler.

    Meant to be called in the trainer's ``__init__`` so that every bad-input error (task
    named twice, missing path, empty dataset, missing columns, all rows too long) is raised
    before training starts. The pad id is the tokenizer's ``pad_token_id``, else its
    ``eos_token_id``, else 0 (padded positions are masked and unscored, so its value only
    matters for readability).
    """
    rows: dict[str, list[TokenRow]] = {}
    for task, source in _as_pairs(capability_datasets):
        dataset = load_capability_source(task, source, split=split)
        rows[task] = tokenize_capability_dataset(task, dataset, tokenizer, max_length)
        origin = "an in-memory Dataset" if isinstance(source, datasets.Dataset) else repr(source)
        logger.info("capability task %r: %d row(s) from %s.", task, len(rows[task]), origin)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    return CapabilitySampler(rows, batch_size=batch_size, seed=seed, pad_token_id=pad_id or 0)


# --------------------------------------------------------------------------------------
# Metric and gradients
# --------------------------------------------------------------------------------------


def completion_metric(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The default capability metric: mean log-likelihood of the scored tokens of a batch.

    ``f = -(sum of token NLL over labels != -100) / (number of such tokens)``, pooled over
    the whole batch (a token-weighted mean, not a mean of per-row means), with the standard
    next-token shift: logits at position ``t`` predict ``labels[t + 1]``. Logits are upcast
    to at least float32 before the log-softmax (a float64 model stays float64).

    Raises:
        ValueError: the batch has no scored token.
    """
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = outputs.logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shift_logits = logits[:, :-1, :]
    shift_labels = batch["labels"][:, 1:].to(shift_logits.device)
    count = (shift_labels != IGNORE_INDEX).sum()
    if int(count) == 0:
        raise ValueError("capability batch has no scored token (all labels are -100 after the shift).")
    nll = functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return -nll / count


def refusal_avoidance_metric(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """−(mean log-likelihood of the refusal) on refusal-hold rows: the capability "does not refuse here".

    The ``capability_metrics`` entry for a :func:`frontier_trainer.benign.refusal_hold_dataset` task (that
    module's docstring says why). Its direction is −∇ log p(y_refuse | x_benign), so frontier mode's ε
    (⟨ĉ_i, δ⟩ ≥ −ε_i‖u‖, which bounds a capability's loss only) bounds the refusal's per-step *rise* on
    benign prompts; null-space mode is unchanged (a projection does not see a direction's sign).
    ``frontier/capability_loss/<task>`` is then the refusal's mean log-likelihood (a rise is a loss).
    """
    return -completion_metric(model, batch)


def _is_active_checkpointing_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers layer that checkpoints its forward in train mode."""
    return isinstance(module, GradientCheckpointingLayer) and bool(module.gradient_checkpointing)


@contextmanager
def deterministic_forward(model: nn.Module) -> Iterator[None]:
    """Turn dropout off for the duration, keeping gradient checkpointing active.

    Why not ``model.eval()``: transformers' ``GradientCheckpointingLayer`` checkpoints only
    when ``self.training`` is true, so ``eval()`` would silently disable checkpointing and
    hold every activation of the capability batch. Instead every submodule is put in eval
    mode *except* the checkpointing layers themselves (their children, where dropout lives,
    are in eval mode). Every module's previous ``training`` flag is restored on exit.

    Why dropout off: directions must be identical on every rank and reproducible on
    resume; dropout masks would make them depend on each rank's RNG stream and consume
    random numbers the training step would otherwise use. Caveat: a model whose
    checkpointing layer applies functional dropout keyed on its own ``self.training``
    would keep that dropout on.
    """
    previous = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in previous:
            module.training = module.training and _is_active_checkpointing_layer(module)
        yield
    finally:
        for module, flag in previous:
            module.training = flag


def capability_gradients(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batch: Mapping[str, torch.Tensor],
    metric: MetricFn = completion_metric,
    deterministic: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Evaluate ``metric(model, batch)`` and its gradient over ``params``.

    Uses ``torch.autograd.grad`` rather than ``backward``, so ``p.grad`` (and therefore
    gradient accumulation of the training step) is left untouched. Works in train mode with
    non-reentrant gradient checkpointing (reentrant checkpointing does not support
    ``autograd.grad``) and with PEFT models (pass only the adapter parameters). Pass the
    *unwrapped* model (``accelerator.unwrap_model``): a DDP wrapper's forward would
    arm its gradient-reduction hooks for a backward that never comes.

    With ``deterministic=True`` dropout is off during the evaluation (see
    :func:`deterministic_forward`); the model's modes are restored afterwards.

    Memory: one activation graph of the capability batch (reduced by checkpointing) plus the
    returned gradients, one tensor per parameter with the parameter's shape, dtype and
    device: k directions cost k x the trainable-parameter bytes, nothing is concatenated.

    Returns:
        ``(value, grads)``: the detached scalar metric and one gradient per parameter, in
        order; a parameter the metric does not depend on gets zeros.

    Raises:
        ValueError: ``params`` is empty or holds a tensor that does not require grad.
    """
    params = list(params)
    if not params:
        raise ValueError("capability_gradients: no trainable parameters given.")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"capability_gradients: {len(frozen)} parameter(s) do not require grad (first at index "
            f"{frozen[0]}); pass only trainable parameters."
        )
    device = params[0].device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.enable_grad():
        if deterministic:
            with deterministic_forward(model):
                value = metric(model, batch)
                grads = torch.autograd.grad(value, params, allow_unused=True)
        else:
            value = metric(model, batch)
            grads = torch.autograd.grad(value, params, allow_unused=True)
    if value.dim() != 0:
        raise ValueError(f"capability metric must return a scalar, got shape {tuple(value.shape)}.")
    out = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return value.detach(), out


# --------------------------------------------------------------------------------------
# Parameter-list vector helpers
# --------------------------------------------------------------------------------------


def list_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner product of two vectors stored as lists of per-parameter tensors.

    Accumulates per-parameter dot products in float64 without concatenating anything:
    extra memory is one float64 copy of the largest single parameter (for the upcast), not
    of the whole model. This is the building block of Gram matrices ``G[i, j] =
    list_dot(c_i, c_j)``; under sharding, all-reduce the partial sums.
    """
    if len(a) != len(b):
        raise ValueError(f"list_dot: {len(a)} vs {len(b)} tensors.")
    total = torch.zeros((), dtype=torch.float64, device=a[0].device if a else "cpu")
    for x, y in zip(a, b, strict=True):
        total = total + torch.dot(x.reshape(-1).double(), y.reshape(-1).double()).to(total.device)
    return total


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one 1-D tensor (a full copy: use for tests and small models only)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a 1-D tensor into views shaped like ``like`` (inverse of :func:`flatten`, no copy)."""
    sizes = [t.numel() for t in like]
    if flat.numel() != sum(sizes):
        raise ValueError(f"unflatten: {flat.numel()} elements for shapes totalling {sum(sizes)}.")
    return [chunk.view_as(t) for chunk, t in zip(flat.split(sizes), like, strict=True)]
