"""Tests for frontier_trainer.real.assets: fetching members of pinned wheels/sdists with provenance.

Archives are built in ``tmp_path``; the two tests that run real ``pip download`` use a local
index (``--no-index --find-links``), so nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from frontier_trainer.real import assets
from frontier_trainer.real.assets import PROVENANCE_FILE, fetch_package_files, provenance


def make_wheel(
    directory: Path, name: str, version: str, files: dict[str, str | bytes], licence: str = "MIT"
) -> Path:
    """A minimal wheel (``<name>-<version>-py3-none-any.whl``) with METADATA, WHEEL and LICENSE."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: {licence}\n",
        )
        wheel.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist}.dist-info/licenses/LICENSE", f"{licence} licence text\n")
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def make_sdist(
    directory: Path, name: str, version: str, files: dict[str, str], licence: str = "UNKNOWN"
) -> Path:
    """A ``.tar.gz`` whose members sit under one top folder ``<name>-<version>/``, with PKG-INFO."""
    top = f"{name}-{version}"
    path = directory / f"{top}.tar.gz"
    members = {"PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: {licence}\n"}
    members.update(files)
    with tarfile.open(path, "w:gz") as tar:
        for member, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wheel_members_are_extracted_with_provenance(tmp_path: Path) -> None:
    wheel = make_wheel(
        tmp_path,
        "demo-pkg",
        "1.2.3",
        {"demo_pkg/data/a.json": "[1]", "demo_pkg/data/b.txt": "b", "demo_pkg/code.py": "x = 1"},
    )
    out = fetch_package_files(
        "demo-pkg==1.2.3",
        ["demo_pkg/data/*.json"],
        cache_dir=tmp_path / "c",
        archive=wheel,
        licence_note="note",
    )
    assert out == tmp_path / "c" / "demo_pkg-1.2.3"
    assert (out / "demo_pkg/data/a.json").read_text() == "[1]"
    assert not (out / "demo_pkg/data/b.txt").exists() and not (out / "demo_pkg/code.py").exists()
    record = provenance(out)
    assert record["requirement"] == "demo-pkg==1.2.3"
    assert record["licence"] == "MIT" and record["licence_note"] == "note"
    assert record["archive_sha256"] == sha256(wheel)
    assert record["files"] == {"demo_pkg/data/a.json": hashlib.sha256(b"[1]").hexdigest()}
    assert record["licence_files"] and (out / record["licence_files"][0]).read_text().startswith("MIT")


def test_sdist_top_folder_is_stripped_and_unknown_licence_is_none(tmp_path: Path) -> None:
    sdist = make_sdist(
        tmp_path, "bb", "1.0.0", {"bb/tasks/t1/task.json": "{}", "bb/tasks/t2/task.json": "{}"}
    )
    out = fetch_package_files(
        "bb==1.0.0",
        ["bb/tasks/t1/task.json"],
        cache_dir=tmp_path,
        archive=sdist,
        sdist=True,
        licence_note="Apache-2.0 upstream",
    )
    assert (out / "bb/tasks/t1/task.json").is_file() and not (out / "bb/tasks/t2").exists()
    record = provenance(out)
    assert record["licence"] is None and record["licence_note"] == "Apache-2.0 upstream"
    assert record["how"].endswith("(sdist)")


def test_licence_falls_back_to_classifiers(tmp_path: Path) -> None:
    path = tmp_path / "cls-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(
            "cls-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: cls\nVersion: 1.0\nLicense: UNKNOWN\n"
            "Classifier: License :: OSI Approved :: BSD License\n",
        )
        wheel.writestr("cls/x.txt", "x")
    assert (
        provenance(fetch_package_files("cls==1.0", ["cls/x.txt"], cache_dir=tmp_path, archive=path))[
            "licence"
        ]
        == "OSI Approved :: BSD License"
    )


def test_cached_fetch_is_reused_and_new_patterns_keep_old_ones(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "p", "1.0", {"p/a.txt": "a", "p/b.txt": "b"})
    cache = tmp_path / "cache"
    fetch_package_files("p==1.0", ["p/a.txt"], cache_dir=cache, archive=wheel)
    # Complete: a second call must not even open the archive.
    assert fetch_package_files("p==1.0", ["p/a.txt"], cache_dir=cache, archive=tmp_path / "missing.whl")
    out = fetch_package_files("p==1.0", ["p/b.txt"], cache_dir=cache, archive=wheel)
    assert (out / "p/a.txt").is_file() and (out / "p/b.txt").is_file()
    assert provenance(out)["patterns"] == ["p/a.txt", "p/b.txt"]
    # A deleted file makes the cache incomplete, so it is fetched again.
    (out / "p/a.txt").unlink()
    fetch_package_files("p==1.0", ["p/a.txt"], cache_dir=cache, archive=wheel)
    assert (out / "p/a.txt").read_text() == "a"
    assert not [p for p in cache.iterdir() if p.name.startswith(".fetch-")]


def test_bad_requests_raise(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "p", "1.0", {"p/a.txt": "a"})
    with pytest.raises(ValueError, match="name==version"):
        fetch_package_files("p>=1.0", ["p/a.txt"], cache_dir=tmp_path, archive=wheel)
    with pytest.raises(ValueError, match="members"):
        fetch_package_files("p==1.0", [], cache_dir=tmp_path, archive=wheel)
    with pytest.raises(FileNotFoundError, match="p/nothing"):
        fetch_package_files("p==1.0", ["p/nothing*"], cache_dir=tmp_path, archive=wheel)
    assert not (tmp_path / "p-1.0").exists()


def test_default_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRONTIER_REAL_CACHE", str(tmp_path / "env-cache"))
    assert assets.default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("FRONTIER_REAL_CACHE")
    assert assets.default_cache_dir().parts[-3:] == (".cache", "frontier_trainer", "real")


def test_pip_download_from_a_local_index(tmp_path: Path) -> None:
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, "localpkg", "0.1.0", {"localpkg/data.json": json.dumps({"k": 1})})
    out = fetch_package_files(
        "localpkg==0.1.0",
        ["localpkg/data.json"],
        cache_dir=tmp_path / "cache",
        pip_args=["--no-index", "--find-links", str(index)],
    )
    assert json.loads((out / "localpkg/data.json").read_text()) == {"k": 1}
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["archive"] == "localpkg-0.1.0-py3-none-any.whl"
    assert record["archive_sha256"] == sha256(index / "localpkg-0.1.0-py3-none-any.whl")
    assert record["how"] == "pip download --no-deps localpkg==0.1.0"


def test_pip_failure_is_reported(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="archive="):
        fetch_package_files(
            "not-a-package==9.9",
            ["x"],
            cache_dir=tmp_path / "cache",
            pip_args=["--no-index", "--find-links", str(empty)],
        )
