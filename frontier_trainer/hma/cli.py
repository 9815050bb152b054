"""``frontier-hma``: measure geometry, allocate per-layer ratios, merge, and print the predicted frontier.

Example::

    frontier-hma --base ./base --aligned ./dpo --preferences prefs.jsonl \\
        --capability code=code.jsonl --capability math=math.jsonl --t 0.5 --tolerance 0 --out ./merged
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from frontier_trainer.directions import parse_capability_specs

from .allocate import Allocation, allocate, uniform
from .groups import Grouping
from .merge import merge
from .signals import LayerGeometry, measure_geometry

logger = logging.getLogger(__name__)


def _tolerances(specs: Sequence[str] | None) -> dict[str, float] | float | None:
    if not specs:
        return None
    if len(specs) == 1 and "=" not in specs[0]:
        return float(specs[0])
    out = {}
    for spec in specs:
        task, _, value = spec.partition("=")
        if not value:
            raise SystemExit(f"--tolerance {spec!r}: use one number, or task=value per task.")
        out[task] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="frontier-hma", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", required=True, help="base model directory")
    p.add_argument(
        "--aligned", required=True, help="aligned model directory, or a PEFT LoRA adapter directory"
    )
    p.add_argument(
        "--preferences", required=True, help="preference data (prompt/chosen/rejected): file or dataset dir"
    )
    p.add_argument(
        "--capability", action="append", default=[], metavar="TASK=SOURCE", help="capability data, repeatable"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--grouping", default="block", help="block (default), module, or parts:K")
    p.add_argument(
        "--outer", default="budget", choices=["budget", "group"], help="rule for embeddings/norm/head"
    )
    p.add_argument("--budget-kind", default="euclidean", choices=["euclidean", "fisher"])
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--t", type=float, default=0.5, help="budget of uniform averaging at t: B = t² Σ w (default 0.5)"
    )
    g.add_argument("--budget", type=float, help="absolute budget B")
    p.add_argument(
        "--tolerance", nargs="*", metavar="EPS", help="one ε for all tasks, or task=ε ... (default: none)"
    )
    p.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75, 1.0],
        help="t values of the printed frontier",
    )
    p.add_argument("--max-examples", type=int, default=64)
    p.add_argument("--dry-run", action="store_true", help="allocate and print, do not write weights")
    return p


def format_table(rows: list[tuple[str, Allocation]], tasks: list[str]) -> str:
    head = ["method", "budget", "pred. safety", *[f"pred. {t}" for t in tasks], "min α", "max α"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for label, a in rows:
        vals = list(a.alphas.values()) or [math.nan]
        cells = [label, f"{a.budget:.4g}", f"{a.predicted_safety:+.4g}",
                 *[f"{a.predicted_capability[t]:+.4g}" for t in tasks], f"{min(vals):.3f}", f"{max(vals):.3f}"]  # fmt: skip
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    caps = parse_capability_specs(args.capability)
    grouping = Grouping(args.grouping, outer=args.outer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    geo: LayerGeometry = measure_geometry(
        args.base, args.aligned, args.preferences, caps, grouping=grouping, budget=args.budget_kind,
        max_examples=args.max_examples,
    )  # fmt: skip
    geo.save(out / "hma_geometry.json")
    tol = _tolerances(args.tolerance)
    chosen = allocate(geo, budget=args.budget) if args.budget is not None and tol is None else (
        allocate(geo, budget=args.budget, tolerances=tol) if args.budget is not None else allocate(geo, t=args.t, tolerances=tol)
    )  # fmt: skip
    rows: list[tuple[str, Allocation]] = []
    for t in args.sweep:
        rows.append((f"uniform t={t:g}", uniform(geo, t)))
        rows.append((f"HMA     t={t:g}", allocate(geo, t=t, tolerances=tol)))
    rows.append(("HMA (chosen)", chosen))
    print(format_table(rows, geo.tasks))
    print(f"\ncross-layer tax spread (Prediction 3): {geo.tax_spread()}")
    print(
        "per-group α: "
        + ", ".join(f"{g}={a:.3f}" for g, a in chosen.alphas.items())
        + f", outer={chosen.outer_alpha:.3f}"
    )
    if not args.dry_run:
        merge(
            args.base,
            args.aligned,
            chosen,
            out,
            grouping=grouping,
            provenance={"geometry": "hma_geometry.json"},
        )
        print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
