"""``frontier-geometry``: the pre-training geometry table of a model, from the command line.

Prediction 1 (§8) of "What Is the Geometry of the Alignment Tax?": the per-task tax rate
τ_i = ⟨v̂*, ĉ_i⟩² (Cor 4.5, eq. 6) is computable *before* alignment. The computation lives in the
library module :mod:`frontier_trainer.report` (safety and capability directions, Gram matrix,
per-task and safety-safety geometry); this command module only parses flags, loads a local model,
prints :func:`~frontier_trainer.report.format_report` and writes the JSON. ``--harmless SOURCE``
adds representation-space τ_i (``tau_repr``, from residual-stream probes: issue 13 §2) next to the
gradient-space τ_i, in the table and in the JSON (``representation``). The library names stay
importable from here for existing callers; library code imports them from
:mod:`frontier_trainer.report`, never from this command module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frontier_trainer.directions import parse_capability_specs
from frontier_trainer.report import (
    PROBE_ROWS,
    Grads,
    average_gradient,
    capability_directions,
    conflict_geometry,
    format_report,
    geometry_report,
    gram_coordinates,
    gram_matrix,
    safety_direction,
    sequence_logprob_sums,
    task_geometry,
    unit_gram,
)

logger = logging.getLogger(__name__)


def _load_model(path: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r} is not a local model directory (offline: no hub downloads)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """``frontier-geometry``: print the pre-training geometry table and write it as JSON."""
    parser = argparse.ArgumentParser(prog="frontier-geometry", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    parser.add_argument("--preferences", required=True, help="preference data: prompt/chosen/rejected")
    parser.add_argument("--preferences2", help="a second preference dataset (e.g. helpfulness)")
    parser.add_argument(
        "--capability", action="append", default=[], metavar="TASK=SOURCE", help="repeat per capability task"
    )
    parser.add_argument("--out", default="geometry_report.json", help="JSON output path")
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--harmless",
        metavar="SOURCE",
        help="harmless prompts (a 'prompt' column: a local file or directory, lab:benign, real:<...>) for the "
        "representation-space safety probe against the --preferences prompts; adds tau_repr per task "
        "(frontier_trainer.probes: difference of means at the last prompt token, Arditi et al. 2024)",
    )
    parser.add_argument(
        "--probe-rows",
        type=int,
        default=PROBE_ROWS,
        help=f"--harmless: prompts per probe set, a seeded subset of larger sets (default {PROBE_ROWS})",
    )
    parser.add_argument(
        "--coverage-rows",
        type=int,
        default=8,
        help="per task, how much of a gradient on this many unseen rows the mean of this many rows, and their "
        "per-row directions, hold (does protection carry beyond the rows held?); 0 skips it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.coverage_rows < 0:
        parser.error(f"--coverage-rows {args.coverage_rows}: give a number of rows >= 1, or 0 to skip")
    if not args.capability:
        parser.error("give at least one --capability TASK=SOURCE")
    try:
        caps = parse_capability_specs(args.capability)
        model, tokenizer = _load_model(args.model)
        report = geometry_report(
            model,
            tokenizer,
            args.preferences,
            caps,
            second_preference_dataset=args.preferences2,
            budget=args.budget,
            batches=args.batches,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            harmless_prompts=args.harmless,
            probe_rows=args.probe_rows,
            harmless_field="--harmless",
            coverage_rows=args.coverage_rows or None,
        )
    except ValueError as err:
        parser.exit(2, f"frontier-geometry: error: {err}\n")
    print(format_report(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "Grads",
    "average_gradient",
    "capability_directions",
    "conflict_geometry",
    "format_report",
    "geometry_report",
    "gram_coordinates",
    "gram_matrix",
    "main",
    "safety_direction",
    "sequence_logprob_sums",
    "task_geometry",
    "unit_gram",
]
