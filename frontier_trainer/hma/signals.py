"""Measuring the per-group geometry of an update: s_ℓ, c_iℓ, w_ℓ and per-layer tax rates τ_ℓ.

All gradients are taken once, at the *base* model (the first-order expansion point of §3):

* safety S: the mean log-probability margin of chosen over rejected completions on the preference set,
  ``S(θ) = mean_pairs [log π_θ(y_c|x) − log π_θ(y_r|x)]`` (sums over completion tokens). At θ = θ_base
  with the reference model = base, the DPO loss is ``−log σ(β(S(θ) − S(θ_ref)))`` whose gradient is
  ``−(β/2)∇S``: the DPO objective and the margin give the same direction, the margin is free of β.
  One backward.
* capability f_i: :func:`frontier_trainer.directions.completion_metric` (mean completion
  log-likelihood) on a batch of task i, one backward each, via ``capability_gradients``.

Then, streaming the aligned tensors one at a time, for each group ℓ with ``Δ_ℓ = θ_aligned − θ_base``:
``s_ℓ = ⟨∇S, Δ_ℓ⟩``, ``c_iℓ = ⟨∇f_i, Δ_ℓ⟩`` (Definition 3.3's ⟨v*, δ⟩ and ⟨c_i, δ⟩ before normalising),
the budget weight ``w_ℓ = ‖Δ_ℓ‖²`` or, with ``budget="fisher"``, ``w_ℓ = Σ_j F_jj Δ_j²`` for the
diagonal empirical Fisher F of the base model (§4.4), and the per-layer tax rate
``τ_ℓ = tax_rate(∇S|_ℓ, [∇f_i|_ℓ])`` (eq. 2 restricted to the group, from the Gram matrix) with the
per-task ``τ_iℓ = cos²(∇S|_ℓ, ∇f_i|_ℓ)`` (eq. 6). The spread of τ_ℓ across groups is the quantity of
Prediction 3.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from frontier_trainer.directions import (
    IGNORE_INDEX,
    build_capability_sampler,
    capability_gradients,
    load_capability_source,
)
from frontier_trainer.geometry import tax_rate_from_gram

from .groups import OUTER, Grouping
from .sources import check_compatible, open_source

logger = logging.getLogger(__name__)


@dataclass
class LayerGeometry:
    """First-order geometry of ``Δ = θ_aligned − θ_base`` per group (see the module docstring).

    Attributes:
        groups: allocated group keys, in model order.
        tasks: capability task names.
        safety: s_ℓ, shape (L,).
        capability: c_iℓ, shape (m, L).
        weights: budget weights w_ℓ, shape (L,).
        sq_norms: ‖Δ_ℓ‖², shape (L,) (equal to ``weights`` for the Euclidean budget).
        tax_rates: τ_ℓ, shape (L,) (nan for a group where a gradient vanishes).
        task_tax_rates: τ_iℓ, shape (m, L).
        outer_safety, outer_capability, outer_weight: the outer tensors' s, c_i and w when they follow the
            budget rule (zeros when ``grouping.outer == "group"``: they are then a group).
        grouping: the :class:`Grouping` used.
        budget_kind: ``"euclidean"`` or ``"fisher"``.
        info: provenance (sources, sizes, base metric values).
    """

    groups: list[str]
    tasks: list[str]
    safety: np.ndarray
    capability: np.ndarray
    weights: np.ndarray
    sq_norms: np.ndarray
    tax_rates: np.ndarray
    task_tax_rates: np.ndarray
    outer_safety: float = 0.0
    outer_capability: np.ndarray = field(default_factory=lambda: np.zeros(0))
    outer_weight: float = 0.0
    grouping: Grouping = field(default_factory=Grouping)
    budget_kind: str = "euclidean"
    info: dict[str, Any] = field(default_factory=dict)

    def tax_spread(self) -> dict[str, float]:
        """Cross-group spread of τ_ℓ (Prediction 3): std, range, and the same for the update's tax ratio."""
        tau = self.tax_rates[np.isfinite(self.tax_rates)]
        return {
            "tau_mean": float(tau.mean()) if tau.size else math.nan,
            "tau_std": float(tau.std()) if tau.size else math.nan,
            "tau_range": float(tau.max() - tau.min()) if tau.size else math.nan,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "tasks": self.tasks,
            "safety": self.safety.tolist(),
            "capability": self.capability.tolist(),
            "weights": self.weights.tolist(),
            "sq_norms": self.sq_norms.tolist(),
            "tax_rates": [None if not math.isfinite(x) else x for x in self.tax_rates.tolist()],
            "task_tax_rates": [
                [None if not math.isfinite(x) else x for x in row] for row in self.task_tax_rates.tolist()
            ],
            "outer_safety": self.outer_safety,
            "outer_capability": self.outer_capability.tolist(),
            "outer_weight": self.outer_weight,
            "grouping": {"mode": self.grouping.mode, "outer": self.grouping.outer},
            "budget_kind": self.budget_kind,
            "tax_spread": self.tax_spread(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerGeometry:
        nanify = lambda xs: np.array([math.nan if x is None else x for x in xs], dtype=np.float64)  # noqa: E731
        return cls(
            groups=list(d["groups"]),
            tasks=list(d["tasks"]),
            safety=np.asarray(d["safety"], dtype=np.float64),
            capability=np.asarray(d["capability"], dtype=np.float64).reshape(len(d["tasks"]), -1),
            weights=np.asarray(d["weights"], dtype=np.float64),
            sq_norms=np.asarray(d["sq_norms"], dtype=np.float64),
            tax_rates=nanify(d["tax_rates"]),
            task_tax_rates=np.array([nanify(r) for r in d["task_tax_rates"]]).reshape(len(d["tasks"]), -1),
            outer_safety=float(d["outer_safety"]),
            outer_capability=np.asarray(d["outer_capability"], dtype=np.float64),
            outer_weight=float(d["outer_weight"]),
            grouping=Grouping(**d["grouping"]),
            budget_kind=d["budget_kind"],
            info=dict(d.get("info", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LayerGeometry:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------
# Safety objective
# --------------------------------------------------------------------------------------


def preference_batch(tokenizer: Any, rows: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``prompt+chosen`` then ``prompt+rejected`` (labels −100 on prompt and pad)."""
    seqs: list[tuple[list[int], int]] = []
    for key in ("chosen", "rejected"):
        for r in rows:
            p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            full = tokenizer(r["prompt"] + r[key], add_special_tokens=False)["input_ids"]
            if full[: len(p)] != p or len(full) == len(p):
                raise ValueError(
                    f"preference row {r['prompt']!r}: the {key} completion does not tokenise after the prompt."
                )
            seqs.append((full, len(p)))
    width = max(len(s) for s, _ in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, n_prompt : len(s)] = torch.tensor(s[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequence_logprobs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each row (next-token shift)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logits = logits.float()[:, :-1]
    labels = batch["labels"][:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def preference_margin(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """S = mean over pairs of log π(chosen|x) − log π(rejected|x) (batch: chosen rows, then rejected)."""
    lp = sequence_logprobs(model, batch)
    n = lp.shape[0] // 2
    return (lp[:n] - lp[n:]).mean()


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def _load_model(base: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(base, nn.Module):
        return base, None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    return model, tok


def _fisher_diagonal(
    model: nn.Module, params: list[nn.Parameter], batch: Mapping[str, torch.Tensor], n: int
) -> list[torch.Tensor]:
    """Diagonal empirical Fisher: mean over ``n`` rows of the squared gradient of each row's log-likelihood."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    rows = min(n, batch["input_ids"].shape[0])
    for i in tqdm(range(rows), desc="fisher", leave=False):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        _, g = capability_gradients(model, params, one, metric=lambda m, b: sequence_logprobs(m, b).sum())
        for f, gi in zip(fisher, g, strict=True):
            f.add_(gi.float().square(), alpha=1.0 / rows)
    return fisher


def measure_geometry(
    base: Any,
    aligned: Any,
    preferences: Any,
    capabilities: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    grouping: Grouping | None = None,
    budget: str = "euclidean",
    max_examples: int = 64,
    fisher_examples: int = 16,
    max_length: int | None = None,
) -> LayerGeometry:
    """Measure s_ℓ, c_iℓ, w_ℓ and τ_ℓ of ``Δ = aligned − base`` (one backward per objective).

    Args:
        base: base model directory or in-memory causal LM (its parameters are the expansion point).
        aligned: aligned model directory, in-memory model, state dict, or a PEFT LoRA adapter directory.
        preferences: preference data (``prompt``/``chosen``/``rejected``): a ``datasets.Dataset`` or a
            source accepted by :func:`~frontier_trainer.directions.load_capability_source`.
        capabilities: ``{task: source}`` of ``prompt``/``completion`` (or ``text``) data.
        tokenizer: needed when ``base`` is an in-memory model.
        grouping: layer groups and outer rule (default per block, outer by budget).
        budget: ``"euclidean"`` (w = ‖Δ_ℓ‖²) or ``"fisher"`` (w = Δ_ℓᵀ diag(F) Δ_ℓ, §4.4).
        max_examples: preference pairs and capability rows per objective (one batch each).
        fisher_examples: rows (one backward each) for the diagonal Fisher.
    """
    grouping = grouping or Grouping()
    if budget not in ("euclidean", "fisher"):
        raise ValueError(f"budget={budget!r}: use 'euclidean' or 'fisher'.")
    model, tok = _load_model(base)
    tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("pass tokenizer= when the base model is given in memory.")
    base_src = open_source(base if not isinstance(base, nn.Module) else model)
    aligned_src = open_source(aligned, base=base_src)
    names = check_compatible(base_src, aligned_src)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        logger.info(
            "%d stored tensor(s) are not parameters (buffers); they are merged but not measured.",
            len(missing),
        )
    measured = [n for n in names if n in params]
    plist = [params[n] for n in measured]
    for p in plist:
        p.requires_grad_(True)

    prefs = (
        load_capability_source("preferences", preferences)
        if not hasattr(preferences, "select")
        else preferences
    )
    prefs = prefs.select(range(min(max_examples, len(prefs))))
    pbatch = preference_batch(tokenizer, list(prefs))
    s_val, g_safety = capability_gradients(model, plist, pbatch, metric=preference_margin)
    sampler = build_capability_sampler(capabilities, tokenizer, max_length, batch_size=max_examples, seed=0)
    tasks = sampler.tasks
    cap_vals, g_caps = {}, []
    for task in tasks:
        v, g = capability_gradients(model, plist, sampler.next_batch(task))
        cap_vals[task] = float(v)
        g_caps.append(g)
    fisher = None
    if budget == "fisher":
        rows = sampler.next_batch(tasks[0]) if tasks else pbatch
        fisher = _fisher_diagonal(model, plist, pbatch if not tasks else rows, fisher_examples)
        # mix in the preference rows so that safety-relevant coordinates get curvature too
        f2 = _fisher_diagonal(model, plist, pbatch, fisher_examples)
        fisher = [0.5 * (a + b) for a, b in zip(fisher, f2, strict=True)]

    assignment = grouping.assign(names)
    groups = grouping.groups(names)
    index = {g: i for i, g in enumerate(groups)}
    m, L = len(tasks), len(groups)
    s = np.zeros(L)
    C = np.zeros((m, L))
    w = np.zeros(L)
    sq = np.zeros(L)
    gram = np.zeros((L, m + 1, m + 1))
    outer_s, outer_c, outer_w = 0.0, np.zeros(m), 0.0
    for k, name in enumerate(tqdm(measured, desc="geometry", leave=False)):
        base_t = params[name].detach().double()
        delta = aligned_src.get(name).double() - base_t
        vecs = [g_safety[k].double()] + [gc[k].double() for gc in g_caps]
        dots = np.array([float((v * delta).sum()) for v in vecs])
        sq_k = float(delta.square().sum())
        w_k = float((fisher[k].double() * delta.square()).sum()) if fisher is not None else sq_k
        group = assignment[name]
        if group == OUTER and grouping.outer == "budget":
            outer_s += dots[0]
            outer_c += dots[1:]
            outer_w += w_k
            continue
        i = index[group]
        s[i] += dots[0]
        C[:, i] += dots[1:]
        w[i] += w_k
        sq[i] += sq_k
        flat = torch.stack([v.reshape(-1) for v in vecs])
        gram[i] += (flat @ flat.T).numpy()
    tau = np.full(L, math.nan)
    tau_i = np.full((m, L), math.nan)
    for i in range(L):
        G = gram[i]
        if G[0, 0] > 0 and m and G[1:, 1:].diagonal().max() > 0:
            tau[i] = tax_rate_from_gram(torch.from_numpy(G))
            diag = G.diagonal()
            with np.errstate(invalid="ignore", divide="ignore"):
                tau_i[:, i] = G[0, 1:] ** 2 / (G[0, 0] * diag[1:])
    info = {
        "base": base_src.ref,
        "aligned": aligned_src.ref,
        "safety_objective": "mean log-prob margin chosen - rejected at the base model",
        "safety_value": float(s_val),
        "capability_values": cap_vals,
        "preference_pairs": len(prefs),
        "max_examples": max_examples,
    }
    return LayerGeometry(
        groups=groups,
        tasks=tasks,
        safety=s,
        capability=C,
        weights=w,
        sq_norms=sq,
        tax_rates=tau,
        task_tax_rates=tau_i,
        outer_safety=outer_s,
        outer_capability=outer_c,
        outer_weight=outer_w,
        grouping=grouping,
        budget_kind=budget,
        info=info,
    )
