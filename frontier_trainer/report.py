"""Pre-training geometry report: per-task tax rates of a model before any alignment step.

Prediction 1 (§8) of "What Is the Geometry of the Alignment Tax?": the per-task tax rate
τ_i = ⟨v̂*, ĉ_i⟩² (Cor 4.5, eq. 6) is computable *before* alignment, and should order the
capability degradation alignment then causes. This module measures it on a real model:

* the safety direction v* is the gradient of the DPO objective at initialisation. With the
  policy equal to the reference, the DPO loss of a pair is −log σ(β·m(θ) − β·m(θ_ref)) with
  m = log π(chosen) − log π(rejected), so its gradient at θ = θ_ref is −β σ(0) ∇m = −(β/2) ∇m:
  the DPO update direction −∇L is exactly proportional to ∇ of the mean log-probability
  margin m. :func:`safety_direction` computes ∇m (no reference model, no β needed), with
  TRL's tokenisation (prompt + completion + EOS, prompt masked, summed completion log-probs);
* a capability direction c_i is the gradient of the mean completion log-likelihood f_i on
  task i's data (:func:`frontier_trainer.directions.completion_metric`), averaged over a few
  batches;
* everything geometric is computed from the Gram matrix of [v, c_1, …, c_m] (inner products
  only, :func:`gram_matrix`), turned into isometric coordinates (:func:`gram_coordinates`) on
  which :mod:`frontier_trainer.geometry` runs unchanged. Memory: the m + 1 gradients, never a
  concatenated copy of the model.

With a second preference dataset (e.g. helpfulness next to harmlessness) the report adds the
safety–safety geometry of §6: the correlation ρ = cos(v₁, v₂), the effective angle when all
capabilities are preserved (Prop 6.5, eq. 15), and, per capability, the partial correlation
when that one capability is preserved (Thm 6.1, eq. 12) with Thm 6.4's case; capabilities
whose preservation raises the correlation ease the conflict (Prediction 4) and are
recommended.

This is the library half; ``frontier-geometry`` (:func:`frontier_trainer.geometry_report.main`) is
the command-line front end, and the degradation tracker (:mod:`frontier_trainer.tracking`) reuses
the pieces here, so no library module has to import a command module.

Representation space (issue 13 §2, Prediction 1 as §8 states it): given a *harmless* prompt set,
the report and the tracker also measure τ_i = cos²(v*_ℓ*, c_i,ℓ*) from residual-stream probes
(:mod:`frontier_trainer.probes`: the safety probe is the difference of means of the harmful — the
preference prompts — and the harmless prompts at the last prompt token, after Arditi et al. 2024;
the task probes are each task's mean against the grand mean of the task means; ℓ* is the layer
where the safety probe separates best). :func:`load_probe_prompts`, :func:`task_probe_prompts` and
:func:`representation_geometry` are the pieces both share; the result sits next to the gradient
τ_i as ``tau_repr`` (the table) and ``representation`` (the whole :class:`probes.ProbeGeometry`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from frontier_trainer import geometry, probes
from frontier_trainer.directions import (
    IGNORE_INDEX,
    CapabilitySampler,
    MetricFn,
    build_capability_sampler,
    capability_gradients,
    completion_metric,
    deterministic_forward,
    list_dot,
    load_capability_source,
    tokenize_capability_dataset,
)

logger = logging.getLogger(__name__)

Grads = list[torch.Tensor]
"""A vector over the trainable parameters, stored as one tensor per parameter."""

PROBE_ROWS = 256
"""Prompts per probe set (harmful, harmless, each task) for representation-space τ_i: a seeded
subset when a set is larger. Difference-of-means directions converge as 1/√n; 256 prompts cost a
few forward passes."""


# --------------------------------------------------------------------------------------
# Gram matrices and isometric coordinates
# --------------------------------------------------------------------------------------


def gram_matrix(vectors: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Float64 Gram matrix ``G[i, j] = ⟨x_i, x_j⟩`` of per-parameter vectors (Remark 4.6's Gram form)."""
    n = len(vectors)
    G = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            G[i, j] = G[j, i] = float(list_dot(vectors[i], vectors[j]))
    return G


def unit_gram(gram: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the same vectors scaled to unit norm (zero vectors stay zero).

    Directions only: every quantity of this report is invariant to each vector's length, but
    gradient norms differ by many orders of magnitude (a saturated capability's log-likelihood
    gradient is tiny next to the DPO gradient), and a relative eigenvalue cut-off on the raw
    Gram matrix would then drop the small vectors' own directions and corrupt τ.
    """
    G = gram.detach().to(torch.float64)
    norms = torch.diagonal(G).clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return G * inv[:, None] * inv[None, :]


def gram_coordinates(gram: torch.Tensor) -> torch.Tensor:
    """Coordinates X of shape (r, n) with XᵀX = G: n vectors in R^r with the same geometry.

    Every quantity of the paper (τ, principal angles, partial correlations) depends on inner
    products only, so it is the same for the original vectors and for these columns. From
    G = VΛVᵀ, X = Λ^{1/2}Vᵀ keeping eigenvalues above ``geometry.GRAM_RTOL`` of the largest.

    Raises:
        ValueError: ``gram`` is not square, not finite, or all zero.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    G = gram.detach().to(torch.float64)
    if not torch.isfinite(G).all():
        raise ValueError("gram contains NaN or inf (a direction had non-finite gradients)")
    G = 0.5 * (G + G.T)
    evals, evecs = torch.linalg.eigh(G)
    top = float(evals.max())
    if top <= 0:
        raise ValueError("gram is all zeros: every direction is the zero vector")
    keep = evals > geometry.GRAM_RTOL * top
    return evals[keep].sqrt()[:, None] * evecs[:, keep].T


# --------------------------------------------------------------------------------------
# directions
# --------------------------------------------------------------------------------------


def average_gradient(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Mapping[str, torch.Tensor]],
    metric: MetricFn = completion_metric,
) -> tuple[float, Grads]:
    """Mean over batches of ``metric`` and of its gradient (dropout off, ``p.grad`` untouched)."""
    if not batches:
        raise ValueError("average_gradient: no batch given")
    total: Grads | None = None
    values = []
    for batch in batches:
        value, grads = capability_gradients(model, params, batch, metric=metric)
        values.append(float(value))
        if total is None:
            total = [g.detach().clone() for g in grads]
        else:
            for acc, g in zip(total, grads, strict=True):
                acc.add_(g)
    assert total is not None
    for acc in total:
        acc.div_(len(batches))
    return sum(values) / len(values), total


def sequence_logprob_sums(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-row sum of log π over scored tokens (labels ≠ −100), shape (B,): DPO's log π(y|x)."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = outputs.logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))[:, :-1, :]
    labels = batch["labels"][:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    logp = functional.log_softmax(logits, dim=-1)
    token = torch.gather(logp, -1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(dim=-1)


def _preference_rows(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int | None, name: str
) -> CapabilitySampler:
    """Tokenise chosen and rejected completions like TRL into one paired sampler.

    As ``trl.DPOTrainer`` does: plain-text rows get the EOS appended to each completion; conversational
    rows (``prompt`` a list of messages, ``chosen``/``rejected`` the assistant turn) are rendered with the
    chat template, ``prompt + chosen``, and nothing is appended (the template's end of turn ends them).
    """
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"{name}: a preference dataset needs columns prompt/chosen/rejected; missing {sorted(missing)}"
        )
    eos = getattr(tokenizer, "eos_token", None) or ""
    first = dataset[0] if len(dataset) else {}
    conversational = all(isinstance(first.get(c), list) for c in ("prompt", "chosen", "rejected"))
    if not conversational and any(isinstance(first.get(c), list) for c in ("prompt", "chosen", "rejected")):
        raise ValueError(
            f"{name}: prompt, chosen and rejected must be all strings or all lists of messages "
            "(TRL's conversational format); this dataset mixes the two"
        )

    def side(column: str) -> datasets.Dataset:
        if conversational:
            return datasets.Dataset.from_dict(
                {"messages": [list(p) + list(c) for p, c in zip(dataset["prompt"], dataset[column], strict=True)]}
            )
        return datasets.Dataset.from_dict(
            {
                "prompt": list(dataset["prompt"]),
                "completion": [c if c.endswith(eos) else c + eos for c in dataset[column]],
            }
        )

    chosen = tokenize_capability_dataset(f"{name}/chosen", side("chosen"), tokenizer, None)
    rejected = tokenize_capability_dataset(f"{name}/rejected", side("rejected"), tokenizer, None)
    if len(chosen) != len(rejected):
        raise ValueError(f"{name}: some rows have an empty chosen or rejected completion")
    keep = [
        i
        for i in range(len(chosen))
        if max_length is None or max(len(chosen[i]["input_ids"]), len(rejected[i]["input_ids"])) <= max_length
    ]
    if not keep:
        raise ValueError(f"{name}: every row is longer than max_length={max_length} tokens")
    rows = {"chosen": [chosen[i] for i in keep], "rejected": [rejected[i] for i in keep]}
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return CapabilitySampler(rows, batch_size=8, seed=0, pad_token_id=pad or 0)


def safety_direction(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    tokenizer: Any,
    preference_dataset: datasets.Dataset,
    batches: int = 4,
    batch_size: int = 8,
    max_length: int | None = 512,
    seed: int = 0,
    name: str = "preferences",
) -> tuple[float, Grads]:
    """∇ of the mean log-probability margin log π(chosen) − log π(rejected): the DPO direction at init.

    Proportional to −∇L_DPO when policy = reference (module docstring), so its normalised
    version is the safety direction v̂* whose overlaps define τ_i (eq. 6). ``batches`` batches
    of ``batch_size`` seeded rows are averaged.

    Returns:
        ``(mean margin, gradient list)``.
    """
    sampler = _preference_rows(preference_dataset, tokenizer, max_length, name)
    sampler.batch_size, sampler.seed = int(batch_size), int(seed)
    device = params[0].device

    def margin_metric(index_batch: Mapping[str, Any]) -> MetricFn:
        def metric(m: nn.Module, _: Mapping[str, torch.Tensor]) -> torch.Tensor:
            chosen = sequence_logprob_sums(m, index_batch["chosen"])
            rejected = sequence_logprob_sums(m, index_batch["rejected"])
            return (chosen - rejected).mean()

        return metric

    values, total = [], None
    for _ in range(batches):
        idx = sampler.next_indices("chosen")
        pair = {side: sampler.collate(side, idx, device=device) for side in ("chosen", "rejected")}
        value, grads = capability_gradients(model, params, pair["chosen"], metric=margin_metric(pair))
        values.append(float(value))
        total = grads if total is None else [a.add_(g) for a, g in zip(total, grads, strict=True)]
    assert total is not None
    return sum(values) / len(values), [g.div_(batches) for g in total]


def capability_directions(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    sampler: CapabilitySampler,
    batches: int = 4,
    progress: bool = False,
) -> dict[str, Grads]:
    """c_i = mean over ``batches`` sampler batches of ∇f_i (f_i: mean completion log-likelihood)."""
    device = params[0].device
    out: dict[str, Grads] = {}
    for task in tqdm(sampler.tasks, desc="capability directions", disable=not progress):
        n = min(batches, max(1, len(sampler.rows[task]) // sampler.task_batch_size(task)))
        _, out[task] = average_gradient(
            model, params, [sampler.next_batch(task, device=device) for _ in range(n)]
        )
    return out


def span_coverage(gram: torch.Tensor) -> float:
    """‖P g‖ / ‖g‖ from the Gram matrix of ``[r_1, …, r_n, g]``: the fraction of the last vector's norm inside the
    span of the others (bᵀ G⁺ b / ‖g‖², with G the rows' Gram block and b their products with g; a pseudo-inverse
    on unit-scaled vectors, so dependent or tiny rows are harmless). 0 for a zero ``g``."""
    G = unit_gram(gram)
    if float(G[-1, -1]) == 0.0:
        return 0.0
    rows, b = G[:-1, :-1], G[:-1, -1]
    inside = float(b @ torch.linalg.pinv(rows, hermitian=True, rtol=1e-10) @ b)
    return math.sqrt(min(max(inside, 0.0), 1.0))


def direction_coverage(
    model: nn.Module, params: Sequence[nn.Parameter], sampler: CapabilitySampler, task: str, rows: int
) -> dict[str, Any]:
    """How much of a task's gradient on unseen rows the trainer's directions would hold (benchmarks/README.md §8).

    From ``rows`` rows of ``task``, one at a time: the span of their *mean* gradient (what the trainer holds with
    ``capability_rank=1, capability_batch_size=rows``) and the span of their *per-row* gradients
    (``capability_rank=rows, capability_batch_size=1``); and ĝ, the mean gradient of the next ``rows`` rows (the
    sampler's next rows in its permutation, disjoint within an epoch; rows are weighted equally). Coverage
    ‖P ĝ‖/‖ĝ‖ says how far protection of the held rows carries to the task: a projection off a span that holds
    a fraction c of ĝ leaves √(1 − c²) of it. All in the Gram form (inner products only, nothing flattened).

    Returns:
        ``{"rows": n, "mean": coverage by the mean direction, "per_row": coverage by the per-row span}``; ``rows``
        is lowered to half the task's rows when it has fewer than 2·``rows``, and the coverages are ``None``
        when it has fewer than 2 rows.
    """
    available = len(sampler.rows[task])
    n = min(int(rows), available // 2)
    if n < 1:
        return {"rows": 0, "mean": None, "per_row": None}
    device = params[0].device
    seen = [capability_gradients(model, params, sampler.next_batch(task, device=device))[1] for _ in range(n)]
    _, held = average_gradient(model, params, [sampler.next_batch(task, device=device) for _ in range(n)])
    mean = [torch.stack(parts).mean(0) for parts in zip(*seen, strict=True)]
    return {
        "rows": n,
        "mean": span_coverage(gram_matrix([mean, held])),
        "per_row": span_coverage(gram_matrix([*seen, held])),
    }


# --------------------------------------------------------------------------------------
# geometry from a Gram matrix
# --------------------------------------------------------------------------------------


def task_geometry(gram: torch.Tensor, tasks: Sequence[str], budget: float = 1.0) -> dict[str, Any]:
    """Per-task τ_i, angle, regime and tax-free safety from the Gram matrix of [v, c_1, …, c_m].

    τ_i = cos²(v, c_i) (eq. 6), the principal angle α_i = arccos √τ_i between span(v) and
    span(c_i) (Björck–Golub), the §9.3 regime, and B√(1 − τ_i) (Cor 4.4, eq. 5). ``cos`` keeps
    the sign: cos < 0 means the safety step lowers f_i to first order. The joint τ of v
    against all of C (eq. 2, non-additive, Remark 4.6) comes with its B√(1 − τ).
    A zero capability gradient gets NaN entries and regime ``"undefined"``.
    """
    if gram.shape[0] != len(tasks) + 1:
        raise ValueError(f"gram has {gram.shape[0]} rows for 1 + {len(tasks)} directions")
    if float(gram[0, 0]) <= 0:
        raise ValueError("the safety direction is zero: the preference objective has no gradient here")
    X = gram_coordinates(unit_gram(gram))
    v = X[:, 0]
    rows = []
    for i, task in enumerate(tasks, start=1):
        c = X[:, i]
        if float(gram[i, i]) <= 0:
            rows.append(dict(task=task, tau=math.nan, cos=math.nan, angle_deg=math.nan, regime="undefined"))
            rows[-1]["free_safety"] = math.nan
            continue
        tau = float(geometry.task_tax_rates(v, c[:, None])[0])
        angle = float(geometry.principal_angles(v[:, None], c[:, None])[0])
        rows.append(
            {
                "task": task,
                "tau": tau,
                "cos": float(gram[0, i]) / math.sqrt(float(gram[0, 0]) * float(gram[i, i])),
                "angle_deg": math.degrees(angle),
                "regime": geometry.regime(tau),
                "free_safety": geometry.free_safety(tau, budget),
            }
        )
    nonzero = [i for i in range(1, len(tasks) + 1) if float(gram[i, i]) > 0]
    joint = geometry.tax_rate(v, X[:, nonzero]) if nonzero else math.nan
    return {
        "budget": budget,
        "tasks": rows,
        "joint_tau": joint,
        "joint_free_safety": geometry.free_safety(joint, budget) if nonzero else math.nan,
        "sum_of_task_taus": float(sum(r["tau"] for r in rows if not math.isnan(r["tau"]))),
    }


def conflict_geometry(gram: torch.Tensor, tasks: Sequence[str]) -> dict[str, Any]:
    """Safety–safety geometry (§6) from the Gram matrix of [v₁, v₂, c_1, …, c_m].

    ρ = cos(v₁, v₂) and θ = arccos ρ without preserving anything; θ_C when every capability is
    preserved (Prop 6.5, eq. 15; ``None`` if a safety direction lies in span(C)); and per task
    :func:`geometry.conflict_effect` (Thm 6.4): the partial correlation when that task is
    preserved (eq. 12), the effective angle, the case, and whether it helps. ``recommended``
    lists the tasks whose preservation raises the correlation, largest gain first (Prediction
    4), and ``max_equal_improvement`` gives cos(θ/2) (Cor 6.3) for the unconstrained case.
    """
    X = gram_coordinates(unit_gram(gram))
    v1, v2, C = X[:, 0], X[:, 1], X[:, 2:]
    rho = float(gram[0, 1]) / math.sqrt(float(gram[0, 0]) * float(gram[1, 1]))
    theta = math.acos(min(max(rho, -1.0), 1.0))
    try:
        theta_all: float | None = geometry.effective_angle(v1, v2, C)
    except ValueError as err:
        logger.warning("effective angle with every capability preserved is undefined: %s", err)
        theta_all = None
    per_task = []
    for i, task in enumerate(tasks):
        try:
            eff = geometry.conflict_effect(v1, v2, C[:, i])
        except ValueError as err:
            logger.warning("capability %r: conflict effect undefined (%s)", task, err)
            continue
        per_task.append(
            {
                "task": task,
                "a": eff.a,
                "b": eff.b,
                "preserved_correlation": eff.preserved,
                "angle_preserved_deg": math.degrees(math.acos(eff.preserved)),
                "case": eff.case,
                "helps": eff.helps,
                "gain": eff.preserved - eff.rho,
            }
        )
    recommended = [r["task"] for r in sorted(per_task, key=lambda r: -r["gain"]) if r["helps"]]
    return {
        "rho": rho,
        "angle_deg": math.degrees(theta),
        "max_equal_improvement": geometry.max_equal_improvement(theta),
        "angle_all_preserved_deg": None if theta_all is None else math.degrees(theta_all),
        "max_equal_improvement_all_preserved": (
            None if theta_all is None else geometry.max_equal_improvement(theta_all)
        ),
        "tasks": per_task,
        "recommended": recommended,
    }


# --------------------------------------------------------------------------------------
# representation-space tax rates (probes; issue 13 §2)
# --------------------------------------------------------------------------------------


def probe_prompts(name: str, rows: Any, limit: int | None = PROBE_ROWS, seed: int = 0) -> list[str]:
    """The prompt strings of one probe set, checked: at least 2, none blank; a seeded subset of
    ``limit`` when larger (kept in the set's order; the probes are order-free anyway).

    ``rows``: a list of strings, a ``datasets.Dataset`` with a ``prompt`` column, or an iterable
    dataset of such rows (its first ``limit`` rows). Why at least 2: a difference of means over
    one prompt is that prompt (no mean), and :func:`probes.difference_of_means` refuses it during
    training; refusing here puts the error before training.

    Raises:
        ValueError: naming ``name``: no ``prompt`` column, a prompt that is not a string
            (conversational prompts are refused: the probes read plain prompts), a blank prompt, or
            fewer than 2 prompts.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise ValueError(f"{name}: the probe row limit must be an integer >= 2 or None, got {limit!r}")
    is_table = hasattr(rows, "column_names") and getattr(rows, "column_names", None) is not None
    if not is_table and not isinstance(rows, Sequence) and hasattr(rows, "__iter__"):
        values = []
        for row in rows:  # an IterableDataset: the first `limit` rows
            if not isinstance(row, Mapping) or "prompt" not in row:
                raise ValueError(
                    f"{name}: a probe set needs a 'prompt' column (the probe reads the last prompt token)"
                )
            values.append(row["prompt"])
            if limit is not None and len(values) >= limit:
                break
        rows = values
    values = probes.dataset_prompts(name, rows)
    if limit is not None and len(values) > limit:
        gen = torch.Generator().manual_seed(int(seed))
        keep = sorted(torch.randperm(len(values), generator=gen)[:limit].tolist())
        values = [values[i] for i in keep]
    blank = [i for i, p in enumerate(values) if not p.strip()]
    if blank:
        raise ValueError(
            f"{name}[{blank[0]}]: blank prompt {values[blank[0]]!r}; the probe reads the prompt's last token, "
            "so every prompt must have text: drop blank rows"
        )
    if len(values) < 2:
        raise ValueError(
            f"{name}: {len(values)} prompt; a difference-of-means probe needs at least 2 prompts (more is better: "
            f"up to {PROBE_ROWS} are used)"
        )
    return values


def load_probe_prompts(name: str, source: Any, limit: int | None = PROBE_ROWS, seed: int = 0) -> list[str]:
    """:func:`probe_prompts` of a source: a list of strings, a ``Dataset``, or a capability-style
    source string (local file or directory, ``lab:<...>`` such as ``lab:benign``, ``real:<...>``)
    with a ``prompt`` column, loaded with :func:`load_capability_source` (split ``train``).

    Raises:
        ValueError: naming ``name`` (the config field or flag): the source cannot be loaded (a
            missing file, an unknown lab task), or :func:`probe_prompts` refuses its prompts.
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source).strip():
            raise ValueError(
                f"{name}: empty source; give a file, directory, lab:<...> or real:<...> with a 'prompt' column"
            )
        try:
            source = load_capability_source(name, source)
        except ValueError as err:
            raise ValueError(
                f"{name}: could not load the harmless prompts {os.fspath(source)!r}: {err}"
            ) from None
    elif source is None:
        raise ValueError(f"{name}: no prompts given")
    return probe_prompts(name, source, limit, seed)


def task_probe_prompts(
    capability_datasets: Mapping[str, Any], requested_by: str, limit: int | None = PROBE_ROWS, seed: int = 0
) -> dict[str, list[str]]:
    """``{task: prompts}`` for the task probes, from the capability sources (each needs prompts).

    At least two tasks: the task probe's baseline is the grand mean of the task means
    (:func:`probes.task_directions`). With exactly two, c_2 = −c_1 by construction, so both tasks
    get the same τ (a warning says so).

    Args:
        capability_datasets: ``{task: Dataset or source}`` (prompt/completion rows).
        requested_by: the field or flag that asked for representation τ (named in the errors).

    Raises:
        ValueError: fewer than two tasks, or a task without a ``prompt`` column (e.g. text rows),
            naming the task and ``requested_by``.
    """
    if len(capability_datasets) < 2:
        raise ValueError(
            f"{requested_by}: representation-space τ_i need at least two capability tasks (the task probe of task i "
            f"is its mean activation against the grand mean of the task means); got {list(capability_datasets)}. "
            f"Add a task, or leave {requested_by} unset."
        )
    out: dict[str, list[str]] = {}
    for task, source in capability_datasets.items():
        data = load_capability_source(task, source)
        if "prompt" not in data.column_names:
            raise ValueError(
                f"{requested_by}: capability task {task!r} has columns {list(data.column_names)} and no 'prompt' "
                "column; the task probe reads the last prompt token. Give the task as prompt/completion rows, or "
                f"leave {requested_by} unset."
            )
        out[task] = probe_prompts(f"capability_datasets[{task!r}] (task probe)", data, limit, seed)
    if len(out) == 2:
        logger.warning(
            "representation τ_i with two capability tasks: their task probes are opposite (c_2 = −c_1 against the "
            "grand mean), so both get the same τ; use three or more tasks to rank them."
        )
    return out


def representation_geometry(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    tasks: Mapping[str, Sequence[str]],
    batch_size: int = 32,
    progress: bool = False,
) -> probes.ProbeGeometry:
    """Representation-space τ_i of ``model`` (Cor 4.5, eq. 6 on probe directions): a thin call of
    :func:`probes.probe_tax_rates` on plain prompts (no chat template: the prompts are read as the
    trainer tokenises them), with the tokenizer of a processor when one is given."""
    from transformers import ProcessorMixin

    tok = tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer
    return probes.probe_tax_rates(
        model, tok, list(harmful), list(harmless), {t: list(p) for t, p in tasks.items()},
        batch_size=batch_size, progress=progress,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------


def geometry_report(
    model: nn.Module,
    tokenizer: Any,
    preference_dataset: datasets.Dataset | str | os.PathLike,
    capability_datasets: Mapping[str, Any],
    second_preference_dataset: datasets.Dataset | str | os.PathLike | None = None,
    budget: float = 1.0,
    batches: int = 4,
    batch_size: int = 8,
    max_length: int | None = 512,
    seed: int = 0,
    progress: bool = True,
    harmless_prompts: datasets.Dataset | str | os.PathLike | Sequence[str] | None = None,
    probe_rows: int | None = PROBE_ROWS,
    harmless_field: str = "harmless_prompts",
    coverage_rows: int | None = None,
) -> dict[str, Any]:
    """Pre-training geometry of ``model``: τ_i, angle, regime and B√(1 − τ_i) per capability.

    Args:
        model: a causal LM; its parameters with ``requires_grad`` define the space.
        tokenizer: its tokenizer.
        preference_dataset: prompt/chosen/rejected rows (a Dataset or a local source).
        capability_datasets: ``{task: Dataset or local source}`` (prompt/completion or text).
        second_preference_dataset: optional second safety objective (e.g. helpfulness): adds
            the §6 conflict analysis under ``"conflict"``.
        budget: B of the budget ball ‖δ‖ ≤ B.
        batches, batch_size, max_length, seed: direction estimation (every direction is an
            average over ``batches`` seeded batches of ``batch_size`` rows).
        harmless_prompts: harmless prompts (a list, a Dataset or a source with a ``prompt``
            column, e.g. ``lab:benign``) for the representation-space safety probe; the harmful
            side is the preference prompts. Adds ``tau_repr`` to every task row and the whole
            probe result under ``"representation"`` (:func:`representation_geometry`). ``None``:
            gradient space only.
        probe_rows: prompts per probe set (a seeded subset of larger sets; ``None``: all).
        harmless_field: what the errors call ``harmless_prompts`` (the CLI: ``--harmless``).
        coverage_rows: adds ``coverage`` to every task row (:func:`direction_coverage` with this many rows):
            how much of a gradient on unseen rows the trainer's directions would hold. ``None``: skipped.

    Returns:
        A JSON-serialisable dict (see :func:`task_geometry` and :func:`conflict_geometry`).

    Raises:
        ValueError: bad input, before any gradient is taken; errors of the probe sets name
            ``harmless_field``, ``preferences`` or the capability task.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("geometry_report: the model has no trainable parameter")
    prefs = load_capability_source("preferences", preference_dataset)
    sampler = build_capability_sampler(capability_datasets, tokenizer, max_length, batch_size, seed)
    probe_sets = None
    if harmless_prompts is not None:  # every probe input checked before the first gradient
        probe_sets = (
            probe_prompts("preferences (harmful prompts of the safety probe)", prefs, probe_rows, seed),
            load_probe_prompts(harmless_field, harmless_prompts, probe_rows, seed),
            task_probe_prompts(capability_datasets, harmless_field, probe_rows, seed),
        )
    with deterministic_forward(model):
        margin, v1 = safety_direction(model, params, tokenizer, prefs, batches, batch_size, max_length, seed)
        caps = capability_directions(model, params, sampler, batches, progress=progress)
        vectors = [v1]
        margin2 = None
        if second_preference_dataset is not None:
            prefs2 = load_capability_source("preferences2", second_preference_dataset)
            margin2, v2 = safety_direction(
                model, params, tokenizer, prefs2, batches, batch_size, max_length, seed, name="preferences2"
            )
            vectors.append(v2)
    tasks = sampler.tasks
    G = gram_matrix([*vectors, *(caps[t] for t in tasks)])
    k = len(vectors)
    sub = torch.cat([G[:1], G[k:]], dim=0)
    sub = torch.cat([sub[:, :1], sub[:, k:]], dim=1)
    report: dict[str, Any] = {
        "num_parameters": sum(p.numel() for p in params),
        "preference_margin": margin,
        **task_geometry(sub, tasks, budget),
    }
    if k == 2:
        g2 = G[1:, 1:]
        report["second"] = {"preference_margin": margin2, **task_geometry(g2, tasks, budget)}
        report["conflict"] = conflict_geometry(G, tasks)
    if coverage_rows is not None:
        if isinstance(coverage_rows, bool) or not isinstance(coverage_rows, int) or coverage_rows < 1:
            raise ValueError(f"coverage_rows={coverage_rows!r}: pass a positive number of rows, or None to skip.")
        one_row = build_capability_sampler(capability_datasets, tokenizer, max_length, 1, seed + 1)
        with deterministic_forward(model):
            for row in report["tasks"]:
                row["coverage"] = direction_coverage(model, params, one_row, row["task"], coverage_rows)
    if probe_sets is not None:
        harmful, harmless, task_prompts = probe_sets
        with deterministic_forward(model):
            rep = representation_geometry(
                model, tokenizer, harmful, harmless, task_prompts, batch_size, progress
            )
        report["representation"] = rep.to_dict()
        for row in report["tasks"]:
            row["tau_repr"] = rep.tau[row["task"]]
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a plain-text table (what ``frontier-geometry`` prints)."""
    B = report["budget"]
    rep = report.get("representation")
    lines = [
        f"Pre-training geometry ({report['num_parameters']:,} trainable parameters, budget B = {B})",
        f"{'task':<14} {'tau_i':>8} {'cos':>8} {'angle':>8} {'regime':>10} {'B*sqrt(1-tau_i)':>16}"
        + (f" {'tau_repr':>9}" if rep else ""),
    ]
    for r in report["tasks"]:
        lines.append(
            f"{r['task']:<14} {r['tau']:>8.4f} {r['cos']:>+8.4f} {r['angle_deg']:>7.1f}° {r['regime']:>10} "
            f"{r['free_safety']:>16.4f}" + (f" {r['tau_repr']:>9.4f}" if rep else "")
        )
    covered = [r for r in report["tasks"] if "coverage" in r]
    if covered:
        lines.append(
            "coverage c of a gradient on unseen rows by the directions held (a projection leaves sqrt(1 - c^2) "
            "of it; benchmarks/README.md §8):"
        )
        for r in covered:
            c = r["coverage"]
            if c["mean"] is None:  # said, not dropped: the task has fewer than 2 rows
                lines.append(f"  {r['task']:<14} not measured: the task needs at least 2 rows")
                continue
            lines.append(
                f"  {r['task']:<14} mean of {c['rows']} rows: {c['mean']:.2f}; their {c['rows']} per-row directions "
                f"(capability_rank={c['rows']}, capability_batch_size=1): {c['per_row']:.2f}"
            )
    lines.append(
        f"joint tau = {report['joint_tau']:.4f} (sum of per-task tau = {report['sum_of_task_taus']:.4f}); "
        f"tax-free safety B*sqrt(1-tau) = {report['joint_free_safety']:.4f}"
    )
    if rep:
        layer = rep["layer"]
        lines.append(
            f"tau_repr: representation-space tau_i at layer {layer} (safety-probe d' = "
            f"{rep['separation'][str(layer)]:.2f}{'' if rep['separation_held_out'] else ', on the fitting prompts'}; "
            f"task baseline: {rep['baseline']})"
        )
    conflict = report.get("conflict")
    if conflict:
        all_angle = conflict["angle_all_preserved_deg"]
        lines += [
            "",
            f"Safety-safety: rho = {conflict['rho']:+.4f}, angle = {conflict['angle_deg']:.1f}° without "
            f"preservation; {'undefined' if all_angle is None else f'{all_angle:.1f}°'} preserving every "
            "capability (Prop 6.5)",
            f"{'preserve':<14} {'a':>8} {'b':>8} {'corr':>8} {'angle':>8} {'case':>22} {'eases?':>7}",
        ]
        for r in conflict["tasks"]:
            lines.append(
                f"{r['task']:<14} {r['a']:>+8.4f} {r['b']:>+8.4f} {r['preserved_correlation']:>+8.4f} "
                f"{r['angle_preserved_deg']:>7.1f}° {r['case']:>22} {'yes' if r['helps'] else 'no':>7}"
            )
        rec = conflict["recommended"]
        lines.append(
            "preserve to ease the conflict (Thm 6.4, Prediction 4): " + (", ".join(rec) if rec else "none")
        )
    return "\n".join(lines)


__all__ = [
    "PROBE_ROWS",
    "Grads",
    "average_gradient",
    "capability_directions",
    "conflict_geometry",
    "direction_coverage",
    "format_report",
    "geometry_report",
    "gram_coordinates",
    "gram_matrix",
    "load_probe_prompts",
    "probe_prompts",
    "representation_geometry",
    "safety_direction",
    "sequence_logprob_sums",
    "span_coverage",
    "task_geometry",
    "task_probe_prompts",
    "unit_gram",
]
