"""Memory of activation-subspace protection against gradient mode and NSPO's dense projectors.

Shapes only: each model is built on the ``meta`` device from the architecture configs in
``recipes/models/`` (SmolLM2-135M, Qwen2.5-0.5B, Llama-3.1-8B), so nothing is downloaded and no
weight is allocated. For each model, full fine-tuning and LoRA (the recipes' r = 16 on every
block linear), and each activation_rank r:

* activation: the bases Σ_groups r·d_in (float64; q/k/v and gate/up share one basis) plus the
  float64 step images Σ_modules r·d_out held across one optimizer step
  (``frontier_trainer.activation.activation_memory``; an upper bound, since the energy rule may
  keep fewer than r directions);
* refresh: the float64 covariance of the largest input group (the floor with one group per
  pass) and of all groups in one pass;
* gradient: (k+1) × the trainable bytes, k capability directions (UpdateProjector);
* NSPO dense: Σ d_in² fp32 over the same modules.

    python -m benchmarks.activation_memory [--ranks 16 64 256] [--directions 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from frontier_trainer.activation import activation_memory

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "recipes" / "models"
MODELS = {
    "smollm2-135m": "smollm2-135m-instruct.json",
    "qwen2.5-0.5b": "qwen2.5-0.5b-instruct.json",
    "llama-3.1-8b": "llama-3.1-8b-instruct.json",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_config(name: str) -> PretrainedConfig:
    """The architecture config from recipes/models/, or SmolLM2's shapes built by hand."""
    path = MODELS_DIR / MODELS[name]
    if path.exists():
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
        data.pop("architectures", None)
        return AutoConfig.for_model(model_type, **data)
    if name != "smollm2-135m":
        raise FileNotFoundError(path)
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    )


def measure(name: str, ranks: list[int], directions: int, lora_r: int) -> list[dict]:
    config = load_config(name)
    rows = []
    for mode in ("full", "lora"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            if mode == "lora":
                model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=LORA_TARGETS))
        for rank in ranks:
            m = activation_memory(model, rank=rank, num_directions=directions)
            rows.append({"model": name, "mode": mode, "rank": rank, "directions": directions, **m})
    return rows


def gib(n: int) -> str:
    return f"{n / 2**30:9.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--directions", type=int, default=2, help="k capability directions in gradient mode")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = [row for name in args.models for row in measure(name, args.ranks, args.directions, args.lora_r)]
    header = (
        f"{'model':14} {'mode':5} {'r':>4} | {'activation':>9} {'refresh':>9} {'1-pass':>9} | "
        f"{'gradient':>9} {'nspo':>9} {'trainable':>9}   (GiB)"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['model']:14} {row['mode']:5} {row['rank']:>4} | {gib(row['activation_total'])} "
            f"{gib(row['activation_refresh'])} {gib(row['activation_refresh_one_pass'])} | "
            f"{gib(row['gradient'])} {gib(row['nspo_dense'])} {gib(row['trainable'])}"
        )
    print("\n".join(lines))  # the CLI's final table
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
