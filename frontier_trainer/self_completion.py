"""Capability rows without answers, completed once by the model itself (issue 15 §3).

To keep a behaviour for which no reference answers exist — the model's helpful answers to benign
prompts (over-refusal), or any task given only as prompts — protect the likelihood of the model's
*own* answers: generate them once, greedily, before training, and use the result as an ordinary
``prompt``/``completion`` capability task. The null-space step then keeps, to first order, the log
likelihood of what the base model would have said (Thm 4.3 applied to f_i = mean log p(own answer)).

* A source is *prompt-only* when its rows have a ``prompt`` column and no ``completion``/``text``
  column, or a ``messages`` column whose conversations end with a user turn.
* With a chat template the prompt is rendered with ``apply_chat_template(...,
  add_generation_prompt=True)``: the rows are scored in the format DPO trains with.
* The completion is the greedy continuation up to and including the first eos token (kept: the
  model's decision to stop is part of its behaviour), decoded with special tokens.
* Results are cached under ``<cache>/completions/<key>/`` (``rows.jsonl`` + ``provenance.json``);
  the key hashes the model's weights, the tokenizer (vocabulary and chat template), the generation
  settings and the prompts, so a second run reads the cache and a changed model regenerates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

COMPLETION_VERSION = 1
"""Bumped when the completion procedure changes, so stale caches are not reused."""


def default_cache_dir() -> Path:
    """``$FRONTIER_TRAINER_CACHE/completions`` or ``~/.cache/frontier_trainer/completions``."""
    root = os.environ.get("FRONTIER_TRAINER_CACHE") or Path.home() / ".cache" / "frontier_trainer"
    return Path(root) / "completions"


# --------------------------------------------------------------------------------------
# Which rows need completing
# --------------------------------------------------------------------------------------


def _is_user_only(messages: Any) -> bool:
    return (
        isinstance(messages, Sequence)
        and len(messages) > 0
        and all(isinstance(m, Mapping) for m in messages)
        and messages[-1].get("role") == "user"
    )


def is_prompt_only(task: str, dataset: datasets.Dataset) -> bool:
    """Whether a capability dataset has prompts but no answers (and so needs :func:`complete_rows`).

    A ``completion`` column that is empty (``None`` or ``""``) in every row counts as prompt-only.

    Raises:
        ValueError: naming the task, when some rows have answers and others do not (a source
            mixing prompt-only and completed rows).
    """
    columns = set(dataset.column_names)
    if "text" in columns:
        return False
    if "completion" in columns:
        answered = [bool(c) for c in dataset["completion"]]
        if all(answered):
            return False
        if any(answered):
            raise ValueError(
                f"capability_datasets[{task!r}]: {answered.count(False)} of {len(answered)} rows have an empty "
                "'completion' while the others have one: the source mixes prompt-only and completed rows. Split "
                "it into two tasks, or drop the 'completion' column so that the model completes every row."
            )
        return "prompt" in columns
    if "prompt" in columns:
        return True
    return "messages" in columns and any(_is_user_only(m) for m in dataset["messages"])


def _prompts(task: str, dataset: datasets.Dataset) -> list[str | list[dict[str, str]]]:
    """The rows' prompts (strings or user-turn conversations), validated."""
    if len(dataset) == 0:
        raise ValueError(f"capability_datasets[{task!r}]: the dataset is empty (0 rows).")
    column = "prompt" if "prompt" in dataset.column_names else "messages"
    values = dataset[column]
    out: list[str | list[dict[str, str]]] = []
    kinds = set()
    for i, value in enumerate(values):
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(
                    f"capability_datasets[{task!r}]: row {i} has an empty {column!r}; a prompt-only source "
                    "is completed by the model, so every row needs a non-empty prompt. Drop or fill that row."
                )
            kinds.add("prompt-only")
            out.append(value)
        elif _is_user_only(value):
            if not all(isinstance(m.get("content"), str) and m["content"].strip() for m in value):
                raise ValueError(
                    f"capability_datasets[{task!r}]: row {i} has a message with empty content; fill or drop it."
                )
            kinds.add("prompt-only")
            out.append([{"role": m["role"], "content": m["content"]} for m in value])
        elif isinstance(value, Sequence) and value and isinstance(value[-1], Mapping):
            kinds.add("completed")
        else:
            raise ValueError(
                f"capability_datasets[{task!r}]: row {i} column {column!r} is {type(value).__name__}; expected "
                "a string prompt or a list of {'role', 'content'} messages."
            )
    if kinds == {"completed"}:
        raise ValueError(
            f"capability_datasets[{task!r}]: every conversation already ends with an assistant turn; it is not "
            "prompt-only. Give it as prompt/completion rows instead."
        )
    if len(kinds) > 1:
        raise ValueError(
            f"capability_datasets[{task!r}]: the source mixes prompt-only rows (ending with a user turn) and "
            "completed rows (ending with an assistant turn). Split it into two tasks, or drop the answers so that "
            "the model completes every row."
        )
    return out


# --------------------------------------------------------------------------------------
# Fingerprints and cache
# --------------------------------------------------------------------------------------


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's and buffer's name, dtype, shape and bytes (the weights the
    model would answer with: for a PEFT model the adapter included)."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type == "meta":
            raise ValueError(f"model_fingerprint: tensor {name!r} is on the meta device; load the weights first.")
        t = t.cpu().contiguous()
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    payload = {
        "vocab": vocab,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _rows_fingerprint(prompts: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


def _render(tokenizer: Any, prompt: str | list[dict[str, str]], use_chat_template: bool) -> str:
    if use_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        raise ValueError(
            "a conversational (messages) prompt needs a tokenizer with a chat template; set tokenizer.chat_template."
        )
    return prompt


def special_token_ids(model: nn.Module, tokenizer: Any) -> tuple[int, list[int]]:
    """``(pad_id, eos_ids)`` for generation: the model's generation-config eos id(s) plus the
    tokenizer's eos; pad is the tokenizer's pad token, else the first eos.

    Raises:
        ValueError: neither the tokenizer nor the model defines an eos token.
    """
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured is not None:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer and the model define no eos token; generation could not stop.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
    return int(pad), ids


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "self-complete",
) -> list[str]:
    """Greedy continuation of each text (left-padded batches, longest first), cut after the first
    eos token, which is kept; decoded with special tokens so the eos survives as text."""
    pad_id, eos_ids = special_token_ids(model, tokenizer)
    encoded = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if any(not ids for ids in encoded):
        raise ValueError("self-completion: a prompt tokenised to zero tokens.")
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, i in enumerate(batch):
                input_ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
            )[:, width:].tolist()
            for i, ids in zip(batch, generated, strict=True):
                cut = next((k + 1 for k, token in enumerate(ids) if token in eos_ids), len(ids))
                out[i] = tokenizer.decode(ids[:cut], skip_special_tokens=False)
    finally:
        model.train(was_training)
    return out


def complete_rows(
    task: str,
    dataset: datasets.Dataset,
    model: nn.Module,
    tokenizer: Any,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """Complete a prompt-only capability source with the model's own greedy answers, once.

    Returns a ``prompt``/``completion`` dataset (prompt rendered with the chat template when the
    tokenizer has one) ready for the capability sampler. A cached result with the same key is read
    back instead of generating; the key covers the weights, tokenizer, settings and prompts.

    Raises:
        ValueError: naming the task, for an empty source, an empty prompt, or a source mixing
            prompt-only and completed rows.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"self-completion of {task!r}: max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}."
        )
    prompts = _prompts(task, dataset)
    use_chat = bool(getattr(tokenizer, "chat_template", None))
    settings = {
        "version": COMPLETION_VERSION,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "chat_template": use_chat,
    }
    provenance = {
        "task": task,
        "model_sha256": model_fingerprint(model),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "prompts_sha256": _rows_fingerprint(prompts),
        "n_rows": len(prompts),
        "settings": settings,
    }
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:24]
    entry = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = entry / key
    rows_path = entry / "rows.jsonl"
    if rows_path.is_file() and (entry / "provenance.json").is_file():
        logger.info("capability task %r: reading the model's own completions from %s", task, entry)
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line]
        if len(rows) == len(prompts):
            return datasets.Dataset.from_list(rows)
        logger.warning("cached completions in %s are incomplete; regenerating", entry)
    rendered = [_render(tokenizer, p, use_chat) for p in prompts]
    logger.info("capability task %r: completing %d prompt-only rows with the model itself", task, len(rendered))
    completions = greedy_continuations(
        model, tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"complete {task}"
    )
    rows = [{"prompt": p, "completion": c} for p, c in zip(rendered, completions, strict=True)]
    empty = sum(1 for c in completions if not c)
    if empty:
        logger.warning("capability task %r: %d completion(s) are empty (the model stopped at once)", task, empty)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True))
    if entry.exists():  # an incomplete earlier entry
        shutil.rmtree(entry)
    os.replace(tmp, entry)
    return datasets.Dataset.from_list(rows)


__all__ = [
    "complete_rows",
    "default_cache_dir",
    "greedy_continuations",
    "is_prompt_only",
    "model_fingerprint",
    "special_token_ids",
    "tokenizer_fingerprint",
]
