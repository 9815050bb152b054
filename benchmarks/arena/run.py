"""``python -m benchmarks.arena.run --preset NAME --out DIR``: run an arena preset, resumably.

Writes ``results.json``, ``results.md``, ``provenance.json``, the Pareto plots and ``cells/`` under
DIR; a second run with the same DIR reads every finished cell back instead of re-running it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from .presets import PRESETS, get_preset
from .protocol import Arena
from .report import provenance, summarise_results, write

logger = logging.getLogger("benchmarks.arena")


def quiet_libraries() -> None:
    """Keep the terminal to the arena's own progress: datasets/transformers bars and info logs off."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in (
        "httpx",
        "datasets",
        "transformers",
        "wandb",
        "lm_eval",
        "frontier_trainer.directions",
        "frontier_trainer.lab.pretraining",
        "frontier_trainer.evaluation",
        "frontier_trainer.lab.evaluation",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(
    preset_name: str,
    out: Path,
    seeds: int | None = None,
    methods: Sequence[str] | None = None,
    suite: Any = None,
    command: str | None = None,
    report_only: bool = False,
    leak_rows: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a preset and write its files; returns the summary."""
    import torch

    from .report import git_state
    from .suites import make_suite

    preset = get_preset(preset_name).with_overrides(seeds=seeds, methods=methods, leak_rows=leak_rows)
    started = time.perf_counter()
    git = git_state()  # the code that runs, not the HEAD when the run ends
    cpu_started = time.process_time()
    suite = suite or make_suite(preset)
    arena = Arena(preset, suite, out, read_only=report_only)
    agreement: dict[str, Any] = {}
    previous = out / "provenance.json"
    if report_only and previous.is_file():  # keep the agreement measured by the run that scored the cells
        agreement = json.loads(previous.read_text()).get("scorer_agreement_on_base_models", {})
    elif hasattr(suite, "agreement") and getattr(suite, "scorer", "") == "fast":
        for p in (
            preset.pretrain_seeds
        ):  # the fast scorer against evaluate_model, prompt by prompt, per base model
            model, tok = suite.load(suite.base_model(p))
            agreement[f"pretrain_seed_{p}"] = suite.agreement(model, tok, "test")
            del model
    raw = arena.run()
    summary = summarise_results(raw, preset)
    summary["cells_run_here"] = arena.runs
    summary["unfinished"] = raw.get("unfinished", {})
    prov = provenance(
        preset,
        suite.describe(),
        command or " ".join(["python -m benchmarks.arena.run", *sys.argv[1:]]),
        time.perf_counter() - started,
        extra={
            "scorer_agreement_on_base_models": agreement,
            "torch_threads": torch.get_num_threads(),
            "git": git,
            "report_only": report_only,  # wall/CPU seconds are then the report's, not the runs'
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
        },
    )
    write(out, summary, preset, prov)
    logger.info("wrote %s (%d cells run here, the rest read back)", out, arena.runs)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--out", required=True, type=Path, help="results directory (resumable)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (default: the preset's)")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="subset of methods (default: the preset's)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--leak-rows",
        type=int,
        default=None,
        help="held-out rows per task for the generalisation-leak probe (0: off; default: the preset's)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: report the methods whose cells are all finished (partial results)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    import torch

    get_preset(args.preset).with_overrides(
        seeds=args.seeds, methods=args.methods, leak_rows=args.leak_rows
    )  # bad input fails here
    torch.set_num_threads(args.threads)
    with contextlib.suppress(KeyboardInterrupt):
        summary = run(
            args.preset, args.out, args.seeds, args.methods, report_only=args.report_only, leak_rows=args.leak_rows
        )
        _print_table(summary)
        return summary
    logger.warning(
        "interrupted: finished cells are kept under %s/cells; rerun the same command to resume.", args.out
    )
    return {}


def _print_table(summary: dict[str, Any]) -> None:
    """The final table on the terminal (the CLI's one print)."""
    from .stats import Interval

    rows = [("method", "refusal gain", "capability change", "look-alike over-refusal change")]
    for m, r in summary["methods"].items():
        rows.append(
            (
                m,
                *(
                    Interval.from_dict(r[k]).fmt() if k in r else "n/a"
                    for k in ("refusal_gain", "capability_change", "over_refusal_lookalike_change")
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    verdicts = "\n".join(f"{v['ours']} vs {v['baseline']}: {v['verdict']}" for v in summary["verdicts"])
    print(f"{text}\n\n{verdicts}")


if __name__ == "__main__":
    main()
