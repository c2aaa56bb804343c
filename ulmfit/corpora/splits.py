"""Seeded, stratified splits and subsets of labelled data, and the length statistics.

The paper (Howard & Ruder 2018, Section 5) reports validation error on a split cut from the
training data and studies low-resource settings with small labelled subsets (Section 5,
"Low-shot learning"). Both must be reproducible from a seed and keep the class balance, so
every function here takes the labels and a seed and returns sorted indices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)`` with ``fraction`` of every class held out.

    Per class, ``round(n * fraction)`` examples are held out, at least one when the fraction is
    positive and the class has two or more examples, and never the whole class.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        take = int(round(len(members) * fraction))
        if fraction > 0 and len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        held.append(members[:take])
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` indices with the classes as equal as they can be (seeded).

    Each class gets ``size // num_classes`` (capped by its size); the remainder is filled at
    random from what is left, so the result has exactly ``min(size, len(labels))`` indices.
    """
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = size // len(classes)
    chosen: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        chosen.append(members[:per_class])
        rest.append(members[per_class:])
    picked = np.concatenate(chosen)
    remaining = rng.permutation(np.concatenate(rest))
    picked = np.concatenate([picked, remaining[: size - len(picked)]])
    return np.sort(picked)


def random_subset(count: int, size: int, seed: int) -> np.ndarray:
    """``min(size, count)`` sorted indices drawn without replacement (a fixed seeded sample)."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def seeded_order(count: int, seed: int) -> np.ndarray:
    """A seeded permutation: train/valid rows are written shuffled so that no reader sees the
    source's class-sorted order (aclImdb lists every negative review first)."""
    return np.random.default_rng(seed).permutation(count)


def length_stats(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """min / median / mean / max of a list of lengths (zeros for an empty split)."""
    values = np.asarray(lengths, dtype=np.int64)
    if values.size == 0:
        return {"min": 0, "median": 0.0, "mean": 0.0, "max": 0}
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 2),
        "max": int(values.max()),
    }


class LengthTally:
    """The statistics of :func:`length_stats` over a stream of lengths, held as a count per
    distinct length: memory grows with the longest document, not with the number of documents
    (a billion one-line documents would need gigabytes as a list)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.count = 0
        self.total = 0

    def add(self, length: int) -> None:
        self.counts[length] += 1
        self.count += 1
        self.total += length

    def stats(self) -> dict[str, float]:
        if not self.count:
            return length_stats([])
        values = sorted(self.counts)
        # The median as np.median computes it: the mean of the two middle values (one when odd).
        positions, middle, seen = [(self.count - 1) // 2, self.count // 2], [], 0
        for value in values:
            seen += self.counts[value]
            while positions and positions[0] < seen:
                positions.pop(0)
                middle.append(value)
        return {
            "min": int(values[0]),
            "median": float(sum(middle) / 2),
            "mean": round(self.total / self.count, 2),
            "max": int(values[-1]),
        }


def text_lengths(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lengths in characters and in whitespace-separated words."""
    chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    words = np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))
    return chars, words
