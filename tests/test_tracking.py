"""Degradation tracking (Prediction 1) and the pre-training geometry report, checked independently."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset
from scipy import stats
from tiny import build_model_dir, build_tokenizer, capability_datasets, preference_dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
from wandb_reader import read_history

from frontier_trainer import geometry
from frontier_trainer.directions import build_capability_sampler
from frontier_trainer.geometry_report import (
    capability_directions,
    conflict_geometry,
    geometry_report,
    gram_coordinates,
    gram_matrix,
    main,
    safety_direction,
    task_geometry,
)
from frontier_trainer.report import direction_coverage, format_report, span_coverage
from frontier_trainer.tracking import DegradationCallback, kendall, rankdata, spearman

TASKS = ["copy", "count"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def dpo_args(tmp_path: Path, **overrides: Any) -> DPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return DPOConfig(**values)


def eval_sets() -> dict[str, Dataset]:
    """Held-out rows: disjoint from the direction sets of tiny.capability_datasets (indices 20..29)."""
    copy = [{"prompt": f"copy w{i} w{i + 1} =>", "completion": f" w{i} w{i + 1}"} for i in range(20, 30)]
    count = [
        {"prompt": f"count w{i} =>", "completion": f" w{i + 1} w{i + 2} w{i + 3}"} for i in range(20, 30)
    ]
    return {"copy": Dataset.from_list(copy), "count": Dataset.from_list(count)}


def trainer_with_callback(
    model_dir: Path, tmp_path: Path, args: DPOConfig, dtype: torch.dtype | None = None, **kwargs: Any
) -> tuple[DPOTrainer, Any]:
    models = {}
    if dtype is not None:  # pass model objects: TRL's model_init_kwargs accept no float64
        models = {
            "ref_model": AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        }
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype) if dtype else str(model_dir),
        **models,
        args=args,
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
    )
    kwargs.setdefault("batch_size", 4)
    callback = DegradationCallback(capability_datasets(), **kwargs).attach(trainer)
    return trainer, callback


def independent_f(model: torch.nn.Module, rows: Dataset) -> float:
    """Mean completion log-likelihood pooled over tokens, one row at a time (no shared code)."""
    tok = build_tokenizer()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt_ids = tok(row["prompt"])["input_ids"]
            ids = tok(row["prompt"] + row["completion"])["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for pos in range(len(prompt_ids), len(ids)):
                total += float(logp[pos - 1, ids[pos]])
                count += 1
    return total / count


# --------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------


def test_rank_correlations_match_scipy() -> None:
    rng = random.Random(0)
    for n in (2, 3, 6, 11):
        for _ in range(20):
            x = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]  # ties included
            y = [rng.choice([1.0, rng.random()]) for _ in range(n)]
            assert rankdata(x) == pytest.approx(list(stats.rankdata(x)))
            for ours, ref in (
                (spearman(x, y), stats.spearmanr(x, y)[0]),
                (kendall(x, y), stats.kendalltau(x, y)[0]),
            ):
                if math.isnan(ref):
                    assert math.isnan(ours)
                else:
                    assert ours == pytest.approx(ref, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1.0], [2.0]))


def test_gram_geometry_equals_geometry_on_raw_vectors() -> None:
    gen = torch.Generator().manual_seed(1)
    v1, v2 = (
        torch.randn(50, generator=gen, dtype=torch.float64),
        torch.randn(50, generator=gen, dtype=torch.float64),
    )
    C = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    C[:, 0] += 2 * v1 - 2 * v2  # opposite-sign projections: Thm 6.4 case 1
    vecs = [[x] for x in (v1, v2, *C.T)]
    G = gram_matrix(vecs)
    X = gram_coordinates(G)
    assert torch.allclose(X.T @ X, G, atol=1e-9)
    tasks = ["a", "b", "c"]
    keep = [0, 2, 3, 4]  # [v1, c_1, c_2, c_3]
    geo = task_geometry(G[keep][:, keep], tasks, budget=2.0)
    taus = geometry.task_tax_rates(v1, C)
    for row, tau, c in zip(geo["tasks"], taus.tolist(), C.T, strict=True):
        assert row["tau"] == pytest.approx(tau, abs=1e-10)
        assert row["angle_deg"] == pytest.approx(math.degrees(math.acos(math.sqrt(tau))), abs=1e-6)
        assert row["free_safety"] == pytest.approx(2.0 * math.sqrt(1 - tau))
        assert row["cos"] == pytest.approx(float(v1 @ c / (v1.norm() * c.norm())))
    assert geo["joint_tau"] == pytest.approx(geometry.tax_rate(v1, C), abs=1e-10)
    conflict = conflict_geometry(G, tasks)
    assert conflict["angle_all_preserved_deg"] == pytest.approx(
        math.degrees(geometry.effective_angle(v1, v2, C))
    )
    gains = {}
    for row, c in zip(conflict["tasks"], C.T, strict=True):
        eff = geometry.conflict_effect(v1, v2, c)
        assert row["preserved_correlation"] == pytest.approx(eff.preserved, abs=1e-10)
        assert (row["case"], row["helps"]) == (eff.case, eff.helps)
        gains[row["task"]] = eff.preserved - eff.rho
    assert conflict["tasks"][0]["case"] == "opposite_sign"
    assert conflict["recommended"] == sorted([t for t in tasks if gains[t] > 0], key=lambda t: -gains[t])
    assert "a" in conflict["recommended"]


def test_task_geometry_is_invariant_to_gradient_scale() -> None:
    """A saturated capability has a tiny gradient; its τ must not depend on that norm."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(40, generator=gen, dtype=torch.float64) * 1e3
    C = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    C[:, 1] *= 1e-7
    G = gram_matrix([[x] for x in (v, *C.T)])
    geo = task_geometry(G, ["a", "b", "c"])
    for row, tau in zip(geo["tasks"], geometry.task_tax_rates(v, C).tolist(), strict=True):
        assert row["tau"] == pytest.approx(tau, abs=1e-10)
    assert geo["joint_tau"] == pytest.approx(geometry.tax_rate(v, C), abs=1e-9)


# --------------------------------------------------------------------------------------
# geometry report
# --------------------------------------------------------------------------------------


def helpfulness_dataset() -> Dataset:
    return Dataset.from_list(
        [
            {"prompt": f"count w{i} =>", "chosen": f" w{i + 1} w{i + 2}", "rejected": " sorry refuse"}
            for i in range(8)
        ]
    )


def trl_and_ours_dpo_directions(
    model_dir: Path, tmp_path: Path, prefs: Dataset, tok: Any
) -> tuple[torch.Tensor, torch.Tensor, Any, list[torch.Tensor]]:
    """−∇L_DPO of trl.DPOTrainer's own loss on 8 rows, and ours (``safety_direction``) on the same rows, flat;
    with the trainer and the parameters they were taken at."""
    trainer = DPOTrainer(model=str(model_dir), args=dpo_args(tmp_path), train_dataset=prefs, processing_class=tok)
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [p for p in model.parameters() if p.requires_grad]
    ds = trainer._remove_unused_columns(trainer.train_dataset, description="test")
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(8)]))
    model.eval()
    dpo = torch.cat([-g.reshape(-1) for g in torch.autograd.grad(trainer.compute_loss(model, batch), params)])
    _, ours = safety_direction(model, params, tok, prefs, batches=1, batch_size=8)
    return dpo, torch.cat([g.reshape(-1) for g in ours]), trainer, params


def test_safety_direction_is_parallel_to_trl_dpo_gradient_at_init(model_dir: Path, tmp_path: Path) -> None:
    """The documented equivalence: ∇(mean margin) ∝ −∇L_DPO when policy = reference."""
    dpo, ours_flat, trainer, _ = trl_and_ours_dpo_directions(
        model_dir, tmp_path, preference_dataset(8), build_tokenizer()
    )
    cos = float(dpo @ ours_flat / (dpo.norm() * ours_flat.norm()))
    assert cos > 0.9999
    beta = trainer.args.beta
    assert float(dpo.norm()) == pytest.approx(beta / 2 * float(ours_flat.norm()), rel=1e-3)


def test_safety_direction_renders_conversational_preferences_as_trl_does(model_dir: Path, tmp_path: Path) -> None:
    """Conversational prompt/chosen/rejected rows (TRL's format) give TRL's DPO gradient too: rendered with the
    chat template and no EOS appended (an appended EOS or the plain-text path breaks the parallelism)."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} => {% else %}{{ m['content'] }} "
        "{% endif %}{% endfor %}"
    )
    rows = preference_dataset(8)
    prefs = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"].removesuffix(" =>")}],
                "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
            }
            for r in rows
        ]
    )
    dpo, ours_flat, trainer, params = trl_and_ours_dpo_directions(model_dir, tmp_path, prefs, tok)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert float(dpo @ ours_flat / (dpo.norm() * ours_flat.norm())) > 0.9999
    mixed = Dataset.from_list([{**rows[0], "chosen": [{"role": "assistant", "content": "sorry"}]}])
    with pytest.raises(ValueError, match=r"preferences: prompt, chosen and rejected must be all strings or all lists"):
        safety_direction(model, params, tok, mixed, batches=1, batch_size=1)


def test_geometry_report_on_tiny_model_and_cli(model_dir: Path, tmp_path: Path, capsys) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = build_tokenizer()
    caps = capability_datasets()
    report = geometry_report(
        model,
        tok,
        preference_dataset(8),
        caps,
        second_preference_dataset=helpfulness_dataset(),
        batches=2,
        batch_size=4,
        progress=False,
    )
    # independent: flatten the same directions and use geometry.py on raw vectors
    params = [p for p in model.parameters() if p.requires_grad]
    _, v1 = safety_direction(model, params, tok, preference_dataset(8), batches=2, batch_size=4)
    _, v2 = safety_direction(model, params, tok, helpfulness_dataset(), batches=2, batch_size=4)
    sampler = build_capability_sampler(caps, tok, 512, 4, 0)
    dirs = capability_directions(model, params, sampler, batches=2)
    flat = {
        k: torch.cat([g.reshape(-1) for g in x]).double() for k, x in {"v1": v1, "v2": v2, **dirs}.items()
    }
    C = torch.stack([flat[t] for t in TASKS], dim=1)
    taus = geometry.task_tax_rates(flat["v1"], C)
    assert [r["task"] for r in report["tasks"]] == TASKS
    for row, tau in zip(report["tasks"], taus.tolist(), strict=True):
        assert row["tau"] == pytest.approx(tau, rel=1e-6, abs=1e-12)
        assert row["regime"] == geometry.regime(tau)
        assert row["free_safety"] == pytest.approx(math.sqrt(1 - tau))
    assert report["joint_tau"] == pytest.approx(geometry.tax_rate(flat["v1"], C), rel=1e-6)
    for row, task in zip(report["second"]["tasks"], TASKS, strict=True):
        assert row["tau"] == pytest.approx(
            float(geometry.task_tax_rates(flat["v2"], flat[task][:, None])[0]), rel=1e-6
        )
    conflict = report["conflict"]
    rho = float(flat["v1"] @ flat["v2"] / (flat["v1"].norm() * flat["v2"].norm()))
    assert conflict["rho"] == pytest.approx(rho, rel=1e-6)
    for row in conflict["tasks"]:
        eff = geometry.conflict_effect(flat["v1"], flat["v2"], flat[row["task"]])
        assert row["preserved_correlation"] == pytest.approx(eff.preserved, rel=1e-5, abs=1e-9)
        assert row["helps"] == eff.helps and row["case"] == eff.case
    assert set(conflict["recommended"]) == {r["task"] for r in conflict["tasks"] if r["helps"]}

    # the CLI on local files
    data = tmp_path / "data"
    data.mkdir()
    preference_dataset(8).to_json(data / "prefs.jsonl")
    helpfulness_dataset().to_json(data / "help.jsonl")
    for task, ds in caps.items():
        ds.to_json(data / f"{task}.jsonl")
    out = tmp_path / "report.json"
    argv = ["--model", str(model_dir), "--preferences", str(data / "prefs.jsonl"), "--preferences2"]
    argv += [str(data / "help.jsonl"), "--capability", f"copy={data / 'copy.jsonl'}"]
    argv += [
        "--capability",
        f"count={data / 'count.jsonl'}",
        "--out",
        str(out),
        "--batches",
        "2",
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "copy" in printed and "preserve to ease the conflict" in printed
    assert "per-row directions (capability_rank=8, capability_batch_size=1)" in printed  # --coverage-rows 8
    saved = json.loads(out.read_text())
    assert [r["task"] for r in saved["tasks"]] == TASKS
    assert saved["tasks"][0]["tau"] == pytest.approx(report["tasks"][0]["tau"], rel=1e-5)
    with pytest.raises(SystemExit):
        main(
            [
                "--model",
                str(model_dir),
                "--preferences",
                str(data / "missing.jsonl"),
                "--capability",
                "a=b.jsonl",
            ]
        )


# --------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------


def test_predicted_change_matches_finite_difference(model_dir: Path, tmp_path: Path) -> None:
    """Small SGD steps: Σ⟨∇f, Δθ⟩ equals the measured f(θ_T) − f(θ_0), itself checked independently."""
    model64 = build_model_dir(tmp_path / "model64", dtype=torch.float64)  # float64: no rounding noise
    args = dpo_args(
        tmp_path,
        optim="sgd",
        learning_rate=0.002,
        lr_scheduler_type="constant",
        max_steps=3,
    )
    evals = eval_sets()
    trainer, cb = trainer_with_callback(
        model64, tmp_path, args, dtype=torch.float64, eval_datasets=evals, eval_steps=1
    )
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    assert next(trained.parameters()).dtype == torch.float64
    initial = AutoModelForCausalLM.from_pretrained(model64, dtype=torch.float64)
    for task in TASKS:
        observed = independent_f(trained, evals[task]) - independent_f(initial, evals[task])
        assert cb.observed[task] == pytest.approx(observed, rel=1e-9)
        assert abs(observed) > 2e-5  # the steps did move f: the comparison is not vacuous
        assert cb.predicted[task] == pytest.approx(observed, rel=0.01), (task, cb.predicted, cb.observed)
    rows = {r["task"]: r for r in cb.summary["rows"]}
    assert rows["copy"]["observed"] == pytest.approx(-cb.observed["copy"])  # degradation = −change


def test_plain_dpo_trainer_unchanged_and_files_written(model_dir: Path, tmp_path: Path) -> None:
    """Attached to a plain trl.DPOTrainer: training is bitwise unchanged; table JSON/CSV/PNG written."""
    plain = DPOTrainer(
        model=str(model_dir),
        args=dpo_args(tmp_path / "plain"),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
    )
    plain.train()
    calls: list[tuple[str, Any]] = []

    def accuracy(model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        calls.append(("acc", model.training))
        return {"accuracy/copy": 0.5 + 0.1 * len(calls), "note": "ignored"}

    trainer, cb = trainer_with_callback(
        model_dir,
        tmp_path,
        dpo_args(tmp_path / "tracked"),
        eval_datasets=eval_sets(),
        eval_steps=2,
        metrics={"lab": accuracy},
    )
    logged: list[dict[str, Any]] = []
    cb._wandb_log = lambda args, data: logged.append(data)  # the one wandb seam
    trainer.train()
    for (name, a), b in zip(
        plain.accelerator.unwrap_model(plain.model).state_dict().items(),
        trainer.accelerator.unwrap_model(trainer.model).state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name

    def strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in history]

    assert strip(plain.state.log_history) == strip(trainer.state.log_history)
    assert not any("degradation" in k for e in trainer.state.log_history for k in e)

    assert [s for s in (r.get("train/global_step") for r in logged)] == [0, 2, 4]
    assert all(f"degradation/predicted/{t}" in logged[-1] for t in TASKS)
    assert logged[-1]["degradation/user_change/lab/accuracy/copy"] == pytest.approx(0.2)
    assert len(calls) == 3
    out = Path(trainer.args.output_dir) / "degradation"
    table = json.loads((out / "degradation_table.json").read_text())
    with open(out / "degradation_table.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["task"] for r in table["rows"]] == [r["task"] for r in csv_rows] == TASKS
    for row, crow in zip(table["rows"], csv_rows, strict=True):
        assert float(crow["tau"]) == pytest.approx(row["tau"]) and float(crow["observed"]) == pytest.approx(
            row["observed"]
        )
        assert row["observed"] == pytest.approx(-cb.observed[row["task"]])
    obs = [r["observed"] for r in table["rows"]]
    assert table["rank_correlations"]["spearman_tau_vs_observed"] == pytest.approx(
        stats.spearmanr([r["tau"] for r in table["rows"]], obs)[0]
    )
    assert (out / "degradation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offline_wandb_run_read_back(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    caplog.set_level(logging.WARNING, logger="frontier_trainer.tracking")

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "frontier-test")
    args = dpo_args(tmp_path, report_to=["wandb"], max_steps=2)
    trainer, cb = trainer_with_callback(model_dir, tmp_path, args, eval_datasets=eval_sets(), eval_steps=1)
    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    history = read_history(next(run_dir.glob("run-*.wandb")))
    ours = [r for r in history if any(k.startswith("degradation/") for k in r)]
    assert [r["train/global_step"] for r in ours] == [0, 1, 2, 2], (len(history), caplog.text)
    step0 = ours[0]
    for row in cb.geometry["tasks"]:
        assert step0[f"degradation/tau/{row['task']}"] == pytest.approx(row["tau"])
        assert step0[f"degradation/predicted/{row['task']}"] == 0
    for task in TASKS:
        assert ours[2][f"degradation/predicted/{task}"] == pytest.approx(-cb.predicted[task])
        assert ours[2][f"degradation/observed/{task}"] == pytest.approx(-cb.observed[task])
    final = ours[3]
    assert final["degradation/table/_type"] == "table-file"
    assert final["degradation/rank/spearman_tau_vs_observed"] == pytest.approx(
        cb.summary["rank_correlations"]["spearman_tau_vs_observed"]
    )
    assert "degradation/scatter_table/path" in final
    table = json.loads((run_dir / "files" / final["degradation/table/path"]).read_text())
    assert table["columns"] == ["task", "tau", "angle_deg", "regime", "predicted", "observed"]
    for saved, row in zip(table["data"], cb.summary["rows"], strict=True):
        assert saved[0] == row["task"] and saved[3] == row["regime"]
        assert saved[1] == pytest.approx(row["tau"]) and saved[5] == pytest.approx(row["observed"])


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_no_eval_sets_says_so_and_still_logs_predictions(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="frontier_trainer.tracking"):
        trainer, cb = trainer_with_callback(
            model_dir, tmp_path, dpo_args(tmp_path, max_steps=2), eval_steps=1
        )
    assert "observed degradation is NOT measured" in caplog.text
    logged: list[dict[str, Any]] = []
    cb._wandb_log = lambda args, data: logged.append(data)
    trainer.train()
    assert all(f"degradation/predicted/{t}" in logged[-1] for t in TASKS)
    assert not any(k.startswith("degradation/observed") for r in logged for k in r)
    assert any(logged[-1][f"degradation/predicted/{t}"] != 0 for t in TASKS)
    assert all(r["observed"] is None for r in cb.summary["rows"])
    assert (Path(trainer.args.output_dir) / "degradation" / "degradation.png").exists()


def test_bad_configuration_raises_before_training() -> None:
    with pytest.raises(ValueError, match="'math'"):
        DegradationCallback(
            capability_datasets(), eval_datasets={"copy": eval_sets()["copy"], "math": eval_sets()["count"]}
        )
    with pytest.raises(ValueError, match="capability_datasets"):
        DegradationCallback({})
    with pytest.raises(ValueError, match="eval_steps"):
        DegradationCallback(capability_datasets(), eval_steps=0)


def test_wandb_missing_or_failing_warns_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cb = DegradationCallback(capability_datasets())
    args = SimpleNamespace(report_to=["wandb"], output_dir="unused")
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING, logger="frontier_trainer.tracking"):
        assert cb._wandb(args) is None
        cb._emit(args, state, {"train/global_step": 3})
    assert caplog.text.count("wandb is not installed") == 1  # warned once
    fake = SimpleNamespace(run=None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with caplog.at_level(logging.WARNING, logger="frontier_trainer.tracking"):
        assert cb._wandb(args) is None
    assert "no wandb run is active" in caplog.text

    def broken_log(data: dict) -> None:
        raise RuntimeError("network down")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=object(), log=broken_log))
    with caplog.at_level(logging.WARNING, logger="frontier_trainer.tracking"):
        cb._emit(args, state, {"train/global_step": 3})  # must not raise
    assert "network down" in caplog.text


# --------------------------------------------------------------------------------------
# trainer-agnostic safety directions
# --------------------------------------------------------------------------------------


def test_callable_safety_direction_gives_the_geometry_at_step_zero(model_dir: Path, tmp_path: Path) -> None:
    """A user callable supplies v at θ_0; τ_i is then cos²(v, c_i) with c_i recomputed here."""
    seen: list[int] = []

    def v_fn(model: torch.nn.Module, params: Any) -> list[torch.Tensor]:
        seen.append(len(params))
        gen = torch.Generator().manual_seed(3)
        return [torch.randn(p.shape, generator=gen) for p in params]

    args = dpo_args(tmp_path, max_steps=1)
    trainer, cb = trainer_with_callback(
        model_dir, tmp_path, args, safety_direction=v_fn, capability_batches=1, batch_size=32
    )
    assert cb.safety_mode == "callable"
    trainer.train()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    assert seen == [len(params)]
    v = torch.cat([t.reshape(-1) for t in v_fn(model, params)]).double()
    for row in cb.geometry["tasks"]:
        rows = capability_datasets()[row["task"]]
        c = independent_grad(model, params, rows)
        expected = float(c @ v) ** 2 / float(c.norm() ** 2 * v.norm() ** 2)
        assert row["tau"] == pytest.approx(expected, rel=1e-3, abs=1e-12)
    with pytest.raises(ValueError, match="safety_direction"):
        DegradationCallback(capability_datasets(), safety_direction="gradient")


def independent_grad(model: torch.nn.Module, params: list[torch.nn.Parameter], rows: Dataset) -> torch.Tensor:
    """∇ of the token-pooled completion log-likelihood, row by row (shares no code with the library)."""
    tok = build_tokenizer()
    count = sum(
        len(tok(r["prompt"] + r["completion"])["input_ids"]) - len(tok(r["prompt"])["input_ids"]) for r in rows
    )
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for row in rows:
        n = len(tok(row["prompt"])["input_ids"])
        ids = tok(row["prompt"] + row["completion"])["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        score = sum(logp[pos - 1, ids[pos]] for pos in range(n, len(ids))) / count
        for acc, g in zip(total, torch.autograd.grad(score, params), strict=True):
            acc.add_(g.double())
    return torch.cat([t.reshape(-1) for t in total])


def test_tracking_imports_no_command_module() -> None:
    """The library tracker must not depend on the geometry_report command (issue 12 §1)."""
    import subprocess

    code = (
        "import sys, frontier_trainer.tracking, frontier_trainer.mixin, frontier_trainer.trainers; "
        "bad = [m for m in ('frontier_trainer.geometry_report', 'frontier_trainer.cli', 'frontier_trainer.demo') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_span_coverage_matches_a_qr_projection_and_ignores_dependent_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(30, generator=gen, dtype=torch.float64) for _ in range(4)]
    rows.append(rows[0] * 2 - rows[1])  # dependent
    g = torch.randn(30, generator=gen, dtype=torch.float64) * 1e-5  # tiny scale: unit-scaled inside
    q, _ = torch.linalg.qr(torch.stack(rows[:4]).T)
    expected = float((q.T @ g).norm() / g.norm())
    vectors = [[r] for r in [*rows, g]]
    assert span_coverage(gram_matrix(vectors)) == pytest.approx(expected, rel=1e-9)
    assert span_coverage(gram_matrix([[r] for r in [*rows, rows[2] + rows[3]]])) == pytest.approx(1.0, abs=1e-9)
    assert span_coverage(gram_matrix([[r] for r in [*rows, torch.zeros(30, dtype=torch.float64)]])) == 0.0


def test_direction_coverage_holds_unseen_rows_only_in_part(model_dir: Path) -> None:
    """Per-row and mean coverage against an independent flatten-and-QR of the same rows' gradients; the held rows
    are not the seen ones (coverage < 1), and the mean's span is inside the per-row span."""
    from frontier_trainer.directions import capability_gradients
    from frontier_trainer.report import average_gradient

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = build_tokenizer()
    params = [p for p in model.parameters() if p.requires_grad]
    caps = capability_datasets()
    got = direction_coverage(model, params, build_capability_sampler(caps, tok, 512, 1, 7), "copy", 4)
    sampler = build_capability_sampler(caps, tok, 512, 1, 7)  # the same permutation, replayed
    seen = [torch.cat([g.reshape(-1) for g in capability_gradients(model, params, sampler.next_batch("copy"))[1]])
            for _ in range(4)]  # fmt: skip
    _, held = average_gradient(model, params, [sampler.next_batch("copy") for _ in range(4)])
    g = torch.cat([t.reshape(-1) for t in held]).double()
    q, _ = torch.linalg.qr(torch.stack(seen).double().T)
    mean = torch.stack(seen).double().mean(0)
    assert got["rows"] == 4
    assert got["per_row"] == pytest.approx(float((q.T @ g).norm() / g.norm()), rel=1e-6)
    assert got["mean"] == pytest.approx(float(abs(mean @ g) / (mean.norm() * g.norm())), rel=1e-6)
    assert got["mean"] <= got["per_row"] + 1e-9 < 1.0 - 1e-3
    # a task with too few rows gets none
    tiny = {"copy": caps["copy"].select(range(1))}
    none = direction_coverage(model, params, build_capability_sampler(tiny, tok, 512, 1, 0), "copy", 4)
    assert none["mean"] is None
    report = {"budget": 1.0, "num_parameters": 1, "joint_tau": 0.0, "sum_of_task_taus": 0.0, "joint_free_safety": 1.0,
              "tasks": [{"task": "copy", "tau": 0.0, "cos": 0.0, "angle_deg": 90.0, "regime": "free",
                         "free_safety": 1.0, "coverage": none}]}  # fmt: skip
    assert "copy           not measured: the task needs at least 2 rows" in format_report(report)
