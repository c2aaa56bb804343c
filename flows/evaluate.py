"""Flow of stage ``evaluate``: forward, backward and ensemble test error, the confusion matrix,
and the ensemble registered in MLflow as a servable pyfunc model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import flow

from tasks import tracking
from tasks.evaluation import evaluate_task
from tasks.params import load_params, section_dict
from tasks.plots import confusion_figure, write_rows
from tasks.registry import model_name, register_classifier_task
from tasks.stage import record_outputs, require, runtime, stage_run
from tasks.tokens import TOKENIZER_FILE, parquet_column
from tasks.training import MODEL_FILE
from tasks.workspace import Layout


@flow(name="evaluate", persist_result=False, flow_run_name="evaluate-{dataset}")
def evaluate_flow(dataset: str, root: str = ".") -> str:
    """Test metrics -> ``metrics/<dataset>/evaluate.json``; the served model ->
    ``data/datasets/<dataset>/model/`` and the MLflow registry."""
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    params.dataset(dataset)
    spec = Layout.stage("evaluate", dataset)
    tokens = require(root_path / Layout.tokens(dataset), f"tokenize_dataset@{dataset}")
    tokenizer = require(root_path / Layout.tokenizer_dir / TOKENIZER_FILE, "train_tokenizer")
    prepared = require(root_path / Layout.prepared(dataset), f"prepare_dataset@{dataset}")
    files = {
        d: require(
            root_path / Layout.classifier(dataset, d) / MODEL_FILE,
            f"train_classifier@{dataset}-{d}",
        )
        for d in params.dataset(dataset).directions
    }
    label_names = list(json.loads((prepared / "summary.json").read_text())["label_names"])
    with stage_run(root_path, spec, params, section_dict(params, "evaluate")) as ctx:
        out = ctx.path(Layout.model(dataset))
        result = evaluate_task(
            tokenizer_path=tokenizer,
            train_file=tokens / "train.parquet",
            test_file=tokens / "test.parquet",
            forward_file=files["fwd"],
            backward_file=files.get("bwd"),
            label_names=label_names,
            model_dir=out,
            batch_size=params.evaluate.batch_size,
            device=runtime(params.evaluate.device, params.evaluate.threads),
        )
        actual, predicted = np.asarray(result["actual"]), np.asarray(result["predicted"])
        matrix = np.zeros((len(label_names), len(label_names)), dtype=np.int64)
        np.add.at(matrix, (actual, predicted), 1)
        rows = [
            {"actual": label_names[a], "predicted": label_names[p]}
            for a, p in zip(actual, predicted, strict=True)
        ]
        write_rows(root_path / spec.curve, rows, ["actual", "predicted"])
        confusion_figure(
            root_path / spec.figure, matrix, label_names, f"{dataset}: ensemble on the test set"
        )
        metrics = result["metrics"]
        # Metrics first: the retrain flow judges a registered version by its run's metrics.
        record_outputs(
            root_path,
            ctx.run_id,
            spec,
            metrics,
            artifacts=(root_path / spec.curve, root_path / spec.figure),
        )
        if params.evaluate.register:
            examples = [
                t
                for t, _ in zip(
                    parquet_column(prepared / "test.parquet", "text"), range(3), strict=False
                )
            ]
            registered = register_classifier_task(
                root=root_path,
                run_id=ctx.run_id,
                model_dir=out,
                name=model_name(params.mlflow.model_name_prefix, dataset),
                dataset=dataset,
                metrics=metrics,
                examples=examples,
            )
            tracking.set_tags(
                root_path,
                ctx.run_id,
                {
                    "ulmfit.registered_model": registered["name"],
                    "ulmfit.registered_version": registered["version"],
                },
            )
    return str(out)
