"""Tests for ``frontier-eval`` and model loading: full model dirs, PEFT adapter dirs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from test_evaluation import bigram_model

from frontier_trainer import lab
from frontier_trainer.evaluation import Report
from frontier_trainer.evaluation.cli import build_parser, main
from frontier_trainer.evaluation.loading import lab_world, load_model
from frontier_trainer.lab.world import REFUSAL


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A planted refuser, a tiny lab Llama, and two LoRA adapters on it (identity and random)."""
    root = tmp_path_factory.mktemp("models")
    tok = lab.build_tokenizer()
    refuser = bigram_model(tok, [f"=> {REFUSAL} <eos>"])
    refuser.save_pretrained(root / "refuser")
    tok.save_pretrained(root / "refuser")
    tiny = lab.build_model(lab.LabConfig(hidden_size=32, num_layers=1), tok)
    tiny.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    for name, init in (("lora_identity", True), ("lora_random", False)):
        base = lab.build_model(lab.LabConfig(hidden_size=32, num_layers=1), tok)
        config = LoraConfig(
            r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=init, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(base, config)
        peft_model.peft_config["default"].base_model_name_or_path = str(root / "tiny")
        peft_model.save_pretrained(root / name)
    return {p.name: p for p in root.iterdir()}


def test_cli_evaluates_a_model_dir(model_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main([str(model_dirs["refuser"]), "--suite", "lab", "--out", str(out), "--limit", "3"]) == 0
    table = capsys.readouterr().out
    assert "safety/refusal" in table and "capability/arithmetic" in table
    report = Report.read(out)
    assert report.metrics["safety/refusal"].value == 1.0 and report.metrics["safety/refusal"].n == 3
    assert report.provenance["model_spec"] == str(model_dirs["refuser"])
    assert (out / "report.csv").read_text().startswith("metric,value,low,high,n,method")
    assert json.loads((out / "report.json").read_text())["metrics"]["safety/refusal"]["method"] == "wilson"


def test_cli_peft_adapter_and_base(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    tiny = str(model_dirs["tiny"])
    for name, zero in (("lora_identity", True), ("lora_random", False)):
        out = tmp_path / name
        args = [str(model_dirs[name]), "--base", tiny, "--suite", "lab", "--out", str(out), "--limit", "2"]
        assert main(args) == 0
        report = Report.read(out)
        assert report.provenance["model"]["class"] == "PeftModelForCausalLM"
        kl = report.metrics["kl_to_base"].value
        assert (kl == pytest.approx(0.0, abs=1e-9)) if zero else kl > 1e-4
        assert set(report.samples["capability/sort"]) <= {0.0, 1.0}


def test_load_model_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MODEL="):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither config\.json"):
        load_model(str(tmp_path / "empty"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": ""}))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        load_model(str(adapter))
    assert lab_world(tmp_path / "empty") is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["m", "--out", "o"], "--suite"),
        (["m", "--suite", "lab"], "--out"),
        (["m", "--suite", "nope", "--out", "o"], "invalid choice"),
        (["m", "--suite", "lab", "--out", "o", "--limit", "0"], "--limit must be a positive integer"),
        (["m", "--suite", "lab", "--out", "o", "--split", "train"], "invalid choice"),
        (["m", "--suite", "lab", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_bad_arguments(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["lab", "--suite", "lab", "--out", "x"])
    assert (args.split, args.limit, args.batch_size, args.seed, args.base) == ("test", None, 16, 0, None)
