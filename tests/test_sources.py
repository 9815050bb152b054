"""The one registry of source schemes: routing by prefix/predicate, offline resolution that downloads
nothing, content fingerprints, a user-registered scheme reaching the CLI's and the trainer's loaders,
and errors that name the key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
from tiny import build_model_dir, capability_datasets

from frontier_trainer import lab
from frontier_trainer import sources as src
from frontier_trainer.directions import load_capability_source as directions_loader


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {"dir": tmp_path / "saved", "file": tmp_path / "copy.jsonl"}
    capability_datasets()["copy"].to_json(out["file"])
    capability_datasets()["count"].save_to_disk(out["dir"])
    return out


def test_each_value_goes_to_its_scheme(files: dict[str, Path]) -> None:
    names = {
        "lab": "lab",
        "lab:arithmetic": "lab",
        "real:humaneval": "real",
        str(files["file"]): "file",
        str(files["dir"]): "directory",
        "openai/gsm8k": "hub",
        "./missing.jsonl": "hub",
    }
    assert {value: src.scheme_for(value).name for value in names} == names
    assert [s.name for s in src.SCHEMES] == ["lab", "real", "file", "directory", "hub"]


def test_missing_local_paths_and_wrong_kinds_are_named(files: dict[str, Path], tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "prefs.jsonl")
    with pytest.raises(src.InputError, match=r"dataset_name: local path .*nope/prefs.jsonl.* does not exist"):
        src.resolve_preferences(missing, offline=True)
    with pytest.raises(src.InputError, match=r"model_name_or_path: .* is a file"):
        src.resolve_model(str(files["file"]), offline=True)
    with pytest.raises(src.InputError, match=r"has no config\.json"):
        src.resolve_model(str(files["dir"]), offline=True)
    with pytest.raises(src.InputError, match="model_name_or_path: not set"):
        src.resolve_model(None, offline=True)
    with pytest.raises(src.InputError, match=r"capability_datasets\['x'\]: unknown lab task 'chess'"):
        src.resolve_capabilities("capability_datasets", {"x": "lab:chess"}, eval_split=False, offline=True)
    with pytest.raises(src.InputError, match=r"dataset_name: .*real:hh-rlhf.*real:uncensorbench"):
        src.resolve_preferences("real:hh-rlhf", offline=True)


def test_offline_resolution_downloads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("FRONTIER_REAL_CACHE", str(cache))
    model = src.resolve_model("real:smollm2-135m-instruct", offline=True)
    prefs = src.resolve_preferences("real:uncensorbench", offline=True)
    caps = src.resolve_capabilities(
        "capability_datasets",
        {"code": "real:humaneval", "math": "openai/gsm8k"},
        eval_split=False,
        offline=True,
    )
    assert [r.status for r in [model, prefs, *caps]] == [src.OFFLINE] * 4
    assert all(r.data is None for r in [model, prefs, *caps])
    assert [r.split for r in caps] == ["directions", "train"]
    assert not cache.exists()
    assert not src.scheme_for("real:humaneval").resolvable_offline("real:humaneval")
    assert not src.scheme_for("openai/gsm8k").resolvable_offline("openai/gsm8k")
    assert src.scheme_for("lab:arithmetic").resolvable_offline("lab:arithmetic")


def test_lab_sources_resolve_with_their_splits() -> None:
    caps = src.resolve_capabilities(
        "capability_datasets", {"a": "lab:arithmetic"}, eval_split=False, offline=True
    )
    evals = src.resolve_capabilities(
        "capability_eval_datasets", {"a": "lab:arithmetic"}, eval_split=True, offline=True
    )
    expected = lab.capability_datasets("train", tasks=["arithmetic"])["arithmetic"]
    held_out = lab.capability_datasets("eval", tasks=["arithmetic"])["arithmetic"]
    assert caps[0].data.to_list() == expected.to_list() and caps[0].split == "train"
    assert evals[0].data.to_list() == held_out.to_list() and evals[0].split == "eval"
    assert caps[0].fingerprint != evals[0].fingerprint
    # the trainer's loader reaches the same registry: generic train/test map onto lab train/eval
    assert directions_loader("a", "lab:arithmetic", split="train").to_list() == expected.to_list()
    assert directions_loader("a", "lab:arithmetic", split="test").to_list() == held_out.to_list()
    prefs = src.resolve_preferences("lab", offline=True)
    assert set(prefs.data) == {"train", "test"} and prefs.rows["train"] == len(
        lab.preference_dataset("train")
    )


def test_local_sources_carry_file_hashes_and_row_fingerprints(files: dict[str, Path], tmp_path: Path) -> None:
    (copy,) = src.resolve_capabilities(
        "capability_datasets", {"copy": str(files["file"])}, eval_split=False, offline=True
    )
    assert copy.source_sha256 == "sha256:" + hashlib.sha256(files["file"].read_bytes()).hexdigest()
    assert copy.fingerprint == src.dataset_fingerprint(capability_datasets()["copy"])
    assert copy.rows == {"train": 20} and copy.to_json()["task"] == "copy"
    model_dir = build_model_dir(tmp_path / "model")
    model = src.resolve_model(str(model_dir), offline=True)
    assert model.status == src.OK and model.fingerprint == src.directory_sha256(model_dir)


def test_dataset_fingerprint_is_content_not_storage(files: dict[str, Path]) -> None:
    rows = capability_datasets()["copy"].to_list()
    from_file = datasets.load_dataset("json", data_files=str(files["file"]), split="train")
    base = src.dataset_fingerprint(datasets.Dataset.from_list(rows))
    assert src.dataset_fingerprint(from_file) == base
    changed = [dict(rows[0], completion=rows[0]["completion"] + " x"), *rows[1:]]
    assert src.dataset_fingerprint(datasets.Dataset.from_list(changed)) != base
    assert src.dataset_fingerprint(datasets.Dataset.from_list(rows[::-1])) != base
    assert src.dataset_fingerprint(datasets.Dataset.from_list(rows[:-1])) != base
    whole = datasets.DatasetDict({"train": from_file})
    assert src.dataset_fingerprint(whole) != base  # the split name is part of the content


def test_directory_hash_sees_content_and_names(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"abc")
    (root / "sub" / "b.json").write_text("{}")
    first = src.directory_sha256(root)
    (root / "a.bin").write_bytes(b"abd")
    second = src.directory_sha256(root)
    (root / "a.bin").rename(root / "c.bin")
    assert len({first, second, src.directory_sha256(root)}) == 3


class MemoryScheme(src.SourceScheme):
    """A scheme a user might add: ``mem:<name>`` names an in-memory capability dataset."""

    name = "mem"

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {"copy": capability_datasets()["copy"].to_list()}

    def matches(self, value: str) -> bool:
        return value.startswith("mem:")

    def capability(self, key: str, task: str, spec: Any, *, offline: bool, eval_split: bool) -> src.Resolved:
        rows = self.tables[str(spec["path"])[4:]]
        return src.Resolved(key, str(spec["path"]), self.name, src.OK, data=datasets.Dataset.from_list(rows))


@pytest.fixture
def mem_scheme() -> Iterator[MemoryScheme]:
    scheme = MemoryScheme()
    src.register_scheme(scheme)
    yield scheme
    src.SCHEMES.remove(scheme)


def test_a_registered_scheme_reaches_the_cli_and_the_trainer_loader(mem_scheme: MemoryScheme) -> None:
    from frontier_trainer import cli

    assert [s.name for s in src.SCHEMES][-2:] == ["mem", "hub"]
    loaded, report = cli.load_capability_sources("capability_datasets", {"c": "mem:copy"}, eval_split=False)
    assert loaded["c"].to_list() == mem_scheme.tables["copy"] and report[0].scheme == "mem"
    assert directions_loader("c", "mem:copy").to_list() == mem_scheme.tables["copy"]
    with pytest.raises(ValueError, match="registered already"):
        src.register_scheme(MemoryScheme())
    with pytest.raises(src.InputError, match=r"mem source\) cannot be used as a model"):
        src.resolve_model("mem:copy", offline=True)


def test_mapping_sources_and_bad_specs(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "a1", "id": 3}))
    spec = {"math": {"path": str(path), "prompt": "question", "completion": "answer", "separator": "\n"}}
    (res,) = src.resolve_capabilities("capability_datasets", spec, eval_split=False, offline=True)
    assert res.data.to_list() == [{"prompt": "q1", "completion": "\na1"}]
    with pytest.raises(src.InputError, match=r"capability_datasets\['math'\]: a mapping source needs 'path'"):
        src.resolve_capabilities(
            "capability_datasets", {"math": {"file": "x"}}, eval_split=False, offline=True
        )
    with pytest.raises(src.InputError, match=r"capability_datasets\['math'\]: expected a path"):
        src.resolve_capabilities("capability_datasets", {"math": 3}, eval_split=False, offline=True)


def test_benign_sources_are_prompt_only_and_disjoint_from_evaluation() -> None:
    """lab:benign: the lab's look-alike prompts (prompt column only, so the trainer completes them
    with the model itself), train and eval splits disjoint, eval being what over-refusal uses."""
    from frontier_trainer.self_completion import is_prompt_only

    train = directions_loader("benign", src.LAB_BENIGN)
    held_out = directions_loader("benign", src.LAB_BENIGN, split="test")
    assert train.column_names == ["prompt"] and is_prompt_only("benign", train)
    assert list(train["prompt"]) == list(lab.helpfulness_dataset("train")["prompt"])
    assert list(held_out["prompt"]) == list(lab.helpfulness_dataset("eval")["prompt"])
    assert not set(train["prompt"]) & set(held_out["prompt"])
    with pytest.raises(src.InputError, match=r"unknown lab task 'benign2'.*'benign'"):
        directions_loader("benign", "lab:benign2")


def test_benign_question_strips_the_multiple_choice_frame() -> None:
    assert src.benign_question("Q: How many legs do horses have?\n  choice: four\n  choice: six\nA:") == (
        "How many legs do horses have?"
    )
    assert src.benign_question("What is a wheel?") == "What is a wheel?"


def test_real_benign_resolves_offline_without_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """real:benign needs the BIG-bench wheel; offline and uncached it is reported, not fetched."""
    from frontier_trainer.real import sources as real_sources

    monkeypatch.setattr(real_sources, "is_cached", lambda value, cache_dir=None: False)
    (resolved,) = src.resolve_capabilities(
        "capability_datasets", {"benign": src.REAL_BENIGN}, eval_split=False, offline=True
    )
    assert resolved.status == src.OFFLINE and resolved.split == "directions"


def test_completions_from_pairs_benign_prompts_with_the_preferred_responses() -> None:
    """``{path: lab:benign, completions_from: chosen}``: the lab's benign look-alikes, each paired with a
    preferred (refusing) response of the preference data: the rows whose likelihood the trainer holds."""
    prefs = lab.preference_dataset("train")
    spec = {"hold": {"path": src.LAB_BENIGN, "completions_from": "chosen"}}
    (resolved,) = src.resolve_capabilities(
        "capability_datasets", spec, eval_split=False, offline=True, preferences=prefs
    )
    rows = resolved.data
    assert rows.column_names == ["prompt", "completion"]
    assert list(rows["prompt"]) == list(lab.helpfulness_dataset("train")["prompt"])  # benign, not harmful
    assert set(rows["completion"]) == set(prefs["chosen"]) == {lab.REFUSAL_COMPLETION}
    with pytest.raises(
        src.InputError, match=r"capability_datasets\['hold'\]: completions_from='chosen'.*no preference"
    ):
        src.resolve_capabilities("capability_datasets", spec, eval_split=False, offline=True)
    bad = {"hold": {"path": src.LAB_BENIGN, "completions_from": "rejected"}}
    with pytest.raises(src.InputError, match=r"completions_from='rejected'; use one of \['chosen'\]"):
        src.resolve_capabilities(
            "capability_datasets", bad, eval_split=False, offline=True, preferences=prefs
        )
    deferred = src.resolve_capabilities(
        "capability_datasets", spec, eval_split=False, offline=True, preferences=src.OFFLINE
    )
    assert deferred[0].data.column_names == ["prompt"]  # paired at run time


def test_prompt_only_sources_pass_the_recipe_path() -> None:
    """A prompt-only source (``lab:benign``, ``real:benign`` in the SmolLM2 recipe) resolves through the
    CLI's path (it was refused there for lacking a completion, though the trainer completes it)."""
    (resolved,) = src.resolve_capabilities(
        "capability_datasets", {"benign": src.LAB_BENIGN}, eval_split=False, offline=True
    )
    assert resolved.status == src.OK and resolved.data.column_names == ["prompt"]
    with pytest.raises(src.InputError, match=r"capability_datasets\['x'\].*has columns \['answer'\]"):
        src.resolve_capabilities(
            "capability_datasets",
            {"x": datasets.Dataset.from_dict({"answer": ["a"]})},
            eval_split=False,
            offline=True,
        )
