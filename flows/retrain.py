"""Scheduled retraining: refresh the data, rerun the pipeline, promote only a better classifier.

The paper's measure of a classifier is its test error (Howard & Ruder 2018, Sec. 4); this flow
retrains the whole ULMFiT pipeline (Sec. 3: LM pretraining, LM fine-tuning, classifier
fine-tuning) on fresh data and moves the registry alias ``champion`` to the new classifier only
when its test error is strictly lower (``tasks.promotion.decide``).

It is deployed by ``prefect.yaml`` on a cron schedule to the GPU work pool; run it by hand with
``ulmfit retrain`` (from the project root) or ``prefect deployment run retrain/retrain-gpu``.
Its steps are tasks of ``tasks/commands.py`` (the commands) and ``tasks/promotion.py`` (the
decision).

Steps:
1. ``dvc pull`` when the project has a DVC remote (a fresh clone on a fleet host starts empty);
2. refresh: ``dvc repro --force --single-item`` on the prepare stages, so new upstream data is
   downloaded and checked against its checksums even when DVC sees no change in their deps;
3. the pipeline (``ulmfit repro``: ``dvc repro`` with the runs grouped in MLflow and every
   stage reporting to the same Prefect server; ``runner: dvc`` runs bare ``dvc repro``: the
   command is one of these two, never an argv taken from the API, see docs/deployment.md);
   unchanged stages are skipped by DVC, the only cache;
4. ``dvc push`` when the project has a DVC remote, so other hosts reuse the outputs;
5. per dataset: compare the version registered by this run with the champion and decide;
6. promote, record every decision as a run of MLflow experiment ``retrain`` and as a Prefect
   markdown artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.commands import (
    dvc_pull,
    dvc_push,
    prepare_stages,
    refresh_data,
    run_pipeline,
)
from tasks.params import load_params
from tasks.promotion import (
    Decision,
    artifact_key,
    decision_markdown,
    judge_candidate,
    promote_champion,
    record_decision,
    registry_snapshot,
)
from tasks.registry import model_name

DEFAULT_METRIC = "test_error_ensemble"
#: The only commands a retrain run can execute. Flow parameters can be set by anyone who can
#: reach the Prefect API, so they choose between fixed commands and never carry an argv.
RUNNERS = {"ulmfit": ("ulmfit", "repro"), "dvc": ("dvc", "repro")}


@flow(name="retrain", log_prints=True)
def retrain(
    project_dir: str = ".",
    datasets: list[str] | None = None,
    metric: str = DEFAULT_METRIC,
    runner: Literal["ulmfit", "dvc"] = "ulmfit",
    refresh: bool = True,
) -> list[dict]:
    """Refresh data, rerun the pipeline, promote each dataset's new classifier only if its
    ``metric`` (test error, lower is better) beats the champion's. Returns the decisions."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml")
    names = list(datasets or params.datasets)
    prefix = params.mlflow.model_name_prefix
    models = {dataset: model_name(prefix, dataset) for dataset in names}
    if runner not in RUNNERS:  # Prefect validates the Literal; a direct call is checked here
        raise ValueError(f"runner must be one of {sorted(RUNNERS)}, got {runner!r}")
    command = list(RUNNERS[runner])
    flow_run_id = flow_run.get_id()

    # Versions that exist before this run are never candidates: only what this run registers is.
    # The champion is read now too: the first version registered gets the alias at registration
    # when there is none, which is then a first model, not one already in service.
    before = registry_snapshot(project, list(models.values()))
    pulled = dvc_pull(project)
    stages = prepare_stages(project, names) if refresh else []
    changed = refresh_data(project, stages) if refresh else []
    run_pipeline(project, command)
    pushed = dvc_push(project)

    decisions: list[Decision] = [
        judge_candidate(project, dataset, model, metric, *before[model])
        for dataset, model in models.items()
    ]
    context = {
        "project_dir": str(project),
        "pipeline_command": " ".join(command),
        "refreshed_stages": ",".join(stages) or "none",
        "data_changed": ",".join(changed) or "none",
        "dvc_remote": "yes" if (pulled or pushed) else "no",
    }
    decision_runs = {}
    for decision in decisions:
        if decision.promote:
            promote_champion(project, decision, flow_run_id)
        decision_runs[decision.dataset] = record_decision(project, decision, flow_run_id, context)
        logger.info("%s: %s", decision.dataset, decision.reason)

    report = decision_markdown(decisions)
    report += "\n## Context\n\n" + "\n".join(
        f"- {key}: `{value}`" for key, value in context.items()
    )
    report += "\n- MLflow decision runs (experiment `retrain`): " + ", ".join(
        f"{dataset} `{run_id}`" for dataset, run_id in decision_runs.items()
    )
    create_markdown_artifact(
        markdown=report + "\n",
        key=artifact_key("retrain-decision"),
        description="Champion/challenger decisions of this retrain run",
    )
    return [{**d.to_dict(), "decision_run_id": decision_runs[d.dataset]} for d in decisions]
