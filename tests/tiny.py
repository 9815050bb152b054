"""A tiny word-level Llama and datasets for trainer tests: built in a second, fully offline."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(40)] + ["refuse", "sorry", "copy", "count", "=>", "harm"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}=> {% endif %}"
    )
    return tok


def build_model_dir(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a random tiny Llama and its tokenizer to ``path`` (TRL reloads the reference from it)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def preference_rows(n: int = 16) -> list[dict[str, str]]:
    return [
        {"prompt": f"harm w{i % 10} w{(i * 3) % 10} =>", "chosen": " sorry refuse", "rejected": f" w{i % 7} w{i % 5}"}
        for i in range(n)
    ]


def preference_dataset(n: int = 16) -> Dataset:
    return Dataset.from_list(preference_rows(n))


def capability_datasets() -> dict[str, Dataset]:
    copy = [{"prompt": f"copy w{i} w{i + 1} =>", "completion": f" w{i} w{i + 1}"} for i in range(20)]
    count = [{"prompt": f"count w{i} =>", "completion": f" w{i + 1} w{i + 2} w{i + 3}"} for i in range(20)]
    return {"copy": Dataset.from_list(copy), "count": Dataset.from_list(count)}
