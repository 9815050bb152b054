"""benchmarks/scaling_law.py (Prediction 2): the classification rule, the (d, τ) pairing, the seed bootstrap,
bad input, and the script end to end on two tiny lab sizes (files it writes)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks import probe_prediction as pp
from benchmarks import scaling_law as sl
from frontier_trainer import geometry, lab

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIMS = (32, 64, 128, 256)
ENTANGLED = [t for t, task in lab.TASKS.items() if task.overlap == "entangled"]


def _fit(tau0: float, k: float, se0: float, se_k: float) -> geometry.ScalingFit:
    return geometry.ScalingFit(tau0=tau0, k=k, tau0_stderr=se0, k_stderr=se_k, residual_std=0.0, n=12)


def test_rule_on_explicit_fits() -> None:
    """Each branch of the pre-declared rule, and each of its three conditions on its own."""
    # plateau: τ₀ significant and carrying most of τ̂(256)
    assert sl.classify(_fit(0.3, 2.0, 0.01, 0.5), 256)["label"] == "intrinsic"
    # τ₀ > 0 but not significant (0.01 - 2·0.01 < 0) although it would carry 84% at d = 256: falls -> incidental
    r = sl.classify(_fit(0.01, 0.5, 0.01, 0.1), 256)
    assert (r["label"], r["tau0_significant"], r["plateau_carries_most"]) == ("incidental", False, True)
    # significant small floor that carries only 39% of τ̂(256) = 0.01 + 4/256: incidental, not intrinsic
    r = sl.classify(_fit(0.01, 4.0, 0.001, 0.2), 256)
    assert r["tau0_significant"] and not r["plateau_carries_most"] and r["label"] == "incidental"
    assert r["tau_at_d_max"] == pytest.approx(0.01 + 4.0 / 256)
    assert r["plateau_share_at_d_max"] == pytest.approx(0.01 / (0.01 + 4.0 / 256))
    # the same floor measured against d_max = 4096 carries 91%: the share is read at d_max, not d_min
    assert sl.classify(_fit(0.01, 4.0, 0.001, 0.2), 4096)["label"] == "intrinsic"
    # neither a significant plateau nor a significant fall
    assert sl.classify(_fit(0.001, 0.1, 0.002, 0.2), 256)["label"] == "inconclusive"
    # the z multiplier matters: k = 0.5 ± 0.2 falls at z = 2 but not at z = 3
    assert sl.classify(_fit(0.0, 0.5, 0.01, 0.2), 256, z=2.0)["label"] == "incidental"
    assert sl.classify(_fit(0.0, 0.5, 0.01, 0.2), 256, z=3.0)["label"] == "inconclusive"
    # two points only: NaN standard errors never count as significant
    assert sl.classify(_fit(0.3, 2.0, math.nan, math.nan), 256)["label"] == "inconclusive"


def _planted_points(
    laws: dict[str, tuple[float, float]], seeds: int = 3, shuffle: int = 0
) -> list[dict[str, Any]]:
    """Points of a fake family with τ_t(d) = τ₀ + k/d ± 3% (deterministic per seed), in shuffled order."""
    rng = random.Random(shuffle)
    points = []
    for d in DIMS:
        for s in range(seeds):
            wiggle = 1.0 + 0.03 * (s - (seeds - 1) / 2)
            tau = {t: min(1.0, (tau0 + k / d) * wiggle) for t, (tau0, k) in laws.items()}
            grad = {t: v / 100 for t, v in tau.items()}
            points.append(
                {
                    "hidden_size": d,
                    "seed": s,
                    "num_parameters": 10 * d * d,
                    "tau_repr": tau,
                    "tau_grad": grad,
                    "tau_repr_mean_layers": tau,
                    "tau_repr_by_layer": {t: {"1": v, "2": v} for t, v in tau.items()},
                }
            )
    rng.shuffle(points)
    return points


SETTINGS = {"z": 2.0, "plateau_fraction": 0.5, "bootstrap_samples": 200}
AS_BUILT = {t: ((0.3, 1.0) if t in ENTANGLED else (0.0, 2.0 + i)) for i, t in enumerate(lab.TASKS)}


def test_fits_recover_planted_laws_from_shuffled_points() -> None:
    """τ is paired with its own d point by point: a shuffled family still gives the planted τ₀ and k."""
    points = _planted_points(AS_BUILT, shuffle=1)
    assert [p["hidden_size"] for p in points] != sorted(p["hidden_size"] for p in points)  # really shuffled
    fits = sl.fit_all(points, SETTINGS)
    for row in fits["representation"]["tasks"]:
        tau0, k = AS_BUILT[row["task"]]
        assert row["fit"]["tau0"] == pytest.approx(tau0, abs=1e-9)
        assert row["fit"]["k"] == pytest.approx(k, rel=1e-9)
        assert row["fit"]["n"] == len(DIMS) * 3
        assert row["by_hidden_size"]["32"]["mean"] == pytest.approx(tau0 + k / 32)
    # gradient space: the same laws scaled by 1/100
    for row in fits["gradient"]["tasks"]:
        tau0, k = AS_BUILT[row["task"]]
        assert row["fit"]["k"] == pytest.approx(k / 100, rel=1e-9)
    # against x = num_parameters = 10 d², the 1/d law is not linear in 1/P: the fit differs
    by_p = {r["task"]: r["fit"]["k"] for r in fits["gradient, x = 1/P"]["tasks"]}
    assert all(by_p[t] != pytest.approx(AS_BUILT[t][1] / 100, rel=1e-3) for t in lab.TASKS)
    assert {"representation, layer 1 only", "representation, layer 2 only"} <= set(fits)


def test_prediction_verdict_as_built_and_reversed() -> None:
    """Entangled tasks planted with a plateau and the others with 1/d: every label agrees; reversed: none."""
    fits = sl.fit_all(_planted_points(AS_BUILT), SETTINGS)
    rep = fits["representation"]
    labels = {r["task"]: r["label"] for r in rep["tasks"]}
    assert labels == {t: ("intrinsic" if t in ENTANGLED else "incidental") for t in lab.TASKS}
    assert rep["prediction_holds"] and rep["entangled_plateau"] == 2 and rep["others_fall"] == 4
    assert {r["task"]: r["expected"] for r in rep["tasks"]} == labels
    reversed_laws = {t: ((0.0, 3.0) if t in ENTANGLED else (0.2, 1.0)) for t in lab.TASKS}
    rep = sl.fit_all(_planted_points(reversed_laws), SETTINGS)["representation"]
    assert not any(r["agrees"] for r in rep["tasks"])
    assert rep["entangled_plateau"] == 0 and rep["others_fall"] == 0 and not rep["prediction_holds"]


def test_seed_bootstrap_interval() -> None:
    dims = [d for d in DIMS for _ in range(3)]
    taus = [0.2 + 1.0 / d + 0.01 * (i % 3 - 1) for i, d in enumerate(dims)]
    lo, hi = sl.seed_bootstrap(dims, taus, 500)
    assert lo < 0.2 < hi and hi - lo < 0.05
    # identical seeds at every d: nothing to resample, the interval collapses onto the fit
    exact = [0.2 + 1.0 / d for d in dims]
    lo, hi = sl.seed_bootstrap(dims, exact, 100)
    assert lo == pytest.approx(0.2, abs=1e-12) and hi == pytest.approx(0.2, abs=1e-12)
    assert sl.seed_bootstrap(dims, taus, 0) is None
    # one seed per d: resampling within each d keeps both sizes, so the fit is exact every time; a
    # bootstrap that pooled the points across sizes would often draw one size twice (a singular fit)
    lo, hi = sl.seed_bootstrap([32.0, 128.0], [0.2 + 1 / 32, 0.2 + 1 / 128], 200)
    assert lo == pytest.approx(0.2, abs=1e-12) and hi == pytest.approx(0.2, abs=1e-12)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden-sizes", "32"], "--hidden-sizes"),
        (["--hidden-sizes", "32", "32"], "distinct sizes"),
        (["--hidden-sizes", "32", "66"], "--hidden-sizes 66"),  # 66 // 32 = 2 heads of 33: odd head dimension
        (["--seeds", "1", "1"], "--seeds"),
        (["--hidden-sizes", "32", "64", "--seeds", "0"], "at least 3"),
        (["--pretrain-steps", "0"], "--pretrain-steps"),
        (["--gradient-rows", "1"], "--gradient-rows"),
        (["--bootstrap", "-1"], "--bootstrap"),
    ],
)
def test_bad_input_is_refused_naming_the_flag(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        sl.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_end_to_end_on_two_tiny_sizes(tmp_path: Path) -> None:
    """The real script: two tiny lab sizes × 2 seeds (5 pretraining steps), every file it writes."""
    before = dict(pp.SETTINGS)
    out = tmp_path / "out"
    argv = [
        *("--hidden-sizes", "32", "64", "--seeds", "0", "1", "--pretrain-steps", "5"),
        *("--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)),
        *("--probe-rows-per-set", "6", "--held-out-rows", "6", "--gradient-rows", "4"),
        *("--gradient-batch-size", "2", "--gradient-batches", "2", "--eval-rows", "2", "--bootstrap", "20"),
    ]
    assert sl.main(argv) == 0
    assert before == pp.SETTINGS  # probe_prediction's settings are restored
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["pretrain"] == {"steps": 5}
    assert results["settings"]["probe_rows_per_set"] == 6 and results["settings"]["gradient_batches"] == 2
    assert results["git"]["commit"] and results["versions"]["torch"] and results["machine"]["cpu_count"]
    points = results["points"]
    assert sorted((p["hidden_size"], p["seed"]) for p in points) == [(32, 0), (32, 1), (64, 0), (64, 1)]
    for p in points:
        # the τ of a point come from the model of that (d, seed): its manifest says so
        assert p["pretrain_settings"]["hidden_size"] == p["hidden_size"]
        assert p["pretrain_settings"]["seed"] == p["seed"] and p["pretrain_settings"]["steps"] == 5
        assert lab.read_manifest(p["model_dir"])["hash"] == p["model_hash"]
        assert set(p["tau_repr"]) == set(p["tau_grad"]) == set(lab.TASKS)
        assert all(0.0 <= v <= 1.0 for v in [*p["tau_repr"].values(), *p["tau_grad"].values()])
        assert "accuracy/mean" in p["eval"]
    assert len({p["model_hash"] for p in points}) == 4
    params = {p["hidden_size"]: p["num_parameters"] for p in points}
    assert params[64] > params[32]
    for name in ("representation", "gradient"):
        space = results["fits"][name]
        assert space["primary"] and [r["task"] for r in space["tasks"]] == list(lab.TASKS)
        for r in space["tasks"]:
            assert r["fit"]["n"] == 4 and r["label"] in sl.LABELS
            dims, taus = zip(*[(p["hidden_size"], p["tau_repr" if name == "representation" else "tau_grad"][r["task"]])
                               for p in points], strict=True)  # fmt: skip
            refit = geometry.fit_scaling_law(list(dims), list(taus))
            assert r["fit"]["tau0"] == pytest.approx(refit.tau0) and r["fit"]["k"] == pytest.approx(refit.k)
    md = (out / "results.md").read_text()
    for t in lab.TASKS:
        assert f"| {t} | {lab.TASKS[t].overlap} |" in md
    assert "## representation (primary)" in md and "## gradient (primary)" in md and "## Every point" in md
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
