"""What a control stage does beyond the pipeline's recipe (``tasks/recipes.py``): train on the
label subset the TF-IDF baseline also uses, and measure the classifier on the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from tasks.baseline import label_subset
from tasks.progress import Progress
from tasks.recipes import backward
from tasks.tokens import parquet_column
from tasks.training import load_for
from tasks.workspace import Layout
from ulmfit.errors import InputError
from ulmfit.evaluate import evaluate_classifier
from ulmfit.storage import read_tokens
from ulmfit.tokenizer import Tokenizer


def train_subset(root: Path, dataset: str, labels: int | None, seed: int) -> np.ndarray | None:
    """Indices of a control's training documents (None: all), checked to be the same
    documents in the prepared Parquet (what the TF-IDF baseline reads) and the token file."""
    if labels is None:
        return None
    prepared = root / Layout.prepared(dataset) / "train.parquet"
    tokens = root / Layout.tokens(dataset) / "train.parquet"
    text_labels = np.asarray(list(parquet_column(prepared, "label")), dtype=np.int64)
    token_labels = np.asarray(read_tokens(tokens).labels, dtype=np.int64)
    if not np.array_equal(text_labels, token_labels):
        raise InputError(
            tokens,
            "its documents are not in the order of the prepared train split",
            fix=f"re-run the tokenizer for this dataset: dvc repro -f tokenize_dataset@{dataset}",
        )
    return label_subset(text_labels, labels, seed)


@task(name="test-classifier", cache_policy=NONE, persist_result=False)
def test_classifier_task(
    model_file: Path,
    test_file: Path,
    tokenizer_path: Path,
    *,
    batch_size: int,
    direction: str,
    device: str,
    description: str = "test",
) -> dict:
    """Error rate, accuracy and loss of one classifier on a test token file; progress lines
    (or a bar) named ``description``."""
    tokenizer = Tokenizer.load(tokenizer_path)
    test = read_tokens(test_file, tokenizer)
    model = load_for(model_file, tokenizer, "the control's classifier", device=device)
    with Progress(description, len(test), unit="doc") as progress:
        test_metrics, _ = evaluate_classifier(
            model,
            test,
            batch_size=batch_size,
            backward=backward(direction),
            device=device,
            progress=progress.set,
        )
    return {
        "test_error": test_metrics["error_rate"],
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "test_documents": len(test),
    }
