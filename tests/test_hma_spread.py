"""benchmarks/hma_spread.py (Prediction 3): statistics on planted inputs and a tiny end-to-end run.

What is guaranteed and tested here:

* the cross-layer spread is the population std / range / mean of the finite τ_ℓ;
* every correlation pairs the spread and the margin of the *same* (setting, seed) point: planted points
  in shuffled order with margin monotone in the spread give Spearman exactly +1 (and −1 for a reversed
  spread), so any mis-pairing turns the test red;
* the per-setting interval is a bootstrap of the *mean* over seeds (narrower than the values' range);
* the matched-refusal gain is HMA's envelope minus uniform's, averaged over the reachable levels;
* the lab pretraining seed of every point is the point's seed (checked in the cached models' manifests);
* the representation-space joint τ_ℓ is at least every per-task τ_{i,ℓ} (projection onto a span);
* bad settings are refused before any training with a message naming the flag.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from benchmarks import hma_benchmark, hma_spread
from frontier_trainer import lab

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _point(setting: str, seed: int, grad_std: float, repr_std: float, hv: float, gain: float) -> dict:
    return {
        "setting": setting,
        "seed": seed,
        "gradient": {"tax_spread": {"tau_std": grad_std}},
        "representation": {"tax_spread": {"tau_std": repr_std}},
        "margin": {"hv_ratio": hv, "matched_gain": gain},
    }


# --------------------------------------------------------------------------------------
# statistics on planted inputs
# --------------------------------------------------------------------------------------


def test_spread_is_population_std_range_and_mean_of_finite_taus() -> None:
    s = hma_spread.spread([0.1, None, 0.3, math.nan])
    assert s["tau_mean"] == pytest.approx(0.2)
    assert s["tau_std"] == pytest.approx(0.1)  # population std of {0.1, 0.3}
    assert s["tau_range"] == pytest.approx(0.2)
    assert s["tau_cv"] == pytest.approx(0.5)
    assert math.isnan(hma_spread.spread([None])["tau_std"])


def test_correlations_pair_spread_and_margin_of_the_same_point() -> None:
    rng = random.Random(0)
    points = []
    for k in range(12):
        grad = 0.001 * (k + 1)
        # margins strictly increasing in the gradient spread, matched gain strictly decreasing;
        # the representation spread is planted in the reverse order of the gradient spread
        points.append(_point(f"s{k % 4}", k // 4, grad, 1.0 / (k + 1), 1.0 + grad**0.5, -grad))
    rng.shuffle(points)
    summary = hma_spread.summarise(points, samples=500)
    c = summary["correlations"]
    assert c["gradient_spread~hv_ratio"]["rho"] == pytest.approx(1.0)
    assert c["gradient_spread~matched_gain"]["rho"] == pytest.approx(-1.0)
    assert c["representation_spread~hv_ratio"]["rho"] == pytest.approx(-1.0)
    assert c["representation_spread~matched_gain"]["rho"] == pytest.approx(1.0)
    # perfectly monotone data: every resample that has a ρ has ρ = +1
    primary = c["gradient_spread~hv_ratio"]
    assert primary["lo"] == pytest.approx(1.0) and primary["hi"] == pytest.approx(1.0)
    assert primary["n"] == 12 and primary["valid"] > 450
    assert summary["verdict"].startswith("the margin grows with the spread")
    # per setting: the seeds' own values, in their own order
    row = summary["per_setting"]["s1"]
    expected = sorted(p["margin"]["hv_ratio"] for p in points if p["setting"] == "s1")
    assert sorted(row["hv_ratio"]["values"]) == expected
    assert row["hv_ratio"]["mean"] == pytest.approx(np.mean(expected))
    assert row["gradient_spread"] == pytest.approx(np.mean([0.002, 0.006, 0.010]))
    assert row["representation_spread"] == pytest.approx(np.mean([1 / 2, 1 / 6, 1 / 10]))


def test_verdict_follows_the_sign_of_the_interval() -> None:
    down = [_point("a", k, 0.01 * (k + 1), 0.1, 2.0 - 0.1 * k, 0.0) for k in range(8)]
    assert hma_spread.summarise(down, samples=300)["verdict"].startswith("the margin shrinks")
    rng = np.random.default_rng(3)
    noise = [_point("a", k, float(x), 0.1, float(y), 0.0) for k, (x, y) in enumerate(rng.random((8, 2)))]
    flat = hma_spread.summarise(noise, samples=300)
    c = flat["correlations"]["gradient_spread~hv_ratio"]
    assert c["lo"] < 0 < c["hi"]
    assert flat["verdict"].startswith("no monotone relation")


def test_bootstrap_interval_is_of_the_mean_not_of_the_values() -> None:
    lo, hi = hma_spread.bootstrap_mean(list(range(10)), samples=4000)
    # mean 4.5, standard error 2.87/sqrt(10) ≈ 0.91: the interval is about 4.5 ± 1.8, well inside [0, 9]
    assert 2.0 < lo < 3.5 and 5.5 < hi < 7.0
    assert hma_spread.bootstrap_mean([1.3, 1.3, 1.3], samples=100) == (pytest.approx(1.3), pytest.approx(1.3))


def test_spearman_refuses_unpaired_inputs() -> None:
    with pytest.raises(ValueError, match="one margin per spread"):
        hma_spread.spearman([1.0, 2.0, 3.0], [1.0, 2.0])
    assert math.isnan(hma_spread.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_matched_gain_is_hma_envelope_minus_uniform_envelope() -> None:
    def pt(method: str, t: float, refusal: float, acc: float) -> dict:
        return {"method": method, "t": t, "refusal_rate": refusal, "accuracy/mean": acc}

    result = {
        "points": [
            pt("base", 0.0, 0.0, 0.5),
            pt("aligned", 1.0, 0.8, 0.1),
            pt("uniform", 0.5, 0.4, 0.3),
            pt("hma", 0.5, 0.4, 0.4),
        ],
        "hypervolume": {"uniform": 0.2, "hma": 0.25},
        "hv_ratio": 1.25,
    }
    m = hma_spread.margins(result)
    # by hand: HMA − uniform = 0.25 x on [0, 0.4], 0.1 − 0.25 (x − 0.4) on [0.4, 0.8], nothing beyond 0.8
    levels = [0.05 * k for k in range(1, 17)]
    by_hand = [0.25 * x if x <= 0.4 else 0.1 - 0.25 * (x - 0.4) for x in levels]
    assert sorted(m["matched_gain_levels"]) == [f"{x:.2f}" for x in levels]
    assert m["matched_gain"] == pytest.approx(np.mean(by_hand))
    assert m["matched_gain"] > 0
    assert m["hv_ratio"] == 1.25 and m["hv_hma"] == 0.25


# --------------------------------------------------------------------------------------
# settings, seeding, bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("ent1:1.0", "name:entanglement:layers"),
        ("x:1.5:4", "entanglement in"),
        ("x:1:one", "layers a positive"),
        ("x:0.5:1", "layers >= 2"),
    ],
)
def test_bad_setting_is_refused_naming_the_flag(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        hma_spread.Setting.parse(spec)
    assert "--settings" in str(err.value)


def test_bad_run_values_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--sweep"):
        hma_spread.main(["--out", str(tmp_path), "--sweep", "0.5", "1.0"])
    with pytest.raises(ValueError, match="--seeds"):
        hma_spread.main(["--out", str(tmp_path), "--seeds", "1", "1"])
    with pytest.raises(ValueError, match="--probe-rows"):
        hma_spread.main(["--out", str(tmp_path), "--probe-rows", "1"])
    assert not (tmp_path / "results.json").exists()


def test_lab_seed_reaches_hma_benchmark_and_is_undone() -> None:
    real = hma_benchmark.lab
    with hma_spread.lab_seed(7):
        cfg = hma_benchmark.lab.LabConfig(hidden_size=16, num_layers=2)
        assert cfg.seed == 7 and cfg.hidden_size == 16
        assert hma_benchmark.lab.WorldConfig is lab.WorldConfig  # everything else is the real module
    assert hma_benchmark.lab is real
    assert hma_benchmark.lab.LabConfig(hidden_size=16).seed == 0


def test_representation_tau_is_the_joint_rate_over_all_task_probes() -> None:
    """On an untrained tiny lab model: one τ_ℓ per block output, each ≥ every per-task τ_{i,ℓ}."""
    tok = lab.build_tokenizer()
    model = lab.build_model(lab.LabConfig(hidden_size=16, num_layers=3), tok)
    rep = hma_spread.representation_taus(model, tok, lab.WorldConfig(entanglement=0.5), rows=6, held_out=4)
    assert rep["layers"] == [1, 2, 3]
    for layer in map(str, rep["layers"]):
        per_task = [rep["task_tau_by_layer"][t][layer] for t in lab.TASKS]
        assert max(per_task) - 1e-9 <= rep["tau_by_layer"][layer] <= 1.0 + 1e-12
        # a projection onto the span of six directions, not the square of one cosine
        assert rep["tau_by_layer"][layer] > max(per_task) + 1e-6
    assert rep["tax_spread"]["tau_std"] == pytest.approx(np.std(list(rep["tau_by_layer"].values())))
    assert set(rep["separation"]) == {"1", "2", "3"}


# --------------------------------------------------------------------------------------
# end to end on the tiniest setting
# --------------------------------------------------------------------------------------

TINY = ["--hidden", "16", "--pretrain-steps", "20", "--pretrain-batch", "8", "--dpo-steps", "2",
        "--geometry-examples", "4", "--eval-examples", "4", "--probe-rows", "4", "--held-out-rows", "4",
        "--sweep", "0.5", "--settings", "flat:0.0:2", "deep:1.0:3", "--seeds", "0", "1",
        "--bootstrap-samples", "200"]  # fmt: skip


def test_end_to_end_tiny_run_writes_every_point_and_resumes(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [*TINY, "--out", str(out), "--cache-dir", str(cache), "--work", str(tmp_path / "work")]
    assert hma_spread.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "margin_vs_spread.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "Spearman(spread, margin)" in md and "| flat |" in md and "| deep |" in md
    assert {(p["setting"], p["seed"]) for p in results["points"]} == {
        ("flat", 0),
        ("flat", 1),
        ("deep", 0),
        ("deep", 1),
    }
    for key in ("git_commit", "torch", "transformers", "trl", "machine"):
        assert key in results["provenance"]
    assert results["run"]["sweep"] == [0.5] and results["run"]["pretrain_steps"] == 20
    models = set()
    for p in results["points"]:
        layers = 2 if p["setting"] == "flat" else 3
        manifest = lab.read_manifest(cache / p["lab_model"])
        # the lab pretraining seed is the point's seed (and the model has the setting's depth)
        assert manifest["settings"]["seed"] == p["seed"]
        assert manifest["settings"]["num_layers"] == layers
        assert manifest["settings"]["world"]["entanglement"] == p["entanglement"]
        models.add(p["lab_model"])
        assert len(p["gradient"]["tax_rates"]) == layers
        assert p["gradient"]["tax_spread"]["tau_std"] == pytest.approx(
            np.std(list(p["gradient"]["tax_rates"].values()))
        )
        rep = p["representation"]
        assert rep["layers"] == list(range(1, layers + 1))
        for layer in map(str, rep["layers"]):
            joint = rep["tau_by_layer"][layer]
            per_task = [rep["task_tau_by_layer"][t][layer] for t in lab.TASKS]
            assert max(per_task) - 1e-9 <= joint <= 1.0 + 1e-12
        assert rep["tax_spread"]["tau_std"] == pytest.approx(np.std(list(rep["tau_by_layer"].values())))
        assert [q["method"] for q in p["benchmark"]["points"]] == ["base", "aligned", "uniform", "hma"]
    assert len(models) == 4
    # resuming with the same settings keeps every point as it was
    before = (out / "results.json").read_text()
    assert hma_spread.main(args) == 0
    assert json.loads((out / "results.json").read_text())["points"] == json.loads(before)["points"]
