"""CUDA correctness checks for FrontierDPOTrainer (the CPU test suite's guarantees, on a GPU).

(a) ``projection="none"`` against ``trl.DPOTrainer``: final parameters and logs compared
    bitwise, with a vanilla-vs-vanilla control run that shows how reproducible the kernels
    themselves are (``--deterministic`` turns on ``torch.use_deterministic_algorithms``).
(b) null-space exactness measured *outside* the projector: at every optimizer step the
    capability gradients are recomputed at θ_old (from a copy of the trainer's sampler, so on
    the same batches) with the package's ``capability_gradients`` and with an independent
    log-softmax/gather implementation of the metric, and |cos(c_i, θ_new − θ_old)| is taken in
    float64; fp32 and ``bf16=True`` autocast, full fine-tuning, LoRA, activation checkpointing.
(c) a model whose trainable parameters are bf16 is refused at construction (a clear error);
    informational: a bf16 base with fp32 LoRA adapters is accepted and stays exact.

Run on the GPU:  ``python benchmarks/gpu_check.py --deterministic --out check.json``
Quick CPU smoke: ``.venv/bin/python benchmarks/gpu_check.py --device cpu --quick``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# must be set before cuBLAS creates its handle for deterministic GEMMs (harmless otherwise)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from tiny import build_tokenizer, capability_datasets, preference_dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer
from frontier_trainer.directions import capability_gradients

TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}
LEAK_BOUND = 1e-5

# --------------------------------------------------------------------------------------
# models and configs
# --------------------------------------------------------------------------------------


def build_model_dir(path: Path, quick: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A random Llama over tests/tiny.py's 49-word tokenizer; bigger than the tests' on a GPU."""
    torch.manual_seed(seed)
    size = (
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        if quick
        else dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    config = LlamaConfig(
        vocab_size=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1, **size
    )
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def common(out: Path, device: str, steps: int, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


def trainable(trainer: DPOTrainer) -> list[torch.nn.Parameter]:
    return [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def state(trainer: DPOTrainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def logs(trainer: DPOTrainer) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in trainer.state.log_history]


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    max_abs = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    return {
        "bitwise_equal": not differing,
        "tensors_differing": len(differing),
        "tensors": len(a),
        "max_abs_diff": max_abs,
        "max_abs_diff_over_max_param": max_abs / scale if scale else 0.0,
        "first_differing": differing[:3],
    }


# --------------------------------------------------------------------------------------
# (a) projection="none" vs trl.DPOTrainer
# --------------------------------------------------------------------------------------


def check_none_is_vanilla(model_dir: Path, tmp: Path, device: str, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16_autocast"):
        kw = common(tmp, device, steps, bf16=precision == "bf16_autocast")
        runs = {}
        for name in ("vanilla", "vanilla_again", "none"):
            kw["output_dir"] = str(tmp / f"a_{precision}_{name}")
            if name == "none":
                trainer: DPOTrainer = FrontierDPOTrainer(
                    model=str(model_dir),
                    args=FrontierDPOConfig(projection="none", **kw),
                    train_dataset=preference_dataset(32),
                    processing_class=build_tokenizer(),
                    capability_datasets=capability_datasets(),
                )
                assert trainer.projector is None and not trainer._hook_handles
            else:
                trainer = DPOTrainer(
                    model=str(model_dir),
                    args=DPOConfig(**kw),
                    train_dataset=preference_dataset(32),
                    processing_class=build_tokenizer(),
                )
            trainer.train()
            runs[name] = (state(trainer), logs(trainer), str(next(trainer.model.parameters()).device))
            del trainer
            _free()
        initial = {k: v.float() for k, v in LlamaForCausalLM.from_pretrained(model_dir).state_dict().items()}
        res = {
            "device": runs["none"][2],
            "none_vs_vanilla": compare(runs["vanilla"][0], runs["none"][0]),
            "vanilla_vs_vanilla_control": compare(runs["vanilla"][0], runs["vanilla_again"][0]),
            "logs_equal_none_vs_vanilla": runs["vanilla"][1] == runs["none"][1],
            "logs_equal_vanilla_control": runs["vanilla"][1] == runs["vanilla_again"][1],
            "training_moved_params": not compare(initial, runs["vanilla"][0])["bitwise_equal"],
            "final_loss": [h.get("loss") for h in runs["none"][1] if "loss" in h][-1:],
        }
        res["pass_bitwise"] = res["none_vs_vanilla"]["bitwise_equal"] and res["logs_equal_none_vs_vanilla"]
        out[precision] = res
    return out


# --------------------------------------------------------------------------------------
# (b) exactness measured outside the projector
# --------------------------------------------------------------------------------------


def own_metric_gradient(
    model: torch.nn.Module, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Mean completion log-likelihood by log_softmax + gather (not the package's cross-entropy)."""
    dev = params[0].device
    ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
    with torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = logits[:, :-1].log_softmax(-1)
        target = labels[:, 1:]
        keep = target != -100
        token = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        value = (token * keep).sum() / keep.sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return abs(float(a @ b)) / denom if denom > 0 else 0.0


class MeasuredTrainer(FrontierDPOTrainer):
    """Records every optimizer step's raw and realised update and leaks against directions
    recomputed here at θ_old (needs ``capability_refresh_steps=1``)."""

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        sampler = copy.deepcopy(self.capability_sampler)  # the batches the refresh is about to draw
        super()._before_optimizer_step(optimizer, args, kwargs)
        assert self._directions_step == self.state.global_step, "use capability_refresh_steps=1"
        params = trainable(self)
        model = self.accelerator.unwrap_model(self.model)
        self._m_old = flat(params)
        self._m_recomputed, self._m_own = [], []
        for task in self.capability_tasks:
            for _ in range(self.args.capability_rank):
                batch = sampler.next_batch(task)
                with self.autocast_smart_context_manager():
                    _, grads = capability_gradients(model, params, batch)
                    own = own_metric_gradient(model, params, batch)
                self._m_recomputed.append(flat(grads))
                self._m_own.append(flat(own))
        self._m_devices = sorted(
            {str(t.device) for d in self.projector.directions for t in d}
            | {str(t.device) for t in self.projector._snapshot or []}
        )

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        params = trainable(self)
        raw = flat(params) - self._m_old
        super()._after_optimizer_step(optimizer, args, kwargs)
        realised = flat(params) - self._m_old
        used = [flat(d) for d in self.projector.directions]
        self.__dict__.setdefault("m_steps", []).append(
            {
                "leak_vs_recomputed": [cos(c, realised) for c in self._m_recomputed],
                "leak_vs_own_metric": [cos(c, realised) for c in self._m_own],
                "leak_vs_projector_directions": [cos(c, realised) for c in used],
                "raw_cos_vs_recomputed": [cos(c, raw) for c in self._m_recomputed],
                "recomputed_vs_projector_rel_diff": [
                    float((a - b).norm() / b.norm()) for a, b in zip(self._m_recomputed, used, strict=True)
                ],
                "realised_norm": float(realised.norm()),
                "raw_norm": float(raw.norm()),
                "param_dtypes": sorted({str(p.dtype) for p in params}),
                "state_devices": self._m_devices,
            }
        )


def measured_run(
    model_dir: Path, tmp: Path, device: str, steps: int, name: str, peft: bool = False, **overrides: Any
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0
        )
    kw = common(tmp / name, device, steps, **overrides)
    trainer = MeasuredTrainer(
        model=str(model_dir),
        args=FrontierDPOConfig(capability_refresh_steps=1, capability_batch_size=4, **kw),
        train_dataset=preference_dataset(32),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
        **kwargs,
    )
    trainer.train()
    steps_ = trainer.m_steps
    n_trainable = sum(p.numel() for p in trainable(trainer))
    logged = [h[k] for h in trainer.state.log_history for k in h if k.startswith("frontier/leak/")]
    res = {
        "optimizer_steps_measured": len(steps_),
        "trainable_params": n_trainable,
        "param_dtypes": steps_[0]["param_dtypes"],
        "state_devices": steps_[0]["state_devices"],
        "max_leak_vs_recomputed": max(max(s["leak_vs_recomputed"]) for s in steps_),
        "max_leak_vs_own_metric": max(max(s["leak_vs_own_metric"]) for s in steps_),
        "max_leak_vs_projector_directions": max(max(s["leak_vs_projector_directions"]) for s in steps_),
        "max_leak_logged_by_trainer": max(logged) if logged else None,
        "max_raw_cos_before_projection": max(max(s["raw_cos_vs_recomputed"]) for s in steps_),
        "max_recomputed_vs_projector_rel_diff": max(
            max(s["recomputed_vs_projector_rel_diff"]) for s in steps_
        ),
        "min_realised_norm": min(s["realised_norm"] for s in steps_),
        "peak_state_bytes_over_trainable_bytes": trainer.peak_state_bytes
        / sum(p.numel() * p.element_size() for p in trainable(trainer)),
    }
    res["pass"] = (
        res["optimizer_steps_measured"] == steps
        and res["max_leak_vs_recomputed"] <= LEAK_BOUND
        and res["max_leak_vs_own_metric"] <= LEAK_BOUND
        and res["min_realised_norm"] > 0
        and res["max_raw_cos_before_projection"] > 1e-3  # the raw update leaked: the check could fail
        and all(dev.split(":")[0] == device for dev in res["state_devices"])
    )
    del trainer
    _free()
    return res


def check_exactness(model_dir: Path, tmp: Path, device: str, steps: int) -> dict[str, Any]:
    cases = {
        "full_fp32": dict(),
        "full_bf16_autocast": dict(bf16=True),
        "full_bf16_autocast_checkpointing": dict(bf16=True, activation_checkpointing=True),
        "lora_fp32": dict(peft=True),
        "lora_bf16_autocast": dict(peft=True, bf16=True),
    }
    return {
        name: _guard(measured_run, model_dir, tmp, device, steps, name, **kw) for name, kw in cases.items()
    }


# --------------------------------------------------------------------------------------
# (c) low-precision trainable weights are refused
# --------------------------------------------------------------------------------------


def check_bf16_refused(tmp: Path, device: str, quick: bool, steps: int) -> dict[str, Any]:
    bf16_dir = build_model_dir(tmp / "bf16_model", quick, dtype=torch.bfloat16)
    out: dict[str, Any] = {}

    def attempt(model: Any, **overrides: Any) -> dict[str, Any]:
        try:
            FrontierDPOTrainer(
                model=model,
                args=FrontierDPOConfig(**common(tmp / "c", device, steps, **overrides)),
                train_dataset=preference_dataset(),
                processing_class=build_tokenizer(),
                capability_datasets=capability_datasets(),
            )
        except ValueError as err:
            return {"refused": True, "error": str(err), "pass": "low-precision" in str(err)}
        return {"refused": False, "pass": False}

    out["path_with_model_init_kwargs_bf16"] = attempt(
        str(bf16_dir), model_init_kwargs={"dtype": torch.bfloat16}, bf16=True
    )
    model = LlamaForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).to(device)
    out["instantiated_bf16_model_on_device"] = attempt(model, bf16=True)
    del model
    # plain DPO on the same bf16 model is not refused
    try:
        FrontierDPOTrainer(
            model=str(bf16_dir),
            args=FrontierDPOConfig(
                projection="none",
                **common(
                    tmp / "c_none", device, steps, model_init_kwargs={"dtype": torch.bfloat16}, bf16=True
                ),
            ),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
        )
        out["projection_none_accepts_bf16"] = {"pass": True}
    except Exception as err:  # pragma: no cover - reported
        out["projection_none_accepts_bf16"] = {"pass": False, "error": repr(err)}
    # informational: bf16 frozen base, LoRA adapters upcast to fp32 by PEFT -> accepted and exact
    out["info_bf16_base_fp32_lora"] = _guard(
        measured_run,
        bf16_dir,
        tmp,
        device,
        steps,
        "bf16_base_lora",
        peft=True,
        bf16=True,
        model_init_kwargs={"dtype": torch.bfloat16},
    )
    _free()
    return out


# --------------------------------------------------------------------------------------


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _guard(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        traceback.print_exc()
        return {"pass": False, "error": repr(err), "traceback": traceback.format_exc()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU smoke test)")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    parser.add_argument("--checks", default="abc", help="any of a, b, c")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    steps = args.steps or (2 if args.quick else 4)
    warned: list[str] = []
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        warnings.simplefilter("always")
        previous = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            text = f"{category.__name__}: {message}"
            if "deterministic" in text.lower() and text not in warned:
                warned.append(text)
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = record
    result: dict[str, Any] = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__,
        "versions": _versions(),
        "deterministic": args.deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "steps": steps,
        "leak_bound": LEAK_BOUND,
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model_dir = build_model_dir(tmp / "model", args.quick)
        result["model_params"] = sum(
            p.numel() for p in LlamaForCausalLM.from_pretrained(model_dir).parameters()
        )
        if "a" in args.checks:
            result["a_projection_none_vs_trl"] = _guard(
                check_none_is_vanilla, model_dir, tmp, args.device, steps
            )
        if "b" in args.checks:
            result["b_nullspace_exactness"] = check_exactness(model_dir, tmp, args.device, steps)
        if "c" in args.checks:
            result["c_bf16_weights_refused"] = _guard(check_bf16_refused, tmp, args.device, args.quick, steps)
    result["deterministic_warnings"] = warned
    result["seconds"] = time.perf_counter() - start
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(summary(result))
    return 0


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("transformers", "trl", "datasets", "peft", "accelerate", "tokenizers", "huggingface_hub"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"== gpu_check summary ({result['device']}, {result['gpu']}, deterministic={result['deterministic']})"
    ]
    a = result.get("a_projection_none_vs_trl")
    if a:
        for precision, res in a.items():
            if not isinstance(res, dict) or "none_vs_vanilla" not in res:
                lines.append(f"(a) {precision}: ERROR {res}")
                continue
            nv, vv = res["none_vs_vanilla"], res["vanilla_vs_vanilla_control"]
            lines.append(
                f"(a) {precision}: none==vanilla bitwise={nv['bitwise_equal']} (max|Δ| {nv['max_abs_diff']:.3g}), "
                f"logs equal={res['logs_equal_none_vs_vanilla']}; control vanilla==vanilla bitwise="
                f"{vv['bitwise_equal']} (max|Δ| {vv['max_abs_diff']:.3g})"
            )
    for name, res in (result.get("b_nullspace_exactness") or {}).items():
        lines.append(_exact_line("(b) " + name, res))
    c = result.get("c_bf16_weights_refused") or {}
    for name, res in c.items():
        if name.startswith("info_"):
            lines.append(_exact_line("(c) " + name, res))
        elif isinstance(res, dict):
            lines.append(f"(c) {name}: pass={res.get('pass')} {res.get('error', '')[:160]}")
    return "\n".join(lines)


def _exact_line(label: str, res: dict[str, Any]) -> str:
    if "error" in res:
        return f"{label}: ERROR {res['error']}"
    return (
        f"{label}: pass={res['pass']} leak(recomputed) {res['max_leak_vs_recomputed']:.2e}, "
        f"leak(own metric) {res['max_leak_vs_own_metric']:.2e}, logged {res['max_leak_logged_by_trainer']}, "
        f"raw cos {res['max_raw_cos_before_projection']:.2e}, dtypes {res['param_dtypes']}, "
        f"state on {res['state_devices']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
