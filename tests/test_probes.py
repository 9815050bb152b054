"""Representation probes (frontier_trainer.probes): planted directions, τ consistency, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from frontier_trainer import geometry, probes
from tests.tiny import build_tokenizer

D = 16


class PlantedModel(nn.Module):
    """A stub causal LM whose hidden states are built by hand, driven through the same code path.

    hidden_states[0] = token embeddings; [2] = m @ R, m the causal running mean of the real
    (unmasked) token embeddings, R a fixed orthogonal matrix; [1] = m + the running mean of a second,
    "nuisance" embedding of the filler words w0..w39. Planting a token with embedding α·u in some
    prompts shifts their layer-1 state by α·u / length along the known unit vector u (layer 2: along
    u @ R); layer 1 carries extra prompt-to-prompt noise, so the safety probe separates best at layer 2.
    """

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, D)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, D, generator=g))
        self.register_buffer("R", torch.linalg.qr(torch.randn(D, D, generator=g))[0])
        nuisance = 3.0 * torch.randn(vocab, D, generator=g)
        filler = [i for w, i in build_tokenizer().get_vocab().items() if w.startswith("w")]
        keep = torch.zeros(vocab, 1)
        keep[filler] = 1.0
        self.register_buffer("nuisance", nuisance * keep)
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.seen_position_ids: list[torch.Tensor] = []

    def forward(
        self, input_ids, attention_mask, position_ids=None, output_hidden_states=False, use_cache=None
    ):
        self.seen_position_ids.append(position_ids)
        e = self.embed(input_ids)
        m = attention_mask.unsqueeze(-1).to(e.dtype)
        count = m.cumsum(1).clamp_min(1)
        mean = (e * m).cumsum(1) / count
        noise = (self.nuisance[input_ids] * m).cumsum(1) / count
        return SimpleNamespace(hidden_states=(e, mean + noise, mean @ self.R))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _plant(model: PlantedModel, tok, word: str, vector: torch.Tensor) -> None:
    with torch.no_grad():
        model.embed.weight[tok.convert_tokens_to_ids(word)] = vector


def _prompts(first: str, n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 40, (n, 3), generator=g).tolist()
    return [f"{first} " + " ".join(f"w{i}" for i in row) + " =>" for row in words]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def _planted_world(tok):
    """A stub model with 'harm' planted along u, 'refuse'/'copy'/'count' at known angles to u."""
    model = PlantedModel(len(tok), seed=1)
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    u, w = basis[:, 0], basis[:, 1]
    theta = math.radians(60.0)
    alpha = 40.0
    _plant(model, tok, "harm", alpha * u)
    _plant(model, tok, "sorry", torch.zeros(D))  # the harmless slot: no shift
    _plant(model, tok, "refuse", alpha * u)  # task aligned with safety: τ = 1
    _plant(model, tok, "copy", alpha * w)  # task orthogonal to safety: τ = 0
    _plant(model, tok, "count", alpha * (math.cos(theta) * u + math.sin(theta) * w))  # τ = cos² 60° = 1/4
    return model, u, w, theta


def test_safety_direction_recovers_planted_vector_per_layer(tok):
    model, u, _, _ = _planted_world(tok)
    harmful = probes.residual_activations(model, tok, _prompts("harm", 300, 0), layers=[1, 2], batch_size=64)
    harmless = probes.residual_activations(
        model, tok, _prompts("sorry", 300, 1), layers=[1, 2], batch_size=64
    )
    assert set(harmful) == {1, 2} and harmful[1].shape == (300, D) and harmful[1].dtype == torch.float32
    v = probes.safety_direction(harmful, harmless)
    assert abs(float(v[1].norm()) - 1.0) < 1e-6
    assert float(v[1] @ u) > 0.99  # sign: harmful − harmless points along +u
    assert float(v[2] @ (u @ model.R)) > 0.99  # layer 2 rotates the planted vector


def test_task_tax_rates_recover_planted_angles(tok):
    model, _, _, theta = _planted_world(tok)
    result = probes.probe_tax_rates(
        model,
        tok,
        _prompts("harm", 300, 0),
        _prompts("sorry", 300, 1),
        {
            "aligned": _prompts("refuse", 300, 2),
            "orthogonal": _prompts("copy", 300, 3),
            "sixty": _prompts("count", 300, 4),
        },
        baseline=_prompts("sorry", 300, 5),
        batch_size=64,
    )
    assert result.tau["aligned"] > 0.97
    assert result.tau["orthogonal"] < 0.03
    assert abs(result.tau["sixty"] - math.cos(theta) ** 2) < 0.05
    assert result.baseline == "neutral prompt set"


def test_default_baseline_is_one_vs_rest(tok):
    """Grand mean of task means as baseline gives c_i ∝ μ_i − mean_{j≠i} μ_j."""
    g = torch.Generator().manual_seed(0)
    acts = {t: {1: torch.randn(n, D, generator=g) + 3 * torch.randn(D, generator=g)} for t, n in
            [("a", 5), ("b", 9), ("c", 7)]}  # fmt: skip
    c = probes.task_directions(acts)
    for t in acts:
        rest = torch.stack([acts[s][1].mean(0) for s in acts if s != t]).mean(0)
        expected = _unit(acts[t][1].mean(0) - rest)
        assert torch.allclose(c[t][1], expected, atol=1e-6)


def test_tax_rates_match_geometry_library():
    g = torch.Generator().manual_seed(3)
    harmful = {1: torch.randn(8, D, generator=g) + 2, 3: torch.randn(8, D, generator=g)}
    harmless = {1: torch.randn(6, D, generator=g), 3: torch.randn(6, D, generator=g) - 1}
    tasks = {t: {1: torch.randn(5, D, generator=g) * (i + 1), 3: torch.randn(5, D, generator=g) + i}
             for i, t in enumerate(["x", "y", "z"])}  # fmt: skip
    v = probes.safety_direction(harmful, harmless)
    c = probes.task_directions(tasks)
    tau = probes.representation_tax_rates(v, c)
    for layer in (1, 3):
        C = torch.stack([c[t][layer] for t in tasks], dim=1)
        lib = geometry.task_tax_rates(v[layer].double(), C.double())
        for i, t in enumerate(tasks):
            assert tau[t][layer] == pytest.approx(float(lib[i]), abs=1e-12)
            # and independently of the library: cos² of the raw mean differences
            dv = harmful[layer].mean(0) - harmless[layer].mean(0)
            base = torch.stack([tasks[s][layer].mean(0) for s in tasks]).mean(0)
            dc = tasks[t][layer].mean(0) - base
            cos = float(dv @ dc) / float(dv.norm() * dc.norm())
            assert tau[t][layer] == pytest.approx(cos**2, abs=1e-5)
        # the multi-task tax rate of the paper (eq. 2) bounds every single-task τ_i
        assert geometry.tax_rate(v[layer].double(), C.double()) >= max(tau[t][layer] for t in tasks) - 1e-9


def test_layer_rule_picks_best_separating_layer_and_applies_it():
    g = torch.Generator().manual_seed(4)
    u = torch.zeros(D)
    u[0] = 1.0
    # layer 1: classes 0.5 std apart along u; layer 2: 5 std apart
    harmful = {1: torch.randn(50, D, generator=g) + 0.5 * u, 2: torch.randn(50, D, generator=g) + 5 * u}
    harmless = {1: torch.randn(50, D, generator=g), 2: torch.randn(50, D, generator=g)}
    v = probes.safety_direction(harmful, harmless)
    sep = probes.safety_separation(v, harmful, harmless)
    assert sep[2] > 3 * sep[1] > 0
    assert probes.select_layer(sep) == 2
    assert probes.select_layer({1: 2.0, 2: 2.0}) == 1  # ties: shallowest


def test_probe_tax_rates_uses_selected_layer_everywhere(tok):
    model, _, _, _ = _planted_world(tok)
    tasks = {"aligned": _prompts("refuse", 40, 2), "sixty": _prompts("count", 40, 4)}
    r = probes.probe_tax_rates(
        model, tok, _prompts("harm", 40, 0), _prompts("sorry", 40, 1), tasks,
        held_out_harmful=_prompts("harm", 40, 7), held_out_harmless=_prompts("sorry", 40, 8),
    )  # fmt: skip
    assert r.separation_held_out and r.layers == [1, 2]
    assert r.separation[2] > r.separation[1] and r.layer == 2  # the noisier layer 1 separates worse
    assert r.tau == {t: r.tau_by_layer[t][r.layer] for t in tasks}
    for t in tasks:
        assert r.cos[t] ** 2 == pytest.approx(r.tau[t], abs=1e-9)
    # two tasks, grand-mean baseline: c_aligned ∝ u − (cos60° u + sin60° w), at cos 1/2 to +u; c_sixty = −c_aligned
    assert r.cos["aligned"] == pytest.approx(0.5, abs=0.05)
    assert r.cos["sixty"] == pytest.approx(-r.cos["aligned"], abs=1e-6)
    logs = probes.tax_rate_logs(r)
    assert logs["degradation/tau_repr/aligned"] == r.tau["aligned"]
    assert logs["degradation/tau_repr_layer"] == float(r.layer)
    d = r.to_dict()
    assert set(d["tau_by_layer"]["aligned"]) == {"1", "2"}


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_gives_unpadded_activations(tok, side):
    """A real tiny Llama: batched activations (either padding side) equal one-prompt-at-a-time ones."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    prompts = ["harm w1 =>", "copy w2 w3 w4 w5 w6 w7 =>", "w9 =>", "count w1 w2 w3 =>"]
    tok.padding_side = side
    try:
        batched = probes.residual_activations(model, tok, prompts, layers=[0, 1, 2], batch_size=4)
        single = [probes.residual_activations(model, tok, [p], layers=[0, 1, 2]) for p in prompts]
    finally:
        tok.padding_side = "right"
    for layer in (0, 1, 2):
        expected = torch.cat([s[layer] for s in single])
        assert torch.allclose(batched[layer], expected, atol=1e-5), (side, layer)
    # the probe really is the last prompt token: it is the "=>" embedding at layer 0
    arrow = model.get_input_embeddings().weight[tok.convert_tokens_to_ids("=>")].detach()
    assert torch.allclose(batched[0], arrow.expand(len(prompts), -1))
    # and the default layers are the decoder blocks 1..L
    assert sorted(probes.residual_activations(model, tok, prompts[:2])) == [1, 2]


def test_position_ids_count_real_tokens_only(tok):
    model = PlantedModel(len(tok))
    tok.padding_side = "left"
    try:
        probes.residual_activations(model, tok, ["w1 w2 w3 =>", "w1 =>"], layers=[1])
    finally:
        tok.padding_side = "right"
    assert model.seen_position_ids[-1].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def test_chat_template_flag(tok):
    model = PlantedModel(len(tok))
    plain = probes.residual_activations(model, tok, ["user w1 w2 => "], layers=[1])
    chat = probes.residual_activations(model, tok, ["w1 w2"], layers=[1], chat_template=True)
    assert torch.allclose(plain[1], chat[1])


# --- bad input ---------------------------------------------------------------------------------------


def test_empty_prompt_refused_naming_row(tok):
    model = PlantedModel(len(tok))
    with pytest.raises(ValueError, match=r"harmful\[1\].*no token.*last prompt token"):
        probes.residual_activations(model, tok, ["w1 =>", ""], name="harmful")
    with pytest.raises(ValueError, match="prompts: no prompt given"):
        probes.residual_activations(model, tok, [])


def test_unknown_layer_refused(tok):
    model = PlantedModel(len(tok))
    with pytest.raises(ValueError, match=r"layers: index 3 is out of range.*0 \(embeddings\) to 2"):
        probes.residual_activations(model, tok, ["w1 =>"], layers=[1, 3])
    with pytest.raises(ValueError, match="layers: index -1 is out of range"):
        probes.residual_activations(model, tok, ["w1 =>"], layers=[-1])
    with pytest.raises(ValueError, match="position='first'"):
        probes.residual_activations(model, tok, ["w1 =>"], position="first")


def test_fewer_than_two_prompts_per_class_refused():
    one, two = {1: torch.randn(1, D)}, {1: torch.randn(2, D)}
    with pytest.raises(ValueError, match=r"harmful\[1\]: 1 prompt.*at least 2 prompts per class"):
        probes.safety_direction(one, two)
    with pytest.raises(ValueError, match=r"harmless\[1\]: 1 prompt"):
        probes.safety_direction(two, one)
    with pytest.raises(ValueError, match=r"tasks\['b'\]\[1\]: 1 prompt"):
        probes.task_directions({"a": two, "b": one})
    with pytest.raises(ValueError, match="at least two tasks"):
        probes.task_directions({"a": two})


def test_mismatched_hidden_sizes_refused():
    a, b = {1: torch.randn(3, D)}, {1: torch.randn(3, D + 1)}
    with pytest.raises(ValueError, match="hidden sizes differ at layer 1"):
        probes.safety_direction(a, b)
    with pytest.raises(ValueError, match="hidden sizes differ at layer 1"):
        probes.task_directions({"x": a, "y": b})
    v = {1: _unit(torch.randn(D))}
    with pytest.raises(ValueError, match=r"c\['t'\]\[1\]: hidden size \(17,\) does not match"):
        probes.representation_tax_rates(v, {"t": {1: _unit(torch.randn(D + 1))}})
    with pytest.raises(ValueError, match=r"c\['t'\]: no direction at layer 1"):
        probes.representation_tax_rates(v, {"t": {2: _unit(torch.randn(D))}})
    with pytest.raises(ValueError, match=r"layers .* differ"):
        probes.safety_direction({1: torch.randn(3, D)}, {2: torch.randn(3, D)})


def test_prompt_independent_layer_refused(tok):
    """Layer 0 at a fixed last token is the same vector for every prompt: no direction there."""
    model = PlantedModel(len(tok))
    h = probes.residual_activations(model, tok, _prompts("harm", 5, 0), layers=[0])
    b = probes.residual_activations(model, tok, _prompts("sorry", 5, 1), layers=[0])
    with pytest.raises(
        ValueError, match=r"harmful − harmless at layer 0: the two means coincide.*drop the layer"
    ):
        probes.safety_direction(h, b)


def test_benchmark_statistics_on_planted_orderings(monkeypatch):
    """The Prediction-1 benchmark's per-seed, pooled and bootstrap Spearman on known orderings."""
    from benchmarks import probe_prediction as bench

    monkeypatch.setitem(bench.SETTINGS, "bootstrap_samples", 300)
    tasks = list(bench.lab.TASKS)
    ranks = {t: float(i) for i, t in enumerate(tasks)}
    seeds = [
        {
            "seed": 0,
            "tau": ranks,
            "obs": {t: math.exp(3.0 * r) for t, r in ranks.items()},
        },  # ranks, not values
        {"seed": 1, "tau": ranks, "obs": {t: -r for t, r in ranks.items()}},
    ]
    c = bench.correlate(seeds[:1], "tau", "obs")
    assert c["per_seed"] == {"0": pytest.approx(1.0)} and c["pooled"] == pytest.approx(1.0)
    assert c["pooled_ci95"][0] == pytest.approx(1.0) and c["within_seed_ci95"][1] == pytest.approx(1.0)
    c = bench.correlate(seeds, "tau", "obs")
    assert c["per_seed"]["1"] == pytest.approx(-1.0)
    assert c["within_seed_mean"] == pytest.approx(0.0)
    lo, hi = c["pooled_ci95"]
    assert lo <= c["pooled"] <= hi
    assert math.isnan(bench.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_dataset_prompts():
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["a =>", "b =>", "c =>"], "completion": [" x", " y", " z"]})
    assert probes.dataset_prompts("caps", ds, limit=2) == ["a =>", "b =>"]
    assert probes.dataset_prompts("caps", ["a =>"]) == ["a =>"]
    with pytest.raises(ValueError, match="harmless: a probe set needs a 'prompt' column"):
        probes.dataset_prompts("harmless", Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match=r"tasks\['t'\]\[0\]: prompts must be strings"):
        probes.dataset_prompts(
            "tasks['t']", Dataset.from_dict({"prompt": [[{"role": "user", "content": "a"}]]})
        )


def test_class_auc():
    from benchmarks import probe_prediction as bench

    entangled = {t for t, task in bench.lab.TASKS.items() if task.overlap == "entangled"}
    assert entangled == {"chemistry", "persuasion"}
    up = {"tau": {t: (1.0 if t in entangled else 0.1) for t in bench.lab.TASKS}}
    down = {"tau": {t: (0.0 if t in entangled else 0.1) for t in bench.lab.TASKS}}
    mixed = {"tau": {**up["tau"], "persuasion": 0.1}}  # a tie with all four: 4 wins + 4 halves
    assert bench.class_auc(up, "tau") == 1.0
    assert bench.class_auc(down, "tau") == 0.0
    assert bench.class_auc(mixed, "tau") == pytest.approx(0.75)
