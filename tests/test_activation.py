"""Activation-subspace protection (frontier_trainer.activation), checked from outside the class.

The guarantee ‖ΔW U‖ ≤ 1e-6 ‖ΔW‖ ‖U‖ is measured against a U the *test* builds: its own forward
hooks record every protected module's inputs at the non-padding positions of the capability
batches, its own float64 covariance and eigendecomposition and its own copy of the energy rule
give the basis, and ΔW is read off the weights before and after a real AdamW step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import build_tokenizer, capability_datasets, check_multiprocess_exit, run_until_results
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from frontier_trainer import activation
from frontier_trainer.activation import (
    DEFAULT_ENERGY,
    ActivationProjector,
    activation_memory,
    protected_modules,
)
from frontier_trainer.directions import build_capability_sampler
from frontier_trainer.projection import UpdateProjector

torch.set_num_threads(1)


def tiny_model(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(dtype)


def capability_batches(n: int = 2, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches from the project's real sampler (tiny tokenizer and tasks)."""
    sampler = build_capability_sampler(capability_datasets(), build_tokenizer(), max_length=32, batch_size=batch_size)
    out = []
    for i in range(n):
        out.append(sampler.next_batch(sampler.tasks[i % len(sampler.tasks)]))
    return out


def safety_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (4, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class Recorder:
    """The test's own record of module inputs at non-padding positions (forward pre-hooks)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.mask is None:
                return  # not recording (a training forward)
            self.inputs[name].append(args[0].detach()[self.mask].double())

        return hook

    @torch.no_grad()
    def run(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inputs X (N × d_in) per module on the batches, dropout off."""
        for v in self.inputs.values():
            v.clear()
        was = model.training
        model.eval()
        for b in batches:
            self.mask = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        self.mask = None
        model.train(was)
        return {n: torch.cat(v) for n, v in self.inputs.items()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def own_basis(X: torch.Tensor, energy: float, rank: int) -> tuple[torch.Tensor, float]:
    """The test's own rule: top eigenvectors of Xᵀ X capturing ≥ energy of the trace, at most
    ``rank`` of them. Returns the basis and the fraction of the energy left outside it."""
    lam, vec = torch.linalg.eigh(X.T @ X)
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    total = float(lam.sum())
    r = 0
    while r < min(rank, len(lam)) and float(lam[:r].sum()) < energy * total * (1 - 1e-12):
        r += 1
    return vec[:, :r], float(lam[r:].sum()) / total


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in protected_modules(model).items() if isinstance(m, nn.Linear)}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_step(model, optimizer, projector, micro_batches, autocast: bool = False) -> None:
    """One real optimizer step over gradient-accumulated micro-batches, wrapped by the projector."""
    for mb in micro_batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**mb).loss / len(micro_batches)
        loss.backward()
    projector.before_step()
    optimizer.step()
    projector.after_step()
    optimizer.zero_grad()


# ---------------------------------------------------------------------------------- discovery


def test_protected_modules_cover_every_block_linear_head_and_embedding() -> None:
    model = tiny_model()
    names = list(protected_modules(model))
    block_linears = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
    ]
    assert len(block_linears) == 2 * 7
    assert set(block_linears) <= set(names)
    assert "lm_head" in names and "model.embed_tokens" in names
    assert set(protected_modules(model, include_embeddings_and_head=False)) == set(block_linears)


# ---------------------------------------------------------------------------------- the guarantee


@pytest.mark.parametrize(
    ("dtype", "bound", "variant"),
    [
        (torch.float32, 1e-6, "plain"),
        (torch.float64, 1e-12, "plain"),
        (torch.float32, 1e-6, "checkpointing+bf16-autocast"),
    ],
)
def test_update_annihilates_the_tests_own_input_subspace(dtype, bound, variant) -> None:
    """AdamW with weight decay and 2-step accumulation: every step, for every protected linear,
    ‖ΔW U‖ ≤ bound ‖ΔW‖ ‖U‖₂ with U from the test's own hooks; ΔW x = 0 on span U; the output
    change on the real capability inputs is bounded by the energy left outside U; the protected
    embedding rows do not move."""
    model = tiny_model(dtype=dtype)
    if variant != "plain":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rank, energy = 4, 0.99
    projector = ActivationProjector(model, rank=rank, energy=energy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    recorder = Recorder(linear_modules(model))
    param_of = {n: m.weight for n, m in linear_modules(model).items()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    for step in range(3):
        batches = capability_batches(n=2)
        projector.refresh(batches)  # refreshed every step, like capability_refresh_steps=1
        X = recorder.run(model, batches)
        before = weights(model)
        train_step(model, optimizer, projector, [safety_batch(2 * step), safety_batch(2 * step + 1)],
                   autocast=variant != "plain")
        for name, weight in param_of.items():
            dW = (weight.detach() - before[name_of[id(weight)]]).double()
            U, tail = own_basis(X[name], energy, rank)
            assert U.shape[1] >= 1
            assert dW.norm() > 1e-4 * weight.detach().double().norm(), f"{name}: the step did not move"
            assert (dW @ U).norm() <= bound * dW.norm() * torch.linalg.matrix_norm(U, 2), (step, name)
            x = U @ torch.randn(U.shape[1], 5, dtype=torch.float64)  # points of span U
            assert (dW @ x).norm() <= bound * dW.norm() * x.norm()
            # on the capability inputs themselves: only the energy outside U can move the output
            change = (X[name] @ dW.T).norm()
            limit = torch.linalg.matrix_norm(dW, 2) * X[name].norm() * (tail**0.5 + bound)
            assert change <= limit, (step, name)
        # the embedding: the test's own top tokens by count keep their rows
        ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
        counts = torch.bincount(ids, minlength=64).double()
        lam = counts.sort(descending=True).values
        r = 0
        while r < rank and float(lam[:r].sum()) < energy * float(lam.sum()) * (1 - 1e-12):
            r += 1
        top = counts.argsort(descending=True, stable=True)[:r]
        emb = model.get_input_embeddings().weight.detach()
        assert torch.equal(emb[top], before["model.embed_tokens.weight"][top])
        others = torch.ones(64, dtype=torch.bool)
        others[top] = False
        assert not torch.equal(emb[others], before["model.embed_tokens.weight"][others])
    recorder.close()


def test_tiny_fp32_steps_meet_the_documented_rounding_floor() -> None:
    """At lr 1e-6 the fp32 write's rounding dominates: the realised ‖ΔW U‖_F stays within the
    documented floor 2⁻²⁴ ‖W_new‖_F (plus float64 residue), and far below the raw step's."""
    model = tiny_model()
    model.train()
    projector = ActivationProjector(model, rank=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = capability_batches(n=2)
    projector.refresh(batches)
    recorder = Recorder(linear_modules(model))
    X = recorder.run(model, batches)
    recorder.close()
    before = {n: m.weight.detach().clone() for n, m in linear_modules(model).items()}
    twin = copy.deepcopy(model)  # the same step without the projection, for the raw ‖ΔW U‖
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-6)
    twin(**safety_batch(0)).loss.backward()
    twin_opt.step()
    train_step(model, optimizer, projector, [safety_batch(0)])
    for name, m in linear_modules(model).items():
        W_new = m.weight.detach().double()
        dW = W_new - before[name].double()
        raw = twin.get_submodule(name).weight.detach().double() - before[name].double()
        U, _ = own_basis(X[name], DEFAULT_ENERGY, 4)
        assert (dW @ U).norm() <= 2.0**-24 * W_new.norm() + 1e-12 * dW.norm(), name
        assert (dW @ U).norm() <= 1e-2 * (raw @ U).norm(), name


def test_energy_one_keeps_the_whole_model_output_on_capability_rows() -> None:
    """Energy 1 with every input direction kept and the norm weights frozen: each protected
    module's output on the recorded capability inputs is unchanged (the first layer's to ~1e-6
    relative), so by induction the logits on the capability rows are unchanged, while logits on
    other rows move."""
    model = tiny_model()
    model.train()
    sampler_batch = capability_batches(n=1, batch_size=1)  # one row: inputs of rank ≤ its length
    projector = ActivationProjector(model, rank=12, energy=1.0, unprotected="freeze")
    projector.refresh(sampler_batch)
    recorder = Recorder(linear_modules(model))
    X = recorder.run(model, sampler_batch)
    recorder.close()
    with torch.no_grad():
        model.eval()
        logits_before = model(**{k: sampler_batch[0][k] for k in ("input_ids", "attention_mask")}).logits
        other = safety_batch(99)
        other_before = model(input_ids=other["input_ids"]).logits
        model.train()
    before = {n: m.weight.detach().clone() for n, m in linear_modules(model).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        train_step(model, optimizer, projector, [safety_batch(step)])
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        W_new = model.get_submodule(name).weight.detach().double()
        old_out = X[name] @ before[name].double().T
        assert (X[name] @ W_new.T - old_out).norm() <= 1e-6 * old_out.norm(), name
        assert not torch.equal(W_new, before[name].double()), name
    with torch.no_grad():
        model.eval()
        logits_after = model(**{k: sampler_batch[0][k] for k in ("input_ids", "attention_mask")}).logits
        other_after = model(input_ids=other["input_ids"]).logits
    mask = sampler_batch[0]["attention_mask"].bool()
    assert (logits_after - logits_before)[mask].norm() <= 1e-5 * logits_before[mask].norm()
    assert (other_after - other_before).norm() > 1e-3 * other_before.norm()


def test_tied_head_and_embedding_satisfy_both_rules() -> None:
    model = tiny_model(tie=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.train()
    projector = ActivationProjector(model, rank=4, energy=0.99)
    batches = capability_batches(n=2)
    projector.refresh(batches)
    X = Recorder({"lm_head": model.lm_head})
    inputs = X.run(model, batches)["lm_head"]
    X.close()
    before = model.lm_head.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_step(model, optimizer, projector, [safety_batch(0)])
    dW = (model.lm_head.weight.detach() - before).double()
    U, _ = own_basis(inputs, 0.99, 4)
    assert (dW @ U).norm() <= 1e-6 * dW.norm()
    assert projector.tokens is not None and projector.tokens.numel() >= 1
    assert torch.equal(dW[projector.tokens], torch.zeros_like(dW[projector.tokens]))
    assert dW.norm() > 0


# ---------------------------------------------------------------------------------- LoRA


def lora_model(r: int = 8, dropout: float = 0.1, **kwargs) -> nn.Module:
    model = get_peft_model(
        tiny_model(),
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"], **kwargs),
    )
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at PEFT's init would make the B-side check vacuous
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


def test_lora_adapter_output_on_span_u_is_exactly_unchanged() -> None:
    """For x ∈ span U (U from the test's own hooks on the base layer's input),
    (B_new A_new − B_old A_old) x = 0 to 1e-6 relative, while A and B both move."""
    model = lora_model(r=8)
    model.train()
    rank = 3
    projector = ActivationProjector(model, rank=rank, energy=0.99)
    assert {e.kind for e in projector.entries} == {"lora"}
    layers = lora_layers(model)
    recorder = Recorder({n: m.base_layer for n, m in layers.items()})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        batches = capability_batches(n=2)
        projector.refresh(batches)
        X = recorder.run(model, batches)
        old = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone()) for n, m in layers.items()}
        train_step(model, optimizer, projector, [safety_batch(step), safety_batch(step + 10)])
        for name, m in layers.items():
            A0, B0 = (t.double() for t in old[name])
            A1, B1 = m.lora_A["default"].weight.detach().double(), m.lora_B["default"].weight.detach().double()
            U, _ = own_basis(X[name], 0.99, rank)
            change = B1 @ A1 - B0 @ A0
            assert (A1 - A0).norm() > 1e-4 * A0.norm() and (B1 - B0).norm() > 1e-4 * B0.norm(), name
            assert (change @ U).norm() <= 1e-6 * change.norm() * torch.linalg.matrix_norm(U, 2), (step, name)
            assert ((A1 - A0) @ U).norm() <= 1e-6 * (A1 - A0).norm(), (step, name)
    recorder.close()


def test_lora_b_is_held_when_the_subspace_fills_the_adapter_rank(caplog) -> None:
    model = lora_model(r=2, dropout=0.0)
    model.train()
    projector = ActivationProjector(model, rank=4, energy=1.0)
    projector.refresh(capability_batches(n=2))
    layers = lora_layers(model)
    B_old = {n: m.lora_B["default"].weight.detach().clone() for n, m in layers.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="frontier_trainer.activation"):
        train_step(model, optimizer, projector, [safety_batch(0)])
    assert "B cannot move" in caplog.text
    for n, m in layers.items():
        assert (m.lora_B["default"].weight.detach() - B_old[n]).norm() <= 1e-6 * B_old[n].norm()


# ---------------------------------------------------------------------------------- estimation details


def test_shared_inputs_share_one_basis_and_chunked_passes_match_one_pass() -> None:
    model = tiny_model()
    one = ActivationProjector(model, rank=4)
    batches = capability_batches(n=2)
    one.refresh(batches)
    groups = {e.name: e.group for e in one.entries if e.kind != "embedding"}
    for layer in (0, 1):
        attn = f"model.layers.{layer}.self_attn"
        assert groups[f"{attn}.k_proj"] == groups[f"{attn}.v_proj"] == groups[f"{attn}.q_proj"]
        assert groups[f"{attn}.o_proj"] != groups[f"{attn}.q_proj"]
        mlp = f"model.layers.{layer}.mlp"
        assert groups[f"{mlp}.up_proj"] == groups[f"{mlp}.gate_proj"] != groups[f"{mlp}.down_proj"]
    assert len(one.bases) == 2 * 4 + 1  # per layer: attention in, o_proj in, MLP in, down_proj in; + head
    sizes = [b.shape[0] ** 2 * 8 for b in one.bases.values()]
    assert (one.refresh_passes, one.peak_covariance_bytes) == (1, sum(sizes))
    chunked = ActivationProjector(model, rank=4, max_covariance_bytes=1)  # one group per pass
    chunked.refresh(batches)
    assert (chunked.refresh_passes, chunked.peak_covariance_bytes) == (len(sizes), max(sizes))
    for name, U in one.bases.items():
        V = chunked.bases[name]
        assert U.shape == V.shape
        assert torch.allclose(U @ U.T, V @ V.T, atol=1e-10), name


def planted_covariance(d: int, spectrum: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """C = V diag(spectrum) Vᵀ with a random orthogonal V (columns in spectrum order)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g)).Q
    return (V * spectrum) @ V.T, V


@pytest.mark.parametrize("max_rank, energy", [(8, 0.99), (32, 0.99), (32, 0.5)])
def test_subspace_iteration_finds_eighs_subspace_and_energy_rank(monkeypatch, max_rank, energy) -> None:
    """Above ITERATION_MIN_WIDTH the top subspace comes from the iteration, and it is eigh's: the same
    r by the energy rule (counted against the whole trace, not the top eigenvalues found), an
    orthonormal basis, subspace distance ≤ 1e-6. Spectrum 1/j (slow decay, as SmolLM2's inputs)."""
    d = activation.ITERATION_MIN_WIDTH + 76
    C, _ = planted_covariance(d, 1.0 / torch.arange(1, d + 1, dtype=torch.float64))
    calls: list[bool] = []
    real = activation.top_eigenpairs_by_iteration

    def spy(*args, **kwargs):
        found = real(*args, **kwargs)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(activation, "top_eigenpairs_by_iteration", spy)
    U = activation.top_subspace(C, energy, max_rank)
    assert calls == [True], "the iteration did not run, or did not converge"
    E = activation.top_subspace(C, energy, max_rank, method="eigh")
    assert U.shape == E.shape and 1 <= U.shape[1] <= max_rank
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-12)
    assert torch.linalg.matrix_norm(U - E @ (E.T @ U), 2) <= 1e-6
    if energy == 0.5:
        assert U.shape[1] < max_rank  # the energy rule, not the cap, chose r here


def test_subspace_iteration_falls_back_to_eigh_when_it_does_not_converge(monkeypatch) -> None:
    d = activation.ITERATION_MIN_WIDTH + 76
    C, _ = planted_covariance(d, 1.0 / torch.arange(1, d + 1, dtype=torch.float64), seed=1)
    monkeypatch.setattr(activation, "ITERATION_MAX_STEPS", 0)
    assert torch.equal(activation.top_subspace(C, 0.99, 8), activation.top_subspace(C, 0.99, 8, method="eigh"))


def test_padding_positions_are_not_read() -> None:
    """Appending padding (any token id under attention_mask = 0) leaves every basis unchanged."""
    model = tiny_model()
    batches = capability_batches(n=1)
    padded = {k: torch.cat([v, torch.full((v.shape[0], 5), 7 if k == "input_ids" else 0)], dim=1) for k, v in batches[0].items() if k != "labels"}
    a = ActivationProjector(model, rank=4)
    b = ActivationProjector(model, rank=4)
    a.refresh(batches)
    b.refresh([padded])
    for name, U in a.bases.items():
        assert torch.allclose(U @ U.T, b.bases[name] @ b.bases[name].T, atol=1e-8), name
    assert torch.equal(a.tokens, b.tokens)


def test_state_dict_round_trip_projects_identically() -> None:
    model = tiny_model()
    twin = copy.deepcopy(model)
    p1 = ActivationProjector(model, rank=4)
    p1.refresh(capability_batches(n=2))
    p2 = ActivationProjector(twin, rank=4)
    state = p1.state_dict()
    p2.load_state_dict(state)
    for m, p in ((model, p1), (twin, p2)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        train_step(m, opt, p, [safety_batch(0)])
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    other = ActivationProjector(tiny_model(), rank=4, module_filter="mlp")
    with pytest.raises(ValueError, match="other modules"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------------- memory


def test_memory_counts_match_the_tensors_and_beat_gradient_mode() -> None:
    model = tiny_model()
    projector = ActivationProjector(model, rank=4, energy=1.0)
    projector.refresh(capability_batches(n=2))
    assert set(projector.ranks().values()) == {4}  # every group reaches the cap: the estimate is exact
    held = sum(b.numel() * b.element_size() for b in projector.bases.values()) + projector.tokens.numel() * 8
    assert projector.basis_bytes() == held
    estimate = activation_memory(model, rank=4, num_directions=2)
    assert estimate["activation_basis"] == projector.basis_bytes()
    assert estimate["activation_step"] == projector.step_image_bytes()
    assert estimate["gradient"] == 3 * sum(p.numel() * 4 for p in model.parameters())
    lora = lora_model(r=2)
    lora_projector = ActivationProjector(lora, rank=4, energy=1.0)
    lora_projector.refresh(capability_batches(n=2))
    assert set(lora_projector.ranks().values()) == {4}
    lora_estimate = activation_memory(lora, rank=4, num_directions=2)
    assert lora_estimate["activation_basis"] == lora_projector.basis_bytes()
    assert lora_estimate["activation_step"] == lora_projector.step_image_bytes()
    # on the meta device with SmolLM2's shapes (no weights allocated)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        smol = LlamaForCausalLM(config)
    m = activation_memory(smol, rank=64, num_directions=4)
    per_layer = 64 * (576 * 3 + 1536) * 8  # q/k/v share, gate/up share: 4 groups per layer
    assert m["activation_basis"] == 30 * per_layer + 64 * 576 * 8 + 64 * 8
    assert m["activation_total"] < m["gradient"] / 10


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_naming_the_field() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="module_filter='nothing_matches'"):
        ActivationProjector(model, rank=4, module_filter="nothing_matches")
    with pytest.raises(ValueError, match=r"activation_rank=17 is larger than d_in=16"):
        ActivationProjector(model, rank=17)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="activation_rank must be an integer >= 1"):
            ActivationProjector(model, rank=bad)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="energy must be in"):
            ActivationProjector(model, rank=4, energy=bad)
    projector = ActivationProjector(model, rank=4)
    batch = capability_batches(n=1)[0]
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"capability batch 0 rows \[1\] have no non-padding position"):
        projector.refresh([batch])
    with pytest.raises(ValueError, match=r"capability_datasets\['copy'\] row 1 has no non-padding token"):
        ActivationProjector.check_rows({"copy": [{"input_ids": [5, 6]}, {"input_ids": []}]})
    with pytest.raises(ValueError, match="float32"):
        ActivationProjector(tiny_model(dtype=torch.bfloat16), rank=4)
    with pytest.raises(ValueError, match="LoRA variant"):
        ActivationProjector(lora_model(use_dora=True), rank=2)
    frozen = tiny_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to protect"):
        ActivationProjector(frozen, rank=4)


# ---------------------------------------------------------------------------------- both spaces


@pytest.mark.parametrize("kind", ["full", "tied", "lora"])
def test_both_spaces_compose_exactly_with_the_gradient_projector(kind: str) -> None:
    """capability_space='both': the activation projector's after_step, then UpdateProjector's
    null space over project_directions(c): ΔW U = 0 (the test's own U; LoRA: the adapter's
    output on span U unchanged), the embedding rows hold, and cos(δ, c_i) ≈ 0 for the
    *original* directions c_i."""
    model = {"full": tiny_model, "tied": lambda: tiny_model(tie=True), "lora": lambda: lora_model(r=8)}[kind]()
    model.train()
    rank = 3 if kind == "lora" else 4
    activation = ActivationProjector(model, rank=rank)
    params = [p for p in model.parameters() if p.requires_grad]
    gradient = UpdateProjector(params, mode="nullspace")
    batches = capability_batches(n=2)
    activation.refresh(batches)
    hooked = linear_modules(model) if kind != "lora" else {n: m.base_layer for n, m in lora_layers(model).items()}
    recorder = Recorder(hooked)
    X = recorder.run(model, batches)
    recorder.close()
    g = torch.Generator().manual_seed(3)
    directions = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    gradient.set_directions(activation.project_directions(params, directions))
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in params]
    model(**safety_batch(0)).loss.backward()
    activation.before_step()
    gradient.before_step()
    optimizer.step()
    activation.after_step()
    gradient.after_step()
    delta = [(p.detach() - b).double() for p, b in zip(params, before, strict=True)]
    norm = sum(float(d.square().sum()) for d in delta) ** 0.5
    assert norm > 0
    for c in directions:
        dot = sum(float((d * ci.double()).sum()) for d, ci in zip(delta, c, strict=True))
        c_norm = sum(float(ci.double().square().sum()) for ci in c) ** 0.5
        assert abs(dot) <= 1e-6 * norm * c_norm
    index = {id(p): k for k, p in enumerate(params)}
    if kind != "lora":
        for name, m in linear_modules(model).items():
            dW = delta[index[id(m.weight)]]
            U, _ = own_basis(X[name], DEFAULT_ENERGY, rank)
            assert (dW @ U).norm() <= 1e-6 * dW.norm(), name
        emb = delta[index[id(model.get_input_embeddings().weight)]]
        assert float(emb[activation.tokens].abs().max()) == 0.0
        return
    for name, m in lora_layers(model).items():
        A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        A0, B0 = before[index[id(A)]].double(), before[index[id(B)]].double()
        change = B.detach().double() @ A.detach().double() - B0 @ A0
        U, _ = own_basis(X[name], DEFAULT_ENERGY, rank)
        assert change.norm() > 0
        assert (change @ U).norm() <= 1e-6 * change.norm(), name

# ---------------------------------------------------------------------------------- DDP


def test_ddp_two_ranks_stay_identical_and_protected(tmp_path: Path) -> None:
    """Two gloo processes under torchrun, DDP-wrapped model, different data per rank: both ranks
    estimate identical bases from the same capability batches, write byte-identical weights,
    and each rank's own hooks confirm ΔW U = 0."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    results = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    proc = run_until_results(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 1000),
         __file__, "ddp-worker", str(tmp_path)],
        env, results,
    )
    check_multiprocess_exit(proc, results)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert len(set(ranks[0]["sha256"])) == len(ranks[0]["sha256"])  # the weights moved every step
    for r in ranks:
        assert max(r["ratio"]) <= 1e-6


def _ddp_worker(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_model()
    model.train()
    ddp = DistributedDataParallel(model)
    projector = ActivationProjector(model, rank=4)  # on the unwrapped module
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    recorder = Recorder(linear_modules(model))
    hashes, ratios = [], []
    for step in range(2):
        batches = capability_batches(n=2)  # the same on every rank (seeded sampler)
        projector.refresh(batches)
        X = recorder.run(model, batches)
        before = {n: m.weight.detach().clone() for n, m in linear_modules(model).items()}
        mb = safety_batch(100 * rank + step)  # different data per rank: DDP all-reduces the gradients
        ddp(**mb).loss.backward()
        projector.before_step()
        optimizer.step()
        projector.after_step()
        optimizer.zero_grad()
        for name, m in linear_modules(model).items():
            dW = (m.weight.detach() - before[name]).double()
            U, _ = own_basis(X[name], DEFAULT_ENERGY, 4)
            ratios.append(float((dW @ U).norm() / dW.norm()))
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        hashes.append(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"sha256": hashes, "ratio": ratios}))
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["ddp-worker"]:
    _ddp_worker(Path(sys.argv[2]))


def test_refresh_finds_the_input_groups_once(monkeypatch) -> None:
    """The input groups come from one forward at the first refresh only; later refreshes reuse them
    and hold the same groups' bases."""
    finds: list[int] = []
    real_find = ActivationProjector._find_groups

    def find_spy(self, hooked, batch):
        finds.append(1)
        return real_find(self, hooked, batch)

    monkeypatch.setattr(ActivationProjector, "_find_groups", find_spy)
    projector = ActivationProjector(tiny_model(), rank=4)
    projector.refresh(capability_batches(n=1))
    held = set(projector.bases)
    projector.refresh(capability_batches(n=2))
    assert len(finds) == 1
    assert set(projector.bases) == held


def test_resumed_projector_refreshes_to_the_same_bases(monkeypatch) -> None:
    """A projector restored from ``state_dict`` (groups included: it does not need the groups'
    forward) and refreshed on the same batches holds bitwise the continuing projector's bases."""
    model = tiny_model()
    running = ActivationProjector(model, rank=4)
    running.refresh(capability_batches(n=1))
    resumed = ActivationProjector(copy.deepcopy(model), rank=4)
    resumed.load_state_dict(running.state_dict())
    monkeypatch.setattr(
        ActivationProjector, "_find_groups", lambda *a: pytest.fail("the groups were restored with the state")
    )
    batches = capability_batches(n=2)
    running.refresh(batches)
    resumed.refresh(batches)
    assert set(resumed.bases) == set(running.bases)
    for name, basis in running.bases.items():
        assert torch.equal(resumed.bases[name], basis), name
