"""Activation-subspace protection: project every realised update of a linear weight off the
subspace its capability inputs live in (issue 13 §1, the representation-space geometry).

Gradient mode (``projection.UpdateProjector``) protects k capability *gradient* directions and
holds (k+1)× the trainable bytes. Activation mode protects, for every protected linear module
W (out × in) with inputs x, the top-r subspace U (in × r, orthonormal) of the module's inputs on
capability rows, and makes every realised optimizer update satisfy

    ΔW U = 0,  i.e.  ΔW x = 0 for every x ∈ span U,                                    (A1)

so the module's output on capability inputs (to the energy kept by U) does not move, whatever
the optimizer did (AdamW moments, weight decay, accumulation: field notes §2, the update is
read after the step). This is NSPO's and Adam-NSCL's object (field notes §1) made exact and
cheap:

* all linear modules of every decoder block (attention and MLP), the LM head, and the input
  embedding (one rule, below), not MLP only;
* every step, on the realised update, not every 5 steps on the weights;
* no dense d_in × d_in projector and no weight snapshot: before the step the projector stores
  S = W_old U (out × r), after it writes W ← W_new − (W_new U − S) Uᵀ, which equals
  W_old + ΔW (I − U Uᵀ) exactly in real arithmetic. Everything is computed in float64 and
  rounded once into the fp32 (or fp64) master weight.

Precision floor (measured, not hidden): the written weight is the fp32 rounding of the exact
W_old + ΔW(I − UUᵀ), so the realised update carries a rounding error E with |E_ij| ≤ 2⁻²⁴|W_ij|
and ‖ΔW U‖_F ≤ 2⁻²⁴ ‖W_new‖_F (+ float64 residue). Relative to the *output* W x this is ~6e-8;
relative to the *update* it is 2⁻²⁴‖W‖/‖ΔW‖ (typically times √(r/d_in)), so ‖ΔW U‖ ≤ 1e-6 ‖ΔW‖ holds
while steps are ≳ 1e-2·√(r/d_in) of the weights (lr 1e-2 on the tiny test models: ~4e-8), and
not for tiny steps in fp32 (random 1e-4 steps on SmolLM2-shaped weights: 1.8e-6), a floor of
fp32 storage that no projection of fp32 weights can go below. fp64 master weights remove it
(~1e-15).

What is held: Σ_groups r·d_in basis values (float64 by default) plus Σ_modules r·d_out step
images while a step is in flight. Modules that read the *same* input tensor (q/k/v; gate/up in
Llama) share one basis, found at the first refresh by tensor identity.

Estimation (:meth:`ActivationProjector.refresh`): forward pre-hooks read each module's input at
every non-padding position (``attention_mask == 1``) of the capability batches (as produced by
``directions.CapabilitySampler``: ``input_ids``, ``attention_mask``, ``labels``), dropout off, no
autocast, no gradient. The d_in × d_in second-moment matrix Σ x xᵀ is accumulated in float64
(exact up to fp64 rounding; 8·d_in² bytes per group while refreshing). To bound that transient,
groups are split into passes whose covariances fit ``max_covariance_bytes`` (each pass replays
the batches), so an 8B model's 14336-wide down_proj inputs cost passes, not memory. No sketch
of the inputs is used: the subspace is the eigenspace of the exactly streamed covariance (to the
iteration's tolerance for wide inputs, below), which is what makes (A1) testable against an
independently computed U.

Cost: a refresh is one no-grad forward per batch (per pass) plus, per group, the top-r
eigenvectors of a d_in × d_in matrix. A full ``eigh`` costs ~9·d_in³ whatever r is (SmolLM2's
1536-wide down_proj inputs: 30 of them per refresh, most of its CPU time; benchmarks/README.md §9).
From d_in ≥ :data:`ITERATION_MIN_WIDTH` (and a block of at most d_in / 4) the top r come from
block subspace iteration with Rayleigh-Ritz instead (:func:`top_subspace`), ~2·d_in²·(r + p)
per iteration, stopped when every Ritz pair the energy rule keeps has residual ‖C v − θ v‖ ≤
:data:`ITERATION_TOLERANCE` · θ_1, and falling back to ``eigh`` if that is not reached in
:data:`ITERATION_MAX_STEPS` iterations. (A1) is exact against whichever orthonormal U is held, so
the iteration moves only *which* subspace is protected, by at most 2.5e-7 (subspace distance to
eigh's on SmolLM2 + LoRA's refresh covariances at r = 8 and 32, benchmarks/README.md §9), not how
exactly it is protected. Its starting
block comes from a private generator with a fixed seed, so the training RNG is not touched and
ranks with the same covariance get the same U. The input groups are found by one forward of a
single row at the first refresh and kept (restored with the state on resume). A projected step costs three float64
matmuls of size d_out × d_in × r per module (4.7 s at r = 16, 7.1 s at r = 64 on the same box).

Energy rule (:func:`energy_rank`): with eigenvalues λ_1 ≥ … ≥ λ_d ≥ 0 of the covariance, keep the
smallest r with Σ_{j≤r} λ_j ≥ energy · Σ_j λ_j, capped at ``rank`` (activation_rank). With
energy = 1 every direction the inputs reach is kept (up to a 1e-12 relative tolerance), and the
module's output on every capability input is then unchanged.

Embedding and head (one rule: every module is a linear map on its input):

* the LM head is a linear on the final hidden states: protected exactly like a block linear;
* the input embedding is the linear map e_t ↦ E[t] on one-hot token vectors. Its input
  covariance is diag(token counts), whose eigenvectors are token axes, so the same energy rule
  and rank cap pick the r most frequent capability tokens, and (A1) says their rows do not
  move: E[t] ← E_old[t] for those tokens. Held: r token ids and r·hidden row values.
* tied weights (SmolLM2: head = embedding) satisfy both: the head's column projection and the
  embedding's row restore commute.

Biases are left to the optimizer (Llama has none): a bias update shifts the output on every
input. Other trainable parameters (norm weights; anything not a protected linear) are either
left free (``unprotected="allow"``, with a warning listing them) or restored after every step
(``unprotected="freeze"``).

LoRA (PEFT ``lora.Linear``, y = W0 x + s·B A x, W0 frozen): with U the basis of the layer's input,

1. ΔA ← ΔA (I − U Uᵀ): A_new x = A_old x for x ∈ span U;
2. ΔB ← ΔB (I − Q Qᵀ), Q an orthonormal basis of the column space of A_old U (all of its
   min(r_lora, r) left singular vectors, so col(A_old U) ⊆ col(Q) even when it is rank
   deficient): ΔB A_old x = 0 for x ∈ span U;
3. hence B_new A_new x = (B_old + ΔB) A_old x = B_old A_old x: the adapter's output on span U is
   exactly unchanged (the cross term ΔB ΔA x vanishes because ΔA x = 0).

Caveat, stated, not hidden: when r ≥ r_lora and A_old U has full row rank, Q spans all of
R^{r_lora} and B cannot move; from PEFT's B = 0 initialisation the adapter then stays inert.
The projector warns when that happens. DoRA, several active adapters, LoRA on the embedding and
PEFT ``modules_to_save`` copies are refused (no exact form implemented and tested).

Pure torch + transformers modules: no Trainer. The seam is UpdateProjector's: ``before_step()``
right before ``optimizer.step()``, ``after_step()`` right after it (optimizer step hooks).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Default fraction of the input energy (trace of the covariance) the kept subspace captures.
DEFAULT_ENERGY = 0.99

#: Relative slack on the energy target, so that energy = 1 keeps exactly the directions the
#: inputs reach (the covariance's null eigenvalues come out of eigh as ~1e-16·trace, not 0).
ENERGY_SLACK = 1e-12

#: Input widths from which :func:`top_subspace` uses block subspace iteration instead of a full
#: ``eigh`` (below it a full eigh is cheap: its d³ cost at 576 is 1/19 of that at 1536).
ITERATION_MIN_WIDTH = 1024

#: Residual tolerance of the iteration, relative to the top eigenvalue (module docstring).
ITERATION_TOLERANCE = 1e-10

#: Iterations after which :func:`top_subspace` gives up and falls back to ``eigh``.
ITERATION_MAX_STEPS = 100

#: Default budget for the float64 covariances held at once during a refresh (1 GiB).
DEFAULT_MAX_COVARIANCE_BYTES = 2**30

Unprotected = Literal["allow", "freeze"]


# ---------------------------------------------------------------------------------- discovery


def _lora_classes() -> tuple[type, ...]:
    """PEFT's LoRA layer base class, or () when PEFT is not installed."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency of the project
        return ()
    return (LoraLayer,)


def _modules_to_save_classes() -> tuple[type, ...]:
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        return ()
    return (ModulesToSaveWrapper,)


def _decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks: the children of the first ``nn.ModuleList`` named ``layers``, ``h`` or
    ``blocks`` (Llama, Mistral, Qwen: ``model.layers``; GPT-2: ``transformer.h``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.split(".")[-1] in ("layers", "h", "blocks"):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise ValueError(
        "activation protection: found no decoder blocks (an nn.ModuleList named 'layers', 'h' or 'blocks') "
        f"in {type(model).__name__}; only decoder-only transformers are supported."
    )


def protected_modules(
    model: nn.Module, include_embeddings_and_head: bool = True
) -> dict[str, nn.Linear | nn.Embedding]:
    """Every module activation mode protects, by qualified name, in forward order.

    * every ``nn.Linear`` inside every decoder block (attention and MLP);
    * a PEFT LoRA layer appears under its own name, mapped to its ``base_layer`` (the
      ``nn.Linear`` whose input is the layer's input; its ``lora_A``/``lora_B`` are not listed);
    * with ``include_embeddings_and_head``: the LM head (a linear on the final hidden states)
      and the input embedding (a linear on one-hot tokens: its protected subspace is a set of
      token rows; see the module docstring).

    Works on any device, including ``meta`` (for memory estimates). PEFT ``modules_to_save``
    copies are refused: only one of the two copies runs, and no exact rule is implemented.
    """
    lora_types, mts_types = _lora_classes(), _modules_to_save_classes()
    out: dict[str, nn.Linear | nn.Embedding] = {}

    def add(name: str, module: nn.Module) -> None:
        if mts_types and isinstance(module, mts_types):
            raise ValueError(
                f"activation protection: {name!r} is a PEFT modules_to_save copy; activation mode has no exact "
                "rule for it. Remove it from modules_to_save, or use capability_space='gradient'."
            )
        if lora_types and isinstance(module, lora_types):
            base = module.get_base_layer()
            if isinstance(base, nn.Linear | nn.Embedding):
                out[name] = base
                return
            raise ValueError(
                f"activation protection: LoRA layer {name!r} wraps a {type(base).__name__}; only nn.Linear "
                "(and a frozen embedding) are supported."
            )
        if isinstance(module, nn.Linear | nn.Embedding):
            out[name] = module

    names = {id(m): n for n, m in model.named_modules()}
    embedding = model.get_input_embeddings() if include_embeddings_and_head else None
    if embedding is not None:
        add(names[id(embedding)], _outer_wrapper(model, embedding, names))
    for block_name, block in _decoder_blocks(model):
        skip: list[str] = []
        for sub_name, module in block.named_modules():
            full = f"{block_name}.{sub_name}" if sub_name else block_name
            if any(full.startswith(prefix + ".") for prefix in skip):
                continue
            if (lora_types and isinstance(module, lora_types)) or (mts_types and isinstance(module, mts_types)):
                add(full, module)
                skip.append(full)
            elif isinstance(module, nn.Linear):
                add(full, module)
    if include_embeddings_and_head:
        head = model.get_output_embeddings()
        if head is not None:
            add(names[id(head)], _outer_wrapper(model, head, names))
    return out


def _outer_wrapper(model: nn.Module, module: nn.Module, names: Mapping[int, str]) -> nn.Module:
    """The PEFT wrapper (LoRA layer or modules_to_save) that contains ``module``, or ``module``."""
    wrappers = _lora_classes() + _modules_to_save_classes()
    name = names[id(module)]
    for other_name, other in model.named_modules():
        if wrappers and isinstance(other, wrappers) and name.startswith(other_name + "."):
            return other
    return module


# ---------------------------------------------------------------------------------- the rule


def energy_rank(eigenvalues: torch.Tensor, energy: float, max_rank: int, total: float | None = None) -> int:
    """The smallest r ≤ ``max_rank`` whose top-r eigenvalues capture ≥ ``energy`` of the trace.

    ``eigenvalues`` in any order; negatives (rounding of a PSD matrix) count as 0. ``total``: the
    trace, when ``eigenvalues`` are only the top ones (:func:`top_subspace`'s iteration); default
    their sum. Returns 0 when the trace is 0 (the inputs are all zero: nothing to protect).
    """
    lam = eigenvalues.detach().double().clamp_min(0).sort(descending=True).values
    total = float(lam.sum()) if total is None else float(total)
    if total <= 0:
        return 0
    target = energy * total * (1.0 - ENERGY_SLACK)
    cumulative = lam.cumsum(0)
    r = int((cumulative < target).sum()) + 1
    return min(r, int(max_rank), lam.numel())


def iteration_block(max_rank: int) -> int:
    """Block width of the subspace iteration for ``max_rank`` kept vectors: r + max(16, r)."""
    return int(max_rank) + max(16, int(max_rank))


def top_eigenpairs_by_iteration(
    covariance: torch.Tensor,
    k: int,
    energy: float = 1.0,
    tolerance: float = ITERATION_TOLERANCE,
    max_steps: int = ITERATION_MAX_STEPS,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top r eigenpairs (θ descending, V d × r orthonormal, float64) of a PSD matrix C, r ≤ k by
    :func:`energy_rank` against the whole trace, by block subspace iteration with Rayleigh-Ritz
    (block :func:`iteration_block` (k)); None when a kept pair's residual ‖C v_j − θ_j v_j‖ is still
    above ``tolerance`` · θ_1 after ``max_steps``.

    Each step: Z = C Q; the Ritz pairs of C on span Q (eigh of the small Qᵀ Z); r from their values;
    stop when the top r have converged, else Q ← orth(Z). Only the kept pairs must converge: at
    energy 0.99 some of SmolLM2's input groups keep 1-2 of 32 directions. The start is C Ω with Ω
    Gaussian from a private generator seeded 0 (deterministic; the global RNG is untouched).
    """
    C = covariance.double()
    d = C.shape[0]
    block = min(iteration_block(k), d)
    total = float(C.diagonal().sum())
    generator = torch.Generator(device=C.device).manual_seed(0)
    start = torch.randn(d, block, dtype=C.dtype, device=C.device, generator=generator)
    Q = torch.linalg.qr(C @ start).Q
    for _ in range(max_steps):
        Z = C @ Q
        small = Q.T @ Z
        theta, S = torch.linalg.eigh((small + small.T) / 2)
        theta, S = theta.flip(0)[:k], S.flip(1)[:, :k]
        r = energy_rank(theta, energy, k, total=total)
        V = Q @ S[:, :r]
        residual = (Z @ S[:, :r] - V * theta[:r]).norm(dim=0)
        if r == 0 or bool((residual <= tolerance * float(theta[0])).all()):
            return theta[:r], V
        Q = torch.linalg.qr(Z).Q
    return None


def top_subspace(
    covariance: torch.Tensor, energy: float, max_rank: int, method: Literal["auto", "eigh", "iteration"] = "auto"
) -> torch.Tensor:
    """Orthonormal d × r basis (float64) of the top eigenvectors of a PSD matrix, r by :func:`energy_rank`.

    ``method="auto"``: a full ``eigh`` below :data:`ITERATION_MIN_WIDTH` or when the iteration's
    block exceeds d / 4, else :func:`top_eigenpairs_by_iteration` (module docstring, "Cost"),
    with ``eigh`` as its fallback; ``"eigh"`` / ``"iteration"`` force one (the latter still falls back).
    """
    C = covariance.double()
    d = C.shape[0]
    k = min(int(max_rank), d)
    use_iteration = method == "iteration" or (
        method == "auto" and d >= ITERATION_MIN_WIDTH and 4 * iteration_block(k) <= d
    )
    if use_iteration:
        found = top_eigenpairs_by_iteration(C, k, energy, ITERATION_TOLERANCE, ITERATION_MAX_STEPS)
        if found is not None:
            return found[1].contiguous()
        logger.debug("top_subspace: the iteration did not converge for d=%d, k=%d; using eigh", d, k)
    lam, vec = torch.linalg.eigh(C)
    r = energy_rank(lam, energy, max_rank)
    return vec.flip(-1)[:, :r].contiguous()


# ---------------------------------------------------------------------------------- entries


@dataclass
class _Entry:
    """One protected module: what is hooked, what is projected, with which basis group."""

    name: str
    kind: Literal["linear", "lora", "embedding"]
    hooked: nn.Module  # the module whose input defines the subspace
    d_in: int
    params: list[nn.Parameter]  # linear/embedding: [weight]; lora: [A, B]
    group: str = ""  # name of the entry whose basis this one uses
    #: step images held from before_step to after_step: linear [W_old U]; lora [A_old U, Q, B_old Q];
    #: embedding [E_old[rows]]
    images: list[torch.Tensor] = field(default_factory=list)


def _build_entries(
    model: nn.Module, include_embeddings_and_head: bool, module_filter: str | None
) -> tuple[list[_Entry], list[str]]:
    """The trainable protected modules, filtered; and the names of all candidates (for errors)."""
    modules = protected_modules(model, include_embeddings_and_head)
    lora_types = _lora_classes()
    by_name = dict(model.named_modules())
    candidates = list(modules)
    if module_filter is not None:
        try:
            pattern = re.compile(module_filter)
        except re.error as err:
            raise ValueError(f"module_filter={module_filter!r} is not a valid regular expression ({err}).") from None
        modules = {n: m for n, m in modules.items() if pattern.search(n)}
        if not modules:
            raise ValueError(
                f"module_filter={module_filter!r} matches none of the {len(candidates)} protectable modules "
                f"(for example {candidates[:3]}); use a regular expression that re.search finds in their names."
            )
    entries: list[_Entry] = []
    for name, hooked in modules.items():
        outer = by_name.get(name, hooked)
        if lora_types and isinstance(outer, lora_types):
            entry = _lora_entry(name, outer, hooked)
            if entry is not None:
                entries.append(entry)
            continue
        weight = hooked.weight
        if not weight.requires_grad:
            continue  # frozen: its weight never moves, nothing to project
        if isinstance(hooked, nn.Embedding):
            entries.append(_Entry(name, "embedding", hooked, hooked.num_embeddings, [weight]))
        else:
            entries.append(_Entry(name, "linear", hooked, hooked.in_features, [weight]))
    # the embedding's row restore goes last so that it composes with a tied head's projection
    entries.sort(key=lambda e: e.kind == "embedding")
    return entries, candidates


def _lora_entry(name: str, layer: nn.Module, base: nn.Module) -> _Entry | None:
    """The entry for a PEFT LoRA layer, or None when none of its parameters trains; refuses the
    variants with no exact rule."""
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    if not trainable:
        return None
    fix = "or use capability_space='gradient'"
    if isinstance(base, nn.Embedding):
        raise ValueError(
            f"activation protection: LoRA on the embedding ({name!r}) is not supported; drop it from "
            f"target_modules, {fix}."
        )
    if any(n.startswith("base_layer.") for n in trainable):
        raise ValueError(f"activation protection: {name!r} trains both its base weight and a LoRA adapter; {fix}.")
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1:
        raise ValueError(
            f"activation protection: LoRA layer {name!r} has {len(adapters)} active adapters ({adapters}); "
            f"exactly one is supported, {fix}."
        )
    adapter = adapters[0]
    if getattr(layer, "use_dora", {}).get(adapter, False) or adapter in getattr(layer, "lora_variant", {}):
        raise ValueError(
            f"activation protection: LoRA layer {name!r} uses a LoRA variant (DoRA or similar) whose output is "
            f"not B A x; no exact rule is implemented, {fix}."
        )
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if lora_b.bias is not None and lora_b.bias.requires_grad:
        raise ValueError(f"activation protection: LoRA layer {name!r} trains a lora_bias; set lora_bias=False, {fix}.")
    return _Entry(name, "lora", base, base.in_features, [lora_a.weight, lora_b.weight])


# ---------------------------------------------------------------------------------- projector


@dataclass
class ActivationStepReport:
    """What one projected step removed: ‖ΔW U‖_F of the raw update per entry (for LoRA, the
    larger of ‖ΔA U‖ and ‖ΔB Q‖; for the embedding, ‖ΔE[rows]‖), and the largest of them."""

    removed: dict[str, float]

    @property
    def max_removed(self) -> float:
        return max(self.removed.values(), default=0.0)


class ActivationProjector:
    """Projects each realised optimizer update of the protected modules off their capability
    input subspaces, ΔW ← ΔW (I − U Uᵀ) (see the module docstring for the rule, LoRA and memory).

    Args:
        model: the model being trained (unwrapped: not the DDP wrapper).
        rank: activation_rank, the largest r kept per module (1 ≤ rank ≤ the smallest d_in).
        energy: fraction of each module's input energy the basis must capture, in (0, 1].
        include_embeddings_and_head: protect the LM head and the input embedding too.
        module_filter: a regular expression; only protected modules whose name it matches
            (``re.search``) are protected. ``None``: all of them.
        unprotected: what happens to trainable parameters no rule covers (norm weights, biases):
            ``"allow"`` leaves them to the optimizer (logged once), ``"freeze"`` restores them
            after every step.
        max_covariance_bytes: budget for the float64 covariances held at once during a refresh.
        basis_dtype: dtype of the stored bases (float64 keeps U Uᵀ an exact projector).

    Raises ``ValueError`` naming the field for bad input, at construction (rank, energy, filter,
    dtypes, unsupported LoRA variants) or at :meth:`refresh` (empty capability rows).
    """

    STATE_VERSION = 1

    def __init__(
        self,
        model: nn.Module,
        rank: int,
        energy: float = DEFAULT_ENERGY,
        include_embeddings_and_head: bool = True,
        module_filter: str | None = None,
        unprotected: Unprotected = "allow",
        max_covariance_bytes: int = DEFAULT_MAX_COVARIANCE_BYTES,
        basis_dtype: torch.dtype = torch.float64,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"activation_rank must be an integer >= 1, got {rank!r}.")
        if not (isinstance(energy, int | float) and 0.0 < float(energy) <= 1.0):
            raise ValueError(f"activation energy must be in (0, 1], got {energy!r}.")
        if unprotected not in ("allow", "freeze"):
            raise ValueError(f"unprotected must be 'allow' or 'freeze', got {unprotected!r}.")
        if max_covariance_bytes < 1:
            raise ValueError(f"max_covariance_bytes must be >= 1, got {max_covariance_bytes!r}.")
        self.model = model
        self.rank = int(rank)
        self.energy = float(energy)
        self.max_covariance_bytes = int(max_covariance_bytes)
        self.basis_dtype = basis_dtype
        self.entries, candidates = _build_entries(model, include_embeddings_and_head, module_filter)
        if not self.entries:
            raise ValueError(
                f"activation protection: none of the {len(candidates)} protectable modules has a trainable weight "
                "(or LoRA adapter); nothing to protect."
            )
        seen: dict[int, str] = {}
        for entry in self.entries:
            for p in entry.params:
                if p.dtype not in (torch.float32, torch.float64):
                    raise ValueError(
                        f"{entry.name}: weight dtype {p.dtype}; activation protection is exact only on float32 (or "
                        "float64) master weights. Load the model in float32 and use bf16/fp16 autocast instead."
                    )
                if id(p) in seen and entry.kind != "embedding":
                    raise ValueError(
                        f"{entry.name} and {seen[id(p)]} share a weight; two column projections of one weight do "
                        "not compose exactly (only a tied head/embedding pair is supported)."
                    )
                seen[id(p)] = entry.name
            if entry.kind != "embedding" and self.rank > entry.d_in:
                raise ValueError(
                    f"activation_rank={self.rank} is larger than d_in={entry.d_in} of {entry.name!r}; use "
                    f"activation_rank <= {min(e.d_in for e in self.entries if e.kind != 'embedding')}."
                )
        covered = {id(p) for e in self.entries for p in e.params}
        self.unprotected = unprotected
        self.unprotected_params: dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered
        }
        if self.unprotected_params:
            logger.warning(
                "activation protection: %d trainable parameter tensors are not covered by any rule and are %s "
                "(e.g. %s).",
                len(self.unprotected_params),
                "left to the optimizer" if unprotected == "allow" else "frozen (restored after every step)",
                list(self.unprotected_params)[:4],
            )
        #: basis per group (group = the first entry reading that input); float64 d_in × r
        self.bases: dict[str, torch.Tensor] = {}
        #: token ids whose embedding rows are held fixed (the embedding's "basis": token axes)
        self.tokens: torch.Tensor | None = None
        self._frozen: list[torch.Tensor] = []
        self._armed = False
        #: whether every entry's input group is known: found by one forward at the first refresh,
        #: or restored by load_state_dict
        self._groups_known = False
        #: forward passes over the capability batches the last refresh took (one per chunk of
        #: groups whose covariances fit ``max_covariance_bytes``), and the most covariance bytes
        #: it held at once: the refresh's transient memory, for the dry run to report
        self.refresh_passes = 0
        self.peak_covariance_bytes = 0

    # ------------------------------------------------------------------ estimation

    @staticmethod
    def check_rows(rows: Mapping[str, Sequence[Mapping[str, Sequence[int]]]], pad_token_id: int | None = None) -> None:
        """Refuse capability rows with no token before training (``{task: [{"input_ids": ...}]}``,
        the sampler's ``rows``): a row of length 0 reaches no module input."""
        for task, task_rows in rows.items():
            for i, row in enumerate(task_rows):
                ids = list(row["input_ids"])
                if not ids or (pad_token_id is not None and all(t == pad_token_id for t in ids)):
                    raise ValueError(
                        f"capability_datasets[{task!r}] row {i} has no non-padding token; activation protection "
                        "needs every capability row to reach the modules. Drop empty rows."
                    )

    @torch.no_grad()
    def refresh(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Re-estimate every basis from the capability batches at the current weights.

        Each batch needs ``input_ids`` and ``attention_mask`` (B × T); inputs are read at every
        position with ``attention_mask == 1``. Dropout is off and autocast disabled for the
        duration; every module's ``training`` flag is restored afterwards.
        """
        batches = [dict(b) for b in batches]
        if not batches:
            raise ValueError("activation refresh: no capability batches given.")
        for i, batch in enumerate(batches):
            if "input_ids" not in batch or "attention_mask" not in batch:
                raise ValueError(f"capability batch {i} needs 'input_ids' and 'attention_mask', got {sorted(batch)}.")
            if batch["attention_mask"].shape != batch["input_ids"].shape:
                raise ValueError(f"capability batch {i}: attention_mask and input_ids differ in shape.")
            empty = (batch["attention_mask"].sum(dim=-1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"capability batch {i} rows {empty} have no non-padding position (attention_mask is all 0); "
                    "activation protection needs every capability row to reach the modules."
                )
        flags = [(m, m.training) for m in self.model.modules()]
        device_type = _device_of(self.model).type
        try:
            self.model.eval()
            with torch.autocast(device_type=device_type, enabled=False):
                self._estimate(batches)
        finally:
            for m, flag in flags:
                m.training = flag

    def _estimate(self, batches: list[dict[str, torch.Tensor]]) -> None:
        hooked = [e for e in self.entries if e.kind != "embedding"]
        self.bases, self.tokens = {}, None
        self.refresh_passes = self.peak_covariance_bytes = 0
        if hooked:
            if not self._groups_known:  # the module graph is fixed for the run: found once
                self._find_groups(hooked, batches[0])
                self._groups_known = True
            leaders = [e for e in hooked if e.group == e.name]
            for chunk in _chunks(leaders, self.max_covariance_bytes):
                covariances = self._accumulate(chunk, batches)
                self.refresh_passes += 1
                self.peak_covariance_bytes = max(
                    self.peak_covariance_bytes, sum(c.numel() * c.element_size() for c in covariances.values())
                )
                for entry in chunk:
                    basis = top_subspace(covariances.pop(entry.name), self.energy, self.rank)
                    self.bases[entry.name] = basis.to(device=entry.params[0].device, dtype=self.basis_dtype)
            logger.info(
                "activation refresh: %d modules in %d input groups, ranks %s",
                len(hooked),
                len(leaders),
                sorted({int(b.shape[1]) for b in self.bases.values()}),
            )
        for entry in self.entries:
            if entry.kind == "embedding":
                counts = torch.zeros(entry.d_in, dtype=torch.float64)
                for batch in batches:
                    ids = batch["input_ids"][batch["attention_mask"].bool()].cpu()
                    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= entry.d_in):
                        raise ValueError(f"capability input_ids outside the vocabulary of {entry.name!r}.")
                    counts += torch.bincount(ids, minlength=entry.d_in).double()
                r = energy_rank(counts, self.energy, self.rank)
                self.tokens = counts.argsort(descending=True, stable=True)[:r].to(entry.params[0].device)

    def _find_groups(self, hooked: list[_Entry], batch: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Group entries that read the same input tensor (consecutive calls on one tensor object,
        e.g. q/k/v), from one forward of the batch's first row; each group's first entry is its
        leader. Only the previous call's input is held (a strong reference, so its id cannot be
        reused by a later tensor), not the whole forward's."""
        groups: dict[str, list[str]] = {}
        previous: list[tuple[_Entry, torch.Tensor]] = []

        def make_hook(entry: _Entry) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                if any(entry.name in members for members in groups.values()):
                    return  # a module called twice keeps its first group
                if previous and x is previous[0][1]:
                    entry.group = previous[0][0].group
                else:
                    entry.group = entry.name
                groups.setdefault(entry.group, []).append(entry.name)
                previous[:] = [(entry, x)]

            return hook

        handles = [e.hooked.register_forward_pre_hook(make_hook(e)) for e in hooked]
        try:
            self._forward({key: value[:1] for key, value in batch.items()})
        finally:
            for h in handles:
                h.remove()
            previous.clear()
        seen = {name for members in groups.values() for name in members}
        missing = [e.name for e in hooked if e.name not in seen]
        if missing:
            raise ValueError(
                f"activation protection: modules {missing[:4]} were not called on the capability batch; they "
                "cannot be protected (use module_filter to leave them out)."
            )
        return groups

    def _accumulate(self, leaders: list[_Entry], batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Σ x xᵀ in float64 over every non-padding position, for each leader's input."""
        covariances = {e.name: torch.zeros(e.d_in, e.d_in, dtype=torch.float64, device=e.params[0].device) for e in leaders}
        mask: list[torch.Tensor] = []

        def make_hook(entry: _Entry) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                if x.shape[:-1] != mask[0].shape:
                    raise ValueError(
                        f"{entry.name}: input of shape {tuple(x.shape)} does not match the attention mask "
                        f"{tuple(mask[0].shape)}; activation protection needs (batch, time, features) inputs."
                    )
                rows = x[mask[0].to(x.device)].double()
                covariances[entry.name].addmm_(rows.T, rows)

            return hook

        handles = [e.hooked.register_forward_pre_hook(make_hook(e)) for e in leaders]
        try:
            for batch in batches:
                mask[:] = [batch["attention_mask"].bool()]
                self._forward(batch)
        finally:
            for h in handles:
                h.remove()
        return covariances

    def _forward(self, batch: Mapping[str, torch.Tensor]) -> None:
        device = _device_of(self.model)
        self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))

    # ------------------------------------------------------------------ step hooks

    @property
    def ready(self) -> bool:
        """True once :meth:`refresh` (or :meth:`load_state_dict`) has installed bases."""
        return bool(self.bases) or self.tokens is not None

    @torch.no_grad()
    def before_step(self) -> None:
        """Store the step images (W_old U per module; A_old U, Q, B_old Q per LoRA layer;
        E_old[rows] for the embedding), all from the weights before the optimizer step."""
        if not self.ready:
            self._armed = False
            return
        for entry in self.entries:
            entry.images = []
            if entry.kind == "embedding":
                if self.tokens is not None and self.tokens.numel():
                    entry.images = [entry.params[0].detach()[self.tokens].clone()]
                continue
            U = self.bases[entry.group].double()
            if U.shape[1] == 0:
                continue
            if entry.kind == "linear":
                entry.images = [entry.params[0].detach().double() @ U]
            else:
                A, B = entry.params
                AU = A.detach().double() @ U  # r_lora × r
                Q = torch.linalg.svd(AU, full_matrices=False).U  # all min(r_lora, r) columns
                if Q.shape[1] >= A.shape[0]:
                    logger.warning(
                        "%s: A U spans all %d LoRA dimensions, so B cannot move (lower activation_rank or energy "
                        "to let it).",
                        entry.name,
                        A.shape[0],
                    )
                entry.images = [AU, Q, B.detach().double() @ Q]
        if self.unprotected == "freeze":
            self._frozen = [p.detach().clone() for p in self.unprotected_params.values()]
        self._armed = True

    @torch.no_grad()
    def after_step(self) -> ActivationStepReport | None:
        """Write W ← W_new − (W_new U − W_old U) Uᵀ = W_old + ΔW (I − U Uᵀ) for every entry
        (LoRA: A by U, then B by Q; embedding: protected rows restored)."""
        if not self._armed:
            return None
        self._armed = False
        norms: dict[str, torch.Tensor] = {}
        for entry in self.entries:
            if not entry.images:
                continue
            if entry.kind == "embedding":
                weight = entry.params[0]
                assert self.tokens is not None
                norms[entry.name] = (weight[self.tokens] - entry.images[0]).double().norm()
                weight[self.tokens] = entry.images[0]
            elif entry.kind == "linear":
                norms[entry.name] = _project_(entry.params[0], self.bases[entry.group].double(), entry.images[0])
            else:
                A, B = entry.params
                AU, Q, BQ = entry.images
                removed_a = _project_(A, self.bases[entry.group].double(), AU)
                removed_b = _project_(B, Q, BQ)
                norms[entry.name] = torch.maximum(removed_a, removed_b)
            entry.images = []
        if self.unprotected == "freeze":
            for p, old in zip(self.unprotected_params.values(), self._frozen, strict=True):
                p.copy_(old)
        values = torch.stack([v.cpu() for v in norms.values()]).tolist() if norms else []
        report = ActivationStepReport(dict(zip(norms, values, strict=True)))
        if not all(map(math.isfinite, values)):
            raise ValueError("the optimizer's update is not finite (NaN or inf) on a protected module")
        return report

    @torch.no_grad()
    def project_directions(
        self, params: Sequence[nn.Parameter], directions: Sequence[Sequence[torch.Tensor]]
    ) -> list[list[torch.Tensor]]:
        """Gradient-space directions restricted to the updates this projector allows, for
        ``capability_space="both"``.

        Each direction is a list of tensors shaped like ``params`` (UpdateProjector's layout).
        Tensors of protected weights get c ← c (I − U Uᵀ) (LoRA: A by U, B by Q from the current
        A; embedding: protected rows zeroed); frozen unprotected parameters (``unprotected="freeze"``)
        get 0; everything else is returned as it is (no copy).

        Why: run this projector's ``after_step`` first (u → u', an allowed update), then the
        gradient projector with these directions c'. Its δ = a_0 u' + Σ a_i c'_i is allowed (the
        allowed updates form a linear space), so ΔW U = 0 still holds, and ⟨δ, c_i⟩ = ⟨δ, c'_i⟩
        because c_i − c'_i lies in the blocked part (c U Uᵀ, protected rows) that δ has none of:
        the null-space guarantee holds for the original directions too, exactly.
        For LoRA, Q is taken from the A at call time; between refreshes ΔA U = 0 keeps A U (and
        so Q) fixed up to fp32 rounding.
        """
        if not self.ready:
            raise RuntimeError("project_directions needs bases: call refresh first")
        role: dict[int, tuple[_Entry, int]] = {}
        for entry in self.entries:
            for k, p in enumerate(entry.params):
                role.setdefault(id(p), (entry, k))
        frozen = {id(p) for p in self.unprotected_params.values()} if self.unprotected == "freeze" else set()
        lora_q: dict[str, torch.Tensor] = {}
        out: list[list[torch.Tensor]] = []
        for direction in directions:
            if len(direction) != len(params):
                raise ValueError(f"a direction has {len(direction)} tensors for {len(params)} parameters")
            projected = []
            for p, c in zip(params, direction, strict=True):
                if id(p) in frozen:
                    projected.append(torch.zeros_like(c))
                    continue
                found = role.get(id(p))
                if found is None:
                    projected.append(c)
                    continue
                entry, k = found
                c64 = c.detach().double()
                if entry.kind == "embedding":
                    c64 = c64.clone()
                    if self.tokens is not None:
                        c64[self.tokens.to(c64.device)] = 0
                    # a tied head's projection also applies to this tensor (same parameter)
                    for other in self.entries:
                        if other.kind == "linear" and other.params[0] is p:
                            U = self.bases[other.group].double().to(c64.device)
                            c64 = c64 - (c64 @ U) @ U.T
                elif entry.kind == "linear" or k == 0:
                    U = self.bases[entry.group].double().to(c64.device)
                    c64 = c64 - (c64 @ U) @ U.T
                    if entry.kind == "linear":
                        for other in self.entries:
                            if other.kind == "embedding" and other.params[0] is p and self.tokens is not None:
                                c64[self.tokens.to(c64.device)] = 0
                else:  # LoRA B: the rows' span Q of A U
                    if entry.name not in lora_q:
                        A = entry.params[0].detach().double()
                        U = self.bases[entry.group].double()
                        lora_q[entry.name] = torch.linalg.svd(A @ U, full_matrices=False).U
                    Q = lora_q[entry.name].to(c64.device)
                    c64 = c64 - (c64 @ Q) @ Q.T
                projected.append(c64.to(c.dtype))
            out.append(projected)
        return out

    # ------------------------------------------------------------------ memory and state

    def basis_bytes(self) -> int:
        """Bytes of the held bases, Σ_groups r·d_in·itemsize, plus the embedding's token ids."""
        total = sum(b.numel() * b.element_size() for b in self.bases.values())
        if self.tokens is not None:
            total += self.tokens.numel() * self.tokens.element_size()
        return total

    def step_image_bytes(self) -> int:
        """Bytes held between before_step and after_step at the current ranks: Σ r·d_out float64
        per linear (W_old U), r_lora·r + r_lora·q + d_out·q per LoRA layer, r·hidden per
        embedding (its rows), plus the frozen parameters' copies."""
        total = 0
        for entry in self.entries:
            if entry.kind == "embedding":
                r = 0 if self.tokens is None else self.tokens.numel()
                w = entry.params[0]
                total += r * w.shape[1] * w.element_size()
                continue
            basis = self.bases.get(entry.group)
            r = 0 if basis is None else basis.shape[1]
            if entry.kind == "linear":
                total += r * entry.params[0].shape[0] * 8
            else:
                A, B = entry.params
                q = min(A.shape[0], r)
                total += (A.shape[0] * r + A.shape[0] * q + B.shape[0] * q) * 8
        if self.unprotected == "freeze":
            total += sum(p.numel() * p.element_size() for p in self.unprotected_params.values())
        return total

    def memory_bytes(self) -> int:
        """Everything the projector holds during a step: bases plus step images."""
        return self.basis_bytes() + self.step_image_bytes()

    def ranks(self) -> dict[str, int]:
        """The kept r per protected entry (the embedding's r is its number of protected tokens)."""
        out = {}
        for entry in self.entries:
            if entry.kind == "embedding":
                out[entry.name] = 0 if self.tokens is None else int(self.tokens.numel())
            elif entry.group in self.bases:
                out[entry.name] = int(self.bases[entry.group].shape[1])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Bases (CPU), groups and protected tokens: what a resumed run needs to project identically."""
        return {
            "version": self.STATE_VERSION,
            "rank": self.rank,
            "energy": self.energy,
            "groups": {e.name: e.group for e in self.entries if e.kind != "embedding"},
            "bases": {name: b.cpu() for name, b in self.bases.items()},
            "tokens": None if self.tokens is None else self.tokens.cpu(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"unsupported activation projector state version {state.get('version')!r}.")
        groups: Mapping[str, str] = state["groups"]
        names = {e.name for e in self.entries if e.kind != "embedding"}
        if set(groups) != names:
            raise ValueError(
                "activation projector state protects other modules than this model: "
                f"missing {sorted(names - set(groups))[:4]}, unknown {sorted(set(groups) - names)[:4]}."
            )
        by_name = {e.name: e for e in self.entries}
        for entry in self.entries:
            if entry.kind != "embedding":
                entry.group = groups[entry.name]
        self._groups_known = True
        self.bases = {
            name: b.to(device=by_name[name].params[0].device, dtype=self.basis_dtype)
            for name, b in state["bases"].items()
        }
        tokens = state.get("tokens")
        emb = [e for e in self.entries if e.kind == "embedding"]
        self.tokens = None if tokens is None or not emb else tokens.to(emb[0].params[0].device)


def _project_(weight: torch.Tensor, basis: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """In place: weight ← weight − (weight·basis − image)·basisᵀ, in float64, rounded once.

    With image = W_old·basis this is W_old + ΔW (I − basis basisᵀ). Returns ‖ΔW·basis‖_F (a 0-d
    float64 tensor on the weight's device)."""
    w64 = weight.detach().double()
    residual = w64 @ basis - image  # ΔW·basis: the component the step must not have
    weight.copy_(w64.sub_(residual @ basis.T))
    return residual.norm()


def _chunks(leaders: list[_Entry], budget: int) -> list[list[_Entry]]:
    """Split the groups into passes whose float64 covariances fit ``budget`` bytes (at least one
    group per pass)."""
    chunks: list[list[_Entry]] = []
    current: list[_Entry] = []
    used = 0
    for entry in leaders:
        size = entry.d_in * entry.d_in * 8
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(entry)
        used += size
    if current:
        chunks.append(current)
    return chunks


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- memory estimate


@torch.no_grad()
def activation_memory(
    model: nn.Module,
    rank: int,
    num_directions: int,
    include_embeddings_and_head: bool = True,
    basis_itemsize: int = 8,
) -> dict[str, int]:
    """Bytes each geometry holds for ``model`` (works on the ``meta`` device: shapes only).

    * ``activation_basis``: Σ_groups r·d_in·itemsize with r = ``rank`` for every group (an upper
      bound: the energy rule may keep fewer); groups found by one meta forward (q/k/v share);
      the embedding counts r token ids (int64);
    * ``activation_step``: the float64 step images, Σ_modules r·d_out·8 (LoRA: r_lora·r + r_lora·q +
      d_out·q with q = min(r_lora, r)), plus r·hidden embedding rows;
    * ``activation_refresh``: the float64 covariance of the largest group, the smallest budget
      a refresh can run in (one group per pass), and ``activation_refresh_one_pass``: Σ_groups
      d_in²·8, all groups in one pass;
    * ``gradient``: (k+1) × the trainable bytes, k = ``num_directions`` (UpdateProjector's
      directions plus its snapshot);
    * ``nspo_dense``: NSPO's dense projectors, Σ_modules d_in² in fp32, over the same modules.
    """
    entries, _ = _build_entries(model, include_embeddings_and_head, None)
    groups = _meta_groups(model, entries)
    basis = step = one_pass = dense = 0
    largest = 0
    for entry in entries:
        weight = entry.params[0]
        if entry.kind == "embedding":
            basis += rank * 8
            step += rank * weight.shape[1] * weight.element_size()
            continue
        if groups.get(entry.name, entry.name) == entry.name:
            basis += rank * entry.d_in * basis_itemsize
            one_pass += entry.d_in * entry.d_in * 8
            largest = max(largest, entry.d_in * entry.d_in * 8)
        if entry.kind == "lora":  # A_old U, Q and B_old Q (see step_image_bytes)
            r_lora, d_out = entry.params[0].shape[0], entry.params[1].shape[0]
            q = min(r_lora, rank)
            step += (r_lora * rank + r_lora * q + d_out * q) * 8
        else:
            step += rank * weight.shape[0] * 8
        dense += entry.d_in * entry.d_in * 4
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "activation_basis": basis,
        "activation_step": step,
        "activation_total": basis + step,
        "activation_refresh": largest,
        "activation_refresh_one_pass": one_pass,
        "gradient": (num_directions + 1) * trainable,
        "nspo_dense": dense,
        "trainable": trainable,
    }


def _meta_groups(model: nn.Module, entries: list[_Entry]) -> dict[str, str]:
    """Input groups by tensor identity from one forward of a 1 × 4 batch (no attention mask, so it
    runs on the meta device too)."""
    hooked = [e for e in entries if e.kind != "embedding"]
    order: list[tuple[str, torch.Tensor]] = []
    handles = [
        e.hooked.register_forward_pre_hook(lambda m, args, name=e.name: order.append((name, args[0]))) for e in hooked
    ]
    try:
        device = _device_of(model)
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, str] = {}
    previous: tuple[str, torch.Tensor] | None = None
    for name, x in order:
        if name in groups:
            continue
        groups[name] = groups[previous[0]] if previous is not None and x is previous[1] else name
        previous = (name, x)
    return groups
