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
    python -m benchmarks.activation_memory --time smollm2-135m --ranks 16 64   # CPU timings

``--lab MODEL_DIR`` runs a small protection check on a pretrained lab model: supervised steps on
the refusal completions of the lab's harmful prompts (AdamW, lr 1e-3, batch 8), vanilla against
activation-projected (bases refreshed every 10 steps from 2 batches of 8 rows per task), and
reports each capability task's NLL change on its eval split.

``--time MODEL`` also builds that model with random fp32 weights on the CPU and measures, per
rank, one refresh on two random 2 × 192 capability batches (the smollm2 recipe's capability batch
shape) and one projected step (before_step + after_step around a random update of every weight,
lr 1e-4 scale), with the realised ‖ΔW U‖ / ‖ΔW‖ (max over modules) read back from the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from frontier_trainer.activation import ActivationProjector, activation_memory

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


@torch.no_grad()
def time_projection(name: str, ranks: list[int], seed: int = 0) -> list[dict]:
    """Wall-clock seconds of a refresh and of one projected step on CPU, random weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(load_config(name), dtype=torch.float32)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(2):
        ids = torch.randint(3, vocab, (2, 192))
        mask = torch.ones_like(ids)
        mask[1, 150:] = 0  # right padding on one row
        batches.append({"input_ids": ids, "attention_mask": mask})
    rows = []
    for rank in ranks:
        projector = ActivationProjector(model, rank=rank, energy=0.99)
        start = time.perf_counter()
        projector.refresh(batches)
        refresh_s = time.perf_counter() - start
        weights = [e.params[0] for e in projector.entries if e.kind == "linear"]
        old = [w.detach().clone() for w in weights]
        start = time.perf_counter()
        projector.before_step()
        before_s = time.perf_counter() - start
        for w in weights:  # stands in for optimizer.step()
            w.add_(torch.randn_like(w), alpha=1e-4)
        start = time.perf_counter()
        projector.after_step()
        step_s = before_s + time.perf_counter() - start
        ratio = 0.0
        for entry, w0 in zip([e for e in projector.entries if e.kind == "linear"], old, strict=True):
            dW = (entry.params[0].detach() - w0).double()
            U = projector.bases[entry.group].double()
            ratio = max(ratio, float((dW @ U).norm() / dW.norm()))
            entry.params[0].copy_(w0)
        ranks_kept = sorted(set(projector.ranks().values()))
        rows.append({"model": name, "rank": rank, "refresh_s": refresh_s, "step_s": step_s, "ratio": ratio,
                     "passes": projector.refresh_passes, "ranks_kept": [ranks_kept[0], ranks_kept[-1]]})
        logger.warning("%s r=%d: refresh %.1fs, step %.1fs, ratio %.2e", name, rank, refresh_s, step_s, ratio)
    return rows


def lab_check(model_dir: str, ranks: list[int], steps: int = 30, seed: int = 0) -> list[dict]:
    """Capability NLL change per lab task after ``steps`` refusal-SFT steps, vanilla vs activation."""
    from datasets import Dataset

    from frontier_trainer.directions import build_capability_sampler, completion_metric
    from frontier_trainer.lab import data as lab_data
    from frontier_trainer.lab.pretraining import load

    _, tokenizer = load(model_dir)
    prefs = lab_data.preference_dataset("train")
    safety = build_capability_sampler(
        {"safety": Dataset.from_dict({"prompt": prefs["prompt"], "completion": prefs["chosen"]})},
        tokenizer, max_length=64, batch_size=8, seed=seed,
    )
    train_caps = build_capability_sampler(lab_data.capability_datasets("train"), tokenizer, 64, 8, seed)
    eval_caps = build_capability_sampler(lab_data.capability_datasets("eval"), tokenizer, 64, 64, seed)
    eval_batches = {t: eval_caps.next_batch(t) for t in eval_caps.tasks}

    def nll(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            model.eval()
            out = {t: -float(completion_metric(model, b)) for t, b in eval_batches.items()}
            model.train()
        return out

    rows = []
    for rank in [0, *ranks]:  # 0: vanilla
        torch.manual_seed(seed)
        model, _ = load(model_dir)
        model.train()
        start = nll(model)
        refusal_start = -float(completion_metric(model, safety.collate("safety", list(range(32)))))
        projector = ActivationProjector(model, rank=rank, energy=0.99) if rank else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        safety.load_state_dict({**safety.state_dict(), "tasks": {"safety": {"epoch": 0, "cursor": 0,
                                                                              "num_rows": len(safety.rows["safety"])}}})
        train_caps.load_state_dict({**train_caps.state_dict(), "tasks": {
            t: {"epoch": 0, "cursor": 0, "num_rows": len(train_caps.rows[t])} for t in train_caps.tasks}})
        for step in range(steps):
            if projector is not None and step % 10 == 0:
                projector.refresh([train_caps.next_batch(t) for t in train_caps.tasks for _ in range(2)])
            batch = safety.next_batch("safety")
            (-completion_metric(model, batch)).backward()
            if projector is not None:
                projector.before_step()
            optimizer.step()
            if projector is not None:
                projector.after_step()
            optimizer.zero_grad()
        end = nll(model)
        refusal = -float(completion_metric(model, safety.collate("safety", list(range(32)))))
        kept = sorted(set(projector.ranks().values())) if projector else [0]
        rows.append({"rank": rank, "seed": seed, "refusal_nll_start": refusal_start, "refusal_nll": refusal, "kept": [kept[0], kept[-1]],
                     **{f"dnll/{t}": end[t] - start[t] for t in start}})
        logger.warning("lab r=%d: %s", rank, rows[-1])
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
    parser.add_argument("--lab", default=None, help="a pretrained lab model directory: run the protection check")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="--lab: data-order seeds")
    parser.add_argument("--time", choices=list(MODELS), default=None, help="also time refresh and step on CPU")
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
    timings = time_projection(args.time, args.ranks) if args.time else []
    for row in timings:
        lines.append(
            f"time {row['model']} r={row['rank']}: refresh {row['refresh_s']:.1f} s ({row['passes']} pass), "
            f"projected step {row['step_s']:.2f} s (before+after), kept r in {row['ranks_kept']}, "
            f"max ‖ΔW U‖/‖ΔW‖ = {row['ratio']:.2e}"
        )
    lab = [row for seed in args.seeds for row in lab_check(args.lab, args.ranks, seed=seed)] if args.lab else []
    for row in lab:
        name = "vanilla" if row["rank"] == 0 else f"activation r={row['rank']} (kept {row['kept']})"
        changes = ", ".join(f"{k[5:]} {v:+.3f}" for k, v in row.items() if k.startswith("dnll/"))
        lines.append(
            f"lab seed {row['seed']} {name}: refusal NLL {row['refusal_nll_start']:.3f} -> {row['refusal_nll']:.3f}; "
            f"capability NLL change: {changes}"
        )
    print("\n".join(lines))  # the CLI's final table
    if args.json is not None:
        args.json.write_text(json.dumps({"memory": rows, "timings": timings, "lab": lab}, indent=2))


if __name__ == "__main__":
    main()
