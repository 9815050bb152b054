"""GPU cost of FrontierDPOTrainer against vanilla trl.DPOTrainer, side by side in one process.

Model: a randomly initialised Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads,
3 kv heads, intermediate 1536, vocab 49152, tied embeddings; weights do not matter for timing,
nothing is downloaded) loaded in fp32 and trained with ``bf16=True`` autocast; a word-level
tokenizer with one token per word makes sequence lengths exact. Synthetic preference rows:
prompt 192–320 tokens, chosen/rejected 96–192 each (≤ 512 tokens a sequence), batch 8; two
capability tasks (prompt 128–256 + completion 64–128 tokens, 8 rows per direction, the config
default). Full fine-tuning and LoRA (r 16 on every linear layer of the blocks); null space with
directions refreshed every step and every 10 steps. Degradation tracking off (it is a separate
feature; this measures the projection).

Per run: amortised (mean) step time = mean interval between consecutive ``on_step_end`` with
``torch.cuda.synchronize()`` (data loading, logging, refreshes included) after warm-up steps;
refresh time and the projection's time on the GPU timeline (CUDA events around the projector's
``before_step``/``after_step`` during training); an isolated, synchronised projection timing on
the real parameter set after training; ``torch.cuda.max_memory_allocated`` over the run; the
projection state bytes (snapshot + k directions) against the trainable bytes. Runs are
interleaved (vanilla, null space r1, null space r10, repeated).

Run on the GPU:  ``python benchmarks/gpu_benchmark.py --output-dir benchmarks/results/gpu``
Quick CPU smoke: ``.venv/bin/python benchmarks/gpu_benchmark.py --device cpu --quick --output-dir /tmp/gb``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
QUICK = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


# --------------------------------------------------------------------------------------
# model, tokenizer, data
# --------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model_dir(path: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(pad_token_id=0, eos_token_id=1, bos_token_id=1, **shape)
    LlamaForCausalLM(config).save_pretrained(path)  # fp32: master weights for bf16 autocast
    build_tokenizer(shape["vocab_size"]).save_pretrained(path)
    return path


def words(rng: random.Random, vocab: int, lo: int, hi: int) -> str:
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(rng.randint(lo, hi)))


def preference_data(n: int, vocab: int, lengths: dict[str, tuple[int, int]], seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = [
        {
            "prompt": words(rng, vocab, *lengths["prompt"]),
            # trailing space: TRL appends the eos *string*, keep it a separate word
            "chosen": " " + words(rng, vocab, *lengths["completion"]) + " ",
            "rejected": " " + words(rng, vocab, *lengths["completion"]) + " ",
        }
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def capability_data(
    n: int, vocab: int, lengths: dict[str, tuple[int, int]], seed: int = 1
) -> dict[str, Dataset]:
    out = {}
    for t, task in enumerate(("task_a", "task_b")):
        rng = random.Random(seed * 1000 + t)
        rows = [
            {
                "prompt": words(rng, vocab, *lengths["cap_prompt"]),
                "completion": " " + words(rng, vocab, *lengths["cap_completion"]),
            }
            for _ in range(n)
        ]
        out[task] = Dataset.from_list(rows)
    return out


# --------------------------------------------------------------------------------------
# instrumentation
# --------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Synchronised wall time at every optimizer step's end (intervals = amortised step time)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ends: list[float] = []
        self.begin_to_end: list[float] = []
        self._begin = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self.ends.append(time.perf_counter())

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        now = time.perf_counter()
        self.ends.append(now)
        self.begin_to_end.append(now - self._begin)


class _Span:
    """A region timed on the GPU timeline by CUDA events (no synchronisation), or by the host."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.pending: list[tuple[Any, Any]] = []
        self.host: list[float] = []

    def run(self, fn, *args, **kwargs):
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.pending.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.host.append(time.perf_counter() - t0)
        return out

    def seconds(self) -> list[float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self.pending]
        return list(self.host)


class TimedFrontier(FrontierDPOTrainer):
    """FrontierDPOTrainer whose refresh and projector hooks are timed on the GPU timeline."""

    def _setup_timing(self, device: str) -> None:
        self.t_refresh, self.t_before, self.t_after = _Span(device), _Span(device), _Span(device)
        proj = self.projector
        before, after = proj.before_step, proj.after_step
        proj.before_step = lambda: self.t_before.run(before)
        proj.after_step = lambda measure=False: self.t_after.run(after, measure=measure)

    def refresh_directions(self) -> None:
        self.t_refresh.run(super().refresh_directions)


def isolated_projection(trainer: FrontierDPOTrainer, device: str, repeats: int) -> dict[str, float]:
    """Synchronised timing of the projection alone on the trained parameters: snapshot, a
    stand-in optimizer displacement, then the Gram/coefficients/write (and the leak pass)."""
    proj = trainer.projector
    params = proj.params
    saved = [p.detach().clone() for p in params]
    noise = [torch.randn_like(p) * 1e-4 for p in params]
    out: dict[str, list[float]] = {"before_step": [], "after_step": [], "after_step_measure": []}
    with torch.no_grad():
        for i in range(repeats + 2):
            for measure in (False, True):
                _sync(device)
                t0 = time.perf_counter()
                proj.before_step()
                _sync(device)
                t1 = time.perf_counter()
                for p, n in zip(params, noise, strict=True):
                    p.add_(n)
                _sync(device)
                t2 = time.perf_counter()
                proj.after_step(measure=measure)
                _sync(device)
                t3 = time.perf_counter()
                if i >= 2:  # warm-up
                    if not measure:
                        out["before_step"].append(t1 - t0)
                    out["after_step_measure" if measure else "after_step"].append(t3 - t2)
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return {k: statistics.fmean(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------


def run_one(
    method: str, lora: bool, model_dir: Path, data: dict[str, Any], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    device = args.device
    total_steps = args.warmup + args.steps
    clock = StepClock(device)
    base = dict(
        output_dir=str(tmp / "out"),
        max_steps=total_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=args.max_length,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=True,
        activation_checkpointing=False,
        logging_steps=args.logging_steps,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs: dict[str, Any] = dict(
        train_dataset=data["prefs"], processing_class=data["tok"], callbacks=[clock]
    )
    if lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
    _free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    if method == "vanilla":
        trainer: DPOTrainer = DPOTrainer(model=str(model_dir), args=DPOConfig(**base), **kwargs)
    else:
        refresh = int(method.split("_r")[1])
        trainer = TimedFrontier(
            model=str(model_dir),
            args=FrontierDPOConfig(
                **base,
                projection="nullspace",
                capability_refresh_steps=refresh,
                capability_batch_size=args.capability_batch_size,
                capability_max_length=args.max_length,
                degradation_tracking=False,
            ),
            capability_datasets=data["caps"],
            **kwargs,
        )
        trainer._setup_timing(device)
    start = time.perf_counter()
    trainer.train()
    _sync(device)
    wall = time.perf_counter() - start
    intervals = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    timed = intervals[args.warmup :]
    params = [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]
    record: dict[str, Any] = {
        "method": method,
        "lora": lora,
        "steps_timed": len(timed),
        "step_mean_s": statistics.fmean(timed),
        "step_median_s": statistics.median(timed),
        "step_min_s": min(timed),
        "step_max_s": max(timed),
        "step_begin_to_end_mean_s": statistics.fmean(clock.begin_to_end[args.warmup :]),
        "train_wall_s": wall,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in params),
        "trainable_dtypes": sorted({str(p.dtype) for p in params}),
    }
    if device == "cuda":
        record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        record["allocated_before_bytes"] = mem_before
    if isinstance(trainer, TimedFrontier):
        # the timed window: steps warmup+1..total (refreshes at global steps divisible by r)
        before, after, refresh_t = (
            trainer.t_before.seconds(),
            trainer.t_after.seconds(),
            trainer.t_refresh.seconds(),
        )
        proj = [b + a for b, a in zip(before, after, strict=True)]
        logged = [
            h["frontier/projection_seconds"]
            for h in trainer.state.log_history
            if "frontier/projection_seconds" in h
        ]
        logged_leak = [h[k] for h in trainer.state.log_history for k in h if k.startswith("frontier/leak/")]
        record.update(
            projection_gpu_mean_s=statistics.fmean(proj[args.warmup :]),
            projection_gpu_snapshot_mean_s=statistics.fmean(before[args.warmup :]),
            projection_gpu_after_mean_s=statistics.fmean(after[args.warmup :]),
            refresh_count=len(refresh_t),
            refresh_mean_s=statistics.fmean(refresh_t[1:] or refresh_t),
            refresh_first_s=refresh_t[0],
            projection_host_logged_mean_s=statistics.fmean(logged) if logged else None,
            k=trainer.projector.num_directions,
            held_bytes=trainer.projector.extra_memory_bytes(),
            peak_state_bytes=trainer.peak_state_bytes,
            max_logged_leak=max(logged_leak) if logged_leak else None,
        )
        record["isolated_projection_s"] = isolated_projection(trainer, device, args.isolated_repeats)
    del trainer
    _free(device)
    return record


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    rows = []
    for lora in (False, True):
        group = [r for r in runs if r["lora"] == lora]
        if not group:
            continue
        vanilla = [r for r in group if r["method"] == "vanilla"]
        v_mean = statistics.fmean(r["step_mean_s"] for r in vanilla)
        v_peak = max(r.get("peak_allocated_bytes", 0) for r in vanilla)
        for method in dict.fromkeys(r["method"] for r in group):
            rs = [r for r in group if r["method"] == method]
            mean = statistics.fmean(r["step_mean_s"] for r in rs)
            row: dict[str, Any] = {
                "setting": "LoRA" if lora else "full",
                "method": method,
                "repeats": len(rs),
                "step_mean_s": mean,
                "step_mean_per_repeat_s": [r["step_mean_s"] for r in rs],
                "step_median_s": statistics.fmean(r["step_median_s"] for r in rs),
                "ratio_vs_vanilla": mean / v_mean,
                "trainable_bytes": rs[0]["trainable_bytes"],
            }
            if device == "cuda":
                peak = max(r["peak_allocated_bytes"] for r in rs)
                row.update(peak_allocated_bytes=peak, extra_peak_bytes=peak - v_peak)
                row["extra_peak_over_trainable_bytes"] = (peak - v_peak) / rs[0]["trainable_bytes"]
            if method != "vanilla":
                iso = rs[-1]["isolated_projection_s"]
                row.update(
                    k=rs[0]["k"],
                    projection_gpu_s=statistics.fmean(r["projection_gpu_mean_s"] for r in rs),
                    projection_isolated_s=iso["before_step"] + iso["after_step"],
                    projection_isolated_measure_s=iso["before_step"] + iso["after_step_measure"],
                    projection_host_logged_s=statistics.fmean(
                        [r["projection_host_logged_mean_s"] or 0.0 for r in rs]
                    ),
                    refresh_s=statistics.fmean(r["refresh_mean_s"] for r in rs),
                    held_bytes=rs[0]["held_bytes"],
                    peak_state_bytes=max(r["peak_state_bytes"] for r in rs),
                    state_over_trainable=max(r["peak_state_bytes"] for r in rs) / rs[0]["trainable_bytes"],
                    max_logged_leak=max(r["max_logged_leak"] or 0.0 for r in rs),
                )
                row["projection_share_gpu"] = row["projection_gpu_s"] / mean
                row["projection_share_isolated"] = row["projection_isolated_s"] / mean
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"GPU benchmark on {m.get('gpu') or m['device']} (torch {m['torch']}, transformers {m['versions']['transformers']}, "
        f"trl {m['versions']['trl']}): random Llama of SmolLM2-135M's shape ({result['model_params'] / 1e6:.2f}M params), "
        f"bf16 autocast over fp32 weights, batch {s['batch_size']}, sequences ≤ {s['max_length']} tokens "
        f"(mean {result['mean_tokens_per_sequence']:.0f}), 2 capability tasks × {s['capability_batch_size']} rows, "
        f"{s['warmup']} warm-up + {s['steps']} timed steps × {s['repeats']} interleaved repeats, logging every "
        f"{s['logging_steps']} steps.",
        "",
        "| setting | method | mean step | ratio vs vanilla | projection (GPU timeline) | share | projection (isolated, sync) "
        "| share | refresh | peak CUDA mem | extra vs vanilla | extra / trainable | state held / trainable |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gib = 2**30
    for r in result["summary"]:
        peak = f"{r['peak_allocated_bytes'] / gib:.2f} GiB" if "peak_allocated_bytes" in r else "n/a"
        extra = f"{r['extra_peak_bytes'] / gib:+.2f} GiB" if "extra_peak_bytes" in r else "n/a"
        extra_ratio = f"{r['extra_peak_over_trainable_bytes']:.2f}×" if "extra_peak_bytes" in r else "n/a"
        if r["method"] == "vanilla":
            lines.append(
                f"| {r['setting']} | vanilla TRL | {r['step_mean_s'] * 1e3:.1f} ms | 1.000 | | | | | | {peak} | | | |"
            )
            continue
        lines.append(
            f"| {r['setting']} | {r['method']} (k={r['k']}) | {r['step_mean_s'] * 1e3:.1f} ms | "
            f"**{r['ratio_vs_vanilla']:.3f}** | {r['projection_gpu_s'] * 1e3:.2f} ms | {100 * r['projection_share_gpu']:.1f}% | "
            f"{r['projection_isolated_s'] * 1e3:.2f} ms | {100 * r['projection_share_isolated']:.1f}% | "
            f"{r['refresh_s'] * 1e3:.1f} ms | {peak} | {extra} | {extra_ratio} | {r['state_over_trainable']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model and data (CPU smoke test)")
    parser.add_argument("--output-dir", default="benchmarks/results/gpu")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--capability-batch-size", type=int, default=8)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--isolated-repeats", type=int, default=10)
    parser.add_argument("--methods", nargs="*", default=["vanilla", "nullspace_r1", "nullspace_r10"])
    parser.add_argument("--settings", nargs="*", default=["full", "lora"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    q = args.quick
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 10)
    args.steps = args.steps if args.steps is not None else (4 if q else 40)
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 2)
    if q:
        args.batch_size = min(args.batch_size, 2)
        args.capability_batch_size = min(args.capability_batch_size, 2)
        args.isolated_repeats = min(args.isolated_repeats, 2)
        args.logging_steps = min(args.logging_steps, 2)
    shape = QUICK if q else SMOLLM2_135M
    lengths = (
        dict(prompt=(8, 16), completion=(4, 8), cap_prompt=(8, 12), cap_completion=(4, 6))
        if q
        else dict(prompt=(192, 320), completion=(96, 192), cap_prompt=(128, 256), cap_completion=(64, 128))
    )
    args.max_length = 64 if q else 512
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = shape["vocab_size"]
    rows_needed = (args.warmup + args.steps) * args.batch_size
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model_dir = build_model_dir(tmp / "model", shape)
        data = {
            "tok": build_tokenizer(vocab),
            "prefs": preference_data(rows_needed, vocab, lengths),
            "caps": capability_data(64 if not q else 8, vocab, lengths),
        }
        n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(model_dir).parameters())
        tok = data["tok"]
        seq = [
            len(tok(r["prompt"] + r["chosen"])["input_ids"]) + 1
            for r in data["prefs"].select(range(min(64, len(data["prefs"]))))
        ]
        result: dict[str, Any] = {
            "machine": {
                "device": args.device,
                "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                "platform": platform.platform(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "versions": _versions(),
            },
            "settings": {**vars(args), "shape": shape, "lengths": lengths},
            "model_params": n_params,
            "mean_tokens_per_sequence": statistics.fmean(seq),
            "runs": [],
        }
        for repeat in range(args.repeats):
            for setting in args.settings:
                for method in args.methods:
                    print(f"[gpu_benchmark] repeat {repeat} {setting} {method}", flush=True)
                    rec = run_one(
                        method, setting == "lora", model_dir, data, args, tmp / f"{setting}_{method}"
                    )
                    rec["repeat"] = repeat
                    result["runs"].append(rec)
                    print(json.dumps({k: v for k, v in rec.items() if not isinstance(v, dict)}), flush=True)
                    # keep partial results if a later run dies
                    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    result["summary"] = summarise(result["runs"], args.device)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("transformers", "trl", "datasets", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


if __name__ == "__main__":
    raise SystemExit(main())
