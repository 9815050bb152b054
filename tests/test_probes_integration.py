"""Representation-space τ_i wired into the tracker, the geometry report and ``frontier-geometry``
(issue 13 §2), checked against :func:`frontier_trainer.probes.probe_tax_rates` run here on the
same prompts, taken from the test's own data (not from the code under test)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset
from scipy import stats
from tiny import build_model_dir, build_tokenizer, capability_rows, preference_dataset, preference_rows
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer, lab, probes
from frontier_trainer.geometry_report import main
from frontier_trainer.report import PROBE_ROWS, format_report, geometry_report, probe_prompts
from frontier_trainer.tracking import (
    REPR_COLUMN,
    TABLE_COLUMNS,
    DegradationCallback,
    probe_geometry_from_dict,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread

TASKS = ["copy", "count", "echo"]
HARMLESS = [f"w{i % 10} w{(i * 3) % 10} =>" for i in range(16)]
"""The harmful preference prompts of tiny.preference_rows without their 'harm' token."""


def rows(start: int, n: int) -> dict[str, list[dict[str, str]]]:
    """Three capability tasks (two can only tie: the task probes of two tasks are opposite)."""
    out = capability_rows(n, start)
    idx = range(start, start + n)
    out["echo"] = [
        {"prompt": f"w{i % 30} w{i % 30 + 1} w{i % 30 + 2} =>", "completion": f" w{i % 30 + 2}"} for i in idx
    ]
    return out


def caps() -> dict[str, Dataset]:
    return {t: Dataset.from_list(r) for t, r in rows(0, 20).items()}


def evals() -> dict[str, Dataset]:
    return {t: Dataset.from_list(r) for t, r in rows(20, 10).items()}


def reference(model_dir: Path, harmful: list[str]) -> probes.ProbeGeometry:
    """The probes library on the untrained model and on prompts built here."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tasks = {t: [r["prompt"] for r in task_rows] for t, task_rows in rows(0, 20).items()}
    return probes.probe_tax_rates(model, build_tokenizer(), harmful, HARMLESS, tasks, batch_size=3)


class FakeTable:
    def __init__(self, columns: list[str], data: list[list[Any]]) -> None:
        self.columns, self.data = columns, data


FAKE_WANDB = SimpleNamespace(Table=FakeTable, plot=SimpleNamespace(scatter=lambda *a, **k: "scatter"))


def capture(cb: DegradationCallback) -> list[dict[str, Any]]:
    """Everything the callback sends to wandb (its one seam), with a stand-in wandb for the table."""
    logged: list[dict[str, Any]] = []
    cb._wandb_log = lambda args, data: logged.append(data)
    cb._wandb = lambda args: FAKE_WANDB
    return logged


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> probes.ProbeGeometry:
    geo = reference(model_dir, [r["prompt"] for r in preference_rows(16)])
    taus = sorted(geo.tau.values())
    assert taus[-1] - taus[0] > 1e-3  # tasks differ: a mix-up of the tasks' prompts shows
    assert min(abs(c) for c in geo.cos.values()) > 1e-3  # signs defined: swapping harmful/harmless shows
    return geo


def frontier_config(tmp_path: Path, **overrides: Any) -> FrontierDPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        capability_batch_size=4,
        degradation_eval_steps=1,
        seed=0,
    )
    values.update(overrides)
    return FrontierDPOConfig(**values)


def frontier_trainer(
    model_dir: Path, tmp_path: Path, caps_: Any = None, **overrides: Any
) -> FrontierDPOTrainer:
    return FrontierDPOTrainer(
        model=str(model_dir),
        args=frontier_config(tmp_path, **overrides),
        train_dataset=preference_dataset(16),
        processing_class=build_tokenizer(),
        capability_datasets=caps() if caps_ is None else caps_,
        capability_eval_datasets={t: d for t, d in evals().items() if caps_ is None or t in caps_},
    )


def write_prompts(path: Path, prompts: list[str], column: str = "prompt") -> Path:
    Dataset.from_dict({column: prompts}).to_json(path)
    return path


# --------------------------------------------------------------------------------------
# the tracker, through the trainer config
# --------------------------------------------------------------------------------------


def test_trainer_field_logs_representation_tau_next_to_gradient_tau(
    model_dir: Path, tmp_path: Path, ref: probes.ProbeGeometry
) -> None:
    """degradation_probe_harmless (a file) → step-0 tau_repr per task and its layer, the table's
    tau_repr column (wandb, JSON, CSV), the rank correlation and the representation block."""
    harmless = write_prompts(tmp_path / "harmless.jsonl", HARMLESS)
    trainer = frontier_trainer(model_dir, tmp_path, degradation_probe_harmless=str(harmless))
    cb = trainer.degradation_callback
    assert cb is not None and cb.probe_harmless == HARMLESS
    logged = capture(cb)
    trainer.train()

    step0 = logged[0]
    assert step0["train/global_step"] == 0
    for task in TASKS:
        assert step0[f"degradation/tau_repr/{task}"] == pytest.approx(ref.tau[task], rel=1e-4, abs=1e-7)
        assert f"degradation/tau/{task}" in step0  # next to the gradient-space τ_i
    assert step0["degradation/tau_repr_layer"] == ref.layer

    out = Path(trainer.args.output_dir) / "degradation"
    table = json.loads((out / "degradation_table.json").read_text())
    rep = table["representation"]
    assert rep["layer"] == ref.layer and rep["layers"] == ref.layers
    for task in TASKS:
        assert rep["tau"][task] == pytest.approx(ref.tau[task], rel=1e-4, abs=1e-7)
        assert rep["cos"][task] == pytest.approx(ref.cos[task], rel=1e-4, abs=1e-7)
    assert [r["task"] for r in table["rows"]] == TASKS
    tau_repr = [r["tau_repr"] for r in table["rows"]]
    assert tau_repr == pytest.approx([ref.tau[t] for t in TASKS], rel=1e-4, abs=1e-7)
    observed = [r["observed"] for r in table["rows"]]
    assert all(o is not None for o in observed)
    ranks = table["rank_correlations"]
    assert ranks["spearman_tau_repr_vs_observed"] == pytest.approx(stats.spearmanr(tau_repr, observed)[0])
    assert ranks["kendall_tau_repr_vs_observed"] == pytest.approx(stats.kendalltau(tau_repr, observed)[0])

    with open(out / "degradation_table.csv") as handle:
        reader = csv.DictReader(handle)
        csv_rows = list(reader)
    assert reader.fieldnames == ["task", "tau", "tau_repr", "angle_deg", "regime", "predicted", "observed"]
    assert [float(r["tau_repr"]) for r in csv_rows] == pytest.approx(tau_repr)

    final = logged[-1]
    assert final["degradation/table"].columns == cb.table_columns
    assert REPR_COLUMN in final["degradation/table"].columns
    column = final["degradation/table"].columns.index(REPR_COLUMN)
    assert [row[column] for row in final["degradation/table"].data] == pytest.approx(tau_repr)
    assert final["degradation/rank/spearman_tau_repr_vs_observed"] == pytest.approx(
        ranks["spearman_tau_repr_vs_observed"]
    )
    assert cb.state_dict()["representation"] == rep  # a resumed run keeps the θ_0 measurement
    assert probe_geometry_from_dict(rep) == cb.repr_geometry

    # the rank correlation reads tau_repr (not τ): with tau_repr ordered like observed, then reversed,
    # it is +1 then −1, whatever the gradient-space τ_i are
    assert len(set(observed)) == len(observed)
    for sign in (1.0, -1.0):
        cb.repr_geometry = replace(
            cb.repr_geometry, tau={t: sign * o for t, o in zip(TASKS, observed, strict=True)}
        )
        assert cb._summary(2)["rank_correlations"]["spearman_tau_repr_vs_observed"] == pytest.approx(sign)


def test_updates_mode_logs_representation_tau_at_step_zero(
    model_dir: Path, tmp_path: Path, ref: probes.ProbeGeometry
) -> None:
    """safety_direction='updates' holds the gradient geometry back to step safety_batches; the probes
    measure at θ_0 and are in the step-0 record (plain trl.DPOTrainer, a list of prompts)."""
    trainer = DPOTrainer(
        model=str(model_dir),
        args=DPOConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            seed=0,
        ),
        train_dataset=preference_dataset(16),
        processing_class=build_tokenizer(),
    )
    cb = DegradationCallback(
        caps(), batch_size=4, safety_direction="updates", safety_batches=2, probe_harmless=HARMLESS
    ).attach(trainer)
    logged = capture(cb)
    trainer.train()
    step0 = logged[0]
    assert step0["train/global_step"] == 0 and "degradation/tau/copy" not in step0
    assert {t: step0[f"degradation/tau_repr/{t}"] for t in TASKS} == pytest.approx(
        ref.tau, rel=1e-4, abs=1e-7
    )
    assert any("degradation/tau/copy" in r for r in logged[1:])  # the gradient geometry came later


def test_without_harmless_prompts_nothing_new_is_logged(model_dir: Path, tmp_path: Path) -> None:
    trainer = frontier_trainer(model_dir, tmp_path, max_steps=1)
    cb = trainer.degradation_callback
    assert cb is not None and cb.probe_harmless is None
    logged = capture(cb)
    trainer.train()
    assert logged and not any("tau_repr" in key for record in logged for key in record)
    assert logged[-1]["degradation/table"].columns == TABLE_COLUMNS
    out = Path(trainer.args.output_dir) / "degradation"
    table = json.loads((out / "degradation_table.json").read_text())
    assert "representation" not in table and cb.repr_geometry is None
    assert not any("tau_repr" in key for key in table["rank_correlations"])
    assert all(set(r) == set(TABLE_COLUMNS) for r in table["rows"])
    with open(out / "degradation_table.csv") as handle:
        assert csv.DictReader(handle).fieldnames == TABLE_COLUMNS
    assert cb.state_dict()["representation"] is None


# --------------------------------------------------------------------------------------
# bad input: refused when the config or the trainer is built, naming the field
# --------------------------------------------------------------------------------------


def test_bad_config_values_are_refused() -> None:
    for value in ("", "  ", 3):
        with pytest.raises(ValueError, match="degradation_probe_harmless"):
            FrontierDPOConfig(output_dir="unused", use_cpu=True, degradation_probe_harmless=value)
    with pytest.raises(ValueError, match=r"degradation_probe_harmless.*degradation_tracking"):
        FrontierDPOConfig(
            output_dir="unused",
            use_cpu=True,
            degradation_probe_harmless="lab:benign",
            degradation_tracking=False,
        )


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing file", r"degradation_probe_harmless: could not load.*missing\.jsonl"),
        ("blank prompts", r"degradation_probe_harmless\[0\]: blank prompt"),
        ("one prompt", r"degradation_probe_harmless: 1 prompt.*at least 2"),
        ("no prompt column", r"degradation_probe_harmless.*'prompt' column"),
        ("text task", r"degradation_probe_harmless: capability task 'notes'.*no 'prompt'"),
        ("one task", r"degradation_probe_harmless: .*at least two capability tasks"),
    ],
)
def test_bad_probe_inputs_are_refused_before_training(
    model_dir: Path, tmp_path: Path, case: str, match: str
) -> None:
    harmless = write_prompts(tmp_path / "harmless.jsonl", HARMLESS)
    task_sets: Any = None
    if case == "missing file":
        harmless = tmp_path / "missing.jsonl"
    elif case == "blank prompts":
        write_prompts(harmless, ["  ", "w1 =>"])
    elif case == "one prompt":
        write_prompts(harmless, ["w1 =>"])
    elif case == "no prompt column":
        write_prompts(harmless, HARMLESS, column="text")
    elif case == "text task":
        task_sets = {**caps(), "notes": Dataset.from_dict({"text": [f"w{i} w{i + 1}" for i in range(8)]})}
    elif case == "one task":
        task_sets = {"copy": caps()["copy"]}
    with pytest.raises(ValueError, match=match):
        frontier_trainer(model_dir, tmp_path, task_sets, degradation_probe_harmless=str(harmless))


def test_callback_refuses_empty_or_one_sided_probe_sets() -> None:
    with pytest.raises(ValueError, match="probe_harmless: no prompt"):
        DegradationCallback(caps(), probe_harmless=[])
    with pytest.raises(ValueError, match=r"probe_harmless\[1\]: prompts must be strings"):
        DegradationCallback(caps(), probe_harmless=["w1 =>", [{"role": "user", "content": "w2"}]])
    with pytest.raises(ValueError, match="probe_harmful is given without probe_harmless"):
        DegradationCallback(caps(), probe_harmful=HARMLESS)


def test_probe_prompts_subset_is_seeded_and_drawn_from_the_set() -> None:
    prompts = [f"w{i % 40} w{i // 40} =>" for i in range(PROBE_ROWS + 40)]
    first = probe_prompts("p", prompts, seed=1)
    assert len(first) == PROBE_ROWS == len(set(first)) and set(first) <= set(prompts)
    assert probe_prompts("p", Dataset.from_dict({"prompt": prompts}), seed=1) == first
    assert probe_prompts("p", prompts, seed=2) != first
    assert probe_prompts("p", prompts[:10]) == prompts[:10]  # small sets: all of it, in order


# --------------------------------------------------------------------------------------
# the geometry report and frontier-geometry
# --------------------------------------------------------------------------------------


def test_geometry_report_adds_tau_repr(model_dir: Path, ref: probes.ProbeGeometry) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    kwargs: dict[str, Any] = dict(batches=1, batch_size=4, progress=False)
    report = geometry_report(
        model, build_tokenizer(), preference_dataset(16), caps(), harmless_prompts=HARMLESS, **kwargs
    )
    assert [r["task"] for r in report["tasks"]] == TASKS
    for row in report["tasks"]:
        assert row["tau_repr"] == pytest.approx(ref.tau[row["task"]], rel=1e-4, abs=1e-7)
        assert report["representation"]["cos"][row["task"]] == pytest.approx(
            ref.cos[row["task"]], rel=1e-4, abs=1e-7
        )
    assert report["representation"]["layer"] == ref.layer
    text = format_report(report)
    assert "tau_repr" in text and f"layer {ref.layer}" in text
    plain = geometry_report(model, build_tokenizer(), preference_dataset(16), caps(), **kwargs)
    assert "representation" not in plain and not any("tau_repr" in r for r in plain["tasks"])
    assert "tau_repr" not in format_report(plain)
    for row, again in zip(report["tasks"], plain["tasks"], strict=True):
        assert row["tau"] == again["tau"]  # gradient space untouched by the probes


def test_cli_harmless_flag_on_the_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = lab.pretrain(
        hidden_size=32, num_layers=2, steps=4, batch_size=8, checkpoint_every=0, progress=False,
        cache_dir=tmp_path / "labcache",
    )  # fmt: skip
    prefs = lab.preference_dataset("train").select(range(48))
    prefs.to_json(tmp_path / "prefs.jsonl")
    tasks = ["arithmetic", "reverse", "chemistry"]
    out = tmp_path / "report.json"
    argv = ["--model", str(model_dir), "--preferences", str(tmp_path / "prefs.jsonl"), "--out", str(out)]
    for task in tasks:
        argv += ["--capability", f"{task}=lab:{task}"]
    argv += ["--batches", "1", "--batch-size", "16", "--max-length", "64", "--probe-rows", "5000"]
    assert main([*argv, "--harmless", "lab:benign"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())

    model, tok = lab.load(model_dir)
    data = lab.capability_datasets("train", tasks=tasks)
    expected = probes.probe_tax_rates(
        model,
        tok,
        list(prefs["prompt"]),
        list(lab.helpfulness_dataset("train")["prompt"]),  # lab:benign: the benign look-alikes
        {t: list(data[t]["prompt"]) for t in tasks},
        batch_size=64,
    )
    assert [r["task"] for r in saved["tasks"]] == tasks
    for row in saved["tasks"]:
        assert row["tau_repr"] == pytest.approx(expected.tau[row["task"]], rel=1e-4, abs=1e-7)
        assert saved["representation"]["cos"][row["task"]] == pytest.approx(
            expected.cos[row["task"]], rel=1e-4, abs=1e-7
        )
    assert saved["representation"]["layer"] == expected.layer
    header = next(line for line in printed.splitlines() if line.startswith("task"))
    assert header.split()[-1] == "tau_repr"

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--harmless", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2
    assert "--harmless: could not load" in capsys.readouterr().err
