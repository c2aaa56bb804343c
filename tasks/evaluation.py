"""Stage ``evaluate``: test error of the forward, backward and ensembled classifiers (paper
section 3.3, "Bidirectional language model": the two classifiers' predictions are averaged),
beside the majority-class error, and the ensemble saved as one servable ``TextClassifier``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from tasks.progress import Progress
from tasks.training import load_for
from ulmfit.corpora.output import staged_directory
from ulmfit.errors import InputError
from ulmfit.evaluate import evaluate_classifier
from ulmfit.predict import TextClassifier, ensemble
from ulmfit.storage import read_tokens
from ulmfit.tokenizer import Tokenizer


@task(name="evaluate-classifiers", cache_policy=NONE, persist_result=False)
def evaluate_task(
    *,
    tokenizer_path: Path,
    train_file: Path,
    test_file: Path,
    forward_file: Path,
    backward_file: Path | None,
    label_names: list[str],
    model_dir: Path,
    batch_size: int,
    device: str,
) -> dict:
    """Test metrics of each direction and of the ensemble; writes the ``TextClassifier`` to
    ``model_dir``. Returns metrics and the (actual, predicted) label indices of the ensemble."""
    tokenizer = Tokenizer.load(tokenizer_path)
    test = read_tokens(test_file, tokenizer)
    train_labels = read_tokens(train_file, tokenizer).labels
    if test.labels is None or len(test) == 0:
        raise InputError(
            test_file,
            "the test split has no labelled documents",
            fix="check the dataset's test source in params.yaml",
        )
    models = {}
    for name, path in (("fwd", forward_file), ("bwd", backward_file)):
        if path is None:  # the dataset trains the forward direction alone
            continue
        models[name] = load_for(
            path,
            tokenizer,
            "the classifier",
            fix="re-run train_classifier (dvc repro train_classifier)",
            device=device,
        )
    metrics: dict[str, float] = {}
    probs = {}
    for name, model in models.items():
        with Progress(f"evaluate {name}", len(test), unit="doc") as progress:
            result, probs[name] = evaluate_classifier(
                model,
                test,
                batch_size=batch_size,
                backward=name == "bwd",
                device=device,
                progress=progress.set,
            )
        renamed = {"error_rate": "error"}  # test_error_<direction>: the paper's figure
        metrics.update({f"test_{renamed.get(k, k)}_{name}": v for k, v in result.items()})
    actual = np.asarray(test.labels, dtype=np.int64)
    if "bwd" in probs:
        predicted = ensemble(probs["fwd"], probs["bwd"]).argmax(axis=1)
        metrics["test_error_ensemble"] = float((predicted != actual).mean())
        metrics["test_accuracy_ensemble"] = 1.0 - metrics["test_error_ensemble"]
    else:
        predicted = probs["fwd"].argmax(axis=1)
    # The majority class of the training labels, scored on the test set: the bar to beat.
    majority = int(np.bincount(np.asarray(train_labels), minlength=len(label_names)).argmax())
    metrics["test_error_majority"] = float((actual != majority).mean())
    metrics["test_documents"] = len(test)
    metrics["train_documents"] = len(train_labels)
    metrics["num_classes"] = len(label_names)
    with staged_directory(model_dir) as staging:
        TextClassifier(
            tokenizer, models["fwd"], models.get("bwd"), label_names=label_names, device=device
        ).save(staging)
    return {"metrics": metrics, "actual": actual.tolist(), "predicted": predicted.tolist()}
