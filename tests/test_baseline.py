"""The TF-IDF baseline and the seeded, balanced, nested subsets of the low-shot experiments."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.baseline import fit_tfidf, label_subset

# 3 classes of 40, 30 and 30 documents, shuffled so that classes are not contiguous.
LABELS = np.random.default_rng(7).permutation(np.repeat([0, 1, 2], [40, 30, 30]))


def test_label_subset_is_balanced_with_remainder_in_label_order():
    subset = label_subset(LABELS, 10, seed=0)
    assert subset.dtype == np.int64
    assert np.all(np.diff(subset) > 0)  # sorted, no repeats
    assert np.bincount(LABELS[subset], minlength=3).tolist() == [4, 3, 3]
    assert np.bincount(LABELS[label_subset(LABELS, 11, seed=0)]).tolist() == [4, 4, 3]
    assert np.bincount(LABELS[label_subset(LABELS, 3, seed=0)]).tolist() == [1, 1, 1]


def test_label_subset_is_nested_across_sizes():
    previous = np.array([], dtype=np.int64)
    for size in (3, 5, 10, 17, 40, 64, 99):
        subset = label_subset(LABELS, size, seed=3)
        assert len(subset) == size
        assert set(previous.tolist()) <= set(subset.tolist())
        previous = subset


def test_label_subset_is_deterministic_per_seed():
    np.testing.assert_array_equal(
        label_subset(LABELS, 12, seed=5), label_subset(LABELS, 12, seed=5)
    )
    assert not np.array_equal(label_subset(LABELS, 12, seed=5), label_subset(LABELS, 12, seed=6))


def test_label_subset_fills_a_small_class_shortfall_round_robin():
    labels = np.repeat([0, 1, 2], [1, 50, 50])
    subset = label_subset(labels, 10, seed=0)
    # Class 0 gives its only document; its 3 missing documents go to classes 1, 2, 1.
    assert np.bincount(labels[subset]).tolist() == [1, 5, 4]
    assert 0 in subset
    # Labels need not be 0..C-1: classes are taken in sorted order of whatever values are present.
    assert np.bincount(labels[label_subset(labels + 5, 10, seed=0)]).tolist() == [1, 5, 4]


def test_label_subset_of_full_size_returns_every_index():
    expected = np.arange(len(LABELS), dtype=np.int64)
    np.testing.assert_array_equal(label_subset(LABELS, len(LABELS), seed=1), expected)
    np.testing.assert_array_equal(label_subset(LABELS, 10 * len(LABELS), seed=1), expected)


@pytest.mark.parametrize("size", [0, -1, 2])
def test_label_subset_rejects_sizes_below_the_class_count(size):
    with pytest.raises(ValueError, match=rf"size {size}.*100 documents.*3 classes"):
        label_subset(LABELS, size, seed=0)


KEYWORDS = ("football", "inflation", "rainfall")
FILLER = ["the", "a", "of", "report", "today", "new", "said", "people", "local", "city", "week"]


def _keyword_corpus(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Documents whose class is decided by one keyword, hidden among shared filler words."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(KEYWORDS)
    texts = []
    for label in labels:
        words = list(rng.choice(FILLER, size=6)) + [KEYWORDS[label]]
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts, labels


def test_fit_tfidf_separates_keyword_classes_and_reports_plain_numbers():
    train, valid, test = (_keyword_corpus(n, seed) for n, seed in ((60, 0), (15, 1), (30, 2)))
    c_grid = (0.1, 1.0, 10.0)
    result = fit_tfidf(*train, *valid, *test, c_grid=c_grid, seed=0)
    assert set(result) == {
        "test_error",
        "test_accuracy",
        "valid_error",
        "C",
        "valid_errors",
        "train_documents",
        "valid_documents",
        "test_documents",
        "vocabulary_size",
        "seconds",
    }
    assert result["test_error"] == 0.0
    assert result["test_accuracy"] == 1.0
    assert result["C"] in c_grid
    assert [entry["C"] for entry in result["valid_errors"]] == list(c_grid)
    assert result["valid_error"] == min(entry["valid_error"] for entry in result["valid_errors"])
    assert (result["train_documents"], result["valid_documents"], result["test_documents"]) == (
        60,
        15,
        30,
    )
    assert result["vocabulary_size"] > len(FILLER)  # unigrams and bigrams
    assert all(type(result[key]) is float for key in ("test_error", "valid_error", "C", "seconds"))


def test_fit_tfidf_breaks_valid_error_ties_towards_the_smaller_c():
    train, valid, test = (_keyword_corpus(n, seed) for n, seed in ((60, 0), (15, 1), (15, 2)))
    # Every C separates these classes, so all valid errors tie at 0.
    result = fit_tfidf(*train, *valid, *test, c_grid=(10.0, 1.0, 100.0))
    assert all(entry["valid_error"] == 0.0 for entry in result["valid_errors"])
    assert result["C"] == 1.0


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_fit_tfidf_rejects_an_empty_split(split):
    splits = {
        name: _keyword_corpus(9, seed) for seed, name in enumerate(("train", "valid", "test"))
    }
    splits[split] = ([], np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match=split):
        fit_tfidf(*splits["train"], *splits["valid"], *splits["test"], c_grid=(1.0,))


def test_fit_tfidf_rejects_a_one_class_train_split():
    texts, labels = _keyword_corpus(9, 0)
    one_class = labels == 0
    with pytest.raises(ValueError, match="train split has 1 class"):
        fit_tfidf(
            [t for t, keep in zip(texts, one_class, strict=True) if keep],
            labels[one_class],
            texts,
            labels,
            texts,
            labels,
            c_grid=(1.0,),
        )


def _read_trec(path) -> tuple[list[str], list[str]]:
    """``COARSE:fine question text`` lines; the coarse label is TREC-6's class."""
    coarse, texts = [], []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            coarse.append(label.split(":", 1)[0])
            texts.append(text)
    return texts, coarse


@pytest.mark.realdata
def test_fit_tfidf_on_trec6_is_near_the_reference_error(shared_data):
    train_texts, train_coarse = _read_trec(shared_data / "trec6" / "train_5500.label")
    test_texts, test_coarse = _read_trec(shared_data / "trec6" / "TREC_10.label")
    names = sorted(set(train_coarse))
    assert len(names) == 6
    train_labels = np.array([names.index(name) for name in train_coarse])
    test_labels = np.array([names.index(name) for name in test_coarse])
    # A seeded 10 % of train held out for choosing C; the test set stays untouched.
    order = np.random.default_rng(0).permutation(len(train_texts))
    valid_part, train_part = order[: len(order) // 10], order[len(order) // 10 :]
    result = fit_tfidf(
        [train_texts[i] for i in train_part],
        train_labels[train_part],
        [train_texts[i] for i in valid_part],
        train_labels[valid_part],
        test_texts,
        test_labels,
        c_grid=(1.0, 10.0, 100.0),
    )
    assert result["test_documents"] == 500
    # A reference run of TF-IDF 1-2 grams + logistic regression measured 11.4 %.
    assert result["test_error"] < 0.20, result
