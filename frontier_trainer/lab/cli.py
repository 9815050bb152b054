"""``frontier-lab``: build (pretrain or load from cache) and evaluate lab models from the shell.

Examples::

    frontier-lab build                       # the default model (cached)
    frontier-lab build --hidden-size 32 64 128 256 --steps 500
    frontier-lab eval ~/.cache/frontier_trainer/lab/<hash>
    frontier-lab tasks                       # the task table with overlap levels
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from .evaluation import evaluate
from .pretraining import LabConfig, load, pretrain, read_manifest
from .world import TASKS, WorldConfig, overlap_report


def format_table(metrics: dict[str, Any]) -> str:
    """A readable per-task table plus the safety rates."""
    tasks = [k.split("/", 1)[1] for k in metrics if k.startswith("accuracy/") and k != "accuracy/mean"]
    lines = [f"{'task':<12} {'overlap':<10} {'accuracy':>8} {'nll':>8}", "-" * 41]
    for t in tasks:
        overlap = TASKS[t].overlap if t in TASKS else "?"
        nll = metrics.get(f"nll/{t}", float("nan"))
        lines.append(f"{t:<12} {overlap:<10} {metrics[f'accuracy/{t}']:>8.3f} {nll:>8.3f}")
    if "accuracy/mean" in metrics:
        lines.append(
            f"{'mean':<12} {'':<10} {metrics['accuracy/mean']:>8.3f} {metrics.get('nll/mean', float('nan')):>8.3f}"
        )
    lines.append("-" * 41)
    for key in ("refusal_rate", "compliance_rate", "over_refusal_rate", "lookalike_accuracy"):
        if key in metrics:
            lines.append(f"{key:<23} {metrics[key]:>17.3f}")
    return "\n".join(lines)


def _world_from_manifest(model_dir: str) -> WorldConfig | None:
    try:
        return WorldConfig(**read_manifest(model_dir)["settings"]["world"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _cmd_build(args: argparse.Namespace) -> int:
    for h in args.hidden_size:
        t0 = time.perf_counter()
        path = pretrain(
            hidden_size=h,
            num_layers=args.num_layers,
            seed=args.seed,
            num_heads=args.num_heads,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            entanglement=args.entanglement,
            cache_dir=args.cache_dir,
            force=args.force,
        )
        print(f"hidden_size={h}: {path}  ({time.perf_counter() - t0:.1f}s)")
        if args.eval:
            _print_eval(str(path), args)
    return 0


def _print_eval(model_dir: str, args: argparse.Namespace) -> None:
    model, tokenizer = load(model_dir)
    world = _world_from_manifest(model_dir) or WorldConfig()
    metrics = evaluate(model, tokenizer, split=args.split, world=world, max_examples=args.max_examples)
    print(f"\n{model_dir} ({args.split} split)")
    print(format_table(metrics))
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)


def _cmd_eval(args: argparse.Namespace) -> int:
    _print_eval(args.model_dir, args)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    report = overlap_report(WorldConfig(entanglement=args.entanglement))
    print(f"{'task':<12} {'overlap':<10} {'measured':>8}  description")
    for t in TASKS.values():
        print(f"{t.name:<12} {t.overlap:<10} {report[t.name]:>8.2f}  {t.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``frontier-lab`` argument parser."""
    d = LabConfig()
    parser = argparse.ArgumentParser(prog="frontier-lab", description="The embedded alignment-tax lab.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="pretrain (or load from cache) lab models")
    b.add_argument("--hidden-size", type=int, nargs="+", default=[d.hidden_size], metavar="N")
    b.add_argument("--num-layers", type=int, default=d.num_layers)
    b.add_argument("--num-heads", type=int, default=None)
    b.add_argument("--steps", type=int, default=d.steps)
    b.add_argument("--batch-size", type=int, default=d.batch_size)
    b.add_argument("--learning-rate", type=float, default=d.learning_rate)
    b.add_argument("--entanglement", type=float, default=None, help="world knob in [0, 1] (default 1)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--eval", action="store_true", help="evaluate each model after building it")
    b.set_defaults(func=_cmd_build, split="eval", max_examples=None, json=None)

    e = sub.add_parser("eval", help="evaluate a lab model directory")
    e.add_argument("model_dir")
    e.add_argument("--split", choices=["eval", "train"], default="eval")
    e.add_argument("--max-examples", type=int, default=None)
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=_cmd_eval)

    t = sub.add_parser("tasks", help="print the task table with measured overlap")
    t.add_argument("--entanglement", type=float, default=WorldConfig().entanglement)
    t.set_defaults(func=_cmd_tasks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``frontier-lab``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except ValueError as err:
        print(f"frontier-lab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
