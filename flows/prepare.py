"""Flows of stages ``prepare_wikipedia`` and ``prepare_dataset`` (corpus ingest)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.data import prepare_dataset_task, prepare_wikipedia_task
from tasks.params import section_dict
from tasks.pipeline import stage_spec
from tasks.stage import project_params, record_outputs, run_stage, skip_stage
from tasks.workspace import Layout


def _summary_metrics(summary: dict) -> dict:
    """The counts of a corpus summary (documents and words per split and class, skipped and
    repaired records): what ``dvc metrics show`` / ``dvc exp show`` display for a prepare stage.
    Echoed options and length distributions stay in ``summary.json``."""
    out = {}
    for key, value in summary.items():
        if key == "options":
            continue
        if isinstance(value, dict):
            if set(value) <= {"min", "median", "mean", "max"}:
                continue  # a length distribution
            nested = _summary_metrics(value)
            if nested:
                out[key] = nested
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
    return out


@flow(name="prepare_wikipedia", persist_result=False)
def prepare_wikipedia_flow(root: str = ".") -> str:
    """Wikipedia source -> ``data/wikipedia/{train,valid}.parquet``; nothing (a ``SKIPPED.json``)
    with ``pretrain.reuse``, where no LM is pretrained here."""
    params = project_params(root)
    if params.pretrain.reuse:
        spec = stage_spec("prepare_wikipedia")
        skip_stage(Path(root).resolve(), spec, "pretrain.reuse: no LM is pretrained here")
        return ""
    with run_stage(root, "prepare_wikipedia", params=params) as ctx:
        out = ctx.path(Layout.wikipedia)
        summary = prepare_wikipedia_task(ctx.params.wikipedia, out, ctx.path(Layout.cache_dir))
        record_outputs(
            ctx,
            _summary_metrics(summary),
            artifacts=(out / "summary.json", out / "sources.json"),
        )
    return str(out)


@flow(name="prepare_dataset", persist_result=False, flow_run_name="prepare_dataset-{dataset}")
def prepare_dataset_flow(dataset: str, root: str = ".") -> str:
    """One classification dataset -> ``data/datasets/<dataset>/prepared/``."""
    params = project_params(root)
    source = section_dict(params, "datasets", dataset=dataset)["dataset"]["source"]
    with run_stage(
        root, "prepare_dataset", params=params, extra={"source": source}, dataset=dataset
    ) as ctx:
        out = ctx.path(Layout.prepared(dataset))
        summary = prepare_dataset_task(
            params.dataset(dataset).source, out, ctx.path(Layout.cache_dir)
        )
        record_outputs(
            ctx,
            _summary_metrics(summary),
            artifacts=(out / "summary.json", out / "sources.json"),
        )
    return str(out)
