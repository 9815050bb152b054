"""Tax rates from representation probes: Prediction 1 as the paper states it (§8).

Prediction 1 of "What Is the Geometry of the Alignment Tax?" says the per-task tax rate
τ_i = ⟨v*, c_i⟩² (Cor 4.5, eq. 6) is computable from the model's *representations* before any
alignment step: measure the safety direction v* with a safety probe (Arditi et al. 2024) and the
capability directions c_i with task probes, then compare the ordering of τ_i with the observed
degradation. :mod:`frontier_trainer.report` measures the same quantity in *gradient* space; this
module measures it in the residual stream, with plain torch and a Hugging Face causal LM (no
Trainer).

Objects (all per layer ℓ of the residual stream, read at the **last prompt token**):

* activations h_ℓ(x) ∈ ℝ^d: ``output_hidden_states=True``; entry ℓ is the output of decoder block ℓ
  (entry 0 is the embedding output; in Hugging Face Llama-style models the last entry has the final
  norm applied). :func:`residual_activations`.
* safety direction (Def 3.1): v*_ℓ = normalise(mean_harmful h_ℓ − mean_harmless h_ℓ), the
  difference of means of Arditi et al. (2024). :func:`safety_direction`.
* task directions (Def 3.2's c_i, estimated by a probe): c_{i,ℓ} = normalise(mean_{x∈task i} h_ℓ(x)
  − b_ℓ), where the baseline b_ℓ is by default the **grand mean of the task means** (each task
  weighted equally). :func:`task_directions`. Why this baseline: it is the "generic" point of the
  capability suite, so c_i is what distinguishes task i from the other capabilities. It equals, up to
  the positive factor m/(m−1), the one-vs-rest difference μ_i − mean_{j≠i} μ_j, so the two usual
  definitions agree; it needs no extra data set; and it is defined for every task alike. A neutral
  set can be passed instead (``baseline=``). Why a difference of means rather than a logistic
  regression probe: (1) v* is a difference of means (Arditi et al.), so v* and c_i are then measured
  by the same estimator; (2) task prompts are usually linearly separable (here by vocabulary), and on
  separable data a logistic-regression weight vector has no finite optimum: its direction is the
  max-margin direction reached only in the limit and in practice depends on the regulariser and the
  iteration count; (3) it is closed form and deterministic.
* τ_{i,ℓ} = cos²(v*_ℓ, c_{i,ℓ}) via :func:`frontier_trainer.geometry.task_tax_rates` (eq. 6 on unit
  vectors). :func:`representation_tax_rates`.
* **layer-aggregation rule** (one rule, applied everywhere): τ_i is τ_{i,ℓ*} at the single layer ℓ*
  where the safety probe separates harmful from harmless prompts best, measured by the separation
  d′_ℓ = (mean_h ⟨v*_ℓ, h⟩ − mean_b ⟨v*_ℓ, h⟩) / sqrt((var_h + var_b)/2) on held-out prompts
  (:func:`safety_separation`, :func:`select_layer`). Why: the paper's v* is *one* direction, the
  one that carries the safety content; Arditi et al. likewise pick the one layer whose
  difference-of-means direction works best. Averaging over layers would mix in layers where the
  probe does not find the safety feature at all (e.g. the embedding output at a fixed last token,
  which does not depend on the prompt).

Everything returned is float32 on the CPU; inner products are taken in float64 by
:mod:`frontier_trainer.geometry`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from frontier_trainer import geometry

logger = logging.getLogger(__name__)

Activations = dict[int, torch.Tensor]
"""Per layer index ℓ, a float32 tensor of shape (n, d): one row per prompt."""

Directions = dict[int, torch.Tensor]
"""Per layer index ℓ, a unit float32 vector of shape (d,)."""

POSITIONS = ("last_prompt_token",)
"""Probe positions :func:`residual_activations` supports."""

ZERO_DIRECTION_RTOL = 1e-6
"""A difference of means shorter than this fraction of the mean activation norm is treated as zero."""


# --------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(
            "model: residual_activations needs a Hugging Face causal LM whose config has "
            "num_hidden_layers (a positive int)"
        )
    return n


def check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Validate layer indices into ``hidden_states`` (0 = embeddings, 1..L = decoder blocks).

    ``None`` means every decoder block, 1..L: the embedding output (0) is left out by default
    because at a fixed probe token (the lab's ``=>``, a chat template's last token) it is the same
    vector for every prompt and carries no information about the prompt.
    """
    if layers is None:
        return list(range(1, num_layers + 1))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layers: {layer!r} is not an int; pass indices in 0..{num_layers}")
        if not 0 <= layer <= num_layers:
            raise ValueError(
                f"layers: index {layer} is out of range for a model with {num_layers} decoder blocks; "
                f"valid indices are 0 (embeddings) to {num_layers} (last block)"
            )
        if layer not in out:
            out.append(layer)
    if not out:
        raise ValueError(f"layers: empty list; pass indices in 0..{num_layers} or None for all blocks")
    return out


def _encode(
    tokenizer: Any,
    prompts: Sequence[str],
    chat_template: bool,
    add_special_tokens: bool | None,
    name: str,
) -> list[list[int]]:
    """Token ids of each prompt (optionally rendered with the chat template plus generation prompt)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"{name}: pass a list of prompt strings, got {type(prompts).__name__}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name}[{bad[0]}]: prompts must be strings, got {type(prompts[bad[0]]).__name__}")
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{name}: chat_template=True but the tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        special = False if add_special_tokens is None else add_special_tokens
    else:
        texts = list(prompts)
        special = True if add_special_tokens is None else add_special_tokens
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(
                f"{name}[{i}]: the prompt {prompts[i]!r} tokenises to no token, so there is no last prompt "
                "token to probe; drop empty prompts or pass chat_template=True"
            )
    return [list(r) for r in ids]


@torch.no_grad()
def residual_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    position: str = "last_prompt_token",
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    chat_template: bool = False,
    add_special_tokens: bool | None = None,
    progress: bool = False,
    name: str = "prompts",
) -> Activations:
    """Residual-stream hidden states at the last prompt token, per layer: ``{ℓ: Tensor[n, d]}``, fp32.

    Prompts are batched with the tokenizer's padding side; the probe position of each row is its last
    real (attention-mask) token and position ids are counted over real tokens only, so left- and
    right-padded batches give the activations of the unpadded prompt (tested).

    Args:
        model: a Hugging Face causal LM (anything returning ``hidden_states`` with
            ``output_hidden_states=True``).
        tokenizer: its tokenizer (needs a pad token, or an EOS token to pad with).
        prompts: the prompt strings.
        position: only ``"last_prompt_token"`` (Arditi et al. 2024 read the post-instruction tokens;
            the last one is the position the first response token is predicted from).
        layers: indices into ``hidden_states`` (0 = embeddings, 1..L = decoder blocks); ``None``
            means 1..L (see :func:`check_layers`).
        batch_size: prompts per forward pass.
        chat_template: render each prompt as a user turn with the tokenizer's chat template and the
            generation prompt (then no special tokens are added on top, unless ``add_special_tokens``).
        add_special_tokens: passed to the tokenizer; ``None``: the tokenizer's default for plain
            prompts, ``False`` for chat-templated ones (the template already has them). The probe
            position is the last token of the encoded prompt, so a tokenizer that appends EOS to
            every input would be probed at that EOS: pass ``add_special_tokens=False`` then.
        progress: show a tqdm bar over batches.
        name: what the error messages call ``prompts``.

    Raises:
        ValueError: unknown ``position``, an empty prompt list, a prompt with no token (nothing to
            probe), a layer index outside 0..L, or a bad ``batch_size``; each message names the field.
    """
    if position not in POSITIONS:
        raise ValueError(f"position={position!r} is not supported; use one of {POSITIONS}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if len(prompts) == 0:
        raise ValueError(f"{name}: no prompt given; pass at least one prompt string")
    chosen = check_layers(layers, _num_layers(model))
    ids = _encode(tokenizer, prompts, chat_template, add_special_tokens, name)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(
            "tokenizer: no pad_token_id or eos_token_id to pad batches with; set tokenizer.pad_token"
        )
    left = getattr(tokenizer, "padding_side", "right") == "left"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}
    try:
        starts = range(0, len(ids), batch_size)
        for start in tqdm(starts, desc=f"activations ({name})", disable=not progress):
            rows = ids[start : start + batch_size]
            width = max(map(len, rows))
            input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                span = slice(width - len(row), width) if left else slice(0, len(row))
                input_ids[j, span] = torch.tensor(row, dtype=torch.long)
                mask[j, span] = 1
            positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
            last = (mask * torch.arange(width)).argmax(dim=1)  # last real token, either padding side
            output = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                output_hidden_states=True,
                use_cache=False,
            )
            hidden = output.hidden_states
            rows_idx = torch.arange(len(rows), device=device)
            for layer in chosen:
                out[layer].append(hidden[layer][rows_idx, last.to(device)].detach().float().cpu())
    finally:
        model.train(was_training)
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


# --------------------------------------------------------------------------------------
# directions
# --------------------------------------------------------------------------------------


def _check_activations(name: str, acts: Mapping[int, torch.Tensor], min_rows: int = 2) -> None:
    if not isinstance(acts, Mapping) or not acts:
        raise ValueError(f"{name}: expected {{layer: Tensor[n, d]}} activations, got {type(acts).__name__}")
    for layer, x in acts.items():
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(
                f"{name}[{layer}]: expected a 2-D tensor (n prompts, d), got {getattr(x, 'shape', x)}"
            )
        if x.shape[0] < min_rows:
            raise ValueError(
                f"{name}[{layer}]: {x.shape[0]} prompt(s); a difference of means needs at least {min_rows} "
                "prompts per class"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}[{layer}]: activations contain NaN or inf")


def _common_layers(names: Sequence[str], sets: Sequence[Mapping[int, torch.Tensor]]) -> list[int]:
    layers = list(sets[0])
    for name, acts in zip(names[1:], sets[1:], strict=True):
        if set(acts) != set(layers):
            raise ValueError(
                f"{name}: layers {sorted(acts)} differ from {names[0]}'s {sorted(layers)}; "
                "compute all activations with the same layers="
            )
    for layer in layers:
        dims = {name: acts[layer].shape[1] for name, acts in zip(names, sets, strict=True)}
        if len(set(dims.values())) > 1:
            raise ValueError(
                f"hidden sizes differ at layer {layer}: {dims}; activations must come from one model"
            )
    return layers


def _unit(name: str, diff: torch.Tensor, scale: float) -> torch.Tensor:
    norm = float(diff.norm())
    if not math.isfinite(norm) or norm <= ZERO_DIRECTION_RTOL * max(scale, 1e-30):
        raise ValueError(
            f"{name}: the two means coincide (difference norm {norm:.3g} vs activation norm {scale:.3g}), "
            "so the direction is undefined; at this layer the probe position does not depend on the "
            "prompt (e.g. layer 0 at a fixed last token): drop the layer"
        )
    return (diff / norm).float()


def difference_of_means(
    positive: Mapping[int, torch.Tensor],
    negative: Mapping[int, torch.Tensor],
    *,
    names: tuple[str, str] = ("positive", "negative"),
) -> Directions:
    """Per layer, the unit vector along mean(positive) − mean(negative) (both at least 2 rows)."""
    _check_activations(names[0], positive)
    _check_activations(names[1], negative)
    layers = _common_layers(names, [positive, negative])
    out: Directions = {}
    for layer in layers:
        a, b = positive[layer].double(), negative[layer].double()
        scale = 0.5 * float(a.norm(dim=1).mean() + b.norm(dim=1).mean())
        out[layer] = _unit(f"{names[0]} − {names[1]} at layer {layer}", a.mean(0) - b.mean(0), scale)
    return out


def safety_direction(harmful: Mapping[int, torch.Tensor], harmless: Mapping[int, torch.Tensor]) -> Directions:
    """v*_ℓ = unit(mean harmful − mean harmless) per layer (Def 3.1; Arditi et al. 2024).

    Args:
        harmful, harmless: activations from :func:`residual_activations` (≥ 2 prompts each, same
            layers and hidden size).
    """
    return difference_of_means(harmful, harmless, names=("harmful", "harmless"))


def task_directions(
    tasks: Mapping[str, Mapping[int, torch.Tensor]],
    *,
    baseline: Mapping[int, torch.Tensor] | None = None,
) -> dict[str, Directions]:
    """c_{i,ℓ} = unit(mean of task i's activations − baseline_ℓ): a difference-of-means task probe.

    Args:
        tasks: ``{task: activations}`` (≥ 2 prompts each, same layers and hidden size).
        baseline: activations of a neutral prompt set; ``None`` (the default) uses the grand mean of
            the task means, each task weighted equally, which makes c_i ∝ μ_i − mean_{j≠i} μ_j (the
            module docstring says why). With ``None`` at least two tasks are needed.

    Returns:
        ``{task: {layer: unit vector}}``.
    """
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks: expected {task: activations} with at least one task")
    names = [f"tasks[{t!r}]" for t in tasks]
    sets = list(tasks.values())
    for name, acts in zip(names, sets, strict=True):
        _check_activations(name, acts)
    if baseline is not None:
        _check_activations("baseline", baseline)
        layers = _common_layers(["baseline", *names], [baseline, *sets])
        base = {layer: baseline[layer].double().mean(0) for layer in layers}
    else:
        if len(tasks) < 2:
            raise ValueError(
                "tasks: the default baseline (grand mean of the task means) needs at least two tasks; "
                "pass baseline= activations of a neutral prompt set"
            )
        layers = _common_layers(names, sets)
        base = {layer: torch.stack([a[layer].double().mean(0) for a in sets]).mean(0) for layer in layers}
    out: dict[str, Directions] = {}
    for task, acts in tasks.items():
        out[task] = {}
        for layer in layers:
            x = acts[layer].double()
            scale = float(x.norm(dim=1).mean())
            out[task][layer] = _unit(
                f"tasks[{task!r}] − baseline at layer {layer}", x.mean(0) - base[layer], scale
            )
    return out


# --------------------------------------------------------------------------------------
# tax rates and the layer rule
# --------------------------------------------------------------------------------------


def representation_tax_rates(
    v: Mapping[int, torch.Tensor], c: Mapping[str, Mapping[int, torch.Tensor]]
) -> dict[str, dict[int, float]]:
    """τ_{i,ℓ} = cos²(v*_ℓ, c_{i,ℓ}) for every task and layer (eq. 6, via geometry.task_tax_rates).

    Args:
        v: safety direction per layer (from :func:`safety_direction`).
        c: task directions ``{task: {layer: vector}}`` (from :func:`task_directions`); every task
            must cover every layer of ``v`` with vectors of the same hidden size.

    Returns:
        ``{task: {layer: τ}}``, each τ in [0, 1].
    """
    if not isinstance(v, Mapping) or not v:
        raise ValueError("v: expected {layer: Tensor[d]} safety directions, got none")
    if not isinstance(c, Mapping) or not c:
        raise ValueError("c: expected {task: {layer: Tensor[d]}} task directions, got none")
    tasks = list(c)
    out: dict[str, dict[int, float]] = {t: {} for t in tasks}
    for layer, vec in v.items():
        if not isinstance(vec, torch.Tensor) or vec.ndim != 1:
            raise ValueError(f"v[{layer}]: expected a 1-D tensor, got {getattr(vec, 'shape', vec)}")
        cols = []
        for task in tasks:
            if layer not in c[task]:
                raise ValueError(f"c[{task!r}]: no direction at layer {layer} (v has layers {sorted(v)})")
            col = c[task][layer]
            if not isinstance(col, torch.Tensor) or col.ndim != 1 or col.shape[0] != vec.shape[0]:
                raise ValueError(
                    f"c[{task!r}][{layer}]: hidden size {tuple(getattr(col, 'shape', ()))} does not match "
                    f"v[{layer}]'s ({vec.shape[0]},); directions must come from the same model and layer"
                )
            cols.append(col)
        taus = geometry.task_tax_rates(vec.double(), torch.stack(cols, dim=1).double())
        for task, tau in zip(tasks, taus.tolist(), strict=True):
            out[task][layer] = float(tau)
    return out


def representation_cosines(
    v: Mapping[int, torch.Tensor], c: Mapping[str, Mapping[int, torch.Tensor]]
) -> dict[str, dict[int, float]]:
    """Signed cos(v*_ℓ, c_{i,ℓ}) per task and layer; its square is :func:`representation_tax_rates`.

    τ is sign-blind (the frontier is symmetric in the sign of ⟨v*, c_i⟩); the sign says whether task
    i's probe points towards the harmful side (cos > 0) or away from it, which the tax rate hides.
    """
    representation_tax_rates(v, c)  # same validation
    return {
        task: {
            layer: float(v[layer].double() @ by[layer].double())
            / float(v[layer].double().norm() * by[layer].double().norm())
            for layer in v
        }
        for task, by in c.items()
    }


def safety_separation(
    v: Mapping[int, torch.Tensor], harmful: Mapping[int, torch.Tensor], harmless: Mapping[int, torch.Tensor]
) -> dict[int, float]:
    """d′_ℓ of the probe ⟨v*_ℓ, h⟩ between harmful and harmless prompts (pass held-out prompts).

    d′ = (mean_h s − mean_b s) / sqrt((var_h + var_b)/2), s = ⟨v*_ℓ, h⟩: how many pooled standard
    deviations apart the two classes lie along the probe. +inf when both classes have zero spread
    and different means.
    """
    _check_activations("harmful", harmful)
    _check_activations("harmless", harmless)
    layers = _common_layers(["harmful", "harmless"], [harmful, harmless])
    out: dict[int, float] = {}
    for layer in layers:
        if layer not in v:
            raise ValueError(f"v: no safety direction at layer {layer} (v has layers {sorted(v)})")
        if v[layer].shape[0] != harmful[layer].shape[1]:
            raise ValueError(
                f"v[{layer}]: hidden size {v[layer].shape[0]} does not match the activations' "
                f"{harmful[layer].shape[1]}"
            )
        direction = v[layer].double()
        sh, sb = harmful[layer].double() @ direction, harmless[layer].double() @ direction
        gap = float(sh.mean() - sb.mean())
        spread = math.sqrt(0.5 * float(sh.var() + sb.var()))
        out[layer] = gap / spread if spread > 0 else (math.inf if gap > 0 else -math.inf if gap < 0 else 0.0)
    return out


def select_layer(separation: Mapping[int, float]) -> int:
    """The layer rule: the layer with the largest d′ (ties: the shallowest)."""
    if not separation:
        raise ValueError("separation: no layer to choose from")
    return max(sorted(separation), key=lambda layer: separation[layer])


@dataclass
class ProbeGeometry:
    """Result of :func:`probe_tax_rates` (JSON-serialisable through :meth:`to_dict`).

    Attributes:
        layers: the layers probed.
        layer: ℓ*, the layer chosen by the rule (largest held-out d′ of the safety probe).
        separation: d′_ℓ per layer.
        separation_held_out: whether d′ was measured on held-out prompts (else on the fitting ones).
        tau_by_layer: τ_{i,ℓ} per task and layer.
        tau: τ_i = τ_{i,ℓ*} per task (the aggregated value, used everywhere).
        cos: signed cos(v*_ℓ*, c_{i,ℓ*}) per task (cos² = τ_i).
        baseline: which task baseline was used.
    """

    layers: list[int]
    layer: int
    separation: dict[int, float]
    separation_held_out: bool
    tau_by_layer: dict[str, dict[int, float]]
    tau: dict[str, float]
    cos: dict[str, float]
    baseline: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with string layer keys (JSON object keys)."""
        d = asdict(self)
        d["separation"] = {str(k): v for k, v in self.separation.items()}
        d["tau_by_layer"] = {t: {str(k): v for k, v in by.items()} for t, by in self.tau_by_layer.items()}
        return d


def probe_tax_rates(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    tasks: Mapping[str, Sequence[str]],
    *,
    held_out_harmful: Sequence[str] | None = None,
    held_out_harmless: Sequence[str] | None = None,
    baseline: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    chat_template: bool = False,
    progress: bool = False,
) -> ProbeGeometry:
    """End to end: activations, v*, c_i, τ_{i,ℓ}, the layer rule and τ_i, before any training.

    Args:
        harmful, harmless: prompts that define the safety probe (≥ 2 each).
        tasks: ``{task: prompts}`` (≥ 2 each) for the task probes.
        held_out_harmful, held_out_harmless: prompts on which the layer rule's d′ is measured; when
            omitted d′ is measured on ``harmful``/``harmless`` themselves (``separation_held_out``
            says which).
        baseline: neutral prompts for the task probes; ``None``: grand mean of the task means.
        layers, batch_size, chat_template: see :func:`residual_activations`.
    """
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks: expected {task: [prompt, ...]} with at least one task")

    def acts(prompts: Sequence[str], name: str) -> Activations:
        return residual_activations(
            model,
            tokenizer,
            prompts,
            layers=layers,
            batch_size=batch_size,
            chat_template=chat_template,
            progress=progress,
            name=name,
        )

    h, b = acts(harmful, "harmful"), acts(harmless, "harmless")
    v = safety_direction(h, b)
    task_acts = {t: acts(p, f"tasks[{t!r}]") for t, p in tasks.items()}
    base = acts(baseline, "baseline") if baseline is not None else None
    c = task_directions(task_acts, baseline=base)
    held_out = held_out_harmful is not None and held_out_harmless is not None
    if (held_out_harmful is None) != (held_out_harmless is None):
        raise ValueError("held_out_harmful/held_out_harmless: pass both or neither")
    if held_out:
        sep = safety_separation(
            v, acts(held_out_harmful, "held_out_harmful"), acts(held_out_harmless, "held_out_harmless")
        )
    else:
        sep = safety_separation(v, h, b)
    result = probe_geometry(
        v,
        c,
        sep,
        separation_held_out=held_out,
        baseline="neutral prompt set" if baseline is not None else "grand mean of the task means",
    )
    logger.info("probe tax rates at layer %d (d′ %.2f): %s", result.layer, sep[result.layer], result.tau)
    return result


def probe_geometry(
    safety: Directions,
    tasks: Mapping[str, Directions],
    separation: Mapping[int, float],
    *,
    separation_held_out: bool,
    baseline: str,
) -> ProbeGeometry:
    """The layer-aggregation rule on directions already estimated: ℓ* = the layer of largest d′, τ_i =
    τ_{i,ℓ*} (module docstring). :func:`probe_tax_rates` uses it; so can a caller that reuses one set of
    activations for several probe variants."""
    layer = select_layer(separation)
    by_layer = representation_tax_rates(safety, tasks)
    return ProbeGeometry(
        layers=sorted(safety),
        layer=layer,
        separation=dict(separation),
        separation_held_out=separation_held_out,
        tau_by_layer=by_layer,
        tau={t: by[layer] for t, by in by_layer.items()},
        cos={t: by[layer] for t, by in representation_cosines(safety, tasks).items()},
        baseline=baseline,
    )


def dataset_prompts(name: str, rows: Any, limit: int | None = None) -> list[str]:
    """The prompt strings of a probe set: a list of strings, or a dataset with a ``prompt`` column.

    Conversational prompts (lists of messages) are refused: render them first, or pass the user
    turns as strings with ``chat_template=True``. ``limit`` keeps the first rows.

    Raises:
        ValueError: naming ``name`` when there is no ``prompt`` column, a prompt is not a string, or
            the set is empty.
    """
    if isinstance(rows, Sequence) and not isinstance(rows, str):
        values = list(rows)
    elif hasattr(rows, "column_names"):
        if "prompt" not in rows.column_names:
            raise ValueError(
                f"{name}: a probe set needs a 'prompt' column (the probe reads the last prompt token); "
                f"got columns {list(rows.column_names)}"
            )
        values = list(rows["prompt"])
    else:
        raise ValueError(f"{name}: pass a list of prompt strings or a dataset with a 'prompt' column")
    if limit is not None:
        values = values[:limit]
    if not values:
        raise ValueError(f"{name}: no prompt; a probe needs at least 2 prompts")
    bad = [i for i, p in enumerate(values) if not isinstance(p, str)]
    if bad:
        raise ValueError(
            f"{name}[{bad[0]}]: prompts must be strings, got {type(values[bad[0]]).__name__} "
            "(render conversational prompts first)"
        )
    return values


def tax_rate_logs(result: ProbeGeometry, prefix: str = "degradation/tau_repr") -> dict[str, float]:
    """Flat ``{"<prefix>/<task>": τ_i}`` plus ``<prefix>_layer`` for wandb / trainer logs."""
    logs = {f"{prefix}/{task}": tau for task, tau in result.tau.items()}
    logs[f"{prefix}_layer"] = float(result.layer)
    return logs
