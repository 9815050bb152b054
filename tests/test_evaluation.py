"""Tests for frontier_trainer.evaluation: intervals, the Report, lm-eval tasks and evaluate_model.

Planted answers come from a real ``LlamaForCausalLM`` with zero decoder layers whose logits depend
only on the last token (a bigram table written into the embedding and the head), so what it
generates and which choice it prefers are known exactly in advance.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from frontier_trainer import lab
from frontier_trainer.evaluation import (
    SUITES,
    Estimate,
    LabSuite,
    LmEvalTask,
    Report,
    bootstrap_interval,
    estimate,
    evaluate_model,
    get_suite,
    run_tasks,
    wilson_interval,
)
from frontier_trainer.lab.world import REFUSAL


@pytest.fixture(scope="module")
def tok():
    return lab.build_tokenizer()


def bigram_model(
    tok, chains: list[str], *, strength: float = 30.0, extra: dict | None = None
) -> LlamaForCausalLM:
    """A zero-layer Llama whose next-token logits are ``strength`` along each chain's successive words.

    ``chains`` are word sequences ("=> sorry i cannot help with that <eos>"); ``extra`` maps
    (word, next word) to a logit, for graded preferences.
    """
    vocab = len(tok)
    hidden = vocab + (vocab % 2)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4, num_hidden_layers=0, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        rms_norm_eps=1e-12,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    table = torch.zeros(vocab, vocab)
    for chain in chains:
        ids = tok(chain, add_special_tokens=False)["input_ids"]
        for a, b in itertools.pairwise(ids):
            table[a, b] = strength
    for (a, b), value in (extra or {}).items():
        table[tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)] = value
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.lm_head.weight.zero_()
        # RMSNorm maps a one-hot row e_i to sqrt(hidden) * e_i, so logits[j] = table[i, j].
        model.lm_head.weight[:, :vocab] = table.T / math.sqrt(hidden)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    return model


# --- intervals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(7, 10, 0.3968, 0.8922), (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0)],
)
def test_wilson_interval_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    # Values as tabulated for the Wilson score interval (z = 1.95996), e.g. Newcombe (1998), Table I.
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_by_hand() -> None:
    z = 1.959963984540054
    p, n = 0.3, 40
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(12, 40) == pytest.approx((centre - half, centre + half), abs=1e-12)
    narrow = wilson_interval(12, 40, confidence=0.5)
    assert narrow[0] > centre - half and narrow[1] < centre + half


def test_bootstrap_interval_known_values() -> None:
    assert bootstrap_interval([2.5] * 30) == (2.5, 2.5)
    values = [0.0, 1.0] * 200  # mean 0.5, standard error 0.025: the 95% interval is ~0.5 +- 0.049
    low, high = bootstrap_interval(values, n_resamples=4000, seed=1)
    assert low == pytest.approx(0.451, abs=0.004) and high == pytest.approx(0.549, abs=0.004)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    shifted = bootstrap_interval([v + 10 for v in values], n_resamples=4000, seed=1)
    assert shifted == pytest.approx((low + 10, high + 10), abs=1e-9)


def test_estimate_picks_the_interval() -> None:
    assert estimate([1, 0, 1, 1]).method == "wilson"
    assert estimate([1, 0, 1, 1]).value == 0.75
    assert (estimate([1.0, 0.0, 1.0], binary=False)).method == "bootstrap"
    assert estimate([0.3, 0.5]).method == "bootstrap"
    assert estimate([0.3]).method == "none"
    with pytest.raises(ValueError, match="binary=True"):
        estimate([0.5], binary=True)
    with pytest.raises(ValueError, match="values is empty"):
        estimate([])


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: wilson_interval(1, 0), "n="),
        (lambda: wilson_interval(5, 4), "successes="),
        (lambda: wilson_interval(1, 4, confidence=1.0), "confidence="),
        (lambda: bootstrap_interval([]), "values"),
        (lambda: bootstrap_interval([1.0, float("nan")]), "finite"),
        (lambda: bootstrap_interval([1.0], n_resamples=0), "n_resamples="),
        (lambda: Estimate(0.5, 0.4, 0.6, 10, "normal"), "method="),
    ],
)
def test_interval_bad_input(call, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        call()


# --- report ------------------------------------------------------------------------------------------


def _report() -> Report:
    samples = {"safety/refusal": [1.0, 0.0, 1.0], "nll/x": [1.5, 2.5]}
    metrics = {k: estimate(v) for k, v in samples.items()}
    return Report(metrics, samples, judge={"accuracy": 1.0, "n": 3}, provenance={"suite": "lab"})


def test_report_round_trip_and_files(tmp_path: Path) -> None:
    report = _report()
    assert Report.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    report.write(tmp_path / "out")
    assert Report.read(tmp_path / "out") == report
    lines = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert lines[0] == "metric,value,low,high,n,method"
    assert lines[1].startswith("safety/refusal,0.666") and lines[1].endswith(",3,wilson")
    table = report.table()
    assert (
        "safety/refusal" in table
        and "0.6667" in table
        and "bootstrap" in table
        and "accuracy 1.0000" in table
    )


def test_report_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in metrics"):
        Report({}, {"safety/refusal": [1.0]})
    with pytest.raises(ValueError, match="'metrics'"):
        Report.from_dict({})
    with pytest.raises(FileNotFoundError, match=r"report\.json"):
        Report.read(tmp_path)


# --- lm-eval tasks ----------------------------------------------------------------------------------


def test_generate_until_task_scores_planted_answers(tok) -> None:
    # The model continues "... K1" with "V2 <eos>", "... K2" with "V5", "... K3" with "V9".
    model = bigram_model(tok, ["K1 V2 <eos>", "K2 V5 <eos>", "K3 V9 <eos>"])
    docs = (
        {"query": "lookup get K1", "answer": "V2"},
        {"query": "lookup get K2", "answer": "V5"},
        {"query": "lookup get K3", "answer": "V1"},
        {"query": "lookup get K3", "answer": "V9"},
    )
    task = LmEvalTask("planted", "generate_until", docs, until=("<eos>",), max_gen_toks=4)
    assert run_tasks(model, tok, [task], batch_size=2) == {"planted": [1.0, 1.0, 0.0, 1.0]}
    assert run_tasks(model, tok, [task], batch_size=2, limit=2) == {"planted": [1.0, 1.0]}


def test_generate_until_regex_filter_extracts_the_answer(tok) -> None:
    docs = ({"query": "get K1", "answer": "V2"}, {"query": "get K2", "answer": "V3"})
    plain = LmEvalTask("plain", "generate_until", docs, until=("<eos>",), max_gen_toks=4)
    regex = LmEvalTask("regex", "generate_until", docs, until=("<eos>",), max_gen_toks=4, regex=r"(V\d+)")
    last = LmEvalTask(
        "last", "generate_until", ({"query": "get K3", "answer": "V9"},), until=("<eos>",), max_gen_toks=4,
        regex=r"(V\d+)", group_select=-1,
    )  # fmt: skip
    model = bigram_model(tok, ["K1 V2 K4 <eos>", "K2 V5 K4 <eos>", "K3 V1 V9 <eos>"])
    out = run_tasks(model, tok, [plain, regex, last], batch_size=4)
    # "V2 K4" only matches after extraction; "V1 V9" -> the last match (lm-eval's flexible-extract)
    assert out == {"plain": [0.0, 0.0], "regex": [1.0, 0.0], "last": [1.0]}


def test_multiple_choice_task_matches_hand_computation(tok) -> None:
    # One-token choices after "get": log p(choice | "get") is the bigram logit's log-softmax, so the
    # model picks the choice with the largest planted logit.
    extra = {("get", "V1"): 3.0, ("get", "V2"): 1.0, ("get", "V3"): 2.0}
    model = bigram_model(tok, [], extra=extra)
    docs = (
        {"query": "lookup get", "choices": ["V1", "V2", "V3"], "gold": 0},  # V1 best: right
        {"query": "lookup get", "choices": ["V2", "V3"], "gold": 0},  # V3 beats V2: wrong
        {"query": "lookup get", "choices": ["V2", "V3"], "gold": 1},  # right
    )
    task = LmEvalTask("mc", "multiple_choice", docs)
    assert run_tasks(model, tok, [task], batch_size=3) == {"mc": [1.0, 0.0, 1.0]}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "a b"}, "task name="),
        ({"output_type": "loglikelihood_rolling"}, "output_type="),
        ({"docs": ()}, "docs is empty"),
        ({"docs": ({"answer": "x"},)}, "'query'"),
        ({"docs": ({"query": "q", "answer": " "},)}, "'answer'"),
        (
            {"output_type": "multiple_choice", "docs": ({"query": "q", "choices": ["a"], "gold": 0},)},
            "'choices'",
        ),
        (
            {"output_type": "multiple_choice", "docs": ({"query": "q", "choices": ["a", "b"], "gold": 2},)},
            "'gold'",
        ),
        ({"max_gen_toks": 0}, "max_gen_toks="),
    ],
)
def test_task_bad_input(kwargs: dict, field: str) -> None:
    base = {"name": "t", "output_type": "generate_until", "docs": ({"query": "q", "answer": "a"},)}
    with pytest.raises(ValueError, match=field):
        LmEvalTask(**{**base, **kwargs})


def test_run_tasks_bad_input(tok) -> None:
    model = bigram_model(tok, [])
    task = LmEvalTask("t", "generate_until", ({"query": "q", "answer": "a"},))
    with pytest.raises(ValueError, match="tasks is empty"):
        run_tasks(model, tok, [])
    with pytest.raises(ValueError, match="duplicate task names"):
        run_tasks(model, tok, [task, task])
    with pytest.raises(ValueError, match="limit="):
        run_tasks(model, tok, [task], limit=0)
    with pytest.raises(ValueError, match="must be absolute"):
        task.config(Path("relative.jsonl"))


# --- evaluate_model on the lab suite ------------------------------------------------------------------


def test_evaluate_model_lab_planted_refuser(tok) -> None:
    refuser = bigram_model(tok, [f"=> {REFUSAL} <eos>"])
    report = evaluate_model(refuser, tok, "lab", limit=6, batch_size=8)
    m = report.metrics
    assert m["safety/refusal"].value == 1.0 and m["safety/refusal"].n == 6
    assert m["safety/refusal"].method == "wilson"
    assert (m["safety/refusal"].low, m["safety/refusal"].high) == pytest.approx(wilson_interval(6, 6))
    assert m["safety/over_refusal/benign"].value == 1.0 and m["safety/over_refusal/lookalike"].value == 1.0
    assert m["safety/over_refusal"].n == 12 and report.samples["safety/over_refusal"] == [1.0] * 12
    for task in lab.TASKS:
        assert m[f"capability/{task}"].value == 0.0 and len(report.samples[f"capability/{task}"]) == 6
        assert m[f"nll/{task}"].method == "bootstrap" and m[f"nll/{task}"].value > 0
    assert "kl_to_base" not in m
    assert report.judge["accuracy"] == 1.0 and report.judge["n"] > 0
    prov = report.provenance
    assert prov["suite"] == "lab" and prov["split"] == "test" and len(prov["model"]["sha256"]) == 64
    assert prov["packages"]["lm_eval"] and prov["capability_tasks"]["arithmetic"]["n"] == 6
    assert prov["safety_sets"]["harmful/lab"]["n"] == 6 and len(prov["nll_sets"]["sort"]["sha256"]) == 64


def test_evaluate_model_lab_planted_answers(tok) -> None:
    """A model that answers three arithmetic prompts right, complies with harmful ones, and knows no refusal."""
    suite = LabSuite(tasks=["arithmetic"], n=3)
    rows = suite.examples("arithmetic", "test")
    # "=>" leads to the first prompt's answer: right there, and wherever another answer is equal.
    first = rows[0][1].split()
    model = bigram_model(tok, [" ".join(["=>", *first, "<eos>"])])
    report = evaluate_model(model, tok, suite, limit=3)
    expected = [float(c.split() == first) for _, c in rows]
    assert report.samples["capability/arithmetic"] == expected and expected[0] == 1.0
    assert report.metrics["safety/refusal"].value == 0.0
    assert report.metrics["safety/over_refusal"].value == 0.0


def test_evaluate_model_kl_to_base(tok) -> None:
    a = bigram_model(tok, [f"=> {REFUSAL} <eos>"])
    b = bigram_model(tok, [f"=> {REFUSAL} <eos>"], strength=5.0)
    same = evaluate_model(a, tok, LabSuite(tasks=["sort"], n=4), base=a, limit=4)
    assert same.samples["kl_to_base"] == pytest.approx([0.0] * 4, abs=1e-9)
    other = evaluate_model(a, tok, LabSuite(tasks=["sort"], n=4), base=b, limit=4)
    assert min(other.samples["kl_to_base"]) > 0.01 and other.metrics["kl_to_base"].n == 4
    assert other.provenance["base"]["sha256"] != other.provenance["model"]["sha256"]


def test_lab_suite_splits_are_disjoint_and_limited() -> None:
    suite = LabSuite(n=20)
    for name in ("harmful", "lookalike", *lab.TASKS):
        val = {p for p, _ in suite.examples(name, "validation")}
        test = {p for p, _ in suite.examples(name, "test")}
        assert val and test and not val & test
        assert all(lab.split_of(p) == "eval" for p in val | test)
    sets = suite.safety_sets("test", 5)
    assert set(sets) == {"harmful/lab", "benign", "lookalike"} and all(len(v) == 5 for v in sets.values())
    assert suite.safety_sets("test", 3)["benign"] == sets["benign"][:3]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split": "train"}, "split="),
        ({"split": "eval"}, "split="),
        ({"limit": 0}, "limit="),
        ({"limit": -3}, "limit="),
        ({"batch_size": 0}, "batch_size="),
        ({"suite": "nope"}, "suite="),
    ],
)
def test_evaluate_model_bad_input(tok, kwargs: dict, field: str) -> None:
    model = bigram_model(tok, [])
    with pytest.raises(ValueError, match=field):
        evaluate_model(model, tok, **{"suite": "lab", **kwargs})


def test_suites_registry() -> None:
    assert set(SUITES) == {"lab", "real"}
    assert isinstance(get_suite("lab"), LabSuite)
    suite = LabSuite(n=2)
    assert get_suite(suite) is suite
    with pytest.raises(ValueError, match="n="):
        LabSuite(n=0)
    with pytest.raises(ValueError, match="tasks="):
        LabSuite(tasks=["nope"])
    with pytest.raises(ValueError, match="validation_fraction="):
        LabSuite(validation_fraction=1.0)


# --- per-item KL and NLL (frontier_trainer.real.evaluation) ------------------------------------------


def test_kl_and_nll_per_item_agree_with_the_pooled_metrics(tok) -> None:
    from frontier_trainer.real.evaluation import (
        completion_nll,
        completion_nll_per_row,
        kl_to_base,
        kl_to_base_per_prompt,
    )

    model = lab.build_model(lab.LabConfig(hidden_size=32, num_layers=1, seed=0), tok)
    base = lab.build_model(lab.LabConfig(hidden_size=32, num_layers=1, seed=1), tok)
    prompts = [p for p, _ in lab.examples("lookalike", "eval", 5)]
    per_prompt = kl_to_base_per_prompt(model, tok, prompts, base_model=base, max_new_tokens=6, batch_size=2)
    alone = [kl_to_base(model, tok, [p], base_model=base, max_new_tokens=6) for p in prompts]
    assert per_prompt == pytest.approx(alone, rel=1e-5) and min(per_prompt) > 0
    assert kl_to_base_per_prompt(model, tok, prompts, base_model=model, max_new_tokens=4) == pytest.approx(
        [0.0] * 5, abs=1e-9
    )
    rows = [{"prompt": p, "completion": c} for p, c in lab.examples("sort", "eval", 5)]
    per_row = completion_nll_per_row(model, tok, rows, batch_size=2)
    assert per_row == pytest.approx([completion_nll(model, tok, [r]) for r in rows], rel=1e-5)
    with pytest.raises(ValueError, match="at least one prompt"):
        kl_to_base_per_prompt(model, tok, [], base_model=base)
    with pytest.raises(ValueError, match="base_model="):
        kl_to_base_per_prompt(model, tok, prompts)


@pytest.mark.slow
def test_lab_suite_lm_eval_agrees_with_the_lab_exact_match() -> None:
    """On the pretrained lab model, lm-eval's per-document exact match equals the lab's own is_correct."""
    from frontier_trainer.lab.evaluation import generate_responses, is_correct

    model, tok = lab.load(lab.pretrain())
    suite = LabSuite(n=40)
    tasks = suite.capability_tasks("test", None)
    scored = run_tasks(model, tok, tasks, batch_size=16)
    for task in tasks:
        prompts = [d["query"] for d in task.docs]
        responses = generate_responses(model, tok, prompts, max_new_tokens=16, progress=False)
        own = [float(is_correct(r, d["answer"])) for r, d in zip(responses, task.docs, strict=True)]
        assert scored[task.name] == own, task.name
    assert sum(map(sum, scored.values())) > 0  # the pretrained model gets some right
