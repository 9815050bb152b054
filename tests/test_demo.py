"""The demo's geometry report recovers the planted ground truth."""

import json

from frontier_trainer import demo


def test_planted_geometry_report_recovers_ground_truth(tmp_path) -> None:
    demo.main(["--output-dir", str(tmp_path), "--planted-only"])
    report = json.loads((tmp_path / "geometry_planted.json").read_text())
    taus = {t["task"]: t["tau"] for t in report["tasks"]}
    assert abs(taus["chemistry"] - 0.36) < 1e-9 and abs(taus["persuasion"] - 0.35**2) < 1e-9
    assert taus["arithmetic"] < 0.05 and taus["translation"] < 0.05
    fit = report["scaling"]["fit"]
    # Prop 5.5: incidental tax is m'/d with m' = 2 and no plateau
    assert abs(fit["k"] - 2.0) < 5 * fit["k_stderr"] + 0.1
    assert abs(fit["tau0"]) < 5 * fit["tau0_stderr"] + 1e-3
