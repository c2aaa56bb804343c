"""Ingest of real corpora for ULMFiT (Howard & Ruder 2018): the general-domain corpus for
pretraining (Section 3.1: Wikipedia, or your own text) and the classification datasets of
Section 4.1, as normalised Parquet.

- ``prepare_dataset(DatasetSource(...), out_dir, cache_dir=...)``: IMDb, Yelp-bi, Yelp-full,
  AG News, DBpedia, TREC-6, BBC News -> ``train/valid/test[/unsup].parquet``; and your own
  labelled data (``layout="table"``: CSV, TSV, JSON Lines, Parquet; ``layout="folder"``: one
  sub-folder of ``.txt`` files per class), see docs/own-data.md.
- ``prepare_wikipedia(WikipediaSource(...), out_dir, cache_dir=...)``: dumps in any language,
  WikiText-103, WikiExtractor output, or your own text in any language (``kind`` ``text``,
  ``jsonl`` or ``parquet``; files, folders, compressed, streamed) -> ``train/valid.parquet``
  (``title``, ``text``).

Both write ``summary.json`` and ``sources.json`` (sha256 of every input) and replace
``out_dir`` atomically.
"""

from ulmfit.corpora.archive import ExtractLimits, safe_extract, sniff_format
from ulmfit.corpora.datasets import prepare_dataset
from ulmfit.corpora.download import ConsoleProgress, download
from ulmfit.corpora.sources import DATASETS, DatasetSource, WikipediaSource, resolve_package_path
from ulmfit.corpora.wikipedia import prepare_wikipedia, strip_wikicode

__all__ = [
    "DATASETS",
    "ConsoleProgress",
    "DatasetSource",
    "ExtractLimits",
    "WikipediaSource",
    "download",
    "prepare_dataset",
    "prepare_wikipedia",
    "resolve_package_path",
    "safe_extract",
    "sniff_format",
    "strip_wikicode",
]
