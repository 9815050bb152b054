"""capability_refresh_tasks (issue 15 §4): a refresh re-estimates m of the T tasks, round-robin.

What is checked, with T = 3 tasks and a refresh at every step:
* only the scheduled task's directions change at a refresh, the others stay bitwise (batch and sketch);
* the changed direction is ``capability_gradients`` on that task's own next batch;
* the first refresh, a forced refresh and ``None`` re-estimate every task;
* every applied update is orthogonal to every task's direction from that task's last refresh,
  recomputed by the test (gradient and ``capability_space='both'``);
* capability_loss / generalisation_leak are logged for the refreshed tasks only;
* resume from a checkpoint gives the uninterrupted run's directions and weights, bitwise;
* bad values are refused naming the field, and the dry-run plan shows the setting.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tiny import build_model_dir, build_tokenizer, capability_rows, preference_dataset, preference_rows
from transformers import TrainerCallback

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer
from frontier_trainer.directions import capability_gradients

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread

TASKS = ["copy", "count", "swap"]


def three_task_rows(n: int = 16) -> dict[str, list[dict[str, str]]]:
    rows = capability_rows(n)
    rows["swap"] = [{"prompt": f"w{i} w{i + 2} =>", "completion": f" w{i + 2} w{i}"} for i in range(n)]
    return rows


def three_tasks() -> dict[str, Dataset]:
    return {task: Dataset.from_list(rows) for task, rows in three_task_rows().items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def config(tmp_path: Path, **overrides: Any) -> FrontierDPOConfig:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=5,
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
        capability_batch_size=4,
        capability_refresh_tasks=1,
        degradation_tracking=False,
        seed=0,
    )
    values.update(overrides)
    return FrontierDPOConfig(**values)


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def scheduled(step: int, m: int, refresh_steps: int = 1, num_tasks: int = 3) -> set[str]:
    """The tasks the issue's rule re-estimates at ``step`` (after the first refresh)."""
    n = step // refresh_steps
    return {TASKS[(n * m + j) % num_tasks] for j in range(m)}


class Recorder(FrontierDPOTrainer):
    """At every refresh: the expected fresh gradient of every task on its own next batch (computed by the
    test with ``capability_gradients`` on a copy of the sampler, at the parameters of the refresh), the
    held directions after it, bitwise clones; and every applied update."""

    def refresh_directions(self) -> None:
        assert self.projector is not None and self.capability_sampler is not None
        sampler = copy.deepcopy(self.capability_sampler)
        model = self._unwrapped_model()
        expected = {
            task: [
                flat(capability_gradients(model, self.projector.params, sampler.next_batch(task))[1])
                for _ in range(self.args.capability_rank)
            ]
            for task in self.capability_tasks
        }
        super().refresh_directions()
        self.__dict__.setdefault("refreshes", []).append(
            {
                "step": self.state.global_step,
                "expected": expected,
                "dirs": [flat(d).clone() for d in self.projector.directions],
            }
        )

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        super()._before_optimizer_step(optimizer, args, kwargs)
        self._theta = flat(self.projector.params)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        super()._after_optimizer_step(optimizer, args, kwargs)
        self.__dict__.setdefault("updates", []).append(flat(self.projector.params) - self._theta)


def run(model_dir: Path, tmp_path: Path, callbacks: list[Any] | None = None, **overrides: Any) -> Recorder:
    trainer = Recorder(
        model=str(model_dir),
        args=config(tmp_path, **overrides),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=three_tasks(),
        callbacks=callbacks or [],
    )
    trainer.train()
    return trainer


def task_dirs(record: dict[str, Any], task: str, rank: int) -> list[torch.Tensor]:
    i = TASKS.index(task)
    return record["dirs"][i * rank : (i + 1) * rank]


def changed_tasks(before: dict[str, Any], after: dict[str, Any], rank: int) -> set[str]:
    """Tasks with any direction not bitwise equal between two refresh records."""
    return {
        task
        for task in TASKS
        if any(not torch.equal(a, b) for a, b in zip(task_dirs(before, task, rank), task_dirs(after, task, rank), strict=True))
    }


# --------------------------------------------------------------------------------------
# 1-3: which tasks change, to what, and when every task is re-estimated
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"capability_rank": 2},
        {"capability_estimator": "sketch", "capability_sketch_batches": 2},
        {"capability_ema": 0.5},
    ],
    ids=["batch-rank2", "sketch", "ema"],
)
def test_only_the_scheduled_task_changes(model_dir: Path, tmp_path: Path, overrides: dict[str, Any]) -> None:
    rank = overrides.get("capability_rank", 1)
    trainer = run(model_dir, tmp_path, **overrides)
    records = trainer.refreshes
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all(len(r["dirs"]) == 3 * rank for r in records)
    for before, after in itertools.pairwise(records):
        assert changed_tasks(before, after, rank) == scheduled(after["step"], 1), after["step"]


def test_refreshed_direction_is_the_gradient_of_its_own_next_batch(model_dir: Path, tmp_path: Path) -> None:
    rank = 2
    trainer = run(model_dir, tmp_path, capability_rank=rank)
    first, *later = trainer.refreshes
    for task in TASKS:  # the first refresh: every task, from its own rows
        for got, want in zip(task_dirs(first, task, rank), first["expected"][task], strict=True):
            assert torch.equal(got, want), task
    for record in later:
        (task,) = scheduled(record["step"], 1)
        for r, (got, want) in enumerate(zip(task_dirs(record, task, rank), record["expected"][task], strict=True)):
            assert torch.equal(got, want), (record["step"], task, r)
            for other in set(TASKS) - {task}:  # not another task's rows
                assert not torch.equal(got, record["expected"][other][r])


def test_none_re_estimates_every_task_at_every_refresh(model_dir: Path, tmp_path: Path) -> None:
    trainer = run(model_dir, tmp_path, max_steps=3, capability_refresh_tasks=None)
    for record in trainer.refreshes:
        for task in TASKS:
            (got,) = task_dirs(record, task, 1)
            assert torch.equal(got, record["expected"][task][0]), (record["step"], task)


class ForceRefreshAt(TrainerCallback):
    """Ask for a forced refresh (what a parameter-set change does) before the step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.trainer: FrontierDPOTrainer | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.trainer is not None:
            self.trainer._force_refresh = True


def test_forced_refresh_and_refresh_steps_re_estimate_as_scheduled(model_dir: Path, tmp_path: Path) -> None:
    """Refresh every 2 steps, m = 2 of 3: refresh n = step // 2 re-estimates tasks (2n, 2n+1) mod 3; a forced refresh at
    an off-schedule step re-estimates every task."""
    force = ForceRefreshAt(3)
    trainer = Recorder(
        model=str(model_dir),
        args=config(tmp_path, max_steps=6, capability_refresh_steps=2, capability_refresh_tasks=2),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=three_tasks(),
        callbacks=[force],
    )
    force.trainer = trainer
    trainer.train()
    records = trainer.refreshes
    assert [r["step"] for r in records] == [0, 2, 3, 4]
    by_step = {r["step"]: r for r in records}
    assert changed_tasks(by_step[0], by_step[2], 1) == scheduled(2, 2, refresh_steps=2) == {"swap", "copy"}
    assert changed_tasks(by_step[2], by_step[3], 1) == set(TASKS)  # forced: all
    assert changed_tasks(by_step[3], by_step[4], 1) == scheduled(4, 2, refresh_steps=2) == {"count", "swap"}


# --------------------------------------------------------------------------------------
# 4: exactness against every task's held direction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["gradient", "both"])
def test_every_update_is_orthogonal_to_every_tasks_last_direction(
    model_dir: Path, tmp_path: Path, space: str
) -> None:
    """The test's own record of each task's direction at its last refresh (unrestricted, from the
    test's gradient) is orthogonal to the next applied updates, kept tasks included. In 'both' the
    activation bases change at every refresh, so a kept direction must be restricted again from its
    unrestricted form."""
    overrides: dict[str, Any] = {"max_steps": 6}
    if space == "both":
        overrides.update(capability_space="both", activation_rank=2, activation_energy=1.0)
    trainer = run(model_dir, tmp_path, **overrides)
    last: dict[str, torch.Tensor] = {}
    worst = 0.0
    for record, update in zip(trainer.refreshes, trainer.updates, strict=True):
        tasks = TASKS if record["step"] == 0 else scheduled(record["step"], 1)
        for task in tasks:
            last[task] = record["expected"][task][0]
        assert float(update.norm()) > 0
        for task in TASKS:
            worst = max(worst, abs(float(last[task] @ update)) / float(last[task].norm() * update.norm()))
    assert worst <= 1e-5, worst
    leaks = [v for h in trainer.state.log_history for k, v in h.items() if k.startswith("frontier/leak/")]
    assert len(leaks) == 6 * 3 and max(leaks) <= 1e-5


def test_unprojected_update_is_not_orthogonal_to_the_directions(model_dir: Path, tmp_path: Path) -> None:
    """The measure can tell: the vanilla step from the same weights has a |cos| far from 0 against the
    same first-refresh directions."""
    record = run(model_dir, tmp_path, max_steps=1).refreshes[0]
    vanilla = FrontierDPOTrainer(
        model=str(model_dir),
        args=config(tmp_path / "none", max_steps=1, projection="none"),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=three_tasks(),
    )
    params = [p for p in vanilla.model.parameters() if p.requires_grad]
    before = flat(params)
    vanilla.train()
    delta = flat(params) - before
    cos = [abs(float(record["expected"][t][0] @ delta)) / float(record["expected"][t][0].norm() * delta.norm()) for t in TASKS]
    assert max(cos) > 1e-2, cos


def test_peak_state_bytes_stays_k_plus_one(model_dir: Path, tmp_path: Path) -> None:
    """capability_ema = 0: the re-estimated task's old tensors are dropped first, the kept ones counted:
    the peak is (T·k + 1)× the trainable bytes, as with every task re-estimated."""
    trainer = run(model_dir, tmp_path, max_steps=3, capability_rank=2)
    per = sum(p.numel() * p.element_size() for p in trainer.projector.params)
    assert trainer.peak_state_bytes == (3 * 2 + 1) * per


class DropCheck(FrontierDPOTrainer):
    """At each round-robin refresh, counts how many of the re-estimated task's old direction tensors are
    still alive (weak references) when its first capability batch is drawn."""

    def refresh_directions(self) -> None:
        assert self.projector is not None and self.capability_sampler is not None
        alive = self.__dict__.setdefault("alive", [])
        if self.state.global_step == 0:
            super().refresh_directions()
            return
        (task,) = scheduled(self.state.global_step, 1)
        i, rank = TASKS.index(task), self.args.capability_rank
        refs = [weakref.ref(t) for d in self.projector.directions[i * rank : (i + 1) * rank] for t in d]
        sampler = self.capability_sampler
        original = sampler.next_batch
        seen: list[int] = []

        def next_batch(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == task and not seen:
                seen.append(sum(r() is not None for r in refs))
            return original(name, *args, **kwargs)

        sampler.next_batch = next_batch  # type: ignore[method-assign]
        try:
            super().refresh_directions()
        finally:
            del sampler.next_batch
        alive.extend(seen)


def test_re_estimated_tasks_old_tensors_are_freed_before_computing(model_dir: Path, tmp_path: Path) -> None:
    """capability_ema = 0: what keeps the peak at (k+1)x is that the old tensors are gone, not only counted."""
    trainer = DropCheck(
        model=str(model_dir),
        args=config(tmp_path, max_steps=4, capability_rank=2),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=three_tasks(),
    )
    trainer.train()
    assert trainer.alive == [0, 0, 0]


# --------------------------------------------------------------------------------------
# 5: logged only for the refreshed tasks
# --------------------------------------------------------------------------------------


def test_capability_loss_and_generalisation_leak_only_for_refreshed_tasks(model_dir: Path, tmp_path: Path) -> None:
    trainer = run(model_dir, tmp_path, max_steps=4)
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for h in history:
        refresh_step = h["step"] - 1  # the refresh before optimizer step s is logged with step s + 1
        want = set(TASKS) if refresh_step == 0 else scheduled(refresh_step, 1)
        losses = {k.split("/")[-1] for k in h if k.startswith("frontier/capability_loss/")}
        leaks = {k.split("/")[-1] for k in h if k.startswith("frontier/generalisation_leak/")}
        assert losses == want, h
        assert leaks == (set() if refresh_step == 0 else want), h  # no applied update before step 0


# --------------------------------------------------------------------------------------
# 6: resume
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["gradient", "both"])
def test_resume_gives_the_uninterrupted_directions(model_dir: Path, tmp_path: Path, space: str) -> None:
    common: dict[str, Any] = dict(max_steps=5, save_strategy="steps", save_steps=2)
    if space == "both":
        common.update(capability_space="both", activation_rank=2, activation_energy=1.0)
    runs = []
    for name, resume in (("full", None), ("resumed", tmp_path / "full" / "out" / "checkpoint-2")):
        trainer = Recorder(
            model=str(model_dir),
            args=config(tmp_path / name, **common),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
            capability_datasets=three_tasks(),
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runs.append(trainer)
    full, resumed = runs
    # the resumed run's refreshes at steps 2..4 re-estimate only the scheduled task, as the full run's did
    assert [r["step"] for r in resumed.refreshes] == [2, 3, 4]
    for a, b in zip(full.refreshes[2:], resumed.refreshes, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a["dirs"], b["dirs"], strict=True)), a["step"]
    for x, y in zip(full.projector.params, resumed.projector.params, strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------
# 7: bad input, and the dry-run plan
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, "2", True, 1.5])
def test_bad_values_are_refused_naming_the_field(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ValueError, match=r"capability_refresh_tasks must be None .* or an integer >= 1"):
        config(tmp_path, capability_refresh_tasks=value)


def test_more_tasks_than_there_are_is_refused_at_build(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"capability_refresh_tasks=4 is more than the 3 capability task\(s\)") as err:
        FrontierDPOTrainer(
            model=str(model_dir),
            args=config(tmp_path, capability_refresh_tasks=4),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
            capability_datasets=three_tasks(),
        )
    assert "at most 3" in str(err.value)


def test_dry_run_plan_shows_the_setting(model_dir: Path, tmp_path: Path) -> None:
    from trl import ModelConfig, ScriptArguments

    from frontier_trainer.plan import FrontierPlan

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in preference_rows()))
    caps = {}
    for task, rows in three_task_rows().items():
        caps[task] = str(tmp_path / f"{task}.jsonl")
        Path(caps[task]).write_text("\n".join(json.dumps(r) for r in rows))
    texts = {}
    for m in (None, 2):
        args = config(tmp_path, capability_datasets=caps, capability_refresh_tasks=m, capability_refresh_steps=5)
        model_args = ModelConfig(model_name_or_path=str(model_dir), dtype="float32")
        plan = FrontierPlan.build(args, model_args, ScriptArguments(dataset_name=str(prefs)), offline=True)
        texts[m] = "\n".join(plan.lines(args, model_args))
    assert "capability_refresh_tasks=None (every task at every refresh)" in texts[None]
    every = math.ceil(3 / 2) * 5
    assert f"capability_refresh_tasks=2 of 3 (round-robin: each task re-estimated every {every} steps)" in texts[2]
