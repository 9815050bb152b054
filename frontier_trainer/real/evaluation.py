"""Model-agnostic evaluation: greedy chat generation, KL to the base model, completion NLL, exact match.

Every function takes any Hugging Face causal LM (or a ``peft`` model wrapping one) and its
tokenizer, runs without gradients, puts the model in eval mode for the duration and restores
every submodule's previous ``training`` flag afterwards (so a call in the middle of training
changes nothing), and never changes the tokenizer: prompts are tokenised one by one and
left-padded here, so the tokenizer's ``padding_side`` is not touched.

Generation is greedy (``do_sample=False``, one beam) and therefore deterministic for a given
model, prompt set and batch size. Prompts are left-padded into batches of ``batch_size`` after
sorting by length (less padding); results come back in the input order. With left padding and
an attention mask, batched generation equals one-by-one generation up to floating-point
reduction order (checked in the tests).

Chat prompts (:func:`generate_responses`, :func:`kl_to_base`) go through the tokenizer's chat
template with ``add_generation_prompt=True`` and are tokenised with ``add_special_tokens=False``
(the template already writes any BOS). Plain-text prompts (:func:`exact_match_accuracy`,
:func:`completion_nll`) use ``tokenizer(text)`` with its default special tokens, the same rule as
the trainer's capability metric.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import datasets
import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from frontier_trainer.directions import CapabilitySampler, tokenize_capability_dataset
from frontier_trainer.self_completion import special_token_ids
from frontier_trainer.tracking import dataset_metric

logger = logging.getLogger(__name__)

_EVAL_TASK = "evaluation"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode for the duration; every submodule's ``training`` flag is restored on exit."""
    previous = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for module, flag in previous:
            module.training = flag


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_prompts(prompts: Any, name: str = "prompts") -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(prompts).__name__}.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(prompt).__name__}.")
    return list(prompts)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


#: ``(pad_id, eos_ids)`` for generation; one definition, in the core (self-completion uses it too).
_special_ids = special_token_ids


def _chat_ids(tokenizer: Any, prompt: str, system_prompt: str | None) -> list[int]:
    """Token ids of one chat-templated user turn followed by the assistant generation prompt."""
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; set tokenizer.chat_template (chat prompts are "
            "rendered with apply_chat_template(..., add_generation_prompt=True))."
        )


def _left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        if row:
            input_ids[r, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[r, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches over rows sorted by decreasing length (stable), to reduce padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _greedy_ids(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    desc: str,
) -> list[list[int]]:
    """Greedy continuation ids of each prompt, cut after the first eos (which is kept).

    The caller is responsible for eval mode; runs under ``torch.no_grad``.
    """
    from transformers import GenerationConfig

    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("a prompt tokenised to zero tokens; generation needs at least one token of context.")
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
    )
    device = _device(model)
    eos_set = set(eos_ids)
    results: list[list[int]] = [[] for _ in prompt_ids]
    progress = tqdm(total=len(prompt_ids), desc=desc, unit="prompt", leave=False)
    try:
        with torch.no_grad():
            for batch in _batches([len(ids) for ids in prompt_ids], batch_size):
                input_ids, attention_mask = _left_pad([prompt_ids[i] for i in batch], pad_id, device)
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
                new = output[:, input_ids.shape[1] :].tolist()
                for i, ids in zip(batch, new, strict=True):
                    cut = next((k + 1 for k, token in enumerate(ids) if token in eos_set), len(ids))
                    results[i] = ids[:cut]
                progress.update(len(batch))
    finally:
        progress.close()
    return results


def _decode(tokenizer: Any, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    ids = [token for token in ids if token not in set(eos_ids)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _as_dataset(dataset: Any, columns: Sequence[str], what: str) -> datasets.Dataset:
    if isinstance(dataset, datasets.Dataset):
        data = dataset
    elif (
        isinstance(dataset, Sequence)
        and not isinstance(dataset, str)
        and all(isinstance(row, Mapping) for row in dataset)
    ):
        if not dataset:
            raise ValueError(f"{what}: the dataset is empty (0 rows).")
        data = datasets.Dataset.from_list([dict(row) for row in dataset])
    else:
        raise TypeError(
            f"{what}: expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}."
        )
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; found {data.column_names}.")
    if len(data) == 0:
        raise ValueError(f"{what}: the dataset is empty (0 rows).")
    return data


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy chat responses to ``prompts``, one string per prompt, in order.

    Each prompt becomes ``[{"role": "system", "content": system_prompt}]`` (if given) plus
    ``[{"role": "user", "content": prompt}]``, rendered with the tokenizer's chat template and
    ``add_generation_prompt=True``. Generation stops at the tokenizer's or the model's eos token
    or after ``max_new_tokens`` tokens. Returns only the new text, decoded with
    ``skip_special_tokens=True`` and stripped of surrounding whitespace.

    Raises:
        TypeError: ``prompts`` is not a list of strings.
        ValueError: no chat template, no eos token, or a non-positive size.
    """
    prompts = _check_prompts(prompts)
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    _require_chat_template(tokenizer)
    pad_id, eos_ids = _special_ids(model, tokenizer)
    if not prompts:
        return []
    prompt_ids = [_chat_ids(tokenizer, prompt, system_prompt) for prompt in prompts]
    with _eval_mode(model):
        new_ids = _greedy_ids(
            model,
            prompt_ids,
            pad_id=pad_id,
            eos_ids=eos_ids,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            desc="generate",
        )
    return [_decode(tokenizer, ids, eos_ids).strip() for ids in new_ids]


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def kl_to_base(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    base_model: nn.Module | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> float:
    """Mean per-token KL(p_model || p_base) along the base model's greedy responses.

    Definition. For each prompt ``x_i``, let ``c_i`` be its chat-templated token ids (user turn
    plus ``add_generation_prompt=True``, as in :func:`generate_responses`) and
    ``y_i = (y_i1, ..., y_iT_i)`` the *base* model's greedy continuation of ``c_i``: at most
    ``max_new_tokens`` tokens, cut after the first eos token, which is kept (stopping is part of
    the distribution). Both models are then teacher-forced on ``c_i + y_i``; at every response
    position ``t`` (the position whose next token is ``y_it``, i.e. the distributions that
    produced ``y_i1 .. y_iT_i``)::

        KL_it = sum_v p_model(v | c_i, y_i<t) * (log p_model(v | c_i, y_i<t) - log p_base(v | c_i, y_i<t))

    over the full vocabulary, computed from float32 (or wider) log-softmaxes. The result is the
    token-weighted mean over all prompts, ``sum_it KL_it / sum_i T_i``, in nats per token.
    The token ids are used as generated, never decoded and re-tokenised.

    It is 0 for identical models, >= 0 always, and measures how far the trained policy has
    drifted from the base on benign prompts, where the base's own behaviour is the reference.

    Args:
        base_model: the reference model. If ``None`` and ``model`` is a ``peft.PeftModel``, the
            base is ``model`` with its adapters disabled (``model.disable_adapter()``: no second
            copy of the weights); both generation and the base forward run under it.

    Raises:
        ValueError: ``base_model`` is ``None`` and ``model`` is not a peft model; no chat
            template; empty ``prompts``; a non-positive size.
    """
    prompts = _check_prompts(prompts)
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    if not prompts:
        raise ValueError("kl_to_base needs at least one prompt.")
    _require_chat_template(tokenizer)
    base, base_context = _resolve_base(model, base_model)

    sums, counts = _kl_sums(model, base, base_context, tokenizer, prompts, max_new_tokens, batch_size)
    return float(sum(sums) / sum(counts))


def kl_to_base_per_prompt(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    base_model: nn.Module | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[float]:
    """Per-prompt mean per-token KL(p_model || p_base): ``sum_t KL_it / T_i`` for each prompt ``i``.

    The same quantity as :func:`kl_to_base` (same definition, arguments and errors), kept per prompt
    so callers can put intervals over prompts; :func:`kl_to_base` is the token-weighted pool of the
    same terms (``sum_it KL_it / sum_i T_i``), so the two means differ when responses differ in length.
    """
    prompts = _check_prompts(prompts)
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    if not prompts:
        raise ValueError("kl_to_base_per_prompt needs at least one prompt.")
    _require_chat_template(tokenizer)
    base, base_context = _resolve_base(model, base_model)
    sums, counts = _kl_sums(model, base, base_context, tokenizer, prompts, max_new_tokens, batch_size)
    return [s / c for s, c in zip(sums, counts, strict=True)]


def _resolve_base(model: nn.Module, base_model: nn.Module | None) -> tuple[nn.Module, Any]:
    """The reference model and the context manager under which to run it (see :func:`kl_to_base`)."""
    if base_model is None:
        if not _is_peft_model(model):
            raise ValueError(
                "kl_to_base: model is not a peft model, so there is no base to fall back on; pass "
                "base_model=<the reference model> (for a peft model the adapter-disabled model is used)."
            )
        return model, model.disable_adapter
    return base_model, nullcontext


def _kl_sums(
    model: nn.Module,
    base: nn.Module,
    base_context: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[float], list[int]]:
    """Per prompt: the sum over response positions of KL_it (float64) and the number of positions T_i."""
    pad_id, eos_ids = _special_ids(base, tokenizer)
    prompt_ids = [_chat_ids(tokenizer, prompt, None) for prompt in prompts]
    sums = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    with _eval_mode(model, base):
        with base_context():
            responses = _greedy_ids(
                base,
                prompt_ids,
                pad_id=pad_id,
                eos_ids=eos_ids,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                desc="kl: base responses",
            )
        device = _device(model)
        base_device = _device(base)
        progress = tqdm(total=len(prompts), desc="kl: score", unit="prompt", leave=False)
        try:
            with torch.no_grad():
                for batch in _batches(
                    [len(p) + len(r) for p, r in zip(prompt_ids, responses, strict=True)], batch_size
                ):
                    rows = [prompt_ids[i] + responses[i] for i in batch]
                    width = max(len(row) for row in rows)
                    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                    scored = torch.zeros((len(rows), width), dtype=torch.bool)
                    for r, i in enumerate(batch):
                        n_prompt, n_resp = len(prompt_ids[i]), len(responses[i])
                        input_ids[r, : n_prompt + n_resp] = torch.tensor(rows[r], dtype=torch.long)
                        attention_mask[r, : n_prompt + n_resp] = 1
                        # logits at position t predict token t + 1: response tokens sit at
                        # n_prompt .. n_prompt + n_resp - 1, so they are predicted from n_prompt - 1 ...
                        scored[r, n_prompt - 1 : n_prompt + n_resp - 1] = True
                    logits = model(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        use_cache=False,
                    ).logits
                    with base_context():
                        base_logits = base(
                            input_ids=input_ids.to(base_device),
                            attention_mask=attention_mask.to(base_device),
                            use_cache=False,
                        ).logits
                    mask = scored.to(logits.device)
                    sel = logits[mask]
                    base_sel = base_logits.to(logits.device)[mask]
                    dtype = torch.promote_types(sel.dtype, torch.float32)
                    logp = functional.log_softmax(sel.to(dtype), dim=-1)
                    logq = functional.log_softmax(base_sel.to(dtype), dim=-1)
                    kl = (logp.exp() * (logp - logq)).sum(dim=-1).double().cpu()
                    rows_of = torch.arange(len(batch)).unsqueeze(1).expand_as(scored)[scored]
                    per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows_of, kl)
                    for r, i in enumerate(batch):
                        sums[i] += float(per_row[r])
                        counts[i] += int(scored[r].sum())
                    progress.update(len(batch))
        finally:
            progress.close()
    return sums, counts


def completion_nll(
    model: nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset | Sequence[Mapping[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> float:
    """Mean NLL per completion token over a ``{"prompt", "completion"}`` dataset (nats).

    Exactly the trainer's capability metric with the sign flipped and pooled over the whole
    dataset: rows are tokenised by :func:`frontier_trainer.directions.tokenize_capability_dataset`
    (``tokenizer(prompt + completion)``, prompt tokens masked; rows longer than ``max_length``
    tokens are dropped with a logged count) and right-padded by
    :meth:`~frontier_trainer.directions.CapabilitySampler.collate` into consecutive batches in
    dataset order; each batch is scored with :func:`frontier_trainer.directions.completion_metric`
    and pooled by :func:`frontier_trainer.tracking.dataset_metric` (the degradation tracker's own).
    The result is ``sum_b(-metric_b * tokens_b) / sum_b tokens_b``: a token-weighted mean, so it
    does not depend on ``batch_size`` and equals ``-completion_metric`` on a single batch holding
    every row. A ``{"text"}`` dataset scores every token, as in the trainer.

    Raises:
        ValueError / TypeError: bad dataset (missing columns, empty, non-strings, no row left).
    """
    _check_positive(batch_size=batch_size, max_length=max_length)
    data = _as_dataset(dataset, [], "completion_nll")
    rows = tokenize_capability_dataset(_EVAL_TASK, data, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = CapabilitySampler({_EVAL_TASK: rows}, batch_size=batch_size, pad_token_id=pad_id or 0)
    with _eval_mode(model):
        value, _ = dataset_metric(model, sampler, _EVAL_TASK)  # the tracker's pooled metric, no gradient
    return -value


def exact_match_accuracy(
    model: nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset | Sequence[Mapping[str, str]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> float:
    """Fraction of rows whose greedy continuation's first line equals the completion.

    The ``prompt`` is used as plain text (no chat template), tokenised with
    ``tokenizer(prompt)`` and its default special tokens, as in :func:`completion_nll`; the
    model continues it greedily for at most ``max_new_tokens`` tokens (stopping at eos). The
    prediction is the first line of the decoded continuation after leading whitespace is
    removed (``text.lstrip().split("\\n")[0].strip()``), compared for string equality with
    ``completion.strip()``. Write prompts so the answer follows on the same line
    (``"Q: 2+3=? A:"`` with completion ``" 5"``).

    Raises:
        ValueError / TypeError: missing ``prompt``/``completion`` columns, non-strings, empty dataset.
    """
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    data = _as_dataset(dataset, ["prompt", "completion"], "exact_match_accuracy")
    prompts = _check_prompts(list(data["prompt"]), "dataset['prompt']")
    targets = _check_prompts(list(data["completion"]), "dataset['completion']")
    pad_id, eos_ids = _special_ids(model, tokenizer)
    prompt_ids = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    with _eval_mode(model):
        new_ids = _greedy_ids(
            model,
            prompt_ids,
            pad_id=pad_id,
            eos_ids=eos_ids,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            desc="exact match",
        )
    correct = 0
    for ids, target in zip(new_ids, targets, strict=True):
        prediction = _decode(tokenizer, ids, eos_ids).lstrip().split("\n")[0].strip()
        correct += prediction == target.strip()
    return correct / len(prompts)


def completion_nll_per_row(
    model: nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset | Sequence[Mapping[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[float]:
    """Per-row mean NLL per completion token (nats), rows tokenised exactly as in :func:`completion_nll`.

    Row ``i`` gives ``-(sum of log p(token) over its scored tokens) / (its number of scored tokens)``,
    in dataset order (rows longer than ``max_length`` tokens are dropped, as there, so the list can be
    shorter than the dataset). The token-weighted mean of these values (weights = scored tokens)
    equals :func:`completion_nll`; their plain mean weights every row equally.
    """
    _check_positive(batch_size=batch_size, max_length=max_length)
    data = _as_dataset(dataset, [], "completion_nll_per_row")
    rows = tokenize_capability_dataset(_EVAL_TASK, data, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = CapabilitySampler({_EVAL_TASK: rows}, batch_size=batch_size, pad_token_id=pad_id or 0)
    device = _device(model)
    out: list[float] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = sampler.collate(_EVAL_TASK, range(start, min(start + batch_size, len(rows))), device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            scored = labels != -100
            dtype = torch.promote_types(logits.dtype, torch.float32)
            logp = functional.log_softmax(logits.to(dtype), dim=-1)
            token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
            per_row = -token_logp.sum(dim=1).double() / scored.sum(dim=1).clamp(min=1).double()
            out += per_row.cpu().tolist()
    return out
