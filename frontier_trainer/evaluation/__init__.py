"""Evaluate any causal LM the way the field does: safety with intervals, capability through lm-eval.

Typical use::

    from frontier_trainer.evaluation import evaluate_model
    report = evaluate_model(model, tokenizer, suite="lab", base=base_model, limit=40)
    print(report.table())
    report.write("out/")                      # report.json + report.csv

or on the command line ``frontier-eval MODEL [--base BASE] --suite {lab,real} --out DIR``.
See :mod:`.evaluate` for the metrics, :mod:`.suites` for the data, :mod:`.stats` for the intervals.
"""

from frontier_trainer.evaluation.evaluate import evaluate_model, model_fingerprint, package_versions
from frontier_trainer.evaluation.lm_eval_tasks import LmEvalTask, run_tasks
from frontier_trainer.evaluation.real_suite import RealSuite
from frontier_trainer.evaluation.registry import SUITES, get_suite
from frontier_trainer.evaluation.report import Report
from frontier_trainer.evaluation.stats import Estimate, bootstrap_interval, estimate, wilson_interval
from frontier_trainer.evaluation.suites import LabSuite, Suite

__all__ = [
    "SUITES",
    "Estimate",
    "LabSuite",
    "LmEvalTask",
    "RealSuite",
    "Report",
    "Suite",
    "bootstrap_interval",
    "estimate",
    "evaluate_model",
    "get_suite",
    "model_fingerprint",
    "package_versions",
    "run_tasks",
    "wilson_interval",
]
