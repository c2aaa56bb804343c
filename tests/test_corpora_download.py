"""Downloads against a local HTTP server: resume, checksums, HTTP errors, HTML error pages."""

from __future__ import annotations

import hashlib
import os

import pytest
from fixtures.corpora.builders import CorpusServer, imdb_members, tar_gz

from ulmfit.corpora.download import download
from ulmfit.errors import InputError

PAYLOAD = os.urandom(300_000)


@pytest.fixture
def server():
    srv = CorpusServer().start()
    srv.files["data.bin"] = PAYLOAD
    yield srv
    srv.stop()


def test_download_verifies_checksum_and_reports_progress(server, tmp_path):
    seen = []
    dest = download(
        server.url("data.bin"),
        tmp_path / "data.bin",
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        progress=lambda stage, done, total: seen.append((stage, done, total)),
        chunk_size=65536,
    )
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    assert seen[-1] == ("download data.bin", len(PAYLOAD), len(PAYLOAD))
    assert len(seen) > 1  # reported while streaming, not only at the end


def test_connection_dropped_midway_is_resumed_with_range(server, tmp_path):
    server.drop_once.add("data.bin")
    dest = download(server.url("data.bin"), tmp_path / "data.bin", chunk_size=8192)
    assert dest.read_bytes() == PAYLOAD
    ranges = [r for name, r in server.requests if name == "data.bin"]
    assert ranges[0] is None and ranges[1].startswith("bytes=")
    resumed_at = int(ranges[1][6:-1])
    # Resumed from what reached the disk (whole chunks of the first half), not from zero.
    assert len(PAYLOAD) // 2 - 8192 <= resumed_at <= len(PAYLOAD) // 2
    assert server.bytes_sent == len(PAYLOAD) // 2 + (len(PAYLOAD) - resumed_at)


def test_part_file_from_an_earlier_run_is_resumed(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:100_000])
    dest = download(server.url("data.bin"), tmp_path / "data.bin")
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("data.bin", "bytes=100000-")]
    assert server.bytes_sent == len(PAYLOAD) - 100_000


def test_checksum_mismatch_is_fatal_and_deletes_the_download(server, tmp_path):
    with pytest.raises(InputError, match="checksum mismatch") as err:
        download(server.url("data.bin"), tmp_path / "data.bin", sha256="0" * 64)
    assert server.url("data.bin") in str(err.value)
    assert "Fix:" in str(err.value)
    assert not (tmp_path / "data.bin").exists()
    assert not (tmp_path / "data.bin.part").exists()


def test_http_error_names_the_url_and_status(server, tmp_path):
    server.status["gone.tgz"] = 404
    with pytest.raises(InputError, match="HTTP 404") as err:
        download(server.url("gone.tgz"), tmp_path / "gone.tgz")
    assert server.url("gone.tgz") in str(err.value)


def test_html_error_page_saved_as_archive_is_refused(server, tmp_path):
    server.files["aclImdb_v1.tar.gz"] = b"<!DOCTYPE html><html><body>Access denied</body></html>"
    with pytest.raises(InputError, match="HTML page"):
        download(server.url("aclImdb_v1.tar.gz"), tmp_path / "aclImdb_v1.tar.gz")
    assert not list(tmp_path.iterdir())


def test_existing_complete_file_is_not_downloaded_again(server, tmp_path):
    archive = tar_gz(tmp_path / "src.tar.gz", imdb_members(per_class=1, unsup=0))
    server.files["a.tar.gz"] = archive.read_bytes()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    download(server.url("a.tar.gz"), tmp_path / "a.tar.gz", sha256=digest)
    download(server.url("a.tar.gz"), tmp_path / "a.tar.gz", sha256=digest)
    assert len(server.requests) == 1


def test_console_progress_logs_lines_when_not_on_a_terminal(caplog):
    import logging

    from ulmfit.corpora.download import ConsoleProgress

    progress = ConsoleProgress(interval=3600)
    with caplog.at_level(logging.INFO, logger="ulmfit.corpora"):
        progress("download x.tgz", 10, 100)
        progress("download x.tgz", 50, 100)  # within the interval: no line
        progress("download x.tgz", 100, 100)  # finished: always a line
    assert [r.getMessage() for r in caplog.records] == [
        "download x.tgz: 10/100",
        "download x.tgz: 100/100",
    ]
