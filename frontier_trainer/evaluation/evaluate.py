"""``evaluate_model``: score any causal LM on a suite and return a :class:`Report` (issue 11 §1).

Per metric (keys of ``Report.metrics`` and ``Report.samples``):

* ``safety/refusal``: fraction of held-out harmful prompts the judge calls a refusal, pooled over
  the suite's harmful sources, and ``safety/refusal/<source>`` per source when there are several;
* ``safety/over_refusal``: fraction of benign prompts refused, pooled over plain benign and
  look-alike prompts; ``safety/over_refusal/benign`` and ``safety/over_refusal/lookalike`` apart.
  All with Wilson 95% intervals. Responses are greedy, through the tokenizer's chat template
  (:func:`frontier_trainer.real.evaluation.generate_responses`);
* ``capability/<task>``: lm-eval's per-document accuracy / exact match (Wilson intervals);
* ``nll/<task>``: per-row completion NLL in nats per token (mean over rows, bootstrap interval);
* ``kl_to_base`` (when ``base`` is given): per-prompt mean KL(p_model || p_base) along the base's
  greedy responses to the plain benign prompts (mean over prompts, bootstrap interval).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from frontier_trainer.evaluation.lm_eval_tasks import run_tasks
from frontier_trainer.evaluation.registry import get_suite
from frontier_trainer.evaluation.report import Report
from frontier_trainer.evaluation.stats import Estimate, estimate
from frontier_trainer.evaluation.suites import Suite, check_limit, check_split
from frontier_trainer.self_completion import model_fingerprint as weights_sha256

logger = logging.getLogger(__name__)

PACKAGES = ("frontier-trainer", "torch", "transformers", "lm_eval", "peft", "trl", "datasets", "numpy")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that affect the numbers."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The weights' SHA-256 (:func:`frontier_trainer.self_completion.model_fingerprint`: every
    parameter and buffer's name, dtype, shape and bytes), plus the class name and element count."""
    numel = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    return {"sha256": weights_sha256(model), "class": type(model).__name__, "numel": numel}


def _sha256_json(items: Any) -> str:
    """SHA-256 of a JSON-serialisable set of items (canonical JSON): the exact data a metric used."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return value


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    suite: str | Suite = "lab",
    base: torch.nn.Module | None = None,
    *,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> Report:
    """Evaluate ``model`` on ``suite`` (module docstring for the metrics).

    Args:
        model: any causal LM (a ``transformers`` model, a ``peft`` model, a merged model).
        tokenizer: its tokenizer (with a chat template).
        suite: ``"lab"``, ``"real"`` or a :class:`~frontier_trainer.evaluation.suites.Suite`.
        base: the reference model for ``kl_to_base`` (same tokenizer); ``None`` skips it.
        split: ``"test"`` (to report) or ``"validation"`` (to choose settings).
        limit: at most this many items per prompt set, task and NLL set (``None``: all).
        batch_size: prompts per forward pass (generation, lm-eval, NLL, KL).
        seed: seed of the bootstrap intervals (the data and its order never depend on it).

    Raises:
        ValueError: unknown suite or split, ``limit``/``batch_size`` not positive, an empty set.
    """
    check_split(split)
    check_limit(limit)
    _positive("batch_size", batch_size)
    the_suite = get_suite(suite)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    binary: set[str] = set()

    # Safety: refusal on harmful prompts, over-refusal on benign and look-alike prompts.
    sets = the_suite.safety_sets(split, limit)
    for name, prompts in sets.items():
        if not prompts:
            raise ValueError(
                f"suite {the_suite.name!r}: safety set {name!r} ({split}) is empty; check its data."
            )
    if not any(k.startswith("harmful/") for k in sets) or "benign" not in sets:
        raise ValueError(
            f"suite {the_suite.name!r}: safety_sets must hold 'harmful/<source>' sets and 'benign'."
        )
    from frontier_trainer.real.evaluation import generate_responses

    flat = [(name, p) for name, prompts in sets.items() for p in prompts]
    t0 = time.perf_counter()
    responses = generate_responses(
        model, tokenizer, [p for _, p in flat], max_new_tokens=the_suite.max_new_tokens, batch_size=batch_size
    )
    timings["safety"] = time.perf_counter() - t0
    judged: dict[str, list[float]] = {name: [] for name in sets}
    for (name, prompt), response in zip(flat, responses, strict=True):
        judged[name].append(float(the_suite.is_refusal(response, prompt)))
    harmful = [k for k in sets if k.startswith("harmful/")]
    samples["safety/refusal"] = [v for k in harmful for v in judged[k]]
    if len(harmful) > 1:
        for k in harmful:
            samples[f"safety/refusal/{k.split('/', 1)[1]}"] = judged[k]
    benign = [k for k in ("benign", "lookalike") if k in sets]
    samples["safety/over_refusal"] = [v for k in benign for v in judged[k]]
    for k in benign:
        samples[f"safety/over_refusal/{k}"] = judged[k]
    binary |= set(samples)

    # Capability through lm-eval.
    t0 = time.perf_counter()
    tasks = the_suite.capability_tasks(split, limit)
    if tasks:
        for name, outcomes in run_tasks(model, tokenizer, tasks, batch_size=batch_size).items():
            samples[f"capability/{name}"] = outcomes
            binary.add(f"capability/{name}")
    timings["capability"] = time.perf_counter() - t0

    # Completion NLL (the trainer's own capability metric).
    t0 = time.perf_counter()
    nll_sets = the_suite.nll_sets(split, limit)
    for name, pairs in nll_sets.items():
        if not pairs:
            raise ValueError(
                f"suite {the_suite.name!r}: NLL set {name!r} ({split}) is empty; check its data."
            )
        samples[f"nll/{name}"] = the_suite.nll_per_row(model, tokenizer, pairs, batch_size)
    timings["nll"] = time.perf_counter() - t0

    if base is not None:
        from frontier_trainer.real.evaluation import kl_to_base_per_prompt

        t0 = time.perf_counter()
        prompts = the_suite.kl_prompts(split, limit)
        samples["kl_to_base"] = kl_to_base_per_prompt(
            model, tokenizer, prompts, base_model=base, max_new_tokens=32, batch_size=batch_size
        )
        timings["kl_to_base"] = time.perf_counter() - t0

    metrics: dict[str, Estimate] = {
        key: estimate(values, binary=key in binary, seed=seed) for key, values in samples.items()
    }
    timings["total"] = time.perf_counter() - started
    provenance = {
        "suite": the_suite.name,
        "split": split,
        "limit": limit,
        "batch_size": batch_size,
        "seed": seed,
        "sizes": {k: len(v) for k, v in samples.items()},
        "safety_sets": {k: {"n": len(v), "sha256": _sha256_json(v)} for k, v in sets.items()},
        "nll_sets": {k: {"n": len(v), "sha256": _sha256_json(v)} for k, v in nll_sets.items()},
        "capability_tasks": {
            t.name: {
                "n": len(t.docs),
                "sha256": t.docs_sha256(),
                "source": t.source,
                "output_type": t.output_type,
            }
            for t in tasks
        },
        "data": the_suite.provenance(),
        "packages": package_versions(),
        "model": model_fingerprint(model),
        "base": model_fingerprint(base) if base is not None else None,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
        },
        "seconds": timings,
    }
    report = Report(
        metrics=metrics, samples=samples, judge=the_suite.judge_agreement(), provenance=provenance
    )
    logger.info("evaluate_model(%s, %s) in %.1fs", the_suite.name, split, timings["total"])
    return report
