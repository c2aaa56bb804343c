"""Curves and figures of the pipeline: CSV for ``dvc plots``, PNG (matplotlib) for people.

- Training stages: ``plots/<name>.csv`` (step, epoch, loss, lr, ...) and a two-panel PNG: the
  training loss (with validation points) and the learning-rate schedule, which shows STLR's
  slanted triangles (paper section 3.2, Figure 2) and, for the classifier, one per gradual
  unfreezing stage (section 3.3).
- Evaluation: ``plots/<dataset>/evaluate.csv`` (actual, predicted) for DVC's confusion template
  and a confusion-matrix PNG.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ulmfit.io import atomic_path, atomic_write


def write_rows(path: Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> Path:
    """CSV with a fixed header (missing values left empty), written atomically."""
    with atomic_write(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: stages run under DVC, CI and workers
    import matplotlib.pyplot as plt

    return plt


def training_figure(
    path: Path,
    steps: Sequence[Mapping[str, float]],
    evals: Sequence[Mapping[str, float]],
    title: str,
) -> Path:
    """Loss (train, and validation where measured) and learning rate against the step."""
    plt = _pyplot()
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if steps:
        x = [r["step"] for r in steps]
        loss_ax.plot(x, [r.get("loss", np.nan) for r in steps], lw=0.8, label="train loss")
        lr_ax.plot(x, [r.get("lr", np.nan) for r in steps], lw=1.0, color="tab:orange")
    if evals:
        loss_ax.plot(
            [r["step"] for r in evals],
            [r.get("loss", np.nan) for r in evals],
            "o-",
            color="tab:red",
            label="validation loss",
        )
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    loss_ax.set_title(title)
    lr_ax.set_ylabel("learning rate (top group)")
    lr_ax.set_xlabel("optimiser step")
    fig.tight_layout()
    return _save(fig, path)


def confusion_figure(
    path: Path, matrix: np.ndarray, label_names: Sequence[str], title: str
) -> Path:
    """Row-normalised confusion matrix (rows: actual, columns: predicted) with counts."""
    plt = _pyplot()
    size = max(4.0, 0.6 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    ax.imshow(matrix / totals, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if matrix[i, j] / totals[i, 0] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def confusion_outputs(
    rows_path: Path,
    figure_path: Path,
    actual: Sequence[int],
    predicted: Sequence[int],
    label_names: Sequence[str],
    title: str,
) -> None:
    """The test set's (actual, predicted) class names as a CSV (DVC's confusion plot) and the
    confusion matrix as a figure."""
    matrix = np.zeros((len(label_names), len(label_names)), dtype=np.int64)
    np.add.at(matrix, (np.asarray(actual), np.asarray(predicted)), 1)
    rows = [
        {"actual": label_names[a], "predicted": label_names[p]}
        for a, p in zip(actual, predicted, strict=True)
    ]
    write_rows(rows_path, rows, ["actual", "predicted"])
    confusion_figure(figure_path, matrix, label_names, title)


def error_curves_figure(
    path: Path,
    curves: Mapping[str, Mapping[str, list]],
    xlabel: str = "labelled training documents",
) -> Path:
    """Test error against ``xlabel`` (log scale), one panel per dataset and one line per
    method: ``{dataset: {method: [(x, error), ...]}}``."""
    plt = _pyplot()
    names = list(curves) or ["(no datasets)"]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for label, points in curves.get(name, {}).items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test error (%)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        if curves.get(name):
            ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def note_figure(path: Path, text: str) -> Path:
    """A figure that only says ``text`` (the declared plot of a stage item that did not run)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
