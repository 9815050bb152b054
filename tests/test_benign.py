"""Refusal-hold rows (frontier_trainer.benign): what they contain, bad input, and what they do to a step."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from frontier_trainer.benign import is_refusal_hold, refusal_hold_dataset


def test_plain_rows_pair_every_prompt_with_a_preferred_response() -> None:
    prompts = [f"benign {i} =>" for i in range(5)]
    responses = [" sorry", " no way", " i refuse"]
    rows = refusal_hold_dataset(prompts, responses, n=7, seed=3)
    assert rows.column_names == ["prompt", "completion"]
    assert rows["prompt"] == [prompts[i % 5] for i in range(7)]  # cycled in order
    assert set(rows["completion"]) == set(responses)  # the shuffle covers every response type
    again = refusal_hold_dataset(prompts, responses, n=7, seed=3)
    assert again["completion"] == rows["completion"]  # reproducible


def test_conversational_rows_become_messages_ending_with_the_assistant() -> None:
    prefs = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "how to harm"}]],
            "chosen": [[{"role": "assistant", "content": "I can't help with that."}]],
            "rejected": [[{"role": "assistant", "content": "Sure"}]],
        }
    )
    prompts = Dataset.from_dict({"prompt": ["How many legs do horses have?", "Name a river."]})
    rows = refusal_hold_dataset(prompts, prefs)
    assert rows.column_names == ["messages"]
    assert rows[1]["messages"] == [
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "I can't help with that."},
    ]


@pytest.mark.parametrize(
    ("prompts", "responses", "kwargs", "match"),
    [
        ([], [" no"], {}, "prompts: no benign prompts"),
        (["a =>"], [], {}, "responses: no preferred responses"),
        (["a =>", "  "], [" no"], {}, r"prompts\[1\] is empty"),
        (["a =>"], [" no"], {"n": 0}, "n=0"),
        (Dataset.from_dict({"text": ["a"]}), [" no"], {}, "prompts: .*needs a 'prompt' column"),
        (
            ["a =>"],
            [[{"role": "assistant", "content": "no"}, {"role": "user", "content": "x"}]],
            {},
            "one assistant turn",
        ),
        ("a =>", [" no"], {}, "prompts: pass a sequence"),
    ],
)
def test_bad_input_names_the_field(prompts, responses, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        refusal_hold_dataset(prompts, responses, **kwargs)


def test_a_projected_step_holds_the_refusal_likelihood_on_benign_prompts(tmp_path, one_torch_thread) -> None:
    """The outcome on the tiny model: after null-space DPO steps with the hold rows protected, the
    refusal's log-likelihood on the benign prompts moves far less than under vanilla DPO (same data,
    seed and rate). Fails if the rows are not protected (the wrong task's rows, no refresh)."""
    from transformers import LlamaForCausalLM

    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer
    from tests.tiny import build_model_dir, build_tokenizer, preference_dataset

    model_dir = build_model_dir(tmp_path / "model")
    tok = build_tokenizer()
    prefs = preference_dataset(16)  # harmful prompts, chosen " sorry refuse"
    benign = [f"copy w{i} w{i + 1} =>" for i in range(8)]
    hold = refusal_hold_dataset(benign, prefs, n=8)

    def refusal_logp(model) -> float:
        ids = tok([p + " sorry refuse" for p in benign], return_tensors="pt").input_ids
        n_prompt = len(tok(benign[0]).input_ids)  # every benign prompt has the same length
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        target = ids[:, 1:]
        picked = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[:, n_prompt - 1 :]
        return float(picked.sum(1).mean())

    before = refusal_logp(LlamaForCausalLM.from_pretrained(model_dir))
    moved = {}
    for projection in ("none", "nullspace"):
        args = FrontierDPOConfig(
            output_dir=str(tmp_path / projection), max_steps=4, per_device_train_batch_size=8, learning_rate=3e-3,
            report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0,
            projection=projection, capability_refresh_steps=1, capability_batch_size=8, degradation_tracking=False,
        )  # fmt: skip
        trainer = FrontierDPOTrainer(
            model=LlamaForCausalLM.from_pretrained(model_dir), args=args, train_dataset=prefs, processing_class=tok,
            capability_datasets={"refusal_on_benign": hold} if projection != "none" else None,
        )  # fmt: skip
        trainer.train()
        moved[projection] = abs(refusal_logp(trainer.model) - before)
    assert moved["none"] > 0.05, moved  # vanilla DPO does raise the refusal on benign prompts
    assert moved["nullspace"] < 0.35 * moved["none"], moved


def test_frontier_bounds_the_refusals_rise_only_with_the_avoidance_metric(tmp_path, one_torch_thread) -> None:
    """Frontier mode bounds a capability's *loss*. With ``refusal_avoidance_metric`` the hold task's loss is the
    refusal's rise on benign prompts, so ε = 0 holds it (as null-space does) and a larger ε lets it rise more;
    with the likelihood metric the same ε = 0 bounds only a fall, and the step is vanilla's (the refusal rises as
    under vanilla DPO). Hold rows given with no metric get the avoidance metric. Fails if the metric is dropped,
    its sign is lost, or the trainer ignores the rows' tag."""
    from transformers import LlamaForCausalLM

    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer
    from frontier_trainer.directions import completion_metric, refusal_avoidance_metric
    from tests.tiny import build_model_dir, build_tokenizer, preference_dataset

    model_dir = build_model_dir(tmp_path / "model")
    tok = build_tokenizer()
    prefs = preference_dataset(16)
    benign = [f"copy w{i} w{i + 1} =>" for i in range(8)]
    hold = refusal_hold_dataset(benign, prefs, n=8)
    ids = tok([p + " sorry refuse" for p in benign], return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, : len(tok(benign[0]).input_ids)] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    base = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        before = float(completion_metric(base, batch))
        assert float(refusal_avoidance_metric(base, batch)) == pytest.approx(-before, abs=1e-7)
    rise = {}
    # metric: None = none given (the trainer picks the avoidance metric for the tagged hold rows)
    runs = {"vanilla": ("none", 0.0, None), "likelihood metric": ("frontier", 0.0, completion_metric)}
    runs |= {f"avoidance eps {e}": ("frontier", e, refusal_avoidance_metric) for e in (0.0, 0.05, 0.5)}
    runs["no metric given"] = ("frontier", 0.0, None)
    for name, (projection, eps, metric) in runs.items():
        args = FrontierDPOConfig(
            output_dir=str(tmp_path / name.replace(" ", "-")), max_steps=4, per_device_train_batch_size=8,
            learning_rate=3e-3, report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
            seed=0, projection=projection, capability_tolerance=eps if projection == "frontier" else None,
            capability_refresh_steps=1, capability_batch_size=8, degradation_tracking=False,
        )  # fmt: skip
        trainer = FrontierDPOTrainer(
            model=LlamaForCausalLM.from_pretrained(model_dir), args=args, train_dataset=prefs, processing_class=tok,
            capability_datasets={"refusal_on_benign": hold} if projection != "none" else None,
            capability_metrics={"refusal_on_benign": metric} if metric is not None else None,
        )  # fmt: skip
        trainer.train()
        with torch.no_grad():
            rise[name] = float(completion_metric(trainer.model, batch)) - before
    assert rise["vanilla"] > 0.01, rise  # DPO raises the refusal on benign prompts
    assert rise["likelihood metric"] == pytest.approx(rise["vanilla"], rel=0.05), rise  # a one-sided bound on a fall
    assert abs(rise["avoidance eps 0.0"]) < 0.35 * rise["vanilla"], rise
    assert rise["no metric given"] == pytest.approx(rise["avoidance eps 0.0"], abs=1e-6), rise  # the default
    # ε trades: a small one lets part of the rise through, a large one (inactive here) all of it
    v = rise["vanilla"]
    assert rise["avoidance eps 0.0"] + 0.1 * v < rise["avoidance eps 0.05"] < rise["avoidance eps 0.5"] - 0.1 * v, rise


def test_hold_rows_are_tagged_and_the_trainer_scores_them_with_the_avoidance_metric_unless_told_otherwise() -> None:
    """The tag survives the transformations a user applies before training; plain rows are not tagged; a metric
    the user names wins over the default."""
    from frontier_trainer.directions import completion_metric, refusal_avoidance_metric
    from frontier_trainer.mixin import default_capability_metrics

    hold = refusal_hold_dataset([f"benign {i} =>" for i in range(6)], [" sorry", " no"], n=6)
    plain = Dataset.from_dict({"prompt": ["a =>"], "completion": [" b"]})
    assert is_refusal_hold(hold) and not is_refusal_hold(plain) and not is_refusal_hold("lab:benign")
    kept = hold.shuffle(seed=1).select(range(4)).filter(lambda r: True).map(lambda r: r)
    assert is_refusal_hold(kept)
    conversational = refusal_hold_dataset(["Name a river."], [[{"role": "assistant", "content": "I can't."}]])
    assert is_refusal_hold(conversational)
    sources = {"hold": kept, "plain": plain, "spec": {"path": "lab:benign", "completions_from": "chosen"}}
    assert default_capability_metrics(sources, None) == {
        "hold": refusal_avoidance_metric,
        "spec": refusal_avoidance_metric,
    }
    assert default_capability_metrics(sources, {"hold": completion_metric}) == {
        "hold": completion_metric,
        "spec": refusal_avoidance_metric,
    }
