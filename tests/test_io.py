"""Atomic outputs: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from ulmfit.corpora.output import staged_directory
from ulmfit.io import atomic_path, atomic_write, sha256_file


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temp file left
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


def test_outputs_get_umask_permissions_not_mkstemp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.bin") as f:
            f.write(b"x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
        with staged_directory(tmp_path / "folder") as staging:
            (staging / "c.txt").write_text("z")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.bin") == 0o644
    assert mode(tmp_path / "b.bin") == 0o644
    assert mode(tmp_path / "folder") == 0o755
    assert sha256_file(tmp_path / "a.bin") == (
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    )
