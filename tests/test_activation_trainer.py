"""capability_space="activation"/"both" in the trainer (issue 13 §1): the guarantee measured by the
test's own hooks and basis, on FrontierDPOTrainer's real optimizer seam; bad settings refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tiny import LeakProbe, build_model_dir, build_tokenizer, capability_rows, preference_dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer
from frontier_trainer.mixin import STATE_FILE

#: 6 rows per task, capability batch 8: each refresh batch holds all of a task's rows, so the test
#: knows exactly which inputs the bases are estimated from.
ROWS = capability_rows(6)
RANK = 4
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def args(tmp_path: Path, **overrides: Any) -> FrontierDPOConfig:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        capability_refresh_steps=1,
        capability_batch_size=8,
        degradation_tracking=False,
        capability_space="activation",
        activation_rank=RANK,
        activation_energy=1.0,
        seed=0,
    )
    values.update(overrides)
    return FrontierDPOConfig(**values)


class InputSubspaceProbe(TrainerCallback):
    """Before each optimizer step: the inputs of ``MODULES`` on every capability row (own hooks,
    unpadded rows), their top-RANK covariance eigenvectors U; after it: ‖ΔW U‖ / (‖ΔW‖‖U‖)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.ratios: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.model = model
        modules = dict(model.named_modules())
        cov = {name: torch.zeros(modules[name].in_features, modules[name].in_features, dtype=torch.float64) for name in MODULES}
        def record(name: str) -> Any:
            def hook(module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0][0].double()  # one unpadded row: every position counts
                cov[name].add_(x.T @ x)

            return hook

        handles = [modules[name].register_forward_pre_hook(record(name)) for name in MODULES]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for rows in ROWS.values():
                    for row in rows:
                        ids = self.tok(row["prompt"] + row["completion"])["input_ids"]
                        model(input_ids=torch.tensor([ids]))
        finally:
            model.train(was)
            for h in handles:
                h.remove()
        self.bases = {name: torch.linalg.eigh(c).eigenvectors[:, -RANK:] for name, c in cov.items()}
        self.before = {name: modules[name].weight.detach().double().clone() for name in MODULES}

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        modules = dict(self.model.named_modules())
        out = {}
        for name in MODULES:
            delta = modules[name].weight.detach().double() - self.before[name]
            U = self.bases[name]
            out[name] = float((delta @ U).norm() / (delta.norm() * torch.linalg.matrix_norm(U, 2)))
        self.ratios.append(out)


def train(model_dir: Path, tmp_path: Path, callbacks: list[Any], **overrides: Any) -> FrontierDPOTrainer:
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = FrontierDPOTrainer(
        model=model,
        args=args(tmp_path, **overrides),
        train_dataset=preference_dataset(),
        processing_class=tok,
        capability_datasets={task: Dataset.from_list(rows) for task, rows in ROWS.items()},
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_activation_mode_update_is_orthogonal_to_the_capability_inputs(model_dir: Path, tmp_path: Path) -> None:
    probe = InputSubspaceProbe(build_tokenizer())
    trainer = train(model_dir, tmp_path, [probe])
    assert trainer.projector is None and trainer.activation_projector is not None
    assert len(probe.ratios) == 3
    for step in probe.ratios:
        for name, ratio in step.items():
            assert ratio <= 1e-5, (name, step)
    logged = [h for h in trainer.state.log_history if "frontier/activation_removed" in h]
    assert logged and all(h["frontier/activation_removed"] > 0 for h in logged)


def test_unprojected_update_is_not_orthogonal(model_dir: Path, tmp_path: Path) -> None:
    """The probe can tell: without the projection the same ratio is large."""
    probe = InputSubspaceProbe(build_tokenizer())
    train(model_dir, tmp_path, [probe], projection="none", capability_space="gradient")
    assert max(r for step in probe.ratios for r in step.values()) > 1e-2


def test_both_mode_keeps_both_guarantees(model_dir: Path, tmp_path: Path) -> None:
    tok = build_tokenizer()
    probe = InputSubspaceProbe(tok)
    leak = LeakProbe(ROWS, tok)
    trainer = train(model_dir, tmp_path, [probe, leak], capability_space="both")
    assert trainer.projector is not None and trainer.activation_projector is not None
    assert max(r for step in probe.ratios for r in step.values()) <= 1e-5
    assert leak.max_leak() <= 1e-5


def test_activation_state_is_checkpointed(model_dir: Path, tmp_path: Path) -> None:
    trainer = train(model_dir, tmp_path, [], save_strategy="steps", save_steps=3, max_steps=3)
    state = torch.load(Path(trainer.args.output_dir) / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert state["activation_step"] == 2 and state["activation"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"projection": "frontier", "capability_tolerance": 0.1}, "capability_space='both'"),
        ({"activation_rank": 0}, "activation_rank must be an integer >= 1"),
        ({"activation_energy": 1.5}, r"activation_energy must be in \(0, 1\]"),
        ({"capability_space": "activations"}, "capability_space must be one of"),
    ],
)
def test_bad_activation_settings_are_refused(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        args(tmp_path, **overrides)


def test_rank_larger_than_inputs_is_refused_before_training(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"capability_space='activation'.*activation_rank"):
        FrontierDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            args=args(tmp_path, activation_rank=64),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
            capability_datasets={task: Dataset.from_list(rows) for task, rows in ROWS.items()},
        )
