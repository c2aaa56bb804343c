"""Flow of stage ``report``: ``reports/results.md`` over every dataset."""

from __future__ import annotations

from prefect import flow

from tasks import tracking
from tasks.report import write_report_task
from tasks.stage import run_stage
from tasks.workspace import Layout


@flow(name="report", persist_result=False)
def report_flow(root: str = ".") -> str:
    """Tabulate every dataset's metrics (with their MLflow run ids) into ``reports/results.md``."""
    with run_stage(root, "report") as ctx:
        figures = write_report_task(ctx.root, ctx.params)
        tracking.log_metrics(ctx.root, ctx.run_id, figures)
        tracking.log_artifacts(ctx.root, ctx.run_id, [ctx.path(Layout.results)])
    return str(ctx.path(Layout.results))
