"""Safe extraction: traversal, links, device files, decompression bombs, truncation."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from fixtures.corpora.builders import imdb_members, tar_gz, zip_bytes

from ulmfit.corpora.archive import ExtractLimits, is_archive, safe_extract, sniff_format
from ulmfit.errors import InputError


def _tar_with(path, *infos):
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("ok/file.txt"), io.BytesIO(b""))
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name, kind=tarfile.REGTYPE, data=b"x", linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def _assert_nothing_left(tmp_path, target):
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]


def test_extracts_tar_gz_and_zip(tmp_path):
    members = imdb_members(per_class=1, unsup=1)
    out = safe_extract(tar_gz(tmp_path / "a.tar.gz", members), tmp_path / "tar")
    assert (out / "aclImdb" / "train" / "pos" / "0_8.txt").read_bytes() == members[
        "aclImdb/train/pos/0_8.txt"
    ]
    (tmp_path / "a.zip").write_bytes(zip_bytes(members))
    out = safe_extract(tmp_path / "a.zip", tmp_path / "zip")
    assert (out / "aclImdb" / "test" / "neg" / "0_1.txt").read_bytes() == members[
        "aclImdb/test/neg/0_1.txt"
    ]
    assert is_archive(tmp_path / "a.tar.gz") and is_archive(tmp_path / "a.zip")


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("../evil.txt"), "climbs out"),
        (_member("ok/../../evil.txt"), "climbs out"),
        (_member("/etc/evil.txt"), "absolute path"),
        (_member("ok/link", tarfile.SYMTYPE, linkname="/etc/passwd"), "symlink"),
        (_member("ok/link", tarfile.SYMTYPE, linkname="../../outside"), "symlink"),
        (_member("ok/hard", tarfile.LNKTYPE, linkname="../outside"), "hard link"),
        (_member("ok/dev", tarfile.CHRTYPE), "device"),
        (_member("ok/fifo", tarfile.FIFOTYPE), "device, FIFO"),
    ],
)
def test_dangerous_members_are_refused(tmp_path, member, message):
    archive = _tar_with(tmp_path / "bad.tar.gz", member)
    target = tmp_path / "out"
    with pytest.raises(InputError, match=message) as err:
        safe_extract(archive, target)
    assert str(archive) in str(err.value)
    _assert_nothing_left(tmp_path, target)
    assert not (tmp_path / "evil.txt").exists()


def test_link_inside_the_target_is_materialised_as_a_copy(tmp_path):
    archive = _tar_with(
        tmp_path / "a.tar.gz",
        _member("ok/real.txt", data=b"hello"),
        _member("ok/alias.txt", tarfile.SYMTYPE, linkname="real.txt"),
    )
    out = safe_extract(archive, tmp_path / "out")
    alias = out / "ok" / "alias.txt"
    assert alias.read_bytes() == b"hello" and not alias.is_symlink()


def test_zip_traversal_is_refused(tmp_path):
    (tmp_path / "bad.zip").write_bytes(zip_bytes({"../evil.txt": b"x"}))
    with pytest.raises(InputError, match="climbs out"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out")
    _assert_nothing_left(tmp_path, tmp_path / "out")


def test_decompression_bomb_ratio_and_total_are_refused(tmp_path):
    archive = tar_gz(tmp_path / "bomb.tar.gz", {"zeros.bin": b"\0" * 8_000_000})
    assert archive.stat().st_size < 40_000  # ~1000x compression
    with pytest.raises(InputError, match="more than 50x"):
        safe_extract(
            archive, tmp_path / "a", ExtractLimits(max_ratio=50, ratio_grace_bytes=1_000_000)
        )
    _assert_nothing_left(tmp_path, tmp_path / "a")
    with pytest.raises(InputError, match="limit of 1000000 bytes"):
        safe_extract(archive, tmp_path / "b", ExtractLimits(max_total_bytes=1_000_000))
    _assert_nothing_left(tmp_path, tmp_path / "b")
    (tmp_path / "bomb.zip").write_bytes(zip_bytes({"zeros.bin": b"\0" * 8_000_000}))
    with pytest.raises(InputError, match="decompression bomb"):
        safe_extract(
            tmp_path / "bomb.zip",
            tmp_path / "c",
            ExtractLimits(max_ratio=50, ratio_grace_bytes=1_000_000),
        )


def test_truncated_archive_is_reported_and_leaves_nothing(tmp_path):
    whole = tar_gz(tmp_path / "whole.tar.gz", imdb_members(per_class=40, unsup=40)).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated") as err:
        safe_extract(tmp_path / "cut.tar.gz", tmp_path / "out")
    assert "download" in err.value.fix
    _assert_nothing_left(tmp_path, tmp_path / "out")


def test_sniffing_names_html_empty_and_mismatched_files(tmp_path):
    (tmp_path / "page.tgz").write_bytes(b"\n<html><head><title>503</title></head></html>")
    (tmp_path / "empty.tgz").write_bytes(b"")
    (tmp_path / "plain.tgz").write_bytes(b"just text")
    (tmp_path / "ok.gz").write_bytes(gzip.compress(b"x"))
    assert sniff_format(tmp_path / "page.tgz") == "html"
    assert sniff_format(tmp_path / "ok.gz") == "gzip"
    with pytest.raises(InputError, match="HTML page"):
        safe_extract(tmp_path / "page.tgz", tmp_path / "o1")
    with pytest.raises(InputError, match="empty"):
        safe_extract(tmp_path / "empty.tgz", tmp_path / "o2")
    with pytest.raises(InputError, match="promises gzip"):
        safe_extract(tmp_path / "plain.tgz", tmp_path / "o3")


def test_zip_symlink_is_refused(tmp_path):
    import stat
    import zipfile

    info = zipfile.ZipInfo("data/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InputError, match="symlink"):
        safe_extract(tmp_path / "link.zip", tmp_path / "out")
    _assert_nothing_left(tmp_path, tmp_path / "out")


def _plain_tar(path, count):
    """An uncompressed tar of ``count`` small files; returns the byte offset of each header."""
    offsets = []
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            offsets.append(tar.offset)
            data = f"file {i}\n".encode() * 50
            info = tarfile.TarInfo(f"docs/{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return offsets


def test_plain_tar_cut_at_a_header_boundary_is_truncated_not_short(tmp_path):
    whole = tmp_path / "whole.tar"
    offsets = _plain_tar(whole, 5)
    out = safe_extract(whole, tmp_path / "whole")
    assert len(list((out / "docs").iterdir())) == 5
    # Cut exactly where the 4th header starts: tarfile alone reads 3 members and stops quietly.
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[: offsets[3]])
    with pytest.raises(InputError, match="truncated") as err:
        safe_extract(tmp_path / "cut.tar", tmp_path / "out")
    assert str(tmp_path / "cut.tar") in str(err.value) and "downloaded again" in err.value.fix
    _assert_nothing_left(tmp_path, tmp_path / "out")
