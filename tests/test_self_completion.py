"""Prompt-only capability sources are completed once by the model itself (issue 15 §3)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from tiny import build_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from frontier_trainer import self_completion
from frontier_trainer.directions import IGNORE_INDEX, tokenize_capability_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


PROMPTS = [f"copy w{i} w{i + 1}" for i in range(5)]


def _manual_greedy(model, tok, text: str, max_new_tokens: int) -> str:
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=False)


def test_prompt_only_detection_and_mixing_refused():
    assert self_completion.is_prompt_only("t", Dataset.from_list([{"prompt": "a"}]))
    assert self_completion.is_prompt_only("t", Dataset.from_list([{"prompt": "a", "completion": ""}]))
    assert not self_completion.is_prompt_only("t", Dataset.from_list([{"prompt": "a", "completion": " b"}]))
    assert not self_completion.is_prompt_only("t", Dataset.from_list([{"text": "a b"}]))
    user = [{"role": "user", "content": "hi"}]
    assert self_completion.is_prompt_only("t", Dataset.from_list([{"messages": user}]))
    mixed = Dataset.from_list([{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": ""}])
    with pytest.raises(ValueError, match=r"capability_datasets\['benign'\].*mixes prompt-only and completed"):
        self_completion.is_prompt_only("benign", mixed)


def test_completions_are_the_models_own_greedy_answers(tiny, tmp_path):
    model, tok = tiny
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    done = self_completion.complete_rows(
        "copy", data, model, tok, max_new_tokens=6, batch_size=2, cache_dir=tmp_path
    )
    assert done.column_names == ["prompt", "completion"] and len(done) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, done, strict=True):
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        assert row["prompt"] == rendered  # scored in the chat format DPO trains with
        assert row["completion"] == _manual_greedy(model, tok, rendered, 6)
    # the rows feed the capability sampler as ordinary prompt/completion rows, completion tokens scored
    rows = tokenize_capability_dataset("copy", done, tok, max_length=None)
    assert all(any(label != IGNORE_INDEX for label in r["labels"]) for r in rows)


def test_completed_once_cached_and_regenerated_for_a_changed_model(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    calls = []
    real = self_completion.greedy_continuations

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(self_completion, "greedy_continuations", counting)
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    first = self_completion.complete_rows("copy", data, model, tok, max_new_tokens=4, cache_dir=tmp_path)
    second = self_completion.complete_rows("copy", data, model, tok, max_new_tokens=4, cache_dir=tmp_path)
    assert len(calls) == 1 and first.to_list() == second.to_list()
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    provenance = json.loads((entry / "provenance.json").read_text())
    assert provenance["model_sha256"] == self_completion.model_fingerprint(model)
    assert provenance["n_rows"] == len(PROMPTS) and provenance["settings"]["max_new_tokens"] == 4
    # other settings -> another entry
    self_completion.complete_rows("copy", data, model, tok, max_new_tokens=5, cache_dir=tmp_path)
    assert len(calls) == 2
    # a changed model regenerates
    changed = AutoModelForCausalLM.from_pretrained(model.config._name_or_path)
    with torch.no_grad():
        changed.lm_head.weight.add_(0.01)
    self_completion.complete_rows("copy", data, changed, tok, max_new_tokens=4, cache_dir=tmp_path)
    assert len(calls) == 3


def test_bad_prompt_only_sources_are_refused_naming_the_task(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"capability_datasets\['benign'\]: row 1 has an empty 'prompt'"):
        self_completion.complete_rows(
            "benign", Dataset.from_list([{"prompt": "w1"}, {"prompt": "  "}]), model, tok, cache_dir=tmp_path
        )
    convo = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": "w1"}]},
            {"messages": [{"role": "user", "content": "w2"}, {"role": "assistant", "content": "w3"}]},
        ]
    )
    with pytest.raises(ValueError, match=r"capability_datasets\['chat'\].*mixes prompt-only rows"):
        self_completion.complete_rows("chat", convo, model, tok, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        self_completion.complete_rows("benign", Dataset.from_list([]), model, tok, cache_dir=tmp_path)


def test_prompt_only_sources_are_completed_and_others_kept(tiny, tmp_path, monkeypatch):
    """complete_prompt_only_sources (the trainer's construction path): only prompt-only sources are
    replaced, by the model's own answers, and a second call reads the cache instead of generating."""
    from frontier_trainer.directions import complete_prompt_only_sources

    model, tok = tiny
    calls = []
    real = self_completion.greedy_continuations
    monkeypatch.setattr(
        self_completion, "greedy_continuations", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    answered = Dataset.from_list([{"prompt": "copy w1 =>", "completion": " w1"}])
    sources = {"benign": Dataset.from_list([{"prompt": p} for p in PROMPTS]), "copy": answered}
    done = complete_prompt_only_sources(sources, model, tok, max_new_tokens=3, cache_dir=tmp_path)
    assert done["copy"] is answered and len(calls) == 1
    assert done["benign"].column_names == ["prompt", "completion"]
    assert [r["completion"] for r in done["benign"]] == [
        _manual_greedy(model, tok, r["prompt"], 3) for r in done["benign"]
    ]
    again = complete_prompt_only_sources(sources, model, tok, max_new_tokens=3, cache_dir=tmp_path)
    assert len(calls) == 1 and again["benign"].to_list() == done["benign"].to_list()
    with pytest.raises(ValueError, match=r"capability_datasets\['benign'\]: row 0 has an empty 'prompt'"):
        complete_prompt_only_sources(
            {"benign": Dataset.from_list([{"prompt": ""}])}, model, tok, cache_dir=tmp_path
        )


def test_conversational_rows_scored_with_the_chat_template(tiny):
    """messages ending with an assistant turn: the prompt is the template's generation prompt and
    exactly the rest of the rendered conversation is scored (the answer and the template's end of
    turn, nothing of the user turn); a template whose full rendering does not extend the generation
    prompt falls back to scoring the assistant's content after that prompt."""
    model, tok = tiny
    convo = [{"role": "user", "content": "copy w3"}, {"role": "assistant", "content": "w3 w4"}]
    chat_tok = AutoTokenizer.from_pretrained(model.config._name_or_path)
    chat_tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} {% else %}=> {{ m['content'] }} "
        "<eos> {% endif %}{% endfor %}{% if add_generation_prompt %}=> {% endif %}"
    )
    rows = tokenize_capability_dataset(
        "chat", Dataset.from_list([{"messages": convo}]), chat_tok, max_length=None
    )
    assert rows[0]["input_ids"] == chat_tok("copy w3 => w3 w4 <eos> ")["input_ids"]
    scored = [
        t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"], strict=True) if label != IGNORE_INDEX
    ]
    assert chat_tok.decode(scored).split() == ["w3", "w4", "<eos>"]
    # the tiny template renders 'assistant w3 w4', which does not extend 'user copy w3 => '
    rows = tokenize_capability_dataset("chat", Dataset.from_list([{"messages": convo}]), tok, max_length=None)
    assert rows[0]["input_ids"] == tok("user copy w3 => w3 w4")["input_ids"]
    scored = [
        t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"], strict=True) if label != IGNORE_INDEX
    ]
    assert tok.decode(scored).split() == ["w3", "w4"]
    bad = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "w1"}, {"role": "user", "content": "w2"}]}]
    )
    with pytest.raises(ValueError, match=r"capability_datasets\['chat'\]: column 'messages' row 0"):
        tokenize_capability_dataset("chat", bad, tok, max_length=None)
    no_template = AutoTokenizer.from_pretrained(model.config._name_or_path)
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"capability_datasets\['chat'\].*no(ne)? chat template|has none"):
        tokenize_capability_dataset(
            "chat", Dataset.from_list([{"messages": convo}]), no_template, max_length=None
        )


def _trainer(model_dir, tmp_path, caps, **overrides):
    from tiny import build_tokenizer, preference_dataset

    from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer

    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False, logging_steps=1,
        save_strategy="no", capability_batch_size=2, degradation_tracking=False, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return FrontierDPOTrainer(
        model=str(model_dir),
        args=FrontierDPOConfig(**values),
        train_dataset=preference_dataset(8),
        processing_class=build_tokenizer(),
        capability_datasets=caps,
    )


def test_trainer_completes_prompt_only_sources_once(tmp_path, monkeypatch):
    """A prompt-only capability task is completed by the trainer's own model at construction (before
    the sampler), cached: a second construction does not regenerate, a changed model does, and the
    sampler's rows are the model's own answers scored in the chat format."""
    from tiny import build_tokenizer

    monkeypatch.setenv("FRONTIER_TRAINER_CACHE", str(tmp_path / "cache"))
    calls = []
    real = self_completion.greedy_continuations
    monkeypatch.setattr(
        self_completion, "greedy_continuations", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model_dir = build_model_dir(tmp_path / "m")
    caps = {"benign": Dataset.from_list([{"prompt": p} for p in PROMPTS])}
    first = _trainer(model_dir, tmp_path, caps)
    assert len(calls) == 1
    model = first.accelerator.unwrap_model(first.model)
    tok = build_tokenizer()
    expected = []
    for prompt in PROMPTS:
        rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        expected.append(tok(rendered + _manual_greedy(model, tok, rendered, 64))["input_ids"])
    assert sorted(r["input_ids"] for r in first.capability_sampler.rows["benign"]) == sorted(expected)
    first.train()  # the completed task projects like any other
    assert first.projector.num_directions == 1
    _trainer(model_dir, tmp_path, caps)
    assert len(calls) == 1  # read back from the cache
    changed = build_model_dir(tmp_path / "m2", seed=3)
    _trainer(changed, tmp_path, caps)
    assert len(calls) == 2


def test_trainer_refuses_bad_prompt_only_sources_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("FRONTIER_TRAINER_CACHE", str(tmp_path / "cache"))
    model_dir = build_model_dir(tmp_path / "m")
    with pytest.raises(ValueError, match=r"capability_datasets\['benign'\]: row 1 has an empty 'prompt'"):
        _trainer(model_dir, tmp_path, {"benign": Dataset.from_list([{"prompt": "w1"}, {"prompt": ""}])})
    mixed = Dataset.from_list([{"prompt": "w1", "completion": " w2"}, {"prompt": "w3", "completion": ""}])
    with pytest.raises(ValueError, match=r"capability_datasets\['mixed'\].*mixes prompt-only and completed"):
        _trainer(model_dir, tmp_path, {"mixed": mixed})
