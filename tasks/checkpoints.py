"""Resume checkpoints, and the DVC-compatible content hashes that key them.

Resumable training checkpoints live *outside* the declared outs, because DVC deletes a stage's
outs before running it: ``runs/checkpoints/<stage>/<item>/<key>/``, where ``key`` hashes the
stage's effective params and the DVC md5 of every dependency, so a changed config or input
never resumes a stale run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from tasks.pipeline import StageSpec
from tasks.workspace import Layout


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records in ``dvc.lock`` for ``path``: the file's md5, or for a directory
    the md5 of its sorted ``[{"md5", "relpath"}]`` listing plus ``.dir`` (dvc_data's Tree)."""
    if path.is_file():
        return _file_md5(path)
    entries = [
        {"md5": _file_md5(file), "relpath": file.relative_to(path).as_posix()}
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not _ignored(p, path))
    ]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def _ignored(file: Path, root: Path) -> bool:
    """What ``.dvcignore`` excludes from directory hashes: Python byte-code caches."""
    return file.suffix == ".pyc" or "__pycache__" in file.relative_to(root).parts


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def deps_md5(root: Path, spec: StageSpec) -> dict[str, str]:
    """DVC md5 of every dependency of ``spec`` that exists (missing ones are the stage's to
    report, with the file named)."""
    out = {}
    for dep in spec.deps:
        path = root / dep
        if path.exists():
            out[dep] = dvc_md5(path)
    return out


def stage_key(spec: StageSpec, params: dict[str, Any], deps: dict[str, str]) -> str:
    """A short hash of everything that determines the stage's result."""
    blob = json.dumps(
        {"stage": spec.stage, "params": params, "deps": deps}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def checkpoint_dir(root: Path, spec: StageSpec, key: str, sub: str = "") -> Path:
    """``runs/checkpoints/<group>/<item>/<key>[/<sub>]``; older keys of the same stage item are
    removed (they can never be resumed: their params or inputs changed), and so is what a kill
    in the middle of a checkpoint write left (``ulmfit.io.atomic_path``'s dot-named ``.tmp``
    folders). The stage holds the workspace lock: no writer of them is running."""
    base = root / Layout.checkpoints / spec.group / (spec.item or "_")
    if base.is_dir():
        for old in base.iterdir():
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True)
    path = base / key / sub if sub else base / key
    path.mkdir(parents=True, exist_ok=True)
    for partial in path.glob(".*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    return path


def clear_checkpoints(root: Path, spec: StageSpec) -> None:
    """Remove the stage item's checkpoints once its outputs are safely written."""
    shutil.rmtree(root / Layout.checkpoints / spec.group / (spec.item or "_"), ignore_errors=True)
