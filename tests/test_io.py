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


def test_two_atomic_path_writers_of_one_file_do_not_collide(tmp_path):
    """Each writer gets its own private folder; the temporary file keeps the target's name
    (so writers that record it, like torch.save, write the same bytes every time)."""
    target = tmp_path / "model.pt"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.name == second.name == "model.pt"
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block finished last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
