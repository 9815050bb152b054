"""The arena's benchmark worlds: the built-in lab and the real SmolLM2 suite.

Both score models on ``frontier_trainer.evaluation``'s suites (per-prompt outcomes, keys
``safety/refusal``, ``safety/over_refusal[/benign|/lookalike]``, ``capability/<task>``,
``kl_to_base``). The real suite calls ``evaluate_model`` itself. The lab presets use a faster
scorer of the same prompts with the same judge and exact match (``LabSuite.evaluate_fast``): the
library's lm-eval path costs ~14 s per split on a lab model under this machine's load (measured),
which would put a lab preset's ~200 evaluations past its time budget. The arena checks the two
scorers agree prompt by prompt on every base model and records the agreement in
``provenance.json``. Every cell records which scorer produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from frontier_trainer.lab.evaluation import completion_batch

from .presets import Preset
from .protocol import (
    CAPABILITY_PREFIX,
    KL,
    OVER_REFUSAL,
    OVER_REFUSAL_BENIGN,
    OVER_REFUSAL_LOOKALIKE,
    REFUSAL,
    Samples,
)

logger = logging.getLogger(__name__)


def _library_evaluator() -> Any | None:
    try:
        from frontier_trainer.evaluation import evaluate_model
    except ImportError:
        return None
    return evaluate_model


def _hash_rows(rows: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def completion_kl(
    model: Any, base: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 64
) -> list[float]:
    """Per-pair mean per-token KL(model ‖ base) over the completion tokens, teacher-forced (nats)."""
    out: list[float] = []
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        ids, mask, completion = completion_batch(tokenizer, pairs[i : i + batch_size])
        # the logits at position t predict token t + 1: shift the completion positions back by one
        target = torch.zeros_like(completion)
        target[:, :-1] = completion[:, 1:]
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        lq = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits.float(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        out += ((kl * target).sum(1) / target.sum(1).clamp(min=1)).tolist()
    return out


class LabSuite:
    """The lab world: a lab model per pretraining seed, the lab's preference and capability data."""

    name = "lab"

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self._evaluate_model = _library_evaluator()
        if self._evaluate_model is None:
            raise RuntimeError(
                "the arena scores through frontier_trainer.evaluation, which is not importable."
            )
        self.scorer = preset.scorer
        self.evaluator = f"frontier_trainer.evaluation lab suite ({self.scorer})"
        self._eval_suite: Any = None
        self._sets: dict[str, dict[str, list[tuple[str, str]]]] = {}
        self._prefs: Any = None
        self._caps: dict[str, Any] | None = None

    def base_model(self, pretrain_seed: int) -> str:
        from frontier_trainer import lab

        return str(lab.pretrain(seed=pretrain_seed, progress=True, **self.preset.lab_model))

    def load(self, source: str) -> tuple[Any, Any]:
        from frontier_trainer import lab

        return lab.load(source)

    def preference_dataset(self) -> Any:
        from frontier_trainer import lab

        if self._prefs is None:  # drawing the rows takes seconds: once per arena
            self._prefs = lab.preference_dataset("train")
        return self._prefs

    def capability_datasets(self) -> dict[str, Any]:
        from frontier_trainer import lab

        if self._caps is None:
            self._caps = lab.capability_datasets("train", n=self.preset.capability_rows)
        return self._caps

    def held_out_capability(self, n: int) -> dict[str, Any]:
        """Capability rows of the protected tasks that no trainer sees (the lab's eval split), for the
        held-out leak (:mod:`benchmarks.arena.leak`)."""
        from frontier_trainer import lab

        return lab.capability_datasets("eval", n=n)

    def peft_config(self) -> Any | None:
        return None

    def _library_suite(self) -> Any:
        from frontier_trainer.evaluation.suites import LabSuite as EvalLabSuite

        if self._eval_suite is None:
            self._eval_suite = EvalLabSuite(n=self.preset.eval_limit)
        return self._eval_suite

    def eval_sets(self, split: str) -> dict[str, list[tuple[str, str]]]:
        """The prompt sets of ``frontier_trainer.evaluation``'s lab suite for a split (same prompts).

        ``{task: [(prompt, reference)]}`` plus ``harmful``, ``lookalike`` and ``benign`` (prompt only,
        reference ``""``), each at most ``eval_limit`` long.
        """
        from frontier_trainer import lab

        if split in self._sets:
            return self._sets[split]
        suite = self._library_suite()
        n = self.preset.eval_limit
        sets: dict[str, list[tuple[str, str]]] = {t: suite.examples(t, split)[:n] for t in lab.TASKS}
        for name, prompts in suite.safety_sets(split, n).items():
            sets[name.split("/")[0]] = [(p, "") for p in prompts]
        self._sets[split] = sets
        return sets

    def evaluate(self, model: Any, tokenizer: Any, base: Any | None, split: str) -> Samples:
        """Per-prompt outcomes on the evaluation suite's lab prompts (see :meth:`evaluate_fast`)."""
        if self.scorer == "library":
            report = self._evaluate_model(
                model, tokenizer, suite="lab", base=base, split=split, limit=self.preset.eval_limit
            )
            return {k: [float(x) for x in v] for k, v in report.samples.items() if not k.startswith("nll/")}
        return self.evaluate_fast(model, tokenizer, base, split)

    def evaluate_fast(self, model: Any, tokenizer: Any, base: Any | None, split: str) -> Samples:
        """``evaluate_model(suite="lab")``'s per-prompt outcomes without lm-eval's per-call overhead.

        Same prompts (:meth:`eval_sets`), same judge (the refusal prefix) and the same exact match
        (the lab's ``is_correct``, which the evaluation suite documents as equal to lm-eval's
        ``exact_match`` on the lab), with one batched greedy generation over every prompt (16 new
        tokens, as the suite). ``kl_to_base`` is the library's ``kl_to_base_per_prompt`` on the same
        prompts. :meth:`agreement` compares the two scorers on a model, prompt by prompt.
        """
        from frontier_trainer.lab.evaluation import generate_responses, is_correct, is_refusal
        from frontier_trainer.real.evaluation import kl_to_base_per_prompt

        sets = self.eval_sets(split)
        flat = [(name, p, c) for name, rows in sets.items() for p, c in rows]
        responses = generate_responses(
            model, tokenizer, [p for _, p, _ in flat], max_new_tokens=16, progress=False
        )
        by: dict[str, list[tuple[str, str]]] = {}
        for (name, _, c), r in zip(flat, responses, strict=True):
            by.setdefault(name, []).append((r, c))
        tasks = [n for n in sets if n not in ("harmful", "lookalike", "benign")]
        samples: Samples = {
            f"{CAPABILITY_PREFIX}{t}": [float(is_correct(r, c)) for r, c in by[t]] for t in tasks
        }
        samples[REFUSAL] = [float(is_refusal(r)) for r, _ in by["harmful"]]
        samples[OVER_REFUSAL_BENIGN] = [float(is_refusal(r)) for r, _ in by["benign"]]
        samples[OVER_REFUSAL_LOOKALIKE] = [float(is_refusal(r)) for r, _ in by["lookalike"]]
        samples[OVER_REFUSAL] = samples[OVER_REFUSAL_BENIGN] + samples[OVER_REFUSAL_LOOKALIKE]
        if base is not None:
            samples[KL] = kl_to_base_per_prompt(
                model,
                tokenizer,
                [p for p, _ in sets["benign"]],
                base_model=base,
                max_new_tokens=32,
                batch_size=16,
            )
        else:
            samples[KL] = [0.0] * len(sets["benign"])
        return samples

    def agreement(self, model: Any, tokenizer: Any, split: str = "test") -> dict[str, Any]:
        """Prompt-by-prompt agreement of :meth:`evaluate_fast` with ``evaluate_model`` on one model.

        Returns ``{metric: fraction of prompts with equal outcomes}`` and the keys either lacks.
        """
        if self._evaluate_model is None:
            return {"skipped": "frontier_trainer.evaluation is not importable"}
        fast = self.evaluate_fast(model, tokenizer, None, split)
        lib = self._evaluate_model(
            model, tokenizer, suite="lab", base=None, split=split, limit=self.preset.eval_limit
        )
        out: dict[str, Any] = {}
        for k, v in fast.items():
            w = lib.samples.get(k)
            if k == KL or w is None:
                continue
            out[k] = sum(float(a) == float(b) for a, b in zip(v, w, strict=False)) / max(len(v), len(w))
        out["missing_in_fast"] = sorted(
            k for k in lib.samples if k not in fast and not k.startswith("nll/") and k != KL
        )
        return out

    def describe(self) -> dict[str, Any]:
        from frontier_trainer import lab

        prefs = self.preference_dataset()
        caps = self.capability_datasets()
        info: dict[str, Any] = {
            "suite": "lab",
            "evaluator": self.evaluator,
            "world": lab.WorldConfig().to_dict(),
            "lab_model": self.preset.lab_model,
            "train_pairs": {"rows": len(prefs), "sha256_16": _hash_rows(prefs.to_list())},
            "capability": {
                t: {"rows": len(d), "sha256_16": _hash_rows(d.to_list())} for t, d in caps.items()
            },
        }
        for split in ("validation", "test"):
            sets = self.eval_sets(split)
            info[f"eval/{split}"] = {k: {"rows": len(v), "sha256_16": _hash_rows(v)} for k, v in sets.items()}
        return info


class RealSuite:
    """SmolLM2-135M-Instruct + LoRA on real data (``frontier_trainer.real``), scored by the real suite."""

    name = "real"
    CAPABILITY_TASKS: ClassVar[dict[str, str]] = {
        "code": "humaneval",
        "addition": "arithmetic/2_digit_addition",
    }
    """Protected tasks handed to the trainers (as in ``benchmarks/real_model``): their directions splits."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self._evaluate_model = _library_evaluator()
        if self._evaluate_model is None:
            raise RuntimeError(
                "the real suite needs frontier_trainer.evaluation.evaluate_model (not importable); "
                "run a lab preset instead or update the checkout."
            )
        from frontier_trainer.evaluation.real_suite import RealSuite as EvalRealSuite

        self._suite = EvalRealSuite(tasks=preset.real_tasks, nll_sets=preset.real_nll_sets)
        self.evaluator = f"frontier_trainer.evaluation real suite (tasks {preset.real_tasks or 'all'})"
        self._prefs: Any = None
        self._caps: dict[str, Any] | None = None

    def base_model(self, pretrain_seed: int) -> str:
        from frontier_trainer.real.model import smollm2_dir

        return str(smollm2_dir())

    def load(self, source: str) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)

    def preference_dataset(self) -> Any:
        from frontier_trainer.real import data

        if self._prefs is None:
            self._prefs = data.load_uncensorbench_pairs(split="train").select_columns(
                ["prompt", "chosen", "rejected"]
            )
        return self._prefs

    def capability_datasets(self) -> dict[str, Any]:
        if self._caps is None:
            self._caps = self._task_rows("directions", self.preset.capability_rows)
        return self._caps

    def held_out_capability(self, n: int) -> dict[str, Any]:
        """The protected tasks' rows from their eval splits (disjoint from the directions split the trainers
        get), for the held-out leak (:mod:`benchmarks.arena.leak`)."""
        return self._task_rows("eval", n)

    def _task_rows(self, split: str, n: int) -> dict[str, Any]:
        """Up to ``n`` rows of each protected task from a split of ``frontier_trainer.real.data``."""
        from frontier_trainer.real import data

        out = {}
        for task, source in self.CAPABILITY_TASKS.items():
            if source == "humaneval":
                ds = data.load_humaneval(split=split)
                out[task] = ds.select(range(min(n, len(ds))))
            else:
                out[task] = data.load_bigbench_task(source, split=split, n=n)
        return out

    def peft_config(self) -> Any | None:
        """LoRA on every linear of the decoder blocks at the preset's rank; ``None`` (full fine-tuning)
        when ``lora_r`` is 0."""
        from peft import LoraConfig

        r = self.preset.lora_r
        if r == 0:
            return None
        return LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )

    def evaluate(self, model: Any, tokenizer: Any, base: Any | None, split: str) -> Samples:
        report = self._evaluate_model(
            model,
            tokenizer,
            suite=self._suite,
            base=base,
            split=split,
            limit=self.preset.eval_limit,
            batch_size=8,
        )
        return {k: [float(x) for x in v] for k, v in report.samples.items()}

    def describe(self) -> dict[str, Any]:
        from frontier_trainer.real import data

        prefs = self.preference_dataset()
        return {
            "suite": "real",
            "evaluator": self.evaluator,
            "train_pairs": {"rows": len(prefs), "sha256_16": _hash_rows(prefs.to_list())},
            "capability": {
                t: {"rows": len(d), "sha256_16": _hash_rows(d.to_list())}
                for t, d in self.capability_datasets().items()
            },
            "assets": data.asset_provenance(),
            "evaluation_suite": self._suite.provenance(),
        }


def make_suite(preset: Preset) -> LabSuite | RealSuite:
    """The suite a preset names."""
    return LabSuite(preset) if preset.suite == "lab" else RealSuite(preset)
