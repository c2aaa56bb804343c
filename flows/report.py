"""Flow of stage ``report``: ``reports/results.md`` over every dataset."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks import tracking
from tasks.params import load_params, section_dict
from tasks.report import write_report_task
from tasks.stage import stage_run
from tasks.workspace import Layout


@flow(name="report", persist_result=False)
def report_flow(root: str = ".") -> str:
    """Tabulate every dataset's metrics (with their MLflow run ids) into ``reports/results.md``."""
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    spec = Layout.stage("report")
    with stage_run(root_path, spec, params, section_dict(params, "report")) as ctx:
        figures = write_report_task(root_path, params)
        tracking.log_metrics(root_path, ctx.run_id, figures)
        tracking.log_artifacts(root_path, ctx.run_id, [root_path / Layout.results])
    return str(root_path / Layout.results)
