"""Capability rows that keep a model helpful on benign prompts while it learns to refuse (issue 15 §3).

Why over-refusal happens, at first order: a DPO step raises log p(y_refuse | x_harmful). Wherever a
benign prompt x_benign shares features with the harmful ones, the same parameter change raises
log p(y_refuse | x_benign) too: the model learns to refuse what *looks like* a harmful request.
Protecting the model's own answers on benign prompts (a prompt-only source, completed by the model)
does not stop this: greedy decoding flips to the refusal as soon as the refusal overtakes the
answer, and the refusal can gain mass without the answer losing much.

The rows built here name the quantity that moves: each pairs a benign prompt with one of the
preference data's *preferred* (refusing) responses. Given to the trainer as a capability task, the
null-space rule removes the step's component along ∇ log p(y_refuse | x_benign) (Thm 4.3 applied to
this task: zero first-order change of that log-likelihood), so the refusal's likelihood on benign
prompts is held, not pushed down: the harmlessness–helpfulness tradeoff of §6 handled as one more
protected direction.

Frontier mode bounds a capability's *loss* only (⟨ĉ_i, δ⟩ ≥ −ε_i‖u‖, Thm 4.1): with the default metric
(the refusal's log-likelihood) it would stop the refusal on benign prompts from *falling* and let it rise
freely, which is no hold at all. :func:`frontier_trainer.directions.refusal_avoidance_metric` turns the
quantity round: its value is −log p(y_refuse | x_benign), so its loss is the refusal's rise, and ε_i
bounds that rise per step,
⟨∇ log p(y_refuse | x_benign), δ⟩ ≤ ε_i‖u‖: the refusal-versus-over-refusal trade of §6 at a chosen
point. Null-space mode is the same with either metric (a projection does not see a direction's sign).

The rows :func:`refusal_hold_dataset` returns carry a tag (:data:`REFUSAL_HOLD_TAG`, in the dataset's
``info.description``; ``select``, ``shuffle``, ``map``, ``filter`` and ``save_to_disk`` keep it, a round
trip through Python lists drops it), and the trainer scores a tagged task with the avoidance metric unless
``capability_metrics`` names another: a user who passes the rows and nothing else gets the hold that
frontier mode's ε documents, not a silent one-sided bound.

Typical use::

    from frontier_trainer.benign import refusal_hold_dataset
    hold = refusal_hold_dataset(benign_prompts, preference_dataset["chosen"], n=256)
    trainer = FrontierDPOTrainer(..., capability_datasets={**tasks, "refusal_on_benign": hold})
    # trainer.capability_metrics["refusal_on_benign"] is refusal_avoidance_metric (logged at construction)
    # frontier mode, other tasks held exactly, the refusal on benign prompts allowed to rise by ε = 0.1:
    # FrontierDPOConfig(projection="frontier", capability_tolerance={"refusal_on_benign": 0.1}, ...)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

REFUSAL_HOLD_TAG = "frontier_trainer.benign.refusal_hold_dataset"
"""How :func:`refusal_hold_dataset` marks its rows (the start of ``Dataset.info.description``), so that the
trainer scores them with :func:`frontier_trainer.directions.refusal_avoidance_metric` by default."""


def is_refusal_hold(dataset: Any) -> bool:
    """Whether ``dataset`` is a ``Dataset`` built by :func:`refusal_hold_dataset` (it carries the tag)."""
    return isinstance(dataset, datasets.Dataset) and (dataset.info.description or "").startswith(REFUSAL_HOLD_TAG)


def _is_conversation(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(m, Mapping) for m in value)
    )


def _as_messages(field: str, index: int, value: Any, role: str) -> list[dict[str, str]]:
    """A string or a list of messages as a list of ``{"role", "content"}`` messages, checked."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{field}[{index}] is empty; drop empty rows before building refusal-hold rows.")
        return [{"role": role, "content": value}]
    if not _is_conversation(value) or not value:
        raise ValueError(
            f"{field}[{index}] is a {type(value).__name__}; give strings or lists of {{'role', 'content'}} messages."
        )
    messages = [{"role": str(m.get("role")), "content": m.get("content")} for m in value]
    if any(not isinstance(m["content"], str) or not m["content"].strip() for m in messages):
        raise ValueError(f"{field}[{index}] has a message without text content.")
    return messages


def _column(field: str, rows: Any, column: str) -> list[Any]:
    if isinstance(rows, datasets.Dataset):
        if column not in rows.column_names:
            raise ValueError(
                f"{field}: the dataset has columns {rows.column_names}; it needs a {column!r} column."
            )
        return list(rows[column])
    if isinstance(rows, str) or not isinstance(rows, Sequence):
        raise ValueError(
            f"{field}: pass a sequence of rows or a datasets.Dataset, got {type(rows).__name__}."
        )
    return list(rows)


def refusal_hold_dataset(
    prompts: Sequence[Any] | datasets.Dataset,
    responses: Sequence[Any] | datasets.Dataset,
    *,
    n: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Rows (benign prompt, preferred response) whose likelihood the trainer should hold.

    Args:
        prompts: benign prompts: strings, user-turn message lists, or a ``Dataset`` with a ``prompt``
            column (for example the prompt-only sources ``lab:benign`` / ``real:benign``). They must
            be disjoint from any prompt the over-refusal is evaluated on.
        responses: the preference data's preferred responses (its ``chosen`` column, or a ``Dataset``
            with one): strings or assistant-turn message lists.
        n: rows to build (default: one per prompt); prompts are cycled when ``n`` exceeds them.
        seed: the pairing of prompts with responses is a seeded shuffle, so every response type is
            represented and the rows are reproducible.

    Returns:
        ``prompt``/``completion`` string rows when prompts and responses are plain text; a ``messages``
        column (user turn(s), then the assistant's response; scored with the chat template, the format
        DPO trains with) when either is conversational. Tagged with :data:`REFUSAL_HOLD_TAG`.

    Raises:
        ValueError: naming ``prompts`` or ``responses`` for an empty input, an empty row, a missing
            column, or ``n`` < 1.
    """
    prompt_rows = _column("prompts", prompts, "prompt")
    response_rows = _column("responses", responses, "chosen")
    if not prompt_rows:
        raise ValueError("prompts: no benign prompts given; refusal-hold rows need at least one.")
    if not response_rows:
        raise ValueError(
            "responses: no preferred responses given; pass the preference data's 'chosen' column."
        )
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n={n!r}: pass a positive number of rows, or None for one per prompt.")
    count = len(prompt_rows) if n is None else n
    rng = random.Random(seed)
    order = list(range(len(response_rows)))
    rng.shuffle(order)
    pairs = [(prompt_rows[i % len(prompt_rows)], response_rows[order[i % len(order)]]) for i in range(count)]
    conversational = any(_is_conversation(p) for p, _ in pairs) or any(_is_conversation(r) for _, r in pairs)
    if not conversational:
        for field, rows in (("prompts", [p for p, _ in pairs]), ("responses", [r for _, r in pairs])):
            for index, value in enumerate(rows):
                _as_messages(field, index, value, "user")  # the same checks as the conversational path
        return datasets.Dataset.from_dict(
            {"prompt": [p for p, _ in pairs], "completion": [r for _, r in pairs]}, info=_tagged_info()
        )
    messages = []
    for index, (p, r) in enumerate(pairs):
        user = _as_messages("prompts", index, p, "user")
        answer = _as_messages("responses", index, r, "assistant")
        if user[-1]["role"] != "user":
            raise ValueError(f"prompts[{index}] must end with a user turn, got {user[-1]['role']!r}.")
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            raise ValueError(
                f"responses[{index}] must be one assistant turn, got roles {[m['role'] for m in answer]}."
            )
        messages.append(user + answer)
    return datasets.Dataset.from_dict({"messages": messages}, info=_tagged_info())


def _tagged_info() -> datasets.DatasetInfo:
    return datasets.DatasetInfo(
        description=f"{REFUSAL_HOLD_TAG}: benign prompts paired with preferred (refusing) responses; the trainer "
        "scores them with refusal_avoidance_metric unless capability_metrics names another metric."
    )


__all__ = ["REFUSAL_HOLD_TAG", "is_refusal_hold", "refusal_hold_dataset"]
