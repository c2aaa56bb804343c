"""Token files: round trip, tokenizer identity check, streaming encode with worker processes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ulmfit.errors import InputError
from ulmfit.storage import (
    TokenDocs,
    encode_corpus,
    read_metadata,
    read_tokens,
    write_tokens,
)
from ulmfit.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer


def synthetic_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """Short texts with capitals, repeats and newlines (enough for a tiny SentencePiece model)."""
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "movie",
        "film",
        "was",
        "great",
        "bad",
        "actor",
        "story",
        "plot",
        "and",
        "of",
        "to",
        "in",
        "it",
        "not",
        "very",
    ]
    words += ["The", "GREAT", "Really!!!!", "well.\n\nAnd", "ha ha ha ha", "naïve 😀"]
    return [" ".join(rng.choices(words, k=rng.randint(3, 50))) for _ in range(num_docs)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    return train_tokenizer(iter(synthetic_corpus(200)), path, TokenizerConfig(vocab_size=350))


def test_token_docs_indexing_and_subset() -> None:
    docs = TokenDocs.from_lists([[2, 5, 6], [2], [2, 7, 8, 9]], labels=[0, 1, 0])
    assert len(docs) == 3
    assert docs.lengths.tolist() == [3, 1, 4]
    assert docs[2].tolist() == [2, 7, 8, 9]
    sub = docs.subset([2, 0])
    assert [d.tolist() for d in sub] == [[2, 7, 8, 9], [2, 5, 6]]
    assert sub.labels.tolist() == [0, 0]
    with pytest.raises(ValueError):
        TokenDocs(np.array([1, 2], np.int32), np.array([0, 3]))


def test_write_read_round_trip(tmp_path: Path, tokenizer: Tokenizer) -> None:
    docs = TokenDocs.from_lists([[2, 10, 11], [2, 12], []], labels=[3, 4, 5])
    path = tmp_path / "tokens.parquet"
    write_tokens(path, docs, tokenizer.identity, tokenizer.vocab_size)
    back = read_tokens(path, tokenizer)
    assert back.ids.dtype == np.int32 and back.offsets.dtype == np.int64
    assert [d.tolist() for d in back] == [[2, 10, 11], [2, 12], []]
    assert back.labels.tolist() == [3, 4, 5]
    meta = read_metadata(path)
    assert meta["num_docs"] == "3" and meta["num_tokens"] == "5"
    assert meta["vocab_size"] == str(tokenizer.vocab_size)
    schema = pq.read_schema(path)
    assert pa.types.is_list(schema.field("ids").type)
    assert schema.field("ids").type.value_type == pa.int32()
    assert schema.field("label").type == pa.int64()


def test_identity_mismatch_missing_and_corrupt_files(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "tokens.parquet"
    write_tokens(path, TokenDocs.from_lists([[2, 3]]), "0" * 64, tokenizer.vocab_size)
    with pytest.raises(InputError, match="tokens.parquet.*re-run the tokenize stage"):
        read_tokens(path, tokenizer)
    assert read_tokens(path).num_tokens == 2  # without a tokenizer, no check
    with pytest.raises(InputError, match="absent.parquet"):
        read_tokens(tmp_path / "absent.parquet")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(path.read_bytes()[:50])
    with pytest.raises(InputError, match="corrupt.parquet"):
        read_tokens(corrupt)


def test_encode_corpus_matches_encode_and_is_same_with_two_workers(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    texts = synthetic_corpus(120, seed=5)
    labels = [i % 3 for i in range(len(texts))]
    seen: list[int] = []
    one = encode_corpus(
        iter(texts),
        tokenizer.path,
        tmp_path / "one.parquet",
        labels=iter(labels),
        workers=1,
        chunk_docs=16,
        progress=seen.append,
    )
    two = encode_corpus(
        iter(texts),
        tokenizer.path,
        tmp_path / "two.parquet",
        labels=iter(labels),
        workers=2,
        chunk_docs=16,
        max_chunks_in_flight=2,
    )
    assert one.docs == two.docs == 120 and one.tokens == two.tokens
    assert seen[-1] == 120 and seen == sorted(seen)
    a = read_tokens(tmp_path / "one.parquet", tokenizer)
    b = read_tokens(tmp_path / "two.parquet", tokenizer)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)
    assert a.labels.tolist() == b.labels.tolist() == labels
    assert [d.tolist() for d in a] == tokenizer.encode(texts)
    assert [tokenizer.decode(d) for d in a] == texts
    # one row group per chunk: the writer streamed, it did not collect the corpus
    assert pq.ParquetFile(tmp_path / "one.parquet").metadata.num_row_groups == 120 // 16 + 1


def test_encode_corpus_failure_leaves_no_file(tmp_path: Path, tokenizer: Tokenizer) -> None:
    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match="fewer labels"):
        encode_corpus(iter(["a", "b"]), tokenizer.path, out, labels=[1], workers=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_encode_corpus_works_with_spawned_workers(tmp_path: Path, tokenizer: Tokenizer) -> None:
    # "spawn" starts workers from nothing (macOS/Windows default): nothing may rely on fork.
    texts = synthetic_corpus(20, seed=9)
    out = tmp_path / "spawn.parquet"
    stats = encode_corpus(texts, tokenizer.path, out, workers=2, chunk_docs=5, start_method="spawn")
    assert stats.docs == 20
    assert [d.tolist() for d in read_tokens(out, tokenizer)] == tokenizer.encode(texts)
