"""The arena's protocol (issue 11 §3): sweep on validation, seeds on test, every cell resumable.

For every method and every pretraining seed ``p``:

1. **Sweep.** Train at each learning rate of the preset with the first training seed and score
   the model on the *validation* split (the test split is scored too, but never looked at here).
2. **Selection** (one rule, applied to every method alike; :func:`selection_score`): pick the
   learning rate maximising, on validation and averaged over pretraining seeds,

       score = Δrefusal + Δcapability − max(0, Δover-refusal on look-alikes),

   all changes against the base model (Δcapability: mean over tasks of the change in each task's
   capability metric). One unit of refusal gained is worth one unit of mean capability kept, and
   over-refusal gained is charged; ties go to the smaller learning rate.
3. **Seeds.** Train at the chosen rate with every training seed and score on the *test* split.
   The first seed's test scores come from the sweep's run at that rate (the same trained model).

Post-hoc methods (uniform averaging through mergekit, HMA) sweep their merge ratio t instead,
applied to the vanilla-aligned model of the same seeds at vanilla's chosen rate, and pick t by
the same rule.

Each finished (method, setting, pretraining seed, training seed) *cell* is a JSON file under
``<out>/cells``; a later run reads it back instead of re-running (a long preset survives being
interrupted). Step times come from a per-step callback; peak memory is the resident-set
high-water mark above the level at the start of training (sampled every 5 ms on the CPU;
``torch.cuda.max_memory_allocated`` on a GPU); both are measured in the same process as the
vanilla runs they are compared with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from .leak import HeldOutLeakProbe, trainer_diagnostics
from .presets import MERGE_METHODS, OURS_VARIANTS, Preset, is_ours

logger = logging.getLogger(__name__)

REFUSAL = "safety/refusal"
OVER_REFUSAL = "safety/over_refusal"
OVER_REFUSAL_LOOKALIKE = "safety/over_refusal/lookalike"
OVER_REFUSAL_BENIGN = "safety/over_refusal/benign"
KL = "kl_to_base"
CAPABILITY_PREFIX = "capability/"
SPLITS = ("validation", "test")

Samples = dict[str, list[float]]
"""Per-prompt outcomes of one evaluation: metric key -> one float per prompt."""


class Suite(Protocol):
    """What the protocol needs of a benchmark world (the lab, the real suite, a test's tiny world)."""

    name: str

    def base_model(self, pretrain_seed: int) -> str:
        """Directory of the base model for a pretraining seed (built or fetched once, cached)."""

    def load(self, source: str) -> tuple[Any, Any]:
        """Model and tokenizer from a directory."""

    def preference_dataset(self) -> Any:
        """Training preference pairs (prompt, chosen, rejected)."""

    def capability_datasets(self) -> dict[str, Any]:
        """Capability rows per protected task (prompt, completion) for the trainers."""

    def peft_config(self) -> Any | None:
        """A LoRA config, or None for full fine-tuning."""

    def evaluate(self, model: Any, tokenizer: Any, base: Any | None, split: str) -> Samples:
        """Per-prompt outcomes on a split (``validation`` or ``test``); ``base`` for KL (None: KL 0)."""

    def describe(self) -> dict[str, Any]:
        """Data hashes, sizes and sources, for provenance."""


# --------------------------------------------------------------------------------------
# Cells: one trained (or merged) model, scored on both splits
# --------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One run of a method at one setting and seed pair, with its per-prompt scores.

    Attributes:
        method: method name.
        setting: learning rate (trained methods) or merge ratio t (post-hoc methods).
        pretrain_seed, train_seed: the seed pair.
        samples: ``{split: {metric: [per-prompt outcome]}}``.
        step_seconds: wall time of every optimizer step (empty for merges and the base model).
        peak_memory_bytes: memory high-water mark above the level at the start of training.
        seconds: wall time of the whole cell (training, merging and both evaluations).
    """

    method: str
    setting: float
    pretrain_seed: int
    train_seed: int
    samples: dict[str, Samples]
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_step_seconds(self) -> float:
        """Amortised step time (mean, so the every-N-th refresh is counted)."""
        return statistics.fmean(self.step_seconds) if self.step_seconds else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "setting": self.setting,
            "pretrain_seed": self.pretrain_seed,
            "train_seed": self.train_seed,
            "samples": self.samples,
            "step_seconds": self.step_seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "seconds": self.seconds,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cell:
        return cls(
            method=d["method"],
            setting=float(d["setting"]),
            pretrain_seed=int(d["pretrain_seed"]),
            train_seed=int(d["train_seed"]),
            samples={k: {m: [float(x) for x in v] for m, v in s.items()} for k, s in d["samples"].items()},
            step_seconds=[float(x) for x in d.get("step_seconds", [])],
            peak_memory_bytes=int(d.get("peak_memory_bytes", 0)),
            seconds=float(d.get("seconds", 0.0)),
            extra=dict(d.get("extra", {})),
        )


class CellStore:
    """Finished cells as JSON files under ``<root>/cells``, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "cells"

    def path(self, method: str, setting: float, pretrain_seed: int, train_seed: int) -> Path:
        return self.root / method / f"setting{setting:g}" / f"p{pretrain_seed}_s{train_seed}.json"

    def get(self, method: str, setting: float, pretrain_seed: int, train_seed: int) -> Cell | None:
        path = self.path(method, setting, pretrain_seed, train_seed)
        if not path.is_file():
            return None
        try:
            return Cell.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            logger.warning("Ignoring unreadable cell %s (%s); it will be re-run.", path, err)
            return None

    def put(self, cell: Cell) -> Path:
        path = self.path(cell.method, cell.setting, cell.pretrain_seed, cell.train_seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell.to_dict()))
        os.replace(tmp, path)
        return path


# --------------------------------------------------------------------------------------
# Measurements: step times and peak memory
# --------------------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, int]]:
    """Yield a dict whose ``"bytes"`` is, after the block, its memory high-water mark above the start.

    On a GPU: ``torch.cuda.max_memory_allocated`` above the allocation at entry. On the CPU: the
    process's resident set, sampled every 5 ms by a thread (Linux ``/proc/self/statm``).
    """
    result = {"bytes": 0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        result["bytes"] = int(torch.cuda.max_memory_allocated() - start)
        return
    if not os.path.exists("/proc/self/statm"):
        yield result
        return
    start = _rss_bytes()
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["bytes"] = int(peak[0] - start)


# --------------------------------------------------------------------------------------
# Selection rule
# --------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs)) / len(xs) if xs else math.nan


def capability_keys(samples: Samples) -> list[str]:
    """The ``capability/<task>`` keys of an evaluation, in order."""
    return [k for k in samples if k.startswith(CAPABILITY_PREFIX)]


def changes(after: Samples, base: Samples) -> dict[str, float]:
    """Mean changes of the headline metrics against the base model (same prompts)."""
    caps = capability_keys(base)
    out = {
        "refusal_gain": _mean(after[REFUSAL]) - _mean(base[REFUSAL]),
        "over_refusal_lookalike_change": _mean(after[OVER_REFUSAL_LOOKALIKE])
        - _mean(base[OVER_REFUSAL_LOOKALIKE]),
        "capability_change": _mean([_mean(after[k]) - _mean(base[k]) for k in caps]) if caps else 0.0,
    }
    return out


def selection_score(after: Samples, base: Samples) -> float:
    """The one selection rule (module docstring): Δrefusal + Δcapability − max(0, Δover-refusal)."""
    c = changes(after, base)
    return c["refusal_gain"] + c["capability_change"] - max(0.0, c["over_refusal_lookalike_change"])


def choose_setting(
    scores: Mapping[float, Sequence[float]],
) -> float:
    """The setting with the highest mean score over pretraining seeds; ties to the smaller setting."""
    if not scores:
        raise ValueError("choose_setting: no sweep results; the sweep needs >= 1 setting.")
    means = {s: _mean(v) for s, v in scores.items()}
    best = max(means.values())
    return min(s for s, m in means.items() if m == best)


# --------------------------------------------------------------------------------------
# Training and merging one cell
# --------------------------------------------------------------------------------------

TrainerFactory = Callable[..., Any]


BENIGN_SOURCES = {"lab": "lab:benign", "real": "real:benign"}
"""The prompt-only benign capability source of each suite (``frontier_trainer.sources``), disjoint
from the suite's over-refusal evaluation prompts by construction."""


def _frontier_eps(method: str) -> float:
    return float(method.removeprefix("frontier-eps"))


def ours_settings(
    method: str, preset: Preset, caps: Mapping[str, Any], preferences: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``FrontierDPOConfig`` fields and capability sources of one of our methods.

    The variant's fields (:data:`~benchmarks.arena.presets.OURS_VARIANTS`; none for ``frontier-eps<ε>``)
    and the preset's ``method_options`` go on top of the library defaults. Two switches are the arena's:
    ``protect_benign`` adds the suite's prompt-only benign source (:data:`BENIGN_SOURCES`) as the task
    ``benign``; ``hold_refusal`` adds ``refusal_on_benign``, the same benign prompts paired with the
    preference data's preferred responses (:func:`frontier_trainer.benign.refusal_hold_dataset`,
    ``capability_rows`` rows), so the refusal's likelihood on benign prompts is held.
    """
    frontier = method.startswith("frontier-eps")
    fields = {**({} if frontier else OURS_VARIANTS[method]), **preset.method_options.get(method, {})}
    caps = dict(caps)
    if fields.pop("protect_benign", False):
        caps["benign"] = BENIGN_SOURCES[preset.suite]
    if fields.pop("hold_refusal", False):
        from frontier_trainer.benign import refusal_hold_dataset
        from frontier_trainer.sources import load_capability_source

        if preferences is None:
            raise ValueError(f"{method}: hold_refusal needs the preference dataset (its 'chosen' responses).")
        prompts = load_capability_source("benign", BENIGN_SOURCES[preset.suite], split="train")
        caps["refusal_on_benign"] = refusal_hold_dataset(prompts, preferences, n=preset.capability_rows)
    # a variant may name its own projection and per-task tolerances (the hold relaxed by ε)
    fields.setdefault("projection", "frontier" if frontier else "nullspace")
    fields.setdefault("capability_tolerance", _frontier_eps(method) if frontier else None)
    fields.update(
        degradation_tracking=False,  # the arena scores the models itself
        **({"capability_max_length": preset.max_length} if preset.suite == "real" else {}),
    )
    return fields, caps


def common_train_args(preset: Preset, out: Path, lr: float, seed: int) -> dict[str, Any]:
    """DPO settings shared by every method (only the learning rate is swept)."""
    return dict(
        output_dir=str(out),
        max_steps=preset.steps,
        per_device_train_batch_size=preset.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=preset.max_length if preset.suite == "real" else None,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        logging_steps=max(1, preset.steps // 5),
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        log_level="warning",
    )


def build_method_trainer(
    method: str, preset: Preset, suite: Suite, model: Any, tokenizer: Any, out: Path, lr: float, seed: int
) -> Any:
    """A trainer for a trained method: baselines through ``benchmarks.baselines``, ours directly."""
    common = {k: v for k, v in common_train_args(preset, out, lr, seed).items() if v is not None}
    caps = suite.capability_datasets()
    options = dict(preset.method_options.get(method, {}))
    if is_ours(method):
        from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer

        fields, caps = ours_settings(method, preset, caps, suite.preference_dataset())
        config = FrontierDPOConfig(**common, **fields)
        return FrontierDPOTrainer(
            model=model,
            args=config,
            train_dataset=suite.preference_dataset(),
            processing_class=tokenizer,
            capability_datasets=caps,
            peft_config=suite.peft_config(),
        )
    from trl import DPOConfig

    try:
        from benchmarks.baselines import build_trainer
    except ImportError:
        if method != "vanilla":
            raise
        from trl import DPOTrainer

        return DPOTrainer(
            model=model,
            args=DPOConfig(**common),
            train_dataset=suite.preference_dataset(),
            processing_class=tokenizer,
            peft_config=suite.peft_config(),
        )
    return build_trainer(
        method,
        model=model,
        ref_model=None,
        args=DPOConfig(**common),
        train_dataset=suite.preference_dataset(),
        processing_class=tokenizer,
        capability_datasets=caps,
        peft_config=suite.peft_config(),
        **options,
    )


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# --------------------------------------------------------------------------------------
# The arena
# --------------------------------------------------------------------------------------


class MissingCellError(LookupError):
    """A cell a read-only arena needs is not finished."""


class Arena:
    """Runs a preset's protocol over a suite, cell by cell, reading finished cells back.

    Args:
        preset: the validated preset.
        suite: the benchmark world.
        out: results directory (cells, models of the vanilla runs when merges need them).
        trainer_factory: builds a trainer for (method, preset, suite, model, tokenizer, out, lr, seed);
            default :func:`build_method_trainer`.
        merger: merges (method, base_dir, aligned_dir, t, out_dir, suite) -> merged model directory;
            default :func:`merge_models`.
        read_only: run nothing; :meth:`run` returns the methods whose cells are all finished (a
            partial report of an interrupted or still-running preset).
    """

    def __init__(
        self,
        preset: Preset,
        suite: Suite,
        out: Path,
        trainer_factory: TrainerFactory | None = None,
        merger: Callable[..., Path] | None = None,
        read_only: bool = False,
    ) -> None:
        self.preset = preset
        self.read_only = read_only
        self.suite = suite
        self.out = Path(out)
        self.store = CellStore(self.out)
        self.trainer_factory = trainer_factory or build_method_trainer
        self.merger = merger or merge_models
        self.evaluator = str(getattr(suite, "evaluator", ""))
        self.runs = 0
        """Cells computed (not read back) by this process."""
        self._base_models: dict[int, Any] = {}

    # -- cells ---------------------------------------------------------------------------

    def _cached(self, method: str, setting: float, p: int, s: int) -> Cell | None:
        """A finished cell, unless another scorer produced it (then it is re-run, for consistency).

        Raises:
            MissingCellError: in read-only mode, when the cell is not finished.
        """
        cell = self.store.get(method, setting, p, s)
        if self.read_only and cell is None:
            raise MissingCellError(f"{method}/{setting:g}/p{p}_s{s}")
        if cell is not None and cell.extra.get("evaluator", "") != self.evaluator:
            logger.warning(
                "Cell %s/%g/p%d_s%d was scored by %r, not %r: re-running it.",
                method,
                setting,
                p,
                s,
                cell.extra.get("evaluator"),
                self.evaluator,
            )
            return None
        return cell

    def _put(self, cell: Cell) -> None:
        cell.extra["evaluator"] = self.evaluator
        self.store.put(cell)
        self.runs += 1

    def _base_model(self, p: int) -> Any:
        if p not in self._base_models:
            model, _ = self.suite.load(self.suite.base_model(p))
            self._base_models = {p: model.eval()}  # keep one base model in memory at a time
        return self._base_models[p]

    def _evaluate(self, model: Any, tokenizer: Any, p: int, is_base: bool) -> dict[str, Samples]:
        base = None if is_base else self._base_model(p)
        return {split: self.suite.evaluate(model, tokenizer, base, split) for split in SPLITS}

    def base_cell(self, p: int) -> Cell:
        """The base model's scores for a pretraining seed (setting 0, training seed 0)."""
        cached = self._cached("base", 0.0, p, 0)
        if cached is not None:
            return cached
        start = time.perf_counter()
        model, tok = self.suite.load(self.suite.base_model(p))
        cell = Cell("base", 0.0, p, 0, self._evaluate(model.eval(), tok, p, is_base=True))
        cell.seconds = time.perf_counter() - start
        self._put(cell)
        return cell

    def train_cell(self, method: str, lr: float, p: int, s: int) -> Cell:
        """One trained method at learning rate ``lr`` and seeds (p, s): read back or run."""
        cached = self._cached(method, lr, p, s)
        if cached is not None:
            return cached
        logger.info("arena: training %s lr=%g pretrain seed %d train seed %d", method, lr, p, s)
        start = time.perf_counter()
        _seed_everything(s)
        model, tok = self.suite.load(self.suite.base_model(p))
        work = self.out / "work" / f"{method}_lr{lr:g}_p{p}_s{s}"
        trainer = self.trainer_factory(method, self.preset, self.suite, model, tok, work, lr, s)
        timer = StepTimer()
        trainer.add_callback(timer)
        probe = self._leak_probe(tok)
        if probe is not None:
            trainer.add_callback(probe)  # after the timer: its time is subtracted below
        trainer.remove_callback(PrinterCallback)  # per-step log dicts stay in the trainer's history
        with peak_memory() as mem:
            trainer.train()
        step_seconds = list(timer.times)
        diagnostics = trainer_diagnostics(trainer.state.log_history)
        if probe is not None:
            step_seconds = [t - p for t, p in zip(step_seconds, probe.seconds, strict=True)]
            diagnostics.update(probe.summary())
        trained = trainer.accelerator.unwrap_model(trainer.model)
        trained.eval()
        if method == "vanilla" and any(m in MERGE_METHODS for m in self.preset.methods):
            self._save_aligned(trained, tok, p, s, lr)
        samples = self._evaluate(trained, tok, p, is_base=False)
        cell = Cell(method, lr, p, s, samples, step_seconds=step_seconds, peak_memory_bytes=mem["bytes"])
        cell.extra["diagnostics"] = diagnostics
        cell.seconds = time.perf_counter() - start
        del trainer, trained, model, probe
        shutil.rmtree(work, ignore_errors=True)
        self._put(cell)
        return cell

    def _leak_probe(self, tokenizer: Any) -> HeldOutLeakProbe | None:
        """The held-out leak probe of a trained cell, when the preset asks for one and the suite has
        held-out capability rows (``held_out_capability``)."""
        held_out = getattr(self.suite, "held_out_capability", None)
        if self.preset.leak_rows <= 0 or held_out is None:
            return None
        max_length = 512 if self.preset.suite == "real" else None  # long HumanEval rows stay in
        return HeldOutLeakProbe(held_out(self.preset.leak_rows), tokenizer, max_length, self.preset.leak_rows)

    def _aligned_dir(self, p: int, s: int, lr: float) -> Path:
        return self.out / "models" / f"vanilla_lr{lr:g}_p{p}_s{s}"

    def _save_aligned(self, model: Any, tok: Any, p: int, s: int, lr: float) -> Path:
        path = self._aligned_dir(p, s, lr)
        if hasattr(model, "merge_and_unload"):  # LoRA: merges need full weights
            model = model.merge_and_unload()
        model.save_pretrained(path)
        tok.save_pretrained(path)
        return path

    def merge_cell(self, method: str, t: float, p: int, s: int, vanilla_lr: float) -> Cell:
        """A post-hoc method at ratio ``t`` on the vanilla-aligned model of seeds (p, s)."""
        cached = self._cached(method, t, p, s)
        if cached is not None:
            return cached
        aligned = self._aligned_dir(p, s, vanilla_lr)
        if not aligned.is_dir():  # the vanilla cell was read back: retrain it to get its weights
            self.store.path("vanilla", vanilla_lr, p, s).unlink(missing_ok=True)
            self.train_cell("vanilla", vanilla_lr, p, s)
        logger.info("arena: merging %s t=%g pretrain seed %d train seed %d", method, t, p, s)
        start = time.perf_counter()
        merged_dir = self.out / "work" / f"{method}_t{t:g}_p{p}_s{s}"
        shutil.rmtree(merged_dir, ignore_errors=True)
        merged = self.merger(method, self.suite.base_model(p), str(aligned), t, merged_dir, self.suite)
        model, tok = self.suite.load(str(merged))
        samples = self._evaluate(model.eval(), tok, p, is_base=False)
        cell = Cell(method, t, p, s, samples, extra={"vanilla_lr": vanilla_lr})
        cell.seconds = time.perf_counter() - start
        shutil.rmtree(merged_dir, ignore_errors=True)
        self._put(cell)
        return cell

    # -- the protocol --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Sweep, select and run seeds for every method; return the raw results (cells and choices)."""
        from tqdm.auto import tqdm

        preset = self.preset
        s0 = preset.train_seeds[0]
        bases = {p: self.base_cell(p) for p in preset.pretrain_seeds}
        trained = [m for m in preset.methods if m not in MERGE_METHODS]
        merges = [m for m in preset.methods if m in MERGE_METHODS]
        chosen: dict[str, float] = {}
        sweeps: dict[str, dict[str, list[float]]] = {}
        cells: dict[str, list[Cell]] = {}
        total = (
            len(trained)
            * len(preset.pretrain_seeds)
            * (len(preset.learning_rates) + len(preset.train_seeds) - 1)
        )
        total += (
            len(merges) * len(preset.pretrain_seeds) * (len(preset.merge_ts) + len(preset.train_seeds) - 1)
        )
        bar = tqdm(total=total, desc=f"arena {preset.name}", unit="cell")

        def do(method: str, settings: Sequence[float], runner: Callable[[float, int, int], Cell]) -> None:
            scores: dict[float, list[float]] = {}
            for x in settings:
                for p in preset.pretrain_seeds:
                    cell = runner(x, p, s0)
                    scores.setdefault(x, []).append(
                        selection_score(cell.samples["validation"], bases[p].samples["validation"])
                    )
                    bar.update(1)
            best = choose_setting(scores)
            chosen[method] = best
            sweeps[method] = {f"{x:g}": v for x, v in scores.items()}
            logger.info("arena: %s chooses %g (validation scores %s)", method, best, sweeps[method])
            runs = []
            for p in preset.pretrain_seeds:
                for s in preset.train_seeds:
                    runs.append(runner(best, p, s))
                    if s != s0:
                        bar.update(1)
            cells[method] = runs

        missing: dict[str, str] = {}
        for method in trained:
            try:
                do(method, preset.learning_rates, lambda lr, p, s, m=method: self.train_cell(m, lr, p, s))
            except MissingCellError as err:
                missing[method] = str(err)
        for method in merges:
            if "vanilla" not in chosen:
                missing[method] = "vanilla unfinished"
                continue
            vlr = chosen["vanilla"]
            try:
                do(method, preset.merge_ts, lambda t, p, s, m=method, v=vlr: self.merge_cell(m, t, p, s, v))
            except MissingCellError as err:
                missing[method] = str(err)
        bar.close()
        return {"bases": bases, "cells": cells, "chosen": chosen, "sweeps": sweeps, "unfinished": missing}


# --------------------------------------------------------------------------------------
# Post-hoc merges
# --------------------------------------------------------------------------------------


def merge_models(method: str, base_dir: str, aligned_dir: str, t: float, out_dir: Path, suite: Suite) -> Path:
    """Uniform averaging through real mergekit (``benchmarks.baselines.uniform_merge``) or HMA.

    HMA measures the per-block geometry of (base, aligned) on the suite's training data once per
    pair and allocates at the budget of uniform averaging at ``t`` with ``hma_benchmark.py``'s
    tolerance rule (:func:`frontier_trainer.demo.hma_tolerances`, scale 0.5).
    """
    out_dir = Path(out_dir)
    if method == "uniform-merge":
        from benchmarks.baselines import uniform_merge

        return Path(uniform_merge(base_dir, aligned_dir, t, out_dir))
    if method == "hma":
        from frontier_trainer.demo import hma_tolerances
        from frontier_trainer.hma import Grouping, allocate, measure_geometry, merge
        from frontier_trainer.hma.signals import LayerGeometry

        grouping = Grouping("block")
        geo_path = Path(aligned_dir) / "hma_geometry.json"
        if geo_path.is_file():
            geo = LayerGeometry.load(geo_path)
        else:
            caps = suite.capability_datasets()
            n = min(32, min(len(d) for d in caps.values()))
            geo = measure_geometry(
                base_dir, aligned_dir, suite.preference_dataset(), caps, grouping=grouping, max_examples=n
            )
            geo.save(geo_path)
        alloc = allocate(geo, t=t, tolerances=hma_tolerances(geo, t, 0.5))
        merge(base_dir, aligned_dir, alloc, out_dir, grouping=grouping, progress=False)
        if not (
            out_dir / "tokenizer_config.json"
        ).is_file():  # the merge writes weights; evaluation needs the tokenizer
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
        return out_dir
    raise ValueError(f"merge method {method!r} unknown; choose from {list(MERGE_METHODS)}.")
