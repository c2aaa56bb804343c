"""Stages ``train_tokenizer``, ``tokenize_wikipedia`` and ``tokenize_dataset``.

A SentencePiece unigram vocabulary (MultiFiT's choice, which matches or beats the paper's word
tokens and works in any language) is trained on the Wikipedia training split after ULMFiT's
normalisation (``xxbos``, ``xxmaj``, ``xxup``, ``xxrep``), then every corpus is encoded once
into token files. Texts stream from Parquet in record batches, so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE

from tasks.progress import Progress
from ulmfit.corpora.output import staged_directory
from ulmfit.errors import InputError
from ulmfit.storage import encode_corpus
from ulmfit.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "valid", "test", "unsup")


def parquet_column(path: Path, column: str, batch_rows: int = 2048) -> Iterator:
    """Values of one column of a Parquet file, streamed a record batch at a time."""
    try:
        handle = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise InputError(
            path,
            f"not a readable Parquet file ({error})",
            fix="re-run the stage that produces it (dvc repro --force <stage>)",
        ) from error
    if column not in handle.schema_arrow.names:
        raise InputError(
            path,
            f"no column '{column}' (has {handle.schema_arrow.names})",
            fix="re-run the stage that produces it",
        )
    for batch in handle.iter_batches(batch_size=batch_rows, columns=[column]):
        yield from batch.column(0).to_pylist()


def first_texts(path: Path, count: int) -> list[str]:
    """The first ``count`` values of a Parquet file's ``text`` column (input examples)."""
    return [str(text) for text, _ in zip(parquet_column(path, "text"), range(count), strict=False)]


def row_count(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


@task(name="train-tokenizer", cache_policy=NONE, persist_result=False)
def train_tokenizer_task(corpus: Path, out_dir: Path, cfg: TokenizerConfig) -> dict:
    """Train the tokenizer on ``corpus``'s texts; writes ``out_dir/tokenizer.model``."""
    with staged_directory(out_dir) as staging:
        tokenizer = train_tokenizer(parquet_column(corpus, "text"), staging / TOKENIZER_FILE, cfg)
        vocab_size = tokenizer.vocab_size
    identity = Tokenizer.load(out_dir / TOKENIZER_FILE).identity
    return {"vocab_size": vocab_size, "tokenizer_identity": identity}


@task(name="encode-corpus", cache_policy=NONE, persist_result=False)
def encode_splits_task(
    source_dir: Path,
    tokenizer_path: Path,
    out_dir: Path,
    *,
    labelled: bool,
    workers: int | None,
    chunk_docs: int,
) -> dict:
    """Encode every split found in ``source_dir`` into ``out_dir/<split>.parquet``.

    Labels travel with the classification splits (``unsup`` has none); Wikipedia has none.
    Returns per-split statistics (documents, tokens, ...).
    """
    splits = [s for s in SPLITS if (source_dir / f"{s}.parquet").is_file()]
    if "train" not in splits:
        raise InputError(
            source_dir / "train.parquet",
            "missing input",
            fix="run the stage that prepares this corpus",
        )
    stats = {}
    with staged_directory(out_dir) as staging:
        for split in splits:
            path = source_dir / f"{split}.parquet"
            labels = None
            if labelled and split != "unsup":
                labels = parquet_column(path, "label")
            progress = Progress(f"tokenize {source_dir.name}/{split}", row_count(path), unit="doc")
            result = encode_corpus(
                parquet_column(path, "text"),
                tokenizer_path,
                staging / f"{split}.parquet",
                labels=labels,
                workers=workers,
                chunk_docs=chunk_docs,
                progress=progress.set,
            )
            progress.close()
            stats[split] = _as_dict(result)
    return stats


def _as_dict(value) -> dict:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return value
    return {k: v for k, v in vars(value).items() if not k.startswith("_")}
