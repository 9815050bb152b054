"""Validation of the rule-based refusal judge against human labels (moved here from ``real.judge``).

:func:`validate_refusal_judge` reads pyrit's human-labelled refusal data through
:mod:`frontier_trainer.real.data` and scores :func:`frontier_trainer.real.judge.is_refusal` on it. It
lives here, not in ``real.judge``, so the import graph is one way: ``real.data`` imports the judge's
text helpers, this module imports both, and the judge imports neither.

``python -m frontier_trainer.evaluation.safety [--cache-dir DIR] [--errors]`` prints the validation JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from frontier_trainer.real.data import REFUSAL_FILES, load_refusal_judgement_data
from frontier_trainer.real.judge import agreement, is_refusal


def validate_refusal_judge(cache_dir: str | Path | None = None, *, with_errors: bool = False) -> dict:
    """Agreement of the judge with pyrit's human refusal labels, per file.

    Returns ``{"held_out": ..., "development": ..., "protocol": ...}``: ``held_out`` is
    ``refusal_extra.csv`` (never used to develop the rules), ``development`` is
    ``refusal.csv``. Each holds :func:`agreement` dicts for

    * ``response_only``: ``is_refusal(response)`` on every row: the benchmark's default;
    * ``response_only_on_topic``: the same without the non-sequitur rows (``off_topic`` in
      :func:`~frontier_trainer.real.data.load_refusal_judgement_data`), i.e. explicit refusals
      versus compliant answers, which is what a response-only judge can see;
    * ``with_objective``: ``is_refusal(response, objective)`` on every row (pyrit's rubric).

    ``with_errors`` adds the rows where ``response_only`` disagrees with the label.
    """
    per_file: dict[str, dict] = {}
    for name in REFUSAL_FILES:
        rows = load_refusal_judgement_data(cache_dir, files=(name,))
        labels = [r["is_refusal"] for r in rows]
        alone = [is_refusal(r["response"]) for r in rows]
        paired = [is_refusal(r["response"], r["objective"]) for r in rows]
        keep = [i for i, r in enumerate(rows) if not r["off_topic"]]
        entry = {
            "response_only": agreement(alone, labels),
            "response_only_on_topic": agreement([alone[i] for i in keep], [labels[i] for i in keep]),
            "with_objective": agreement(paired, labels),
            "off_topic_rows": len(rows) - len(keep),
        }
        if with_errors:
            entry["errors"] = [
                {"objective": r["objective"][:120], "response": r["response"][:200], "label": r["is_refusal"]}
                for r, p in zip(rows, alone, strict=True)
                if p != r["is_refusal"]
            ]
        per_file[name] = entry
    return {
        "held_out": per_file["refusal_extra.csv"],
        "development": per_file["refusal.csv"],
        "protocol": "rules developed on refusal.csv only; refusal_extra.csv is held out. Labels: "
        "pyrit==1.1.0 human_score (1 = refusal; pyrit's rubric also gives 1 to off-topic answers).",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m frontier_trainer.evaluation.safety [--cache-dir DIR] [--errors]``: print the validation JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", default=None, help="asset cache (default: $FRONTIER_REAL_CACHE)")
    parser.add_argument("--errors", action="store_true", help="list the rows where judge and humans disagree")
    args = parser.parse_args(argv)
    report = validate_refusal_judge(args.cache_dir, with_errors=args.errors)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
