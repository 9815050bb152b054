"""Tests for frontier_trainer.directions: loading, tokenisation, sampling, metric gradients.

Every check compares against an independent computation (hand-written NLL loops, finite
differences, ``loss.backward()`` on a deep copy, a second sampler) with tiny models and a
word-level tokenizer built in code, so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import copy
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from frontier_trainer.directions import (
    IGNORE_INDEX,
    CapabilitySampler,
    build_capability_sampler,
    capability_gradients,
    completion_metric,
    deterministic_forward,
    flatten,
    list_dot,
    load_capability_source,
    parse_capability_specs,
    tokenize_capability_dataset,
    unflatten,
    validate_task_names,
)

WORDS = [f"w{i}" for i in range(40)]
VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
VOCAB_SIZE = 64


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; with ``bos=True`` its post-processor prepends ``<bos>``."""
    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", VOCAB["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>" if bos else None,
    )


def ids(*words: str) -> list[int]:
    return [VOCAB[w] for w in words]


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        **overrides,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.train()
    return model


PC_ROWS = [
    {"prompt": "w1 w2", "completion": " w3 w4"},
    {"prompt": "w5", "completion": " w6"},
    {"prompt": "w7 w8 w9", "completion": " w10 w11 w12"},
    {"prompt": "w13", "completion": " w14 w15"},
    {"prompt": "w16 w17", "completion": " w18"},
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def bos_tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(bos=True)


# --------------------------------------------------------------------------------------
# Tokenisation and masking
# --------------------------------------------------------------------------------------


def test_prompt_completion_masks_prompt(tok: PreTrainedTokenizerFast) -> None:
    rows = tokenize_capability_dataset("t", datasets.Dataset.from_list(PC_ROWS[:2]), tok, max_length=None)
    assert rows[0] == {"input_ids": ids("w1", "w2", "w3", "w4"), "labels": [-100, -100, *ids("w3", "w4")]}
    assert rows[1] == {"input_ids": ids("w5", "w6"), "labels": [-100, *ids("w6")]}


def test_bos_is_masked_with_prompt(bos_tok: PreTrainedTokenizerFast) -> None:
    rows = tokenize_capability_dataset("t", datasets.Dataset.from_list(PC_ROWS[:1]), bos_tok, None)
    assert rows[0]["input_ids"] == ids("<bos>", "w1", "w2", "w3", "w4")
    assert rows[0]["labels"] == [-100, -100, -100, *ids("w3", "w4")]
    text = tokenize_capability_dataset("t", datasets.Dataset.from_dict({"text": ["w1 w2"]}), bos_tok, None)
    assert text[0]["labels"] == ids("<bos>", "w1", "w2")  # BOS is position 0: never scored after the shift


def test_text_rows_score_everything(tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict({"text": ["w1 w2 w3", "w4 w5"]})
    rows = tokenize_capability_dataset("t", ds, tok, None)
    assert [r["labels"] for r in rows] == [ids("w1", "w2", "w3"), ids("w4", "w5")]
    assert [r["input_ids"] for r in rows] == [r["labels"] for r in rows]


def test_prefix_rule_uses_longest_common_prefix(tok: PreTrainedTokenizerFast, caplog) -> None:
    # No space at the boundary: "w1 w2" + "w3" -> "w1 w2w3" -> [w1, <unk>]: tokenizer(prompt) = [w1, w2]
    # is not a prefix, so the boundary is the common prefix (1 token) and <unk> is scored.
    ds = datasets.Dataset.from_list([{"prompt": "w1 w2", "completion": "w3 w4"}])
    with caplog.at_level(logging.WARNING, logger="frontier_trainer.directions"):
        rows = tokenize_capability_dataset("t", ds, tok, None)
    assert rows[0]["input_ids"] == ids("w1", "<unk>", "w4")
    assert rows[0]["labels"] == [-100, *ids("<unk>", "w4")]
    assert "not a prefix" in caplog.text


def test_long_rows_dropped_and_counted(tok: PreTrainedTokenizerFast, caplog) -> None:
    ds = datasets.Dataset.from_list(PC_ROWS)
    with caplog.at_level(logging.WARNING, logger="frontier_trainer.directions"):
        rows = tokenize_capability_dataset("code", ds, tok, max_length=4)
    lengths = [len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in PC_ROWS]
    assert len(rows) == sum(n <= 4 for n in lengths) == 4
    assert "dropped 1 of 5" in caplog.text and "'code'" in caplog.text


def test_masked_nll_matches_hand_computation(tok: PreTrainedTokenizerFast) -> None:
    rows = tokenize_capability_dataset("t", datasets.Dataset.from_list(PC_ROWS), tok, None)
    sampler = CapabilitySampler({"t": rows}, batch_size=5, pad_token_id=tok.pad_token_id)
    batch = sampler.next_batch("t")
    model = make_model(torch.float64)
    value = completion_metric(model, batch)

    # Independent: each row alone, unpadded, scoring the completion tokens by explicit indexing.
    total, count = 0.0, 0
    with torch.no_grad():
        for row in PC_ROWS:
            p_ids = tok(row["prompt"])["input_ids"]
            full = tok(row["prompt"] + row["completion"])["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0], dim=-1)
            for t in range(len(p_ids), len(full)):
                total -= logp[t - 1, full[t]].item()
                count += 1
    assert count == 9
    assert value.item() == pytest.approx(-total / count, rel=1e-10)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_empty_dataset_raises(tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match=r"'math'.*empty"):
        tokenize_capability_dataset("math", ds, tok, 32)


def test_missing_columns_raise(tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["w1"], "answer": ["w2"]})
    with pytest.raises(ValueError, match=r"'math'.*\['completion'\].*Found columns: \['prompt', 'answer'\]"):
        tokenize_capability_dataset("math", ds, tok, 32)


def test_non_string_values_raise(tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["w1", None], "completion": [" w2", " w3"]})
    with pytest.raises(ValueError, match=r"'math'.*'prompt' row 1"):
        tokenize_capability_dataset("math", ds, tok, 32)


def test_all_rows_too_long_raises(tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_list([PC_ROWS[0], PC_ROWS[2], PC_ROWS[3]])  # 4, 6 and 3 tokens
    with pytest.raises(ValueError, match=r"'code'.*capability_max_length=2"):
        tokenize_capability_dataset("code", ds, tok, max_length=2)


def test_nothing_to_score_raises(tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_list([{"prompt": "w1 w2", "completion": ""}])
    with pytest.raises(ValueError, match=r"'qa'.*'completion'"):
        tokenize_capability_dataset("qa", ds, tok, None)


def test_duplicate_tasks_raise(tok: PreTrainedTokenizerFast) -> None:
    assert validate_task_names(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"'a' is named more than once"):
        validate_task_names(["a", "b", "a"])
    with pytest.raises(ValueError, match=r"'code' is named more than once"):
        parse_capability_specs(["code=x.jsonl", "math=y.csv", "code=z.jsonl"])
    ds = datasets.Dataset.from_list(PC_ROWS)
    with pytest.raises(ValueError, match=r"'code' is named more than once"):
        build_capability_sampler([("code", ds), ("code", ds)], tok, 32)
    assert parse_capability_specs(["a=p=q.jsonl"]) == {"a": "p=q.jsonl"}
    with pytest.raises(ValueError, match="task=source"):
        parse_capability_specs(["nosource"])


def test_missing_local_path_and_offline_hub_name(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'code'.*does not exist"):
        load_capability_source("code", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"'code'.*does not exist"):
        load_capability_source("code", str(tmp_path / "missing_dir"))
    with pytest.raises(ValueError, match=r"'math'.*hub"):
        load_capability_source("math", "no-such-org/no-such-dataset")
    bad = tmp_path / "data.txt"
    bad.write_text("w1 w2\n")
    with pytest.raises(ValueError, match=r"'code'.*format"):
        load_capability_source("code", str(bad))


def test_build_sampler_errors_name_the_task(tmp_path, tok: PreTrainedTokenizerFast) -> None:
    good = datasets.Dataset.from_list(PC_ROWS)
    bad = datasets.Dataset.from_dict({"question": ["w1"]})
    with pytest.raises(ValueError, match=r"'trivia'.*missing column"):
        build_capability_sampler({"code": good, "trivia": bad}, tok, 32)


# --------------------------------------------------------------------------------------
# Loading files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved", "saved_dict", "data_dir"])
def test_load_local_sources(tmp_path, kind: str, tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_list(PC_ROWS)
    if kind == "jsonl":
        path = tmp_path / "cap.jsonl"
        ds.to_json(path, lines=True)
    elif kind == "json":
        path = tmp_path / "cap.json"
        ds.to_json(path, lines=False)
    elif kind == "csv":
        path = tmp_path / "cap.csv"
        ds.to_csv(path, index=False)
    elif kind == "parquet":
        path = tmp_path / "cap.parquet"
        ds.to_parquet(path)
    elif kind == "saved":
        path = tmp_path / "saved"
        ds.save_to_disk(path)
    elif kind == "saved_dict":
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(path)
    else:
        path = tmp_path / "data_dir"
        path.mkdir()
        ds.to_json(path / "train.jsonl", lines=True)
    loaded = load_capability_source("code", str(path))
    assert isinstance(loaded, datasets.Dataset)
    assert loaded.to_list() == PC_ROWS
    sampler = build_capability_sampler({"code": str(path)}, tok, 32, batch_size=2)
    assert sampler.rows["code"] == tokenize_capability_dataset("code", ds, tok, 32)


def test_saved_dict_missing_split(tmp_path) -> None:
    path = tmp_path / "saved_dict"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(PC_ROWS)}).save_to_disk(path)
    with pytest.raises(ValueError, match=r"'code'.*no split 'train'.*\['test'\]"):
        load_capability_source("code", str(path))
    assert len(load_capability_source("code", str(path), split="test")) == len(PC_ROWS)


def test_dataset_passes_through() -> None:
    ds = datasets.Dataset.from_list(PC_ROWS)
    assert load_capability_source("code", ds) is ds


# --------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------


def _toy_rows(n: int, offset: int = 0) -> list[dict[str, list[int]]]:
    return [
        {"input_ids": [offset + i] * (1 + i % 3 + 1), "labels": [offset + i] * (1 + i % 3 + 1)}
        for i in range(n)
    ]


def _draw(sampler: CapabilitySampler, schedule: list[str]) -> list[dict[str, torch.Tensor]]:
    return [sampler.next_batch(task) for task in schedule]


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


SCHEDULE = ["a", "b", "a", "a", "b", "a", "b", "b", "a", "a", "a", "b", "a"]


def test_sampler_identical_across_independent_instances() -> None:
    rows = {"a": _toy_rows(7), "b": _toy_rows(4, offset=20)}
    rank0 = CapabilitySampler(rows, batch_size=3, seed=11)
    rank1 = CapabilitySampler({"b": rows["b"], "a": rows["a"]}, batch_size=3, seed=11)  # task order differs
    assert _equal(_draw(rank0, SCHEDULE), _draw(rank1, SCHEDULE))
    other_seed = CapabilitySampler(rows, batch_size=3, seed=12)
    assert not _equal(
        _draw(CapabilitySampler(rows, batch_size=3, seed=11), SCHEDULE), _draw(other_seed, SCHEDULE)
    )


def test_sampler_epochs_are_permutations_without_repeats() -> None:
    rows = {"a": _toy_rows(7)}
    sampler = CapabilitySampler(rows, batch_size=3, seed=0)
    epochs = []
    for _ in range(4):  # 7 rows, batch 3 -> 2 batches per epoch, one row left out (drop-last)
        first, second = sampler.next_indices("a"), sampler.next_indices("a")
        drawn = first + second
        assert len(set(drawn)) == 6 and set(drawn) <= set(range(7))
        epochs.append(drawn)
    assert len({tuple(e) for e in epochs}) > 1  # a new permutation each epoch
    assert sampler.state_dict()["tasks"]["a"] == {"epoch": 3, "cursor": 6, "num_rows": 7}


def test_sampler_small_task_uses_all_rows() -> None:
    sampler = CapabilitySampler({"a": _toy_rows(2)}, batch_size=8)
    assert sorted(sampler.next_indices("a")) == [0, 1]
    assert sampler.next_batch("a")["input_ids"].shape[0] == 2


def test_sampler_resume_continues_exactly() -> None:
    rows = {"a": _toy_rows(7), "b": _toy_rows(4, offset=20)}
    uninterrupted = CapabilitySampler(rows, batch_size=3, seed=5)
    full = _draw(uninterrupted, SCHEDULE)

    first = CapabilitySampler(rows, batch_size=3, seed=5)
    head = _draw(first, SCHEDULE[:6])
    state = first.state_dict()
    path_state = copy.deepcopy(state)
    resumed = CapabilitySampler(rows, batch_size=3, seed=999)  # the checkpoint's seed wins
    resumed.load_state_dict(path_state)
    tail = _draw(resumed, SCHEDULE[6:])
    assert _equal(head + tail, full)


def test_sampler_state_survives_torch_save(tmp_path) -> None:
    rows = {"a": _toy_rows(5)}
    sampler = CapabilitySampler(rows, batch_size=2, seed=1)
    _draw(sampler, ["a"] * 3)
    torch.save(sampler.state_dict(), tmp_path / "s.pt")
    restored = CapabilitySampler(rows, batch_size=2, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert _equal(_draw(sampler, ["a"] * 4), _draw(restored, ["a"] * 4))


def test_collate_right_pads() -> None:
    rows = {
        "a": [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    }
    batch = CapabilitySampler(rows, batch_size=2, pad_token_id=0).collate("a", [1, 0])
    assert batch["input_ids"].tolist() == [[8, 9, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 9, IGNORE_INDEX], [-100, 6, 7]]


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(tok: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    rows = tokenize_capability_dataset("t", datasets.Dataset.from_list(PC_ROWS), tok, None)
    return CapabilitySampler({"t": rows}, batch_size=4, seed=3, pad_token_id=tok.pad_token_id).next_batch("t")


def _rms_norm_in_input_dtype(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm without its float32 upcast, so a float64 model is float64 end to end."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_gradient_matches_finite_differences(batch: dict[str, torch.Tensor], monkeypatch) -> None:
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    model = make_model(torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    value, grads = capability_gradients(model, params, batch)
    assert value.item() == pytest.approx(completion_metric(model, batch).item(), rel=1e-12)

    generator = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    eps = 1e-5
    model.eval()
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(d, alpha=eps)
        plus = completion_metric(model, batch).item()
        for p, d in zip(params, direction, strict=True):
            p.add_(d, alpha=-2 * eps)
        minus = completion_metric(model, batch).item()
    numeric = (plus - minus) / (2 * eps)
    assert list_dot(grads, direction).item() == pytest.approx(numeric, rel=1e-6)


def test_gradient_matches_backward_and_leaves_grad_untouched(batch: dict[str, torch.Tensor]) -> None:
    model = make_model()
    reference = copy.deepcopy(model)
    reference.eval()
    (-completion_metric(reference, batch)).backward()  # independent: backward of -f on a copy

    params = list(model.parameters())
    generator = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):  # accumulated grads on some params, None on others
        p.grad = torch.randn(p.shape, generator=generator) if i % 2 == 0 else None
    before = [None if p.grad is None else p.grad.clone() for p in params]
    _, grads = capability_gradients(model, params, batch)
    for p, old in zip(params, before, strict=True):
        assert (p.grad is None) if old is None else torch.equal(p.grad, old)
    for g, p_ref in zip(grads, reference.parameters(), strict=True):
        torch.testing.assert_close(g, -p_ref.grad, rtol=1e-5, atol=1e-7)
    assert model.training


def test_unused_parameter_gets_zeros(batch: dict[str, torch.Tensor]) -> None:
    model = make_model()
    extra = torch.nn.Parameter(torch.ones(3))
    _, grads = capability_gradients(model, [model.lm_head.weight, extra], batch)
    assert torch.equal(grads[1], torch.zeros(3)) and grads[0].abs().sum() > 0


def test_frozen_parameter_rejected(batch: dict[str, torch.Tensor]) -> None:
    model = make_model()
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        capability_gradients(model, list(model.parameters()), batch)


def test_custom_metric(batch: dict[str, torch.Tensor]) -> None:
    model = make_model()

    def logit_mean(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.mean()

    value, grads = capability_gradients(model, [model.lm_head.weight], batch, metric=logit_mean)
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    # d mean(h W^T) / dW = mean over positions of h, broadcast to every vocab row, / vocab size.
    expected = hidden.reshape(-1, hidden.shape[-1]).mean(0).expand(VOCAB_SIZE, -1) / VOCAB_SIZE
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-7)
    assert value.requires_grad is False


def test_gradient_checkpointing_equal_and_active(batch: dict[str, torch.Tensor]) -> None:
    plain = make_model()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layer = ckpt.model.layers[0]
    calls = []
    inner = layer._gradient_checkpointing_func

    def spy(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    layer._gradient_checkpointing_func = spy
    v_plain, g_plain = capability_gradients(plain, list(plain.parameters()), batch)
    v_ckpt, g_ckpt = capability_gradients(ckpt, list(ckpt.parameters()), batch)
    assert calls, "checkpointing must stay active while the direction is computed"
    torch.testing.assert_close(v_ckpt, v_plain, rtol=0, atol=0)
    for a, b in zip(g_ckpt, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert ckpt.training and layer.training and layer.self_attn.training


def test_dropout_off_and_modes_restored(batch: dict[str, torch.Tensor]) -> None:
    model = make_model(attention_dropout=0.5)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    modes = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(0)
    _, first = capability_gradients(model, list(model.parameters()), batch)
    torch.manual_seed(1)
    _, second = capability_gradients(model, list(model.parameters()), batch)
    reference = copy.deepcopy(model).eval()
    _, expected = capability_gradients(reference, list(reference.parameters()), batch, deterministic=False)
    for a, b, c in zip(first, second, expected, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8)
    assert {name: m.training for name, m in model.named_modules()} == modes
    # Sanity: with dropout on, two evaluations differ (the test above could otherwise pass vacuously).
    torch.manual_seed(0)
    v0 = completion_metric(model, batch)
    torch.manual_seed(1)
    assert completion_metric(model, batch).item() != v0.item()
    with deterministic_forward(model):
        assert model.model.layers[0].training and not model.model.layers[0].self_attn.training


def test_lora_gradients_only_for_adapters(batch: dict[str, torch.Tensor]) -> None:
    peft = pytest.importorskip("peft")
    base = make_model()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B so that A's gradient is informative too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert named and all("lora_" in n for n, _ in named)
    _, grads = capability_gradients(model, [p for _, p in named], batch)

    reference = copy.deepcopy(model).eval()
    (-completion_metric(reference, batch)).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for (name, _), g in zip(named, grads, strict=True):
        torch.testing.assert_close(g, -ref_grads[name], rtol=1e-5, atol=1e-8)
        assert g.abs().sum() > 0
    assert all(p.grad is None for _, p in model.named_parameters())


# --------------------------------------------------------------------------------------
# Vector helpers
# --------------------------------------------------------------------------------------


def test_list_dot_and_flatten_roundtrip() -> None:
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    b = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    expected = sum(float(x) * float(y) for x, y in zip(flatten(a).tolist(), flatten(b).tolist(), strict=True))
    assert list_dot(a, b).item() == pytest.approx(expected, rel=1e-12)
    back = unflatten(flatten(a), a)
    assert all(torch.equal(x, y) for x, y in zip(back, a, strict=True))
