"""frontier_trainer.hma: the allocation QP against scipy, the streaming merge, the mergekit YAML, LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize
from tiny import build_model_dir, build_tokenizer, capability_datasets, preference_dataset
from transformers import AutoModelForCausalLM

from frontier_trainer import hma
from frontier_trainer.hma.sources import SafetensorsDir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hma")
    return build_model_dir(root / "base", seed=0), build_model_dir(root / "aligned", seed=1)


def state(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# --------------------------------------------------------------------------------------
# Allocation QP
# --------------------------------------------------------------------------------------


def scipy_best(s, C, w, B, eps, rng) -> float:
    L = len(s)
    cons = [{"type": "ineq", "fun": lambda a: B - w @ (a * a), "jac": lambda a: -2 * w * a}]
    for i in np.flatnonzero(np.isfinite(eps)):
        cons.append({"type": "ineq", "fun": lambda a, i=i: C[i] @ a + eps[i], "jac": lambda a, i=i: C[i]})
    best = -np.inf
    for x0 in (np.zeros(L), np.full(L, 0.5), rng.uniform(0, 1, L)):
        r = minimize(lambda a: -s @ a, x0, jac=lambda a: -s, bounds=[(0, 1)] * L, constraints=cons,
                     method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})  # fmt: skip
        a = np.clip(r.x, 0, 1)
        ok = w @ (a * a) <= B * (1 + 1e-7) and all(
            C[i] @ a >= -eps[i] - 1e-7 for i in np.flatnonzero(np.isfinite(eps))
        )
        if ok:
            best = max(best, float(s @ a))
    return best


def test_qp_matches_scipy_and_meets_constraints() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        L, m = int(rng.integers(1, 10)), int(rng.integers(0, 4))
        s, C, w = rng.normal(size=L), rng.normal(size=(m, L)), rng.uniform(0.1, 3, size=L)
        B = rng.uniform(0.01, 1.2) * w.sum()
        eps = rng.choice([0.0, 0.3, np.inf], size=m) * rng.uniform(0.5, 2, size=m)
        sol = hma.solve_allocation_qp(s, C, w, B, eps)
        a = sol.alpha
        assert np.all(a >= 0) and np.all(a <= 1)
        assert w @ (a * a) <= B * (1 + 1e-9)
        for i in np.flatnonzero(np.isfinite(eps)):
            assert C[i] @ a >= -eps[i] - 1e-9
        assert sol.kkt_residual < 1e-7
        best = scipy_best(s, C, w, B, eps, rng)
        assert sol.objective >= best - 1e-6, (sol.objective, best)
        # beats every feasible uniform α = t (scan t)
        for t in np.linspace(0, 1, 21):
            feasible = t * t * w.sum() <= B and all(
                t * C[i].sum() >= -eps[i] for i in np.flatnonzero(np.isfinite(eps))
            )
            if feasible:
                assert sol.objective >= t * s.sum() - 1e-9


def test_qp_closed_form_without_tasks() -> None:
    # no task constraint, nothing clipped: α ∝ s/w with Σ w α² = B (Cauchy-Schwarz in the w-norm)
    s, w = np.array([0.1, 0.2, 0.05]), np.array([1.0, 2.0, 0.5])
    B = 0.01
    sol = hma.solve_allocation_qp(s, np.zeros((0, 3)), w, B)
    expected = (s / w) * math.sqrt(B / np.sum(s * s / w))
    np.testing.assert_allclose(sol.alpha, expected, rtol=1e-10)


def test_qp_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        hma.solve_allocation_qp([1.0], [[1.0]], [1.0], 1.0, [-0.1])
    with pytest.raises(hma.InfeasibleAllocationError):
        hma.solve_allocation_qp([1.0], [[1.0]], [1.0], 1.0, [0.0], offsets=[-5.0])


# --------------------------------------------------------------------------------------
# Geometry and allocation on a model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def geometry(dirs: tuple[Path, Path]) -> hma.LayerGeometry:
    base, aligned = dirs
    return hma.measure_geometry(
        str(base), str(aligned), preference_dataset(8), capability_datasets(), max_examples=8
    )


def test_geometry_matches_finite_differences(dirs: tuple[Path, Path], geometry: hma.LayerGeometry) -> None:
    from frontier_trainer.hma.signals import preference_batch, preference_margin

    base, aligned = dirs
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    a_sd = state(aligned)
    batch = preference_batch(build_tokenizer(), list(preference_dataset(8)))
    b_sd = {k: v.double() for k, v in state(base).items()}

    def margin_at(group: str, h: float) -> float:  # S(θ_base + h Δ_ℓ); RMSNorm runs in float32
        model.load_state_dict(b_sd)
        for n, p in model.named_parameters():
            if n.startswith(group + "."):
                p.add_(h * (a_sd[n].double() - p))
        return float(preference_margin(model, batch))

    with torch.no_grad():
        h = 1e-3
        for i, group in enumerate(geometry.groups):
            fd = (margin_at(group, h) - margin_at(group, -h)) / (2 * h)  # central difference
            assert fd == pytest.approx(geometry.safety[i], rel=1e-2, abs=1e-5)
    assert np.all(geometry.weights > 0) and geometry.tax_rates.shape == (2,)


def test_allocation_beats_uniform_at_equal_budget(geometry: hma.LayerGeometry) -> None:
    for t in (0.25, 0.5, 0.75):
        uni = hma.uniform(geometry, t)
        eps = {k: max(0.0, -v) for k, v in uni.predicted_capability.items()}  # uniform is feasible
        al = hma.allocate(geometry, t=t, tolerances=eps)
        assert al.budget_used <= uni.budget * (1 + 1e-9)
        assert al.predicted_safety >= uni.predicted_safety - 1e-12
        assert al.outer_alpha == pytest.approx(t)
        for k, v in al.predicted_capability.items():
            assert v >= -eps[k] - 1e-9


# --------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------


def test_alpha_zero_and_one_are_bitwise(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base, aligned = dirs
    for t, ref in ((0.0, base), (1.0, aligned)):
        hma.merge(str(base), str(aligned), t, tmp_path / f"m{t}", progress=False)
        got, want = state(tmp_path / f"m{t}"), state(ref)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_uniform_alphas_equal_uniform_averaging(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base, aligned = dirs
    b, a = state(base), state(aligned)
    groups = hma.Grouping().groups(list(b))
    hma.merge(
        str(base), str(aligned), dict.fromkeys(groups, 0.3), tmp_path / "m", outer_alpha=0.3, progress=False
    )
    got = state(tmp_path / "m")
    for k in b:
        assert torch.equal(got[k], b[k] + 0.3 * (a[k] - b[k]))
        torch.testing.assert_close(got[k], 0.7 * b[k] + 0.3 * a[k])


def test_per_group_alphas_land_on_their_layers(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base, aligned = dirs
    b, a = state(base), state(aligned)
    alphas = {"model.layers.0": 0.2, "model.layers.1": 0.9}
    hma.merge(str(base), str(aligned), alphas, tmp_path / "m", outer_alpha=0.5, progress=False)
    got = state(tmp_path / "m")
    for k in b:
        t = 0.2 if ".layers.0." in k else 0.9 if ".layers.1." in k else 0.5
        torch.testing.assert_close(got[k], b[k] + t * (a[k] - b[k]), rtol=0, atol=1e-6)


def test_mismatched_or_missing_tensors_fail_clearly(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = dirs
    other = tmp_path / "other"
    sd = load_file(str(base / "model.safetensors"))
    sd["model.norm.weight"] = torch.ones(7)
    other.mkdir()
    save_file(sd, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch for model\.norm\.weight"):
        hma.merge(str(base), str(other), 0.5, tmp_path / "o", progress=False)
    sd = load_file(str(base / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(other / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing from aligned \['model\.layers\.1\.mlp\.up_proj\.weight'\]"
    ):
        hma.merge(str(base), str(other), 0.5, tmp_path / "o", progress=False)


@pytest.mark.parametrize("mode", ["block", "module", "parts:1"])
def test_mergekit_yaml_reproduces_weights(dirs: tuple[Path, Path], tmp_path: Path, mode: str) -> None:
    base, aligned = dirs
    grouping = hma.Grouping(mode=mode)
    groups = grouping.groups(list(state(base)))
    rng = np.random.default_rng(1)
    alphas = {g: float(rng.uniform()) for g in groups}
    hma.merge(
        str(base), str(aligned), alphas, tmp_path / "m", grouping=grouping, outer_alpha=0.4, progress=False
    )
    merged = state(tmp_path / "m")
    from_yaml = dict(hma.load_mergekit_yaml(tmp_path / "m" / "mergekit_config.yml"))
    assert from_yaml.keys() == set(SafetensorsDir(base).names())
    assert all(torch.equal(from_yaml[k], merged[k]) for k in from_yaml)
    prov = json.loads((tmp_path / "m" / "hma_provenance.json").read_text())
    assert prov["alphas"] == alphas and prov["outer_alpha"] == 0.4


class RecordingSource(SafetensorsDir):
    """Records the group of every tensor read (an observation independent of the merge's counter)."""

    def __init__(self, path: Path, log: list[str]) -> None:
        super().__init__(path)
        self.log = log
        self.assign = hma.Grouping().assign(self.names())

    def get(self, name: str) -> torch.Tensor:
        self.log.append(self.assign[name])
        return super().get(name)


def test_streaming_merge_holds_one_group(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base, aligned = dirs
    log: list[str] = []
    stats = hma.MergeStats()
    hma.merge(
        RecordingSource(base, log),
        RecordingSource(aligned, log),
        0.5,
        tmp_path / "m",
        stats=stats,
        progress=False,
    )
    assert stats.max_groups_held == 1 and stats.held == 0
    assert stats.groups_written == 3  # two blocks + the outer tensors
    runs = [g for i, g in enumerate(log) if i == 0 or log[i - 1] != g]
    assert len(runs) == len(set(runs)) == 3  # each group read in one contiguous run, never revisited
    assert len(list((tmp_path / "m").glob("*.safetensors"))) == 3


def test_lora_adapter_scaled_per_layer(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base, _ = dirs
    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
    )
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    peft.save_pretrained(tmp_path / "adapter")
    alphas = {"model.layers.0": 0.25, "model.layers.1": 0.75}
    hma.merge(
        str(base), str(tmp_path / "adapter"), alphas, tmp_path / "scaled", outer_alpha=0.5, progress=False
    )
    assert not list((tmp_path / "scaled").glob("model*.safetensors"))  # no full weights written
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "scaled"
    ).merge_and_unload()
    full = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    ).merge_and_unload()
    b, f, got = state(base), full.state_dict(), merged.state_dict()
    for k in b:
        t = 0.25 if ".layers.0." in k else 0.75
        torch.testing.assert_close(got[k], b[k] + t * (f[k] - b[k]), rtol=1e-5, atol=1e-6)
    from_yaml = dict(hma.load_mergekit_yaml(tmp_path / "scaled" / "mergekit_config.yml"))
    for k in b:
        torch.testing.assert_close(from_yaml[k], got[k], rtol=1e-5, atol=1e-6)


def test_grouping_rules() -> None:
    names = [
        "model.embed_tokens.weight",
        *[f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)],
        "model.norm.weight",
    ]
    g = hma.Grouping("parts:3")
    assert g.groups(names) == ["part0", "part1", "part2"]
    assert g.assign(names)["model.norm.weight"] == hma.OUTER
    assert hma.Grouping("block", outer="group").groups(names)[-1] == hma.OUTER
    filters = dict(hma.Grouping().filters(names))
    assert "model.layers.1." in filters and not any(
        f in "model.layers.11.mlp.up_proj.weight" for f in ["model.layers.1."]
    )
    with pytest.raises(ValueError, match="parts:13"):
        hma.Grouping("parts:13").groups(names)


def test_cli_writes_merge_and_table(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from frontier_trainer.hma.cli import main

    base, aligned = dirs
    preference_dataset(8).to_json(str(tmp_path / "prefs.jsonl"))
    for task, ds in capability_datasets().items():
        ds.to_json(str(tmp_path / f"{task}.jsonl"))
    argv = ["--base", str(base), "--aligned", str(aligned), "--preferences", str(tmp_path / "prefs.jsonl"),
            "--capability", f"copy={tmp_path / 'copy.jsonl'}", "--capability", f"count={tmp_path / 'count.jsonl'}",
            "--out", str(tmp_path / "out"), "--t", "0.5", "--tolerance", "0", "--max-examples", "8"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "HMA (chosen)" in printed and "uniform t=0.5" in printed
    prov = json.loads((tmp_path / "out" / "hma_provenance.json").read_text())
    assert prov["allocation"]["method"] == "hma" and (tmp_path / "out" / "mergekit_config.yml").is_file()
    assert (tmp_path / "out" / "hma_geometry.json").is_file()
