"""SentencePiece tokenizer: exact round trip, ids, reservoir sample, bad model files."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest

from ulmfit.errors import InputError
from ulmfit.text import MARKERS
from ulmfit.tokenizer import (
    Tokenizer,
    TokenizerConfig,
    _reservoir_sample,
    train_tokenizer,
)

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "is",
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
    "this",
    "that",
    "not",
    "but",
    "very",
    "good",
    "really",
    "one",
    "time",
    "character",
    "scene",
    "ending",
    "director",
    "watch",
]


def synthetic_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """Small review-like texts with the features the rules mark: case, repeats, newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        words = []
        for _ in range(rng.randint(5, 60)):
            word = rng.choice(WORDS)
            roll = rng.random()
            if roll < 0.1:
                word = word.capitalize()
            elif roll < 0.13:
                word = word.upper()
            elif roll < 0.15:
                word = word + "!!!!"
            words.append(word)
        text = " ".join(words)
        if rng.random() < 0.3:
            text = text.replace(" the ", ".\n\nThe ", 1)
        docs.append(text)
    return docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    return train_tokenizer(iter(synthetic_corpus(300)), path, TokenizerConfig(vocab_size=400))


ROUND_TRIP = [
    "The movie was GREAT!!!!! Really.",
    "line one\n\nline two\twith a tab\r\n",
    "  two leading spaces, three trailing   ",
    "unicode: naïve café Ελληνικά 日本語 😀👍🏽",
    "literal markers xxbos xxmaj XXUP xxrep 4 a and ▁ (SentencePiece's space)",
    "McDonald's iPhone; ha ha ha ha",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tokenizer: Tokenizer, text: str) -> None:
    (ids,) = tokenizer.encode([text])
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids) == text


def test_round_trip_random_text(tokenizer: Tokenizer) -> None:
    rng = random.Random(3)
    alphabet = [chr(c) for c in range(0x20, 0x180)] + ["\n", "\t", " ", "😀", "▁", "x"] * 10
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    for text, ids in zip(texts, tokenizer.encode(texts), strict=True):
        assert tokenizer.decode(ids) == text


def test_special_ids_and_markers_are_single_pieces(tokenizer: Tokenizer) -> None:
    assert tokenizer.pad_id == 1
    assert tokenizer.unk_id == 0
    assert tokenizer.pieces([tokenizer.bos_id]) == ["xxbos"]
    for marker in MARKERS:
        assert len(tokenizer._sp.encode(marker)) == 1, marker
    assert 300 < tokenizer.vocab_size <= 400
    (ids,) = tokenizer.encode(["The END"])
    assert tokenizer.pieces(ids)[:2] == ["xxbos", "xxmaj"]
    assert "xxup" in tokenizer.pieces(ids)


def test_identity_is_sha256_of_model_and_pickle_is_cheap(tokenizer: Tokenizer) -> None:
    import hashlib

    assert tokenizer.identity == hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.identity == tokenizer.identity
    assert clone.encode(["The movie"]) == tokenizer.encode(["The movie"])


def test_training_is_deterministic(tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=300, sample_docs=100)
    corpus = synthetic_corpus(200, seed=1)
    first = train_tokenizer(iter(corpus), tmp_path / "a.model", cfg)
    second = train_tokenizer(iter(corpus), tmp_path / "b.model", cfg)
    assert first.identity == second.identity


def test_reservoir_sample_is_bounded_and_uniform() -> None:
    consumed = 0

    def stream():
        nonlocal consumed
        for i in range(10_000):
            consumed += 1
            yield str(i)

    sample = _reservoir_sample(stream(), size=100, max_chars=10, seed=0)
    assert consumed == 10_000 and len(sample) == 100
    # A uniform sample of 0..9999 has a mean near 5000 (sd of the mean about 290).
    assert 4000 < sum(int(s) for s in sample) / 100 < 6000
    assert _reservoir_sample(iter(["abcdef"]), size=5, max_chars=3, seed=0) == ["abc"]


def test_bad_or_missing_model_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(InputError, match="bad.model"):
        Tokenizer.load(bad)


@pytest.mark.realdata
def test_exact_round_trip_on_real_wikipedia_and_imdb(shared_data: Path, tmp_path: Path) -> None:
    import itertools
    import re
    import tarfile

    wiki = (shared_data / "wikipedia" / "enwiki2015_sample_2MB.txt").read_text(encoding="utf-8")
    articles = re.split(r"<doc [^>]*>\n|</doc>\n", wiki)
    articles = [a for a in articles if a.strip()]
    tok = train_tokenizer(
        iter(articles),
        tmp_path / "wiki.model",
        TokenizerConfig(vocab_size=1000, sample_docs=40, max_doc_chars=5000),
    )
    reviews = []
    with tarfile.open(shared_data / "imdb" / "aclImdb_labeled_50k.tar.gz", "r:gz") as archive:
        for member in itertools.islice((m for m in archive if m.name.endswith(".txt")), 400):
            if "/pos/" in member.name or "/neg/" in member.name:
                reviews.append(archive.extractfile(member).read().decode("utf-8"))
    texts = articles + reviews
    assert len(reviews) > 100
    for text, ids in zip(texts, tok.encode(texts), strict=True):
        assert tok.decode(ids) == text
    # byte fallback keeps rare characters exact without <unk>
    assert not any(tok.unk_id in ids for ids in tok.encode(texts))
