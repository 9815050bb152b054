"""Tests that a broken implementation fails (issue 12 §3).

Each test checks a property, measured outside the trainer, that one of these mutations breaks:

* directions computed from another task's rows,
* directions never refreshed after step 0,
* the θ_old snapshot taken after the optimizer step (so u = 0 and nothing is projected).

The probe (tests/tiny.LeakProbe) records θ around each real optimizer step and recomputes every
task's gradient from that task's rows at θ_before with its own code. With 6 rows per task and
``capability_batch_size=8`` a direction is the gradient over all of a task's rows, so at a
refresh step the held direction must equal the probe's gradient of the same task (and not the
other task's), and the applied update must be orthogonal to it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from datasets import Dataset
from tiny import LeakProbe, build_model_dir, build_tokenizer, capability_rows, flat, preference_dataset

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer

ROWS = capability_rows(6)
TASKS = list(ROWS)
REFRESH = 2
STEPS = 5
SCHEDULED = [s for s in range(STEPS) if s % REFRESH == 0]  # 0, 2, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread


class DirectionProbe(LeakProbe):
    """Also keeps, at every step, the directions the projector held for that step."""

    trainer: Any = None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_optimizer_step(args, state, control, **kwargs)
        self.steps[-1]["held"] = [flat(d) for d in self.trainer.projector.directions]


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / float(a.norm() * b.norm())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FrontierDPOTrainer, DirectionProbe]:
    tmp = tmp_path_factory.mktemp("mutations")
    model_dir = build_model_dir(tmp / "model")
    probe = DirectionProbe(ROWS, build_tokenizer())
    args = FrontierDPOConfig(
        output_dir=str(tmp / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        capability_refresh_steps=REFRESH,
        capability_batch_size=8,
        degradation_tracking=False,
        seed=0,
    )
    trainer = FrontierDPOTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets={t: Dataset.from_list(r) for t, r in ROWS.items()},
        callbacks=[probe],
    )
    probe.trainer = trainer
    trainer.train()
    assert len(probe.steps) == STEPS
    return trainer, probe


def test_each_direction_is_its_own_tasks_gradient_at_every_refresh(run) -> None:
    """Kills: directions from another task's rows; directions never refreshed after step 0."""
    _, probe = run
    for step in SCHEDULED:
        record = probe.steps[step]
        for i, task in enumerate(TASKS):
            own = cos(record["held"][i], record["grads"][task])
            assert own >= 1 - 1e-6, (step, task, own)
            for other in TASKS:
                if other != task:  # the tasks are distinguishable, so a swap cannot pass
                    assert cos(record["held"][i], record["grads"][other]) < 0.99, (step, task, other)


def test_directions_change_exactly_at_the_scheduled_refreshes(run) -> None:
    """Kills: never refreshed (held directions stay those of step 0), and refreshing off schedule."""
    trainer, probe = run
    for step in range(1, STEPS):
        same = all(
            torch.equal(a, b) for a, b in zip(probe.steps[step]["held"], probe.steps[step - 1]["held"], strict=True)
        )
        assert same == (step not in SCHEDULED), step
        if step in SCHEDULED:
            # the gradient really moved between refreshes: a stale direction would be measurably off
            for i, task in enumerate(TASKS):
                assert cos(probe.steps[step - REFRESH]["held"][i], probe.steps[step]["grads"][task]) < 1 - 1e-4
    refresh_logs = [h["step"] for h in trainer.state.log_history if "frontier/refresh_seconds" in h]
    assert refresh_logs == [s + 1 for s in SCHEDULED]  # logged after the step that refreshed


def test_applied_update_is_orthogonal_at_every_refresh(run) -> None:
    """Kills: the snapshot taken after the step (u = 0: the update goes through unprojected);
    also wrong-task and stale directions (the update is then not orthogonal to the true gradient)."""
    trainer, probe = run
    for step in SCHEDULED:
        assert max(probe.steps[step]["leak"].values()) <= 1e-5, (step, probe.steps[step]["leak"])
    # not vacuous: the optimizer's raw updates had a measurable component along the directions
    taus = [h[f"frontier/tau/{t}"] for h in trainer.state.log_history for t in TASKS if f"frontier/tau/{t}" in h]
    assert max(taus) > 1e-6, taus
    assert all(float(s["delta"].norm()) > 0 for s in probe.steps)
