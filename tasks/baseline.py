"""The non-neural baseline ULMFiT is measured against: TF-IDF word n-grams and logistic regression.

The paper's tables (section 4, "Results") compare ULMFiT with earlier models; a TF-IDF + logistic
regression classifier is the cheapest strong baseline a reader can rerun in seconds, so its test
error sits beside ULMFiT's in every report. ``label_subset`` draws the small labelled training sets
of the low-shot experiments (section 4.2, "Low-shot learning", figure 3), so that ULMFiT and the
baseline are trained on exactly the same documents at each size.

``label_subset`` and ``fit_tfidf`` are pure: they take arrays and texts and return indices or
plain numbers. ``baseline_task`` runs the stage's fits on a prepared dataset and returns its
metrics, for the flow to log to MLflow and write to JSON as they are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from tasks.params import BaselineParams
from tasks.tokens import parquet_column


def _class_quotas(class_sizes: np.ndarray, size: int) -> np.ndarray:
    """Documents to take from each class: the first ``size`` picks of a round-robin over the
    classes in label order that skips a class once it has given all its documents.

    Without exhausted classes this is ``size // C`` each plus one each to the first ``size % C``
    classes; a small class drops out of later rounds, so its shortfall goes round-robin to the rest.
    Being a prefix of one fixed sequence of picks, every quota grows with ``size``: the nesting that
    ``label_subset`` promises rests on that.
    """
    # The largest number of complete rounds that fits: sum(min(n_c, rounds)) grows with rounds.
    low, high = 0, int(class_sizes.max())
    while low < high:
        middle = (low + high + 1) // 2
        if int(np.minimum(class_sizes, middle).sum()) <= size:
            low = middle
        else:
            high = middle - 1
    quotas = np.minimum(class_sizes, low)
    left = size - int(quotas.sum())
    # The unfinished round: one more from each class that still has documents, in label order.
    still_open = np.flatnonzero(class_sizes > low)[:left]
    quotas[still_open] += 1
    return quotas


def label_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices (sorted ascending, int64) of a seeded, class-balanced subset of ``size`` documents.

    Each of the C classes present gets ``size // C`` documents, the remainder going one each to the
    classes in label order; a class with too few documents gives all it has and the shortfall is
    filled round-robin from the other classes. For one seed the subset of a smaller size is
    contained in the subset of a larger size: one seeded permutation is drawn per class and a prefix
    of it taken. ``size >= len(labels)`` returns every index. Raises ``ValueError`` when ``size`` is
    below 1 or below the number of classes present.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    classes, class_sizes = np.unique(labels, return_counts=True)
    if size < 1 or size < len(classes):
        raise ValueError(
            f"size {size} is too small for {len(labels)} documents in {len(classes)} classes: "
            f"a balanced subset needs at least one document per class (size >= {max(1, len(classes))})"
        )
    if size >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    # Drawn for every class whatever the size, so that the permutations (and hence the nesting)
    # depend only on the seed and the labels.
    permutations = [rng.permutation(np.flatnonzero(labels == label)) for label in classes]
    quotas = _class_quotas(class_sizes, size)
    chosen = np.concatenate(
        [order[:quota] for order, quota in zip(permutations, quotas, strict=True)]
    )
    return np.sort(chosen).astype(np.int64)


def _check_split(name: str, texts: Sequence[str], labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if len(texts) == 0:
        raise ValueError(f"the {name} split is empty: the TF-IDF baseline needs documents in it")
    if labels.ndim != 1 or len(labels) != len(texts):
        raise ValueError(
            f"the {name} split has {len(texts)} texts but labels of shape {labels.shape}"
        )
    return labels.astype(np.int64)


def fit_tfidf(
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    valid_texts: Sequence[str],
    valid_labels: np.ndarray,
    test_texts: Sequence[str],
    test_labels: np.ndarray,
    *,
    ngram_max: int = 2,
    min_df: int = 1,
    max_features: int | None = None,
    sublinear_tf: bool = True,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    seed: int = 42,
) -> dict:
    """Test error of TF-IDF word 1..``ngram_max`` grams + logistic regression, C tuned on valid.

    The vectorizer is fit on the training texts only, so no test vocabulary or document frequency
    leaks into the features. Every C in ``c_grid`` is fit on train and scored on valid; the lowest
    valid error wins, ties going to the smaller C (the stronger regularisation). The winning model,
    as fit on train, is scored on test. Errors are fractions. Returns plain numbers and lists:
    ``test_error``, ``test_accuracy``, ``valid_error``, ``C``, ``valid_errors`` (one
    ``{"C", "valid_error"}`` per C, in grid order), ``train_documents``, ``valid_documents``,
    ``test_documents``, ``vocabulary_size`` and ``seconds``. Raises ``ValueError`` when a split is
    empty or train has fewer than two classes.
    """
    started = time.perf_counter()
    train_labels = _check_split("train", train_texts, train_labels)
    valid_labels = _check_split("valid", valid_texts, valid_labels)
    test_labels = _check_split("test", test_texts, test_labels)
    train_classes = np.unique(train_labels)
    if len(train_classes) < 2:
        raise ValueError(
            f"the train split has {len(train_classes)} class(es) in {len(train_labels)} documents: "
            "a classifier needs at least two"
        )
    if len(c_grid) == 0:
        raise ValueError("c_grid is empty: give at least one inverse regularisation strength C")
    vectorizer = TfidfVectorizer(
        lowercase=True,
        ngram_range=(1, ngram_max),
        min_df=min_df,
        max_features=max_features,
        sublinear_tf=sublinear_tf,
    )
    train_features = vectorizer.fit_transform(train_texts)
    valid_features = vectorizer.transform(valid_texts)
    test_features = vectorizer.transform(test_texts)

    valid_errors = []
    best: tuple[float, float, LogisticRegression] | None = None
    for c in c_grid:
        # lbfgs fits the multinomial (softmax) loss whenever there are more than two classes,
        # which is the paper's classifier head too; ``multi_class`` is gone from scikit-learn.
        model = LogisticRegression(C=float(c), solver="lbfgs", max_iter=2000, random_state=seed)
        model.fit(train_features, train_labels)
        error = float((model.predict(valid_features) != valid_labels).mean())
        valid_errors.append({"C": float(c), "valid_error": error})
        if best is None or (error, float(c)) < (best[0], best[1]):
            best = (error, float(c), model)
    assert best is not None  # c_grid is not empty
    valid_error, best_c, best_model = best
    test_error = float((best_model.predict(test_features) != test_labels).mean())
    return {
        "test_error": test_error,
        "test_accuracy": 1.0 - test_error,
        "valid_error": valid_error,
        "C": best_c,
        "valid_errors": valid_errors,
        "train_documents": len(train_labels),
        "valid_documents": len(valid_labels),
        "test_documents": len(test_labels),
        "vocabulary_size": len(vectorizer.vocabulary_),
        "seconds": time.perf_counter() - started,
    }


def _split(prepared: Path, name: str) -> tuple[list[str], np.ndarray]:
    path = prepared / f"{name}.parquet"
    texts = [str(t) for t in parquet_column(path, "text")]
    labels = np.asarray(list(parquet_column(path, "label")), dtype=np.int64)
    return texts, labels


@task(name="tfidf-baseline", cache_policy=NONE, persist_result=False)
def baseline_task(
    prepared: Path, subsets: Sequence[tuple[int, int]], options: BaselineParams
) -> dict:
    """``fit_tfidf`` on the prepared dataset's full train split and on each ``(labels, seed)``
    subset of it (``label_subset``): the stage's metrics, full-split figures first."""
    train_texts, train_labels = _split(prepared, "train")
    valid, test = _split(prepared, "valid"), _split(prepared, "test")
    runs = []
    for labels, seed in [(None, 0), *subsets]:
        if labels is None:
            indices = np.arange(len(train_labels))
        else:
            indices = label_subset(train_labels, labels, seed)
        result = fit_tfidf(
            [train_texts[i] for i in indices],
            train_labels[indices],
            *valid,
            *test,
            ngram_max=options.ngram_max,
            min_df=options.min_df,
            max_features=options.max_features,
            sublinear_tf=options.sublinear_tf,
            c_grid=options.c_grid,
            seed=options.seed,
        )
        runs.append({"labels": labels, **result})
    full = runs[0]
    return {
        "test_error": full["test_error"],
        "valid_error": full["valid_error"],
        "C": full["C"],
        "train_documents": full["train_documents"],
        "test_documents": full["test_documents"],
        "subsets": {str(r["labels"]): r for r in runs[1:]},
        "runs": runs,
    }
