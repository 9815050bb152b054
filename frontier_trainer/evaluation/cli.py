"""``frontier-eval MODEL [--base BASE] --suite {lab,real} --out DIR``: evaluate a model, print the table.

MODEL and BASE are ``lab``, ``real:smollm2-135m-instruct``, a saved model directory or a PEFT adapter
directory (:func:`frontier_trainer.evaluation.loading.load_model`). Writes ``DIR/report.json`` and
``DIR/report.csv`` (:meth:`frontier_trainer.evaluation.Report.write`) and prints
:meth:`~frontier_trainer.evaluation.Report.table`. For the lab suite the lab world is read from the
model's ``lab_manifest.json`` when there is one.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests can inspect it)."""
    parser = argparse.ArgumentParser(prog="frontier-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", metavar="MODEL", help="'lab', 'real:<name>', a model directory or a PEFT adapter"
    )
    parser.add_argument("--base", default=None, help="reference model for kl_to_base (same forms as MODEL)")
    parser.add_argument("--suite", required=True, choices=["lab", "real"], help="evaluation suite")
    parser.add_argument("--out", required=True, type=Path, help="output directory for report.json/report.csv")
    parser.add_argument("--split", default="test", choices=["test", "validation"], help="default: test")
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N items per set and task (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals (default 0)")
    parser.add_argument("--cache-dir", default=None, help="real-asset cache (default: $FRONTIER_REAL_CACHE)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``frontier-eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        build_parser().error(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        build_parser().error(f"--batch-size must be a positive integer, got {args.batch_size}")
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("lm_eval", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from frontier_trainer.evaluation import evaluate_model
    from frontier_trainer.evaluation.loading import lab_world, load_model
    from frontier_trainer.evaluation.real_suite import RealSuite
    from frontier_trainer.evaluation.suites import LabSuite

    model, tokenizer, path = load_model(args.model)
    base = load_model(args.base)[0] if args.base is not None else None
    suite = LabSuite(world=lab_world(path)) if args.suite == "lab" else RealSuite(cache_dir=args.cache_dir)
    report = evaluate_model(
        model,
        tokenizer,
        suite,
        base,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    report.provenance["model_spec"] = args.model
    report.provenance["base_spec"] = args.base
    out = report.write(args.out)
    print(report.table())  # the CLI's final table
    logger.info("wrote %s and %s", out / "report.json", out / "report.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
