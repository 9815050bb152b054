"""FrontierMixin on every TRL trainer and on a plain transformers.Trainer: each projected step's
leak measured independently (tests/tiny.LeakProbe), coverage of what the optimizer updates,
the trainer-agnostic degradation tracker, and the configs' parser contract."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tiny import (
    LeakProbe,
    build_model_dir,
    build_tokenizer,
    capability_rows,
    flat,
    independent_gradient,
    preference_dataset,
)
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from trl import DPOConfig, SFTConfig, TrlParser

from frontier_trainer import config as cfg
from frontier_trainer import trainers
from frontier_trainer.arguments import FrontierArguments
from frontier_trainer.directions import completion_metric
from frontier_trainer.mixin import FrontierMixin

#: 6 rows per task and batch 8: every direction is the gradient over all of a task's rows, so the
#: probe's independent gradient is the very quantity the projection must be orthogonal to.
ROWS = capability_rows(6)
BOUND = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def caps() -> dict[str, Dataset]:
    return {task: Dataset.from_list(rows) for task, rows in ROWS.items()}


def common(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        capability_refresh_steps=1,
        capability_batch_size=8,
        degradation_tracking=False,
        seed=0,
    )
    values.update(overrides)
    return values


def refusal_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Refusal words rewarded on the (harmful) prompts; a small length term keeps rewards varied."""
    out = []
    for c in completions:
        words = str(c).split()
        out.append(sum(w in ("refuse", "sorry") for w in words) - 0.1 * words.count("harm") + 0.01 * len(words))
    return out


def build(kind: str, model_dir: Path, tmp_path: Path, probe: TrainerCallback | None = None, **overrides: Any) -> Any:
    """One Frontier trainer of ``kind`` on the tiny model with its natural data."""
    tok = build_tokenizer()
    callbacks = [probe] if probe is not None else None
    kw: dict[str, Any] = dict(processing_class=tok, capability_datasets=caps(), callbacks=callbacks)
    if kind == "dpo":
        args = cfg.FrontierDPOConfig(**common(tmp_path, **overrides))
        return trainers.FrontierDPOTrainer(model=str(model_dir), args=args, train_dataset=preference_dataset(), **kw)
    if kind == "sft":
        rows = [{"prompt": f"harm w{i} =>", "completion": " sorry refuse"} for i in range(16)]
        args = cfg.FrontierSFTConfig(**common(tmp_path, **overrides))
        return trainers.FrontierSFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows), **kw)
    if kind == "kto":
        rows = [
            {"prompt": f"harm w{i} =>", "completion": " sorry refuse" if i % 2 else f" w{i}", "label": bool(i % 2)}
            for i in range(16)
        ]
        args = cfg.FrontierKTOConfig(**common(tmp_path, **overrides))
        return trainers.FrontierKTOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows), **kw)
    if kind == "orpo":
        args = cfg.FrontierORPOConfig(max_length=32, **common(tmp_path, **overrides))
        return trainers.FrontierORPOTrainer(model=str(model_dir), args=args, train_dataset=preference_dataset(), **kw)
    if kind in ("grpo", "rloo"):
        prompts = Dataset.from_list([{"prompt": f"harm w{i} =>"} for i in range(8)])
        values = common(tmp_path, per_device_train_batch_size=8, **overrides)
        gen = dict(num_generations=4, max_completion_length=8)
        if kind == "grpo":
            args = cfg.FrontierGRPOConfig(**gen, **values)
            cls = trainers.FrontierGRPOTrainer
        else:
            args = cfg.FrontierRLOOConfig(**gen, **values)
            cls = trainers.FrontierRLOOTrainer
        return cls(model=str(model_dir), reward_funcs=refusal_reward, args=args, train_dataset=prompts, **kw)
    raise AssertionError(kind)


def logged(trainer: Any, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


# --------------------------------------------------------------------------------------
# every trainer: the realised step is orthogonal to independently recomputed gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dpo", "sft", "kto", "orpo", "grpo", "rloo"])
def test_every_trainer_projects_exactly(kind: str, model_dir: Path, tmp_path: Path) -> None:
    probe = LeakProbe(ROWS, build_tokenizer())
    trainer = build(kind, model_dir, tmp_path, probe)
    assert isinstance(trainer, FrontierMixin)
    trainer.train()
    assert len(probe.steps) == 3
    assert all(float(s["delta"].norm()) > 0 for s in probe.steps)  # every step moved the model
    assert probe.max_leak() <= BOUND, [s["leak"] for s in probe.steps]
    # not vacuous: the raw updates did point into the capability directions (|cos| ≥ 1e-4)
    taus = [v for task in ROWS for v in logged(trainer, f"frontier/tau/{task}")]
    assert max(taus) > 1e-8, taus
    # the mixin's own buffer reached the logs, one value per logging step
    assert len(logged(trainer, "frontier/leak/copy")) == 3
    assert max(logged(trainer, "frontier/leak/copy")) <= BOUND


class PlainFrontierTrainer(FrontierMixin, Trainer):
    """A plain transformers.Trainer wearing the mixin (no TRL class anywhere)."""


def lm_dataset(tok: Any) -> Dataset:
    texts = [f"harm w{i % 10} w{(i * 3) % 10} => sorry refuse" for i in range(16)]
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    ids = [x + [tok.pad_token_id] * (width - len(x)) for x in ids]
    return Dataset.from_list([{"input_ids": x, "labels": x, "attention_mask": [1] * width} for x in ids])


def test_plain_transformers_trainer_with_the_mixin(model_dir: Path, tmp_path: Path) -> None:
    tok = build_tokenizer()
    probe = LeakProbe(ROWS, tok)
    args = cfg.FrontierTrainingArguments(**common(tmp_path))
    trainer = PlainFrontierTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=lm_dataset(tok),
        processing_class=tok,
        capability_datasets=caps(),
        callbacks=[probe],
    )
    trainer.train()
    assert len(probe.steps) == 3 and probe.max_leak() <= BOUND
    assert max(logged(trainer, "frontier/tau/count")) > 1e-8
    assert len(logged(trainer, "frontier/leak/count")) == 3  # metrics merged by the mixin's log()


def test_plain_configs_are_upgraded_and_bad_ones_refused(model_dir: Path, tmp_path: Path) -> None:
    values = common(tmp_path)
    frontier_only = {f.name for f in dataclasses.fields(FrontierArguments)}
    plain = SFTConfig(**{k: v for k, v in values.items() if k not in frontier_only})
    trainer = trainers.FrontierSFTTrainer(
        model=str(model_dir),
        args=plain,
        train_dataset=Dataset.from_list([{"text": "harm w1 => sorry"}] * 8),
        processing_class=build_tokenizer(),
        capability_datasets=caps(),
    )
    assert isinstance(trainer.args, cfg.FrontierSFTConfig) and trainer.args.projection == "nullspace"
    assert trainer.args.learning_rate == 1e-2 and trainer.projector is not None
    with pytest.raises(TypeError, match="FrontierArguments"):
        trainers.FrontierSFTTrainer(
            model=str(model_dir),
            args=DPOConfig(**{k: v for k, v in values.items() if k not in frontier_only}),
            train_dataset=Dataset.from_list([{"text": "harm w1 => sorry"}] * 8),
            processing_class=build_tokenizer(),
            capability_datasets=caps(),
        )


@pytest.mark.parametrize(
    "config_class",
    [
        cfg.FrontierDPOConfig,
        cfg.FrontierSFTConfig,
        cfg.FrontierKTOConfig,
        cfg.FrontierGRPOConfig,
        cfg.FrontierRLOOConfig,
        cfg.FrontierTrainingArguments,
    ],
)
def test_configs_parse_with_trl_parser(config_class: type, tmp_path: Path) -> None:
    for f in dataclasses.fields(FrontierArguments):
        assert f.metadata.get("help"), f.name  # every field is documented for --help
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    argv += ["--projection", "frontier", "--capability_tolerance", "copy=0.1,count=inf"]
    argv += ["--capability_param_change", "error", "--safety_direction", "updates"]
    (parsed,) = TrlParser((config_class,)).parse_args_and_config(argv)
    assert isinstance(parsed, config_class)
    assert parsed.capability_tolerance == {"copy": 0.1, "count": math.inf}
    assert parsed.capability_param_change == "error" and parsed.safety_direction == "updates"
    with pytest.raises(ValueError, match="capability_param_change"):
        config_class(**{**common(tmp_path), "capability_param_change": "ignore"})
    with pytest.raises(ValueError, match="safety_direction"):
        config_class(**{**common(tmp_path), "safety_direction": "gradient"})


# --------------------------------------------------------------------------------------
# coverage: exactly what the optimizer updates
# --------------------------------------------------------------------------------------


def embed(model: torch.nn.Module) -> torch.nn.Parameter:
    return model.get_input_embeddings().weight


def test_lr_zero_group_is_excluded_and_never_moves(model_dir: Path, tmp_path: Path) -> None:
    """A param group with lr 0 (the embedding) is left out of the projection: it stays bitwise
    put, and the step is still orthogonal to the gradients over ALL parameters."""
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    e = embed(model)
    rest = [p for p in model.parameters() if p is not e]
    optimizer = torch.optim.AdamW([{"params": [e], "lr": 0.0}, {"params": rest, "lr": 1e-2}], weight_decay=0.1)
    probe = LeakProbe(ROWS, tok)
    e0 = e.detach().clone()
    args = cfg.FrontierDPOConfig(**common(tmp_path))
    trainer = trainers.FrontierDPOTrainer(
        model=model,
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=preference_dataset(),
        processing_class=tok,
        capability_datasets=caps(),
        optimizers=(optimizer, None),
        callbacks=[probe],
    )
    trainer.train()
    assert torch.equal(e.detach(), e0)  # not moved by the correction either
    assert all(p is not e for p in trainer.projector.params)
    assert len(trainer.projector.params) == len(rest)
    assert len(probe.steps) == 3 and probe.max_leak() <= BOUND
    assert max(logged(trainer, "frontier/tau/copy")) > 1e-8


class Toggle(TrainerCallback):
    """Freezes or unfreezes the embedding at the end of step ``at``."""

    def __init__(self, at: int, requires_grad: bool) -> None:
        self.at, self.requires_grad = at, requires_grad

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.at:
            embed(model).requires_grad_(self.requires_grad)


def toggled_trainer(model_dir: Path, tmp_path: Path, start_frozen: bool, probe: Any, **overrides: Any) -> Any:
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    embed(model).requires_grad_(not start_frozen)
    optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-2, weight_decay=0.0)
    args = cfg.FrontierDPOConfig(**common(tmp_path, max_steps=4, capability_refresh_steps=2, **overrides))
    return trainers.FrontierDPOTrainer(
        model=model,
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=preference_dataset(),
        processing_class=tok,
        capability_datasets=caps(),
        optimizers=(optimizer, None),
        callbacks=[Toggle(at=3, requires_grad=start_frozen), probe],
    )


@pytest.mark.parametrize("start_frozen", [True, False], ids=["unfrozen-mid-run", "frozen-mid-run"])
def test_parameters_frozen_or_unfrozen_mid_run_are_retracked(
    model_dir: Path, tmp_path: Path, start_frozen: bool
) -> None:
    """capability_param_change='retrack': the projector follows the new set at the next step (3)
    and re-estimates the directions there (scheduled refreshes: every 2 steps). The probe's
    leak is exact at every step whose directions were estimated at that step's θ."""
    probe = LeakProbe(ROWS, build_tokenizer())
    trainer = toggled_trainer(model_dir, tmp_path, start_frozen, probe)
    refreshes: list[int] = []
    original = trainer.refresh_directions

    def spy() -> None:
        refreshes.append(trainer.state.global_step)
        original()

    trainer.refresh_directions = spy
    e = embed(trainer.accelerator.unwrap_model(trainer.model))
    trainer.train()
    assert refreshes == [0, 2, 3], refreshes  # scheduled 0 and 2, then the re-track at step 3
    assert len(probe.steps) == 4
    for i in refreshes:
        assert max(probe.steps[i]["leak"].values()) <= BOUND, (i, probe.steps[i]["leak"])
    tracked = {id(p) for p in trainer.projector.params}
    assert (id(e) in tracked) == start_frozen
    assert all(float(s["delta"].norm()) > 0 for s in probe.steps)


def test_parameter_change_refused_when_asked(model_dir: Path, tmp_path: Path) -> None:
    probe = LeakProbe(ROWS, build_tokenizer())
    trainer = toggled_trainer(model_dir, tmp_path, True, probe, capability_param_change="error")
    with pytest.raises(ValueError, match=r"embed_tokens.*capability_param_change='retrack'"):
        trainer.train()
    assert len(probe.steps) == 3  # steps 0-2 ran; step 3 was refused before it moved anything


def test_frozen_parameter_stays_put_after_retrack(model_dir: Path, tmp_path: Path) -> None:
    """Freezing mid-run: without the re-track the correction Σ a_i c_i would still move it."""
    probe = LeakProbe(ROWS, build_tokenizer())
    trainer = toggled_trainer(model_dir, tmp_path, False, probe)
    e = embed(trainer.accelerator.unwrap_model(trainer.model))
    snapshots: list[torch.Tensor] = []

    class Snap(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            snapshots.append(e.detach().clone())

    trainer.add_callback(Snap())
    trainer.train()
    assert not torch.equal(snapshots[1], snapshots[2])  # it was training before
    assert torch.equal(snapshots[2], snapshots[3])  # frozen at the end of step 3: never moves again
    assert max(probe.steps[3]["leak"].values()) <= BOUND


def test_fp16_without_cuda_is_refused(model_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("on CUDA fp16 is allowed (autocast with loss scaling)")
    with pytest.raises(ValueError, match=r"fp16=True.*CUDA"):
        build("dpo", model_dir, tmp_path, fp16=True)


class InfAt(TrainerCallback):
    """Puts an inf into one gradient right before the optimizer step ``at`` (after clipping, which
    is off): the AMP scaler must skip that step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.at:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class HeldLeak(TrainerCallback):
    """|cos(held direction, θ_after − θ_before)| in float64 per step, read outside the projector."""

    trainer: Any = None

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._model = model
        self._before = flat([p for p in model.parameters() if p.requires_grad])

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        delta = flat([p for p in self._model.parameters() if p.requires_grad]) - self._before
        held = [flat(d) for d in self.trainer.projector.directions]
        norm = float(delta.norm())
        leak = [abs(float(c @ delta)) / (float(c.norm()) * norm) if norm > 0 else 0.0 for c in held]
        self.steps.append({"moved": norm > 0, "leak": leak})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with loss scaling needs CUDA")
def test_fp16_on_cuda_skipped_steps_leave_no_trace(model_dir: Path, tmp_path: Path) -> None:
    """fp16 autocast over fp32 weights: an overflowing step is skipped by the scaler, so the
    projection's hooks never fire (θ unchanged, nothing recorded); every other step is exact."""
    probe = HeldLeak()
    values = common(tmp_path, max_steps=4, fp16=True, use_cpu=False, max_grad_norm=0.0)
    trainer = trainers.FrontierDPOTrainer(
        model=str(model_dir),
        args=cfg.FrontierDPOConfig(**values),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=caps(),
        callbacks=[InfAt(1), probe],
    )
    probe.trainer = trainer
    trainer.train()
    assert [s["moved"] for s in probe.steps] == [True, False, True, True]
    assert len(logged(trainer, "frontier/projection_seconds")) == 3  # no projection at the skipped step
    for s in probe.steps:
        if s["moved"]:
            assert max(s["leak"]) <= BOUND, s


def test_nan_direction_names_the_task(model_dir: Path, tmp_path: Path) -> None:
    def broken(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return completion_metric(model, batch) * float("nan")

    trainer = trainers.FrontierDPOTrainer(
        model=str(model_dir),
        args=cfg.FrontierDPOConfig(**common(tmp_path)),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=caps(),
        capability_metrics={"count": broken},
    )
    with pytest.raises(ValueError, match=r"count.*(NaN|not finite)|(NaN|not finite).*count"):
        trainer.train()


# --------------------------------------------------------------------------------------
# generalisation leak (issue 15 §1)
# --------------------------------------------------------------------------------------


def test_generalisation_leak_is_the_last_update_against_the_fresh_directions(
    model_dir: Path, tmp_path: Path
) -> None:
    probe = LeakProbe(ROWS, build_tokenizer())
    trainer = build("dpo", model_dir, tmp_path, probe, max_steps=4)
    trainer.train()
    for task in ROWS:
        values = logged(trainer, f"frontier/generalisation_leak/{task}")
        assert len(values) == 3  # refreshes at steps 1, 2, 3 (step 0 has no previous update)
        for t, value in enumerate(values, start=1):
            delta, g = probe.steps[t - 1]["delta"], probe.steps[t]["grads"][task]
            expected = abs(float(g @ delta)) / float(g.norm() * delta.norm())
            assert value == pytest.approx(expected, rel=1e-4, abs=1e-9)
            assert value > 100 * BOUND  # the held-out leak is real, unlike the realised one


# --------------------------------------------------------------------------------------
# the degradation tracker without a loss to differentiate (GRPO)
# --------------------------------------------------------------------------------------


class RecordingGRPO(trainers.FrontierGRPOTrainer):
    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        params = [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
        self.__dict__.setdefault("raw", []).append(flat(params) - self._probe_before)
        super()._after_optimizer_step(optimizer, args, kwargs)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        super()._before_optimizer_step(optimizer, args, kwargs)
        params = [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
        self._probe_before = flat(params)


@pytest.mark.parametrize("projection", ["nullspace", "none"])
def test_grpo_tracker_safety_direction_is_the_sum_of_raw_updates(
    model_dir: Path, tmp_path: Path, projection: str
) -> None:
    tok = build_tokenizer()
    prompts = Dataset.from_list([{"prompt": f"harm w{i} =>"} for i in range(8)])
    values = common(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=3,
        projection=projection,
        degradation_tracking=True,
        safety_direction_batches=2,
        degradation_eval_steps=1,
    )
    args = cfg.FrontierGRPOConfig(num_generations=4, max_completion_length=8, **values)
    trainer = RecordingGRPO(
        model=str(model_dir), reward_funcs=refusal_reward, args=args, train_dataset=prompts,
        processing_class=tok, capability_datasets=caps(),
    )
    cb = trainer.degradation_callback
    assert cb is not None and cb.safety_mode == "updates"
    theta0 = flat([p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad])
    model0 = AutoModelForCausalLM.from_pretrained(model_dir)
    params0 = [p for p in model0.parameters() if p.requires_grad]
    grads0 = {task: independent_gradient(model0, params0, rows, tok) for task, rows in ROWS.items()}
    snapshots: list[torch.Tensor] = []

    class Snap(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            snapshots.append(flat([p for p in model.parameters() if p.requires_grad]))

    trainer.add_callback(Snap())
    trainer.train()
    if projection == "none":
        v = snapshots[1] - theta0  # nothing projected: Σ raw u = θ_2 − θ_0
    else:
        v = trainer.raw[0] + trainer.raw[1]
        realised = snapshots[1] - theta0
        assert float((v - realised).norm()) > 1e-3 * float(v.norm())  # the raw sum is not the applied one
    for row in cb.geometry["tasks"]:
        g = grads0[row["task"]]
        expected = float(g @ v) ** 2 / float(g.norm() ** 2 * v.norm() ** 2)
        assert row["tau"] == pytest.approx(expected, rel=1e-3, abs=1e-10), (row, expected)
    assert cb.summary is not None and [r["task"] for r in cb.summary["rows"]] == list(ROWS)


def test_loss_safety_direction_refused_for_online_trainers(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="safety_direction='updates'"):
        build("grpo", model_dir, tmp_path, degradation_tracking=True, safety_direction="loss")
