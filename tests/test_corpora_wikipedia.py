"""Wikipedia dumps, WikiText-103 and WikiExtractor output, served from a local HTTP server."""

from __future__ import annotations

import bz2
import json
import os

import pyarrow.parquet as pq
import pytest
from fixtures.corpora.builders import (
    MEDIAWIKI,
    CorpusServer,
    mediawiki_dump_bz2,
    tar_gz,
    wikiextractor_gz,
    wikitext_members,
    zip_bytes,
)

from ulmfit.corpora import WikipediaSource, prepare_wikipedia, strip_wikicode
from ulmfit.errors import InputError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    build = tmp_path_factory.mktemp("wiki")
    srv = CorpusServer().start()
    srv.files["dewiki-latest-pages-articles.xml.bz2"] = mediawiki_dump_bz2(
        build / "d.xml.bz2"
    ).read_bytes()
    srv.files["wikitext-103.tgz"] = tar_gz(build / "wt.tgz", wikitext_members()).read_bytes()
    srv.files["wikitext-103-v1.zip"] = zip_bytes(wikitext_members())
    srv.files["AA.txt.gz"] = wikiextractor_gz(build / "AA.txt.gz").read_bytes()
    yield srv
    srv.stop()


def _prepare(tmp_path, **kwargs):
    return prepare_wikipedia(
        WikipediaSource(**kwargs),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=lambda *a: None,
    )


def _texts(path):
    return pq.read_table(path).to_pydict()


def test_dump_keeps_articles_only_and_strips_markup(server, tmp_path):
    summary = _prepare(
        tmp_path,
        lang="de",
        url=server.url("dewiki-latest-pages-articles.xml.bz2"),
        valid_fraction=0.0,
        workers=1,
    )
    assert summary["skipped"] == {"skipped_redirect": 1, "skipped_namespace": 1, "skipped_short": 1}
    train = _texts(tmp_path / "out" / "train.parquet")
    assert train["title"] == ["Anarchismus", "Bakunin"]
    article = train["text"][0]
    assert article.startswith(
        "Anarchismus ist eine politische Philosophie, die Herrschaft ablehnt. Sie betont Freiheit"
    )
    assert "Geschichte" in article  # heading text kept
    for removed in (
        "Infobox",
        "Literatur",
        "Quelle",
        "GEHEIM",
        "Bildunterschrift",
        "Kategorie",
        "Anarchism]",
        "en:",
        "Kommentar",
        "{{",
        "[[",
        "'''",
    ):
        assert removed not in article, removed
    assert _texts(tmp_path / "out" / "valid.parquet")["text"] == []
    sources = json.loads((tmp_path / "out" / "sources.json").read_text())["inputs"]
    assert (
        sources[0]["origin"].endswith("dewiki-latest-pages-articles.xml.bz2")
        and len(sources[0]["sha256"]) == 64
    )


def test_wikitext103_articles_and_its_own_splits(server, tmp_path):
    for archive in ("wikitext-103.tgz", "wikitext-103-v1.zip"):
        summary = _prepare(tmp_path, kind="wikitext103", url=server.url(archive))
        assert {s: v["count"] for s, v in summary["splits"].items()} == {
            "train": 2,
            "valid": 1,
            "test": 1,
        }
    train = _texts(tmp_path / "out" / "train.parquet")
    assert train["title"] == ["Valkyria Chronicles", "Tower Building"]
    assert "role-playing game developed by Sega . It sold 1,000 copies" in train["text"][0]
    assert "Gameplay\nThe game plays like its predecessors with 3.5 times" in train["text"][0]
    raw = _prepare(
        tmp_path, kind="wikitext103", url=server.url("wikitext-103.tgz"), detokenize=False
    )
    assert raw["splits"]["train"]["count"] == 2
    assert "role @-@ playing" in _texts(tmp_path / "out" / "train.parquet")["text"][0]


def test_wikiextractor_output_and_limits(server, tmp_path):
    summary = _prepare(
        tmp_path, kind=None, url=server.url("AA.txt.gz"), min_chars=50, valid_fraction=0.0
    )
    assert summary["kind"] == "wikiextractor" and summary["splits"]["train"]["count"] == 3
    train = _texts(tmp_path / "out" / "train.parquet")
    assert train["title"][0] == "Article & 0"
    assert (
        train["text"][0]
        == "This is the body of article number 0. It has enough words to be kept as an article of the corpus.\nA second paragraph for article 0."
    )
    assert (
        _prepare(
            tmp_path,
            url=server.url("AA.txt.gz"),
            kind="wikiextractor",
            min_chars=50,
            max_articles=2,
        )["splits"]["train"]["count"]
        + 0
        <= 2
    )
    limited = _prepare(
        tmp_path,
        url=server.url("AA.txt.gz"),
        kind="wikiextractor",
        min_chars=50,
        max_words=30,
        valid_fraction=0.0,
    )
    assert limited["splits"]["train"]["count"] == 2  # 25 words each: stops once 30 are reached


def test_truncated_dump_and_unclosed_doc_are_fatal_and_atomic(tmp_path):
    cut = tmp_path / "enwiki-x-pages-articles.xml.bz2"
    cut.write_bytes(bz2.compress(MEDIAWIKI.encode())[:-200])
    with pytest.raises(InputError, match="truncated"):
        _prepare(tmp_path, path=str(cut))
    cut.write_bytes(bz2.compress(MEDIAWIKI.encode()[:-300]))
    with pytest.raises(InputError, match="malformed XML"):
        _prepare(tmp_path, path=str(cut))
    unclosed = tmp_path / "wiki_00"
    unclosed.write_text('<doc id="1" url="u" title="T">\nT\n\nsome text\n')
    with pytest.raises(InputError, match=r"wiki_00:1: <doc> block 'T' is not closed"):
        _prepare(tmp_path, path=str(unclosed), kind="wikiextractor")
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]


def test_strip_wikicode_keeps_link_text_and_drops_the_rest():
    text = "'''X''' links [[A|shown]] and [[B]].<ref name=r>cite</ref> {{cn}} [[File:F.png|thumb|cap]] [[Category:C]] [http://e.org site]"
    assert strip_wikicode(text) == "X links shown and B. site"


def test_streaming_keeps_memory_flat_on_a_large_generated_dump(tmp_path):
    """Parse 44 MB of XML in a subprocess: peak RSS must stay far below the input size."""
    import subprocess
    import sys

    script = r"""
import gzip, resource, sys
from collections import Counter
from pathlib import Path
from ulmfit.corpora.wikipedia import iter_dump_pages
path = Path(sys.argv[1])
page = "<page><title>T{i}</title><ns>0</ns><id>{i}</id><revision><text>" + "word " * 200 + "</text></revision></page>\n"
with gzip.open(path, "wt", compresslevel=1) as f:
    f.write('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n')
    for i in range(40000):
        f.write(page.format(i=i))
    f.write("</mediawiki>\n")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pages = sum(1 for _ in iter_dump_pages(path, Counter()))
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(pages, growth_mb)
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big.xml.gz")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    pages, growth_mb = result.stdout.split()
    assert int(pages) == 40000
    assert float(growth_mb) < 20, f"RSS grew {growth_mb} MB while streaming 44 MB of XML"


def test_parallel_stripping_and_dump_part_files_give_the_same_corpus(tmp_path):
    parts = tmp_path / "dumps"
    parts.mkdir()
    # Two part files named as Wikimedia splits them; "10" must come after "2".
    later = MEDIAWIKI.replace("<title>Anarchismus</title>", "<title>Zweiter Teil</title>")
    (parts / "dewiki-20240101-pages-articles10.xml-p9p12.bz2").write_bytes(
        bz2.compress(later.encode())
    )
    mediawiki_dump_bz2(parts / "dewiki-20240101-pages-articles2.xml-p1p8.bz2")
    serial = _prepare(tmp_path, path=str(parts), workers=1, valid_fraction=0.0)
    serial_rows = _texts(tmp_path / "out" / "train.parquet")
    assert serial_rows["title"] == ["Anarchismus", "Bakunin", "Zweiter Teil", "Bakunin"]
    assert serial["kind"] == "dump" and serial["skipped"]["skipped_redirect"] == 2
    parallel = _prepare(tmp_path, path=str(parts), workers=2, valid_fraction=0.0)
    assert parallel["splits"] == serial["splits"]
    assert _texts(tmp_path / "out" / "train.parquet") == serial_rows
    sources = json.loads((tmp_path / "out" / "sources.json").read_text())["inputs"]
    assert sources[0]["path"] == os.path.relpath(parts)  # relative: the same in every clone
