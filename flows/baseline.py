"""Flow of stage ``baseline``: TF-IDF n-grams + logistic regression (scikit-learn) on one
dataset, the classical line that ULMFiT's gains are measured against. It trains on the full
train split and on every label subset the dataset's controls use (the same documents: see
``tasks.baseline.label_subset``), with C tuned on the validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow

from tasks.baseline import fit_tfidf, label_subset
from tasks.stage import project_params, record_outputs, run_stage
from tasks.tokens import parquet_column
from tasks.workspace import Layout


def _split(prepared: Path, name: str) -> tuple[list[str], np.ndarray]:
    path = prepared / f"{name}.parquet"
    texts = [str(t) for t in parquet_column(path, "text")]
    labels = np.asarray(list(parquet_column(path, "label")), dtype=np.int64)
    return texts, labels


@flow(name="baseline", persist_result=False, flow_run_name="baseline-{dataset}")
def baseline_flow(dataset: str, root: str = ".") -> str:
    """``metrics/<dataset>/baseline.json``: test error for the full train split and each subset."""
    params = project_params(root)
    subsets = [(None, 0), *params.label_subsets(dataset)]
    extra = {"label_subsets": [list(s) for s in subsets[1:]]}
    with run_stage(root, "baseline", params=params, extra=extra, dataset=dataset) as ctx:
        prepared = ctx.path(Layout.prepared(dataset))
        train_texts, train_labels = _split(prepared, "train")
        valid = _split(prepared, "valid")
        test = _split(prepared, "test")
        options = params.baseline
        runs = []
        for labels, seed in subsets:
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
        metrics = {
            "test_error": full["test_error"],
            "valid_error": full["valid_error"],
            "C": full["C"],
            "train_documents": full["train_documents"],
            "test_documents": full["test_documents"],
            "subsets": {str(r["labels"]): r for r in runs[1:]},
            "runs": runs,
        }
        record_outputs(ctx, metrics)
    return str(ctx.path(ctx.spec.metrics))
