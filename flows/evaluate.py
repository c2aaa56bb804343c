"""Flow of stage ``evaluate``: forward, backward and ensemble test error, the confusion matrix,
and the ensemble registered in MLflow as a servable pyfunc model."""

from __future__ import annotations

from prefect import flow

from tasks import tracking
from tasks.evaluation import evaluate_task
from tasks.plots import confusion_outputs
from tasks.recipes import label_names_of
from tasks.registry import model_name, register_classifier_task
from tasks.stage import record_outputs, run_stage, runtime
from tasks.tokens import TOKENIZER_FILE, first_texts
from tasks.training import MODEL_FILE
from tasks.workspace import Layout


@flow(name="evaluate", persist_result=False, flow_run_name="evaluate-{dataset}")
def evaluate_flow(dataset: str, root: str = ".") -> str:
    """Test metrics -> ``metrics/<dataset>/evaluate.json``; the served model ->
    ``data/datasets/<dataset>/model/`` and the MLflow registry."""
    with run_stage(root, "evaluate", dataset=dataset) as ctx:
        params, root_path, spec = ctx.params, ctx.root, ctx.spec
        prepared = ctx.path(Layout.prepared(dataset))
        tokens = ctx.path(Layout.tokens(dataset))
        files = {
            d: ctx.require(f"{Layout.classifier(dataset, d)}/{MODEL_FILE}")
            for d in params.dataset(dataset).directions
        }
        label_names = label_names_of(root_path, dataset)
        out = ctx.path(Layout.model(dataset))
        result = evaluate_task(
            tokenizer_path=ctx.require(f"{Layout.tokenizer_dir}/{TOKENIZER_FILE}"),
            train_file=tokens / "train.parquet",
            test_file=tokens / "test.parquet",
            forward_file=files["fwd"],
            backward_file=files.get("bwd"),
            label_names=label_names,
            model_dir=out,
            batch_size=params.evaluate.batch_size,
            device=runtime(params.evaluate.device, params.evaluate.threads),
        )
        confusion_outputs(
            root_path / spec.curve,
            root_path / spec.figure,
            result["actual"],
            result["predicted"],
            label_names,
            f"{dataset}: ensemble on the test set",
        )
        metrics = result["metrics"]
        # Metrics first: the retrain flow judges a registered version by its run's metrics.
        record_outputs(
            ctx,
            metrics,
            artifacts=(root_path / spec.curve, root_path / spec.figure),
        )
        if params.evaluate.register:
            registered = register_classifier_task(
                root=root_path,
                run_id=ctx.run_id,
                model_dir=out,
                name=model_name(params.mlflow.model_name_prefix, dataset),
                dataset=dataset,
                metrics=metrics,
                examples=first_texts(prepared / "test.parquet", 3),
            )
            tracking.set_tags(
                root_path,
                ctx.run_id,
                {
                    "ulmfit.registered_model": registered["name"],
                    "ulmfit.registered_version": registered["version"],
                    "ulmfit.backbone": registered["backbone"],
                },
            )
    return str(out)
