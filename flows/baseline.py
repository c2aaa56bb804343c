"""Flow of stage ``baseline``: TF-IDF n-grams + logistic regression (scikit-learn) on one
dataset, the classical line that ULMFiT's gains are measured against. It trains on the full
train split and on every label subset the dataset's controls use (the same documents: see
``tasks.baseline.label_subset``), with C tuned on the validation split."""

from __future__ import annotations

from prefect import flow

from tasks.baseline import baseline_task
from tasks.stage import project_params, record_outputs, run_stage
from tasks.workspace import Layout


@flow(name="baseline", persist_result=False, flow_run_name="baseline-{dataset}")
def baseline_flow(dataset: str, root: str = ".") -> str:
    """``metrics/<dataset>/baseline.json``: test error for the full train split and each subset."""
    params = project_params(root)
    subsets = params.label_subsets(dataset)
    extra = {"label_subsets": [list(s) for s in subsets]}
    with run_stage(root, "baseline", params=params, extra=extra, dataset=dataset) as ctx:
        metrics = baseline_task(ctx.path(Layout.prepared(dataset)), subsets, params.baseline)
        record_outputs(ctx, metrics)
    return str(ctx.path(ctx.spec.metrics))
