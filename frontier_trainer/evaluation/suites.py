"""Evaluation suites: which prompts, tasks and judge a :class:`~frontier_trainer.evaluation.Report` uses.

A :class:`Suite` supplies, for a split (``"validation"`` to choose settings, ``"test"`` only to report):

* ``safety_sets``: harmful prompt sets (``"harmful/<source>"``) whose refusal rate is the safety
  metric, and benign sets (``"benign"``: plain benign requests; ``"lookalike"``: benign requests that
  look like harmful ones) whose refusal rate is over-refusal;
* ``is_refusal``: the refusal judge, and ``judge_agreement``: its measured agreement with labels;
* ``capability_tasks``: lm-eval tasks (:class:`~frontier_trainer.evaluation.lm_eval_tasks.LmEvalTask`);
* ``nll_sets``: ``(prompt, completion)`` pairs scored by completion NLL, and ``kl_prompts`` for KL to
  the base model.

``limit`` caps every set and task at its first ``limit`` items (a fixed order), so a small ``limit``
is a prefix of a larger one. Two suites ship: ``"lab"`` (:class:`LabSuite`) and ``"real"``
(:class:`frontier_trainer.evaluation.real_suite.RealSuite`), registered by name in
:mod:`frontier_trainer.evaluation.registry` (a separate module, so the import graph has no cycle).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from frontier_trainer.evaluation.lm_eval_tasks import LmEvalTask

SPLITS = ("validation", "test")


def check_split(split: str) -> str:
    """Validate an evaluation split name."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not an evaluation split; use one of {SPLITS}.")
    return split


def check_limit(limit: int | None) -> int | None:
    """Validate ``limit`` (``None`` or a positive integer)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer (items per set) or None (all).")
    return limit


def take(items: Sequence[Any], limit: int | None) -> list[Any]:
    """The first ``limit`` items (all if ``None``)."""
    return list(items) if limit is None else list(items[:limit])


def hash_partition(key: str, salt: str, validation_fraction: float) -> str:
    """``"validation"`` or ``"test"`` for an item, from a keyed hash of its text (seed-free, stable)."""
    h = int.from_bytes(hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest(), "big")
    return "validation" if (h % 10_000) < validation_fraction * 10_000 else "test"


class Suite(ABC):
    """What an evaluation measures; subclass to add a suite (see the module docstring)."""

    name: str = ""
    max_new_tokens: int = 48
    """Generation budget of the safety responses."""

    @abstractmethod
    def safety_sets(self, split: str, limit: int | None) -> dict[str, list[str]]:
        """``{"harmful/<source>": prompts, ..., "benign": prompts, "lookalike": prompts}``."""

    @abstractmethod
    def is_refusal(self, response: str, prompt: str) -> bool:
        """The refusal judge."""

    @abstractmethod
    def judge_agreement(self) -> dict[str, Any]:
        """The judge's agreement with labelled responses: accuracy, precision, recall, n, source."""

    @abstractmethod
    def capability_tasks(self, split: str, limit: int | None) -> list[LmEvalTask]:
        """lm-eval tasks scored as ``capability/<task.name>``."""

    @abstractmethod
    def nll_sets(self, split: str, limit: int | None) -> dict[str, list[tuple[str, str]]]:
        """``{name: [(prompt, completion), ...]}`` scored as ``nll/<name>``."""

    @abstractmethod
    def nll_per_row(
        self, model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int
    ) -> list[float]:
        """Per-row completion NLL (nats per completion token)."""

    def kl_prompts(self, split: str, limit: int | None) -> list[str]:
        """Prompts for ``kl_to_base``: by default the plain benign set."""
        return self.safety_sets(split, limit)["benign"]

    def provenance(self) -> dict[str, Any]:
        """Where the suite's data comes from (sources, licences, hashes)."""
        return {}


# --------------------------------------------------------------------------------------------------
# The lab suite
# --------------------------------------------------------------------------------------------------


class LabSuite(Suite):
    """The alignment-tax lab (:mod:`frontier_trainer.lab`) as an evaluation suite.

    Data: the lab world's held-out ``eval`` split only (pretraining never sees it), divided into
    ``validation`` and ``test`` by a keyed hash of each prompt (``validation_fraction`` of them go to
    validation), so the two never share a prompt and the division does not depend on any seed.

    * ``harmful/lab``: the world's harmful requests; ``lookalike``: its benign look-alikes (the
      harmful templates with harmless objects); ``benign``: the prompts of the four capability tasks
      whose vocabulary is disjoint from harmful requests (arithmetic, reverse, sort, lookup),
      interleaved task by task: plain benign requests a refusal would be an over-refusal on.
    * judge: :func:`frontier_trainer.lab.evaluation.is_refusal` (the response starts with the fixed
      refusal). Its agreement is measured on responses labelled by construction (the refusal, the
      refusal with a continuation, compliant harmful answers, helpful look-alike answers, capability
      answers), which pins the judge's behaviour; the lab has no human labels.
    * capability: every lab task as an lm-eval ``generate_until`` task (greedy until ``<eos>``,
      ``max_gen_toks`` tokens) scored by ``exact_match`` against the reference completion (whitespace
      stripped): lm-eval runs the lab's word-level tokenizer as any other, and this equals the lab's
      own ``is_correct`` (word lists equal) because the tokenizer decodes words joined by one space.
    * ``nll/<task>``: :func:`frontier_trainer.lab.evaluation.completion_nll` per example.
    """

    name = "lab"
    max_new_tokens = 16

    def __init__(
        self,
        world: Any = None,
        *,
        n: int | None = None,
        tasks: Sequence[str] | None = None,
        validation_fraction: float = 0.5,
        max_gen_toks: int = 16,
    ) -> None:
        from frontier_trainer.lab.world import WorldConfig, check_tasks

        self.world = world if world is not None else WorldConfig()
        self.n = n if n is not None else self.world.n_eval
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n={n!r} must be a positive integer (examples per set and split).")
        self.tasks = check_tasks(list(tasks) if tasks is not None else None)
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={validation_fraction!r} must be strictly between 0 and 1.")
        self.validation_fraction = validation_fraction
        self.max_gen_toks = max_gen_toks
        self._cache: dict[tuple[str, str], list[tuple[str, str]]] = {}

    def examples(self, name: str, split: str) -> list[tuple[str, str]]:
        """Up to ``n`` (prompt, completion) pairs of a lab task or safety set in an evaluation split."""
        from frontier_trainer.lab.world import examples

        check_split(split)
        key = (name, split)
        if key not in self._cache:
            pool = examples(name, "eval", 4 * self.n, self.world)
            picked = [
                ex for ex in pool if hash_partition(ex[0], "lab-eval", self.validation_fraction) == split
            ]
            self._cache[key] = picked[: self.n]
        return self._cache[key]

    def safety_sets(self, split: str, limit: int | None) -> dict[str, list[str]]:
        from frontier_trainer.lab.world import TASKS

        plain = [t for t in self.tasks if TASKS[t].overlap == "none"] or list(self.tasks)
        per_task = [self.examples(t, split) for t in plain]
        benign = [rows[i][0] for i in range(max(map(len, per_task))) for rows in per_task if i < len(rows)]
        return {
            "harmful/lab": take([p for p, _ in self.examples("harmful", split)], limit),
            "benign": take(benign, limit),
            "lookalike": take([p for p, _ in self.examples("lookalike", split)], limit),
        }

    def is_refusal(self, response: str, prompt: str) -> bool:
        from frontier_trainer.lab.evaluation import is_refusal

        return is_refusal(response)

    def judge_agreement(self) -> dict[str, Any]:
        from frontier_trainer.lab.world import REFUSAL
        from frontier_trainer.real.judge import agreement

        labelled: list[tuple[str, bool]] = []
        for _prompt, answer in self.examples("harmful", "test")[:20]:
            labelled += [(" " + REFUSAL, True), (REFUSAL + answer, True), (answer, False)]
        for _, answer in self.examples("lookalike", "test")[:20]:
            labelled.append((answer, False))
        for task in self.tasks:
            labelled += [(answer, False) for _, answer in self.examples(task, "test")[:5]]
        predicted = [self.is_refusal(r, "") for r, _ in labelled]
        result = agreement(predicted, [y for _, y in labelled])
        result["source"] = (
            "lab: responses labelled by construction (the fixed refusal vs compliant/helpful answers)"
        )
        return result

    def capability_tasks(self, split: str, limit: int | None) -> list[LmEvalTask]:
        from frontier_trainer.lab.world import TASKS

        out = []
        for task in self.tasks:
            rows = take(self.examples(task, split), limit)
            out.append(
                LmEvalTask(
                    name=task,
                    output_type="generate_until",
                    docs=tuple({"query": p, "answer": c.strip()} for p, c in rows),
                    until=("<eos>",),
                    max_gen_toks=self.max_gen_toks,
                    source=f"frontier_trainer.lab world {self.world.to_dict()}, task {task!r} "
                    f"({TASKS[task].overlap}), eval split, {split} half",
                )
            )
        return out

    def nll_sets(self, split: str, limit: int | None) -> dict[str, list[tuple[str, str]]]:
        return {task: take(self.examples(task, split), limit) for task in self.tasks}

    def nll_per_row(
        self, model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int
    ) -> list[float]:
        from frontier_trainer.lab.evaluation import completion_nll

        return completion_nll(model, tokenizer, pairs, batch_size=batch_size)

    def provenance(self) -> dict[str, Any]:
        return {
            "world": self.world.to_dict(),
            "n": self.n,
            "tasks": list(self.tasks),
            "validation_fraction": self.validation_fraction,
            "partition": "lab 'eval' split divided by blake2b('lab-eval' + prompt) into validation/test",
        }
