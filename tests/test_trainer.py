"""FrontierDPOTrainer: drop-in behaviour, exactness measured independently, resume, bad input."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset, IterableDataset
from tiny import build_model_dir, build_tokenizer, capability_datasets, preference_dataset, preference_rows
from trl import DPOConfig, DPOTrainer

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer
from frontier_trainer.directions import capability_gradients

TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


def config(tmp_path: Path, **overrides: Any) -> FrontierDPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        capability_refresh_steps=2,
        capability_batch_size=4,
        seed=0,
    )
    values.update(overrides)
    return FrontierDPOConfig(**values)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


def trainable(trainer: DPOTrainer) -> list[torch.nn.Parameter]:
    return [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]


class MeasuredTrainer(FrontierDPOTrainer):
    """Records, outside the projector, the raw and the realised update of every optimizer step
    and |cos(c_i, Δθ)| against the directions in use."""

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        super()._before_optimizer_step(optimizer, args, kwargs)
        self._theta_before = flat(trainable(self))

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        raw = flat(trainable(self)) - self._theta_before
        super()._after_optimizer_step(optimizer, args, kwargs)
        realised = flat(trainable(self)) - self._theta_before
        dirs = [flat(d) for d in self.projector.directions]
        self.__dict__.setdefault("steps", []).append(
            {
                "raw": raw,
                "realised": realised,
                "dirs": dirs,
                "leak": [abs(float(c @ realised)) / float(c.norm() * realised.norm()) for c in dirs],
            }
        )


def max_leak(trainer: MeasuredTrainer) -> float:
    assert trainer.steps, "no optimizer step was measured"
    return max(max(s["leak"]) for s in trainer.steps)


def final_params(trainer: DPOTrainer) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }


# --------------------------------------------------------------------------------------
# projection="none" is vanilla DPO, bitwise
# --------------------------------------------------------------------------------------


def test_projection_none_is_bitwise_vanilla_dpo(model_dir: Path, tmp_path: Path) -> None:
    common = dict(
        max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2
    )
    common.update(
        weight_decay=0.1, report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False
    )
    common.update(logging_steps=1, save_strategy="no", seed=0)
    vanilla = DPOTrainer(
        model=str(model_dir),
        args=DPOConfig(output_dir=str(tmp_path / "v"), **common),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
    )
    vanilla.train()
    ours = FrontierDPOTrainer(
        model=str(model_dir),
        args=FrontierDPOConfig(output_dir=str(tmp_path / "f"), projection="none", **common),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
    )
    ours.train()
    a, b = final_params(vanilla), final_params(ours)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs_a = [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in vanilla.state.log_history]
    logs_b = [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in ours.state.log_history]
    assert logs_a == logs_b
    # and training did move the model (the comparison is not vacuous)
    initial = final_params_from_dir(model_dir)
    assert any(not torch.equal(a[k], initial[k]) for k in a)


def final_params_from_dir(path: Path) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    return {k: v.detach() for k, v in LlamaForCausalLM.from_pretrained(path).state_dict().items()}


# --------------------------------------------------------------------------------------
# exactness, measured by the test
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_nullspace_update_is_orthogonal_to_every_direction(
    model_dir: Path, tmp_path: Path, checkpointing: bool
) -> None:
    """Gradient accumulation 2, AdamW weight decay 0.1, optionally gradient checkpointing."""
    trainer = MeasuredTrainer(
        model=str(model_dir),
        args=config(tmp_path, activation_checkpointing=checkpointing, max_steps=5),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
    )
    trainer.train()
    assert len(trainer.steps) == 5  # once per optimizer step, never per micro-batch
    assert max_leak(trainer) <= 1e-5
    # the raw AdamW update did have a capability component (so the test could fail)
    raw_cos = [
        abs(float(c @ s["raw"])) / float(c.norm() * s["raw"].norm()) for s in trainer.steps for c in s["dirs"]
    ]
    assert max(raw_cos) > 1e-3
    # the trainer's own leak metric agrees with the independent measurement
    logged = [h["frontier/leak/copy"] for h in trainer.state.log_history if "frontier/leak/copy" in h]
    assert len(logged) == 5 and max(logged) <= 1e-5
    # memory floor: a snapshot plus k directions, never more at once
    param_bytes = sum(p.numel() * p.element_size() for p in trainable(trainer))
    k = trainer.projector.num_directions
    assert trainer.peak_state_bytes == (k + 1) * param_bytes


def test_projecting_the_gradient_instead_is_not_exact(model_dir: Path, tmp_path: Path) -> None:
    """The same measurement on OGPSA-style gradient projection before AdamW: it leaks."""
    trainer = DPOTrainer(
        model=str(model_dir),
        args=DPOConfig(
            output_dir=str(tmp_path / "g"),
            max_steps=5,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            weight_decay=0.1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            save_strategy="no",
        ),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
    )
    tok = build_tokenizer()
    from frontier_trainer.directions import build_capability_sampler

    sampler = build_capability_sampler(capability_datasets(), tok, max_length=64, batch_size=4)
    leaks: list[float] = []
    state: dict[str, Any] = {}

    def pre(optimizer, args, kwargs) -> None:
        params = trainable(trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        dirs = [flat(capability_gradients(model, params, sampler.next_batch(t))[1]) for t in sampler.tasks]
        C = torch.stack(dirs, 1)
        g = flat([p.grad for p in params])
        g = g - C @ torch.linalg.lstsq(C, g).solution
        offset = 0
        for p in params:
            p.grad.copy_(g[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        state.update(before=flat(params), dirs=dirs)

    def post(optimizer, args, kwargs) -> None:
        delta = flat(trainable(trainer)) - state["before"]
        leaks.extend(abs(float(c @ delta)) / float(c.norm() * delta.norm()) for c in state["dirs"])

    original = trainer.create_optimizer

    def create_optimizer(*a, **k):
        opt = original(*a, **k)
        raw = getattr(opt, "optimizer", opt)
        raw.register_step_pre_hook(pre)
        raw.register_step_post_hook(post)
        return opt

    trainer.create_optimizer = create_optimizer
    trainer.train()
    assert len(leaks) == 10
    assert max(leaks) > 1e-3


def test_lora_directions_live_in_adapter_space(model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig

    trainer = MeasuredTrainer(
        model=str(model_dir),
        args=config(tmp_path, max_steps=3),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    params = trainable(trainer)
    assert params and all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.train()
    assert max_leak(trainer) <= 1e-5
    assert sum(p.numel() for p in params) == trainer.steps[0]["dirs"][0].numel()


# --------------------------------------------------------------------------------------
# frontier mode
# --------------------------------------------------------------------------------------


def test_frontier_with_infinite_tolerance_is_vanilla_bitwise(model_dir: Path, tmp_path: Path) -> None:
    runs = {}
    for projection in ("none", "frontier"):
        trainer = FrontierDPOTrainer(
            model=str(model_dir),
            args=config(tmp_path / projection, projection=projection, capability_tolerance=math.inf),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
            capability_datasets=capability_datasets(),
        )
        trainer.train()
        runs[projection] = final_params(trainer)
    for k, v in runs["none"].items():
        assert torch.equal(v, runs["frontier"][k]), k


def test_frontier_constraints_budget_and_monotone_tradeoff(model_dir: Path, tmp_path: Path) -> None:
    """One step from the same start (a fixed problem): constraints hold, the full budget is used,
    and as ε grows the safety objective ⟨u, δ⟩ rises while the worst capability change falls."""
    gains, worst = [], []
    for eps in (0.0, 0.02, 0.05, 0.2):
        trainer = MeasuredTrainer(
            model=str(model_dir),
            args=config(tmp_path / str(eps), projection="frontier", capability_tolerance=eps, max_steps=1),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
            capability_datasets=capability_datasets(),
        )
        trainer.train()
        (step,) = trainer.steps
        u, delta = step["raw"], step["realised"]
        assert float(delta.norm()) == pytest.approx(float(u.norm()), rel=1e-4)  # Thm 4.3: full budget
        changes = [float(c @ delta) / float(c.norm()) for c in step["dirs"]]
        # ⟨ĉ_i, δ⟩ ≥ −ε‖u‖, to the tolerance of 1e-5 in cosine
        assert min(changes) >= -(eps + 1e-5) * float(u.norm())
        gains.append(float(u @ delta) / float(u @ u))
        worst.append(min(changes))
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(gains))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(worst))
    assert gains[-1] > gains[0]


# --------------------------------------------------------------------------------------
# drop-in: TRL's formats and options
# --------------------------------------------------------------------------------------


def conversational(implicit: bool) -> Dataset:
    rows = []
    for r in preference_rows(8):
        prompt = [{"role": "user", "content": r["prompt"]}]
        chosen = [{"role": "assistant", "content": r["chosen"].strip()}]
        rejected = [{"role": "assistant", "content": r["rejected"].strip()}]
        if implicit:
            rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(rows)


@pytest.mark.parametrize(
    "variant", ["conversational", "implicit_prompt", "ref_model", "precompute", "iterable", "bf16_autocast"]
)
def test_drop_in_variants_stay_exact(model_dir: Path, tmp_path: Path, variant: str) -> None:
    kwargs: dict[str, Any] = {}
    overrides: dict[str, Any] = {"max_steps": 2, "gradient_accumulation_steps": 1}
    train: Any = preference_dataset()
    if variant == "conversational":
        train = conversational(implicit=False)
    elif variant == "implicit_prompt":
        train = conversational(implicit=True)
    elif variant == "ref_model":
        from transformers import AutoModelForCausalLM

        kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(model_dir)
    elif variant == "precompute":
        overrides["precompute_ref_log_probs"] = True
    elif variant == "bf16_autocast":  # bf16 autocast over fp32 master weights (CPU autocast here)
        overrides["bf16"] = True
    elif variant == "iterable":
        rows = preference_rows()
        train = IterableDataset.from_generator(lambda: iter(rows))
    trainer = MeasuredTrainer(
        model=str(model_dir),
        args=config(tmp_path, **overrides),
        train_dataset=train,
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
        **kwargs,
    )
    trainer.train()
    assert len(trainer.steps) == 2
    assert max_leak(trainer) <= 1e-5


def test_trl_dpo_script_runs_with_our_classes(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL's own trl/scripts/dpo.py main(), in-process, with our classes put in place of TRL's."""
    import trl
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser
    from trl.scripts import dpo

    data = tmp_path / "prefs"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in preference_rows()))
    caps = {}
    for task, ds in capability_datasets().items():
        path = tmp_path / f"{task}.jsonl"
        ds.to_json(path)
        caps[task] = str(path)
    created: list[FrontierDPOTrainer] = []

    class Recording(FrontierDPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(trl, "DPOTrainer", Recording)
    parser = TrlParser((ScriptArguments, FrontierDPOConfig, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
        [
            "--model_name_or_path", str(model_dir),
            "--dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"),
            "--max_steps", "2",
            "--per_device_train_batch_size", "4",
            "--learning_rate", "0.01",
            "--use_cpu", "--bf16", "false", "--activation_checkpointing", "false",
            "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
            "--capability_datasets", json.dumps(caps),
            "--capability_batch_size", "4",
        ]
    )  # fmt: skip
    assert training_args.projection == "nullspace"
    dpo.main(script_args, training_args, model_args, dataset_args)
    assert (tmp_path / "out" / "model.safetensors").exists()
    (trainer,) = created
    assert trainer.capability_tasks == ["copy", "count"]
    leaks = [h["frontier/leak/count"] for h in trainer.state.log_history if "frontier/leak/count" in h]
    assert len(leaks) == 2 and max(leaks) <= 1e-5


# --------------------------------------------------------------------------------------
# checkpoint and resume
# --------------------------------------------------------------------------------------


def test_resume_from_checkpoint_matches_uninterrupted_run(model_dir: Path, tmp_path: Path) -> None:
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, capability_refresh_steps=2)
    full = FrontierDPOTrainer(
        model=str(model_dir),
        args=config(tmp_path / "full", **common),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
    )
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    assert (checkpoint / "frontier_state.pt").exists()
    resumed = FrontierDPOTrainer(
        model=str(model_dir),
        args=config(tmp_path / "resumed", **common),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = final_params(full), final_params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run really used saved directions: its sampler continued, not restarted
    assert resumed.capability_sampler.state_dict() == full.capability_sampler.state_dict()


def run_and_resume(
    model_dir: Path, tmp_path: Path, evals: Any = None, caps_resumed: Any = None, **overrides: Any
) -> tuple[FrontierDPOTrainer, FrontierDPOTrainer]:
    """An uninterrupted 6-step run saving at step 3, and a second run resumed from checkpoint-3."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, capability_refresh_steps=2, **overrides)
    runs = []
    for name, resume in (("full", None), ("resumed", tmp_path / "full" / "out" / "checkpoint-3")):
        trainer = FrontierDPOTrainer(
            model=str(model_dir),
            args=config(tmp_path / name, **common),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
            capability_datasets=capability_datasets() if resume is None or caps_resumed is None else caps_resumed,
            capability_eval_datasets=evals,
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runs.append(trainer)
    return runs[0], runs[1]


@pytest.mark.parametrize(
    "overrides",
    [{"projection": "frontier", "capability_tolerance": 0.05}, {"capability_ema": 0.5}],
    ids=["frontier", "ema"],
)
def test_frontier_and_ema_resume_match_uninterrupted_run(model_dir: Path, tmp_path: Path, overrides) -> None:
    full, resumed = run_and_resume(model_dir, tmp_path, degradation_tracking=False, **overrides)
    a, b = final_params(full), final_params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(full.projector.directions, resumed.projector.directions, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))


def test_resume_restores_the_degradation_tracker(model_dir: Path, tmp_path: Path) -> None:
    """The resumed run continues the tracker's measurement (from θ_0, not from the checkpoint)."""
    copy = [{"prompt": f"copy w{i} w{i + 1} =>", "completion": f" w{i} w{i + 1}"} for i in range(20, 26)]
    count = [{"prompt": f"count w{i} =>", "completion": f" w{i + 1} w{i + 2} w{i + 3}"} for i in range(20, 26)]
    evals = {"copy": Dataset.from_list(copy), "count": Dataset.from_list(count)}
    full, resumed = run_and_resume(model_dir, tmp_path, evals=evals, degradation_eval_steps=2)
    f, r = full.degradation_callback, resumed.degradation_callback
    assert f is not None and r is not None and f.summary and r.summary
    assert r.geometry == f.geometry  # not re-measured at the resumed parameters
    for task in ("copy", "count"):
        assert r.predicted[task] == pytest.approx(f.predicted[task], rel=1e-9, abs=1e-12)
        assert r.observed[task] == pytest.approx(f.observed[task], rel=1e-9, abs=1e-12)
        assert abs(f.observed[task]) > 0  # the comparison is not vacuous
    assert [h["train/global_step"] for h in r.history] == [h["train/global_step"] for h in f.history]


def test_resume_with_other_capability_data_names_the_task(model_dir: Path, tmp_path: Path) -> None:
    changed = capability_datasets()
    rows = [{"prompt": f"count w{i} =>", "completion": f" w{i + 2} w{i + 3}"} for i in range(20)]
    changed["count"] = Dataset.from_list(rows)  # same task names, other rows
    with pytest.raises(ValueError, match=r"'count'.*fingerprint"):
        run_and_resume(model_dir, tmp_path, caps_resumed=changed, degradation_tracking=False)


# --------------------------------------------------------------------------------------
# bad input and unsupported setups: clear errors before training
# --------------------------------------------------------------------------------------


def make(model_dir: Path, tmp_path: Path, caps: Any = None, **overrides: Any) -> FrontierDPOTrainer:
    return FrontierDPOTrainer(
        model=str(model_dir),
        args=config(tmp_path, **overrides),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets() if caps is None else caps,
    )


@pytest.mark.parametrize(
    "caps,overrides,match",
    [
        ({"copy": Dataset.from_list([])}, {}, r"copy"),
        ({"copy": Dataset.from_list([{"question": "a", "answer": "b"}])}, {}, r"copy.*(prompt|text)"),
        (None, {"capability_max_length": 2}, r"capability_max_length"),
        (None, {"capability_tolerance": {"chemistry": 0.1}, "projection": "frontier"}, r"chemistry"),
        ({}, {}, r"capability_datasets"),
        ({"copy": "/nonexistent/file.jsonl"}, {}, r"copy.*does not exist"),
    ],
)
def test_bad_capability_input_is_refused_before_training(model_dir, tmp_path, caps, overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        make(model_dir, tmp_path, caps=caps, **overrides)


def test_bad_config_values_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capability_tolerance"):
        config(tmp_path, capability_tolerance=-0.1)
    with pytest.raises(ValueError, match="named twice"):
        config(tmp_path, capability_datasets="copy=a.jsonl,copy=b.jsonl")
    with pytest.raises(ValueError, match="projection"):
        config(tmp_path, projection="orthogonal")
    with pytest.raises(ValueError, match="capability_ema"):
        config(tmp_path, capability_ema=1.0)


def test_unsupported_setups_are_refused(model_dir: Path, tmp_path: Path) -> None:
    bf16_dir = build_model_dir(tmp_path / "bf16", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="low-precision"):
        FrontierDPOTrainer(
            model=str(bf16_dir),
            args=config(tmp_path, model_init_kwargs={"dtype": torch.bfloat16}),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
            capability_datasets=capability_datasets(),
        )
    with pytest.raises(ValueError, match="inside backward"):
        make(model_dir, tmp_path, optim="adalomo")
    with pytest.raises(ValueError, match="use_reentrant"):
        make(
            model_dir,
            tmp_path,
            activation_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )


@pytest.mark.parametrize(
    "field,value,match",
    [("deepspeed", {"zero_optimization": {"stage": 2}}, "DeepSpeed"), ("fsdp", "full_shard", "FSDP")],
)
def test_sharded_engines_are_refused_before_construction(
    tmp_path: Path, field: str, value: Any, match: str
) -> None:
    """DeepSpeed needs its package to build a config here, so the check is called directly on a
    config whose field is set after construction (what TrainingArguments would hold)."""
    args = config(tmp_path)
    setattr(args, field, value)
    with pytest.raises(ValueError, match=match):
        FrontierDPOTrainer._check_setup_before_init(args, capability_datasets(), None)
    args.projection = "none"  # plain DPO is not refused
    FrontierDPOTrainer._check_setup_before_init(args, capability_datasets(), None)


def test_plain_dpo_config_is_upgraded_and_projected(model_dir: Path, tmp_path: Path) -> None:
    """Drop-in: a script that builds a trl.DPOConfig still gets the (default) null-space projection."""
    plain = DPOConfig(
        output_dir=str(tmp_path / "plain"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = MeasuredTrainer(
        model=str(model_dir),
        args=plain,
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
    )
    assert isinstance(trainer.args, FrontierDPOConfig) and trainer.args.projection == "nullspace"
    assert trainer.args.learning_rate == 1e-2 and trainer.args.max_steps == 2
    trainer.train()
    assert len(trainer.steps) == 2 and max_leak(trainer) <= 1e-5
