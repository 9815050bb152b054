"""``make demo``: the product's story on the built-in default, end to end.

Currently: a geometry report (tax rates, principal angles, frontier points, the scaling law)
for planted safety and capability directions with known ground truth. Results are printed
as tables and written as JSON under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from frontier_trainer import geometry

logger = logging.getLogger(__name__)


def planted_directions(d: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A unit safety direction and four capability directions with known overlap.

    ``chemistry`` and ``persuasion`` have intrinsic overlap γ with safety (0.6 and 0.35: the
    paper's §9.2 examples); ``arithmetic`` and ``translation`` are independent uniform
    directions, whose overlap is incidental packing (τ_i ≈ 1/d in expectation, Prop 5.5).
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, 8, generator=gen, dtype=torch.float64))
    v = basis[:, 0]
    caps = {
        "chemistry": 0.6 * v + 0.8 * basis[:, 1],
        "persuasion": 0.35 * v + math.sqrt(1 - 0.35**2) * basis[:, 2],
    }
    for name in ("arithmetic", "translation"):
        c = torch.randn(d, generator=gen, dtype=torch.float64)
        caps[name] = c / c.norm()
    return v, caps


def geometry_report(d: int = 256, budget: float = 1.0, seed: int = 0) -> dict:
    """Per-task and joint geometry of the planted directions, plus the scaling fit."""
    v, caps = planted_directions(d, seed)
    C = torch.stack(list(caps.values()), dim=1)
    taus = geometry.task_tax_rates(v, C)
    tasks = []
    for (name, c), tau in zip(caps.items(), taus.tolist(), strict=True):
        angle = float(geometry.principal_angles(v[:, None], c[:, None])[0])
        tasks.append(
            {
                "task": name,
                "tau": tau,
                "angle_deg": math.degrees(angle),
                "regime": geometry.regime(tau),
                "free_safety": geometry.free_safety(tau, budget),
            }
        )
    joint_tau = geometry.tax_rate(v, C)
    chem_alpha = math.acos(min(1.0, math.sqrt(tasks[0]["tau"])))
    frontier = [
        {"delta_c": dc, "delta_s": geometry.frontier_safety(dc, chem_alpha, budget)}
        for dc in [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0]
    ]
    dims = [32, 64, 128, 256, 512, 1024]
    incidental = []
    for dim in dims:
        draws = []
        for s in range(200):
            vv, cc = planted_directions(dim, seed=1000 + s)
            draws.append(geometry.tax_rate(vv, torch.stack([cc["arithmetic"], cc["translation"]], 1)))
        incidental.append(sum(draws) / len(draws))
    fit = geometry.fit_scaling_law(dims, incidental)
    return {
        "dimension": d,
        "budget": budget,
        "tasks": tasks,
        "joint_tau": joint_tau,
        "sum_of_task_taus": float(taus.sum()),
        "joint_free_safety": geometry.free_safety(joint_tau, budget),
        "chemistry_frontier": frontier,
        "scaling": {
            "dims": dims,
            "incidental_tau": incidental,
            "fit": {"tau0": fit.tau0, "k": fit.k, "tau0_stderr": fit.tau0_stderr, "k_stderr": fit.k_stderr},
            "expected_k": 2.0,
        },
    }


def format_geometry_report(report: dict) -> str:
    lines = [
        f"Geometry of planted directions (d = {report['dimension']}, budget B = {report['budget']})",
        f"{'task':<12} {'tau_i':>8} {'angle':>8} {'regime':>10} {'B*sqrt(1-tau_i)':>16}",
    ]
    for t in report["tasks"]:
        lines.append(
            f"{t['task']:<12} {t['tau']:>8.4f} {t['angle_deg']:>7.1f}° {t['regime']:>10} {t['free_safety']:>16.4f}"
        )
    lines += [
        f"joint tau = {report['joint_tau']:.4f} (sum of per-task tau = {report['sum_of_task_taus']:.4f}; "
        "Remark 4.6: not additive)",
        f"tax-free safety against all four: B*sqrt(1-tau) = {report['joint_free_safety']:.4f}",
        "frontier for chemistry (Thm 4.1): "
        + ", ".join(f"dC={p['delta_c']:+.2f}->dS={p['delta_s']:.3f}" for p in report["chemistry_frontier"]),
    ]
    s = report["scaling"]
    lines.append(
        "incidental tax vs d (arithmetic+translation, 200 draws each): "
        + ", ".join(f"d={d}:{t:.4f}" for d, t in zip(s["dims"], s["incidental_tau"], strict=True))
    )
    f = s["fit"]
    lines.append(
        f"fit tau(d) = tau0 + k/d: tau0 = {f['tau0']:.4f} ± {f['tau0_stderr']:.4f}, "
        f"k = {f['k']:.3f} ± {f['k_stderr']:.3f} (Prop 5.5 predicts tau0 = 0, k = m' = {s['expected_k']:.0f})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo", help="where reports and plots are written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = geometry_report()
    logger.info(format_geometry_report(report))
    (out / "geometry_planted.json").write_text(json.dumps(report, indent=2))
    logger.info("wrote %s", out / "geometry_planted.json")


if __name__ == "__main__":
    main()
