"""The real corpora in ../shared/data and gensim's real Wikipedia dump sample."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from ulmfit.corpora import DatasetSource, prepare_dataset, resolve_package_path

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="gensim (ships the dump sample) not installed",
)
GENSIM_DUMP = "package:gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _prepare(tmp_path, **kwargs):
    return prepare_dataset(
        DatasetSource(**kwargs),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=lambda *a: None,
    )


@pytest.mark.realdata
def test_trec6_parses_to_5452_and_500(shared_data, tmp_path):
    summary = _prepare(tmp_path, name="trec6", path=str(shared_data / "trec6"), valid_fraction=0.0)
    assert summary["splits"]["train"]["count"] == 5452
    assert summary["splits"]["test"]["count"] == 500
    assert summary["repairs"]["counts"] == {"invalid_bytes": 1}
    assert summary["repairs"]["examples"]["invalid_bytes"] == [
        f"{shared_data / 'trec6' / 'train_5500.label'}:66"
    ]
    sources = json.loads((tmp_path / "out" / "sources.json").read_text())["inputs"]
    checksums = {entry["role"]: entry["sha256"] for entry in sources}
    assert checksums["train"] == "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3"
    with_valid = _prepare(tmp_path, name="trec6", path=str(shared_data / "trec6"))
    assert with_valid["splits"]["train"]["count"] + with_valid["splits"]["valid"]["count"] == 5452


@pytest.mark.realdata
def test_ag_news_subset_and_test_split(shared_data, tmp_path):
    summary = _prepare(tmp_path, name="ag_news", path=str(shared_data / "ag_news"), drop_title=True)
    splits = summary["splits"]
    assert splits["train"]["count"] + splits["valid"]["count"] == 8000
    assert splits["test"]["per_class"] == {
        "World": 1900,
        "Sports": 1900,
        "Business": 1900,
        "Sci/Tech": 1900,
    }


@pytest.mark.realdata
@pytest.mark.slow
def test_imdb_parses_to_25000_25000_and_50000_unlabelled(shared_data, tmp_path):
    summary = _prepare(tmp_path, name="imdb", path=str(shared_data / "imdb"), valid_fraction=0.0)
    splits = summary["splits"]
    assert splits["train"]["count"] == 25000 and splits["test"]["count"] == 25000
    assert splits["train"]["per_class"] == {"neg": 12500, "pos": 12500}
    assert splits["test"]["per_class"] == {"neg": 12500, "pos": 12500}
    assert splits["unsup"]["count"] == 50000


def _peak_rss_growth(script: str, *args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return result.stdout.split()


@pytest.mark.realdata
@needs_gensim
def test_streaming_parse_of_the_real_gensim_dump_keeps_memory_flat(tmp_path):
    """Every page of the real dump sample through the XML stream, RSS measured in a subprocess."""
    script = r"""
import resource, sys
from collections import Counter
from pathlib import Path
from ulmfit.corpora.wikipedia import iter_dump_pages
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
counts = Counter()
longest = max(len(text) for _, text, _ in iter_dump_pages(Path(sys.argv[1]), counts))
print(counts["skipped_redirect"], longest, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    redirects, longest, growth_mb = _peak_rss_growth(script, resolve_package_path(GENSIM_DUMP))
    assert int(redirects) > 50
    # 6.1 MB of XML went through; only about one page (the longest is ~0.1 MB) is held at a time.
    assert float(growth_mb) < 16, f"peak RSS grew {growth_mb} MB"


@pytest.mark.realdata
@pytest.mark.slow
@needs_gensim
def test_prepare_wikipedia_on_the_real_gensim_dump_keeps_memory_bounded(tmp_path):
    script = r"""
import resource, sys
from ulmfit.corpora import WikipediaSource, prepare_wikipedia, strip_wikicode
strip_wikicode("[[warm|up]] {{the parser}}")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = prepare_wikipedia(WikipediaSource(path=sys.argv[1], workers=1), sys.argv[2], cache_dir=sys.argv[3], progress=lambda *a: None)
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(summary["splits"]["train"]["count"] + summary["splits"]["valid"]["count"], growth_mb)
"""
    articles, growth_mb = _peak_rss_growth(
        script, resolve_package_path(GENSIM_DUMP), tmp_path / "wiki", tmp_path / "cache"
    )
    assert int(articles) > 100
    # Bounded by the markup tree of the largest article plus Parquet row-group buffers.
    assert float(growth_mb) < 96, f"peak RSS grew {growth_mb} MB"
