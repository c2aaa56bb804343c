"""Scheduled retraining: refresh the data, rerun the pipeline, promote only a better classifier.

The paper's measure of a classifier is its test error (Howard & Ruder 2018, Sec. 4); this flow
retrains the whole ULMFiT pipeline (Sec. 3: LM pretraining, LM fine-tuning, classifier
fine-tuning) on fresh data and moves the registry alias ``champion`` to the new classifier only
when its test error is strictly lower (``tasks.promotion.decide``).

It is deployed by ``prefect.yaml`` on a cron schedule to the GPU work pool; run it by hand with
``python -m flows.retrain --project-dir .`` or ``prefect deployment run retrain/retrain-gpu``.

Steps:
1. ``dvc pull`` when the project has a DVC remote (a fresh clone on a fleet host starts empty);
2. refresh: ``dvc repro --force --single-item`` on the prepare stages, so new upstream data is
   downloaded and checked against its checksums even when DVC sees no change in their deps;
3. the pipeline (``ulmfit repro``: ``dvc repro`` with the runs grouped in MLflow and every
   stage reporting to the same Prefect server; ``pipeline_command`` can say otherwise);
   unchanged stages are skipped by DVC, the only cache;
4. ``dvc push`` when the project has a DVC remote, so other hosts reuse the outputs;
5. per dataset: compare the version registered by this run with the champion and decide;
6. promote, record every decision as a run of MLflow experiment ``retrain`` and as a Prefect
   markdown artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

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
from ulmfit.errors import InputError

DEFAULT_METRIC = "test_error_ensemble"
# Stage-name prefix of the data-preparation stages in dvc.yaml (prepare_wikipedia, prepare@<ds>).
PREPARE_PREFIX = "prepare"


# The pipeline's stages report bad input as ``ulmfit <stage>: error: <file>: <problem>. Fix: <fix>``.
BAD_INPUT_LINE = re.compile(r"ulmfit [\w-]+: error: .*Fix: ")
DEFAULT_COMMAND = ("ulmfit", "repro")
# DVC is the project's one cache: Prefect keeps no task results.
NO_CACHE = {"cache_policy": NONE, "persist_result": False}


class CommandFailed(RuntimeError):
    """A pipeline command exited non-zero; the message carries the end of its output."""


class BadInput(CommandFailed):
    """A stage stopped on bad input (it printed which file and the fix): retrying cannot help."""


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O failures, not a stage's bad-input report."""
    data = getattr(state, "data", None)
    error = getattr(data, "result", data)  # a ResultRecord wraps the exception
    return not isinstance(error, BadInput)


def _command_env(project_dir: Path) -> dict[str, str]:
    """Environment for pipeline commands: no telemetry, and the checkout's own code first on
    ``PYTHONPATH``, so a fleet host that cloned a branch runs that branch's stages."""
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "true")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_dir), env.get("PYTHONPATH")]))
    return env


def run_command(command: Sequence[str], project_dir: Path, *, tail_lines: int = 60) -> str:
    """Run ``command`` in ``project_dir``, streaming its output to the Prefect log.

    Returns the output; raises ``CommandFailed`` with the last ``tail_lines`` lines on failure.
    """
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", " ".join(command), project_dir)
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=tail_lines)
    with subprocess.Popen(
        list(command),
        cwd=project_dir,
        env=_command_env(project_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            tail.append(line)
            logger.info("%s", line)
        returncode = process.wait()
    if returncode != 0:
        bad_input = [line for line in lines if BAD_INPUT_LINE.search(line)]
        error = BadInput if bad_input else CommandFailed
        raise error(
            f"`{' '.join(command)}` exited with {returncode} in {project_dir}; "
            + (f"bad input:\n{bad_input[-1]}" if bad_input else "last lines:\n" + "\n".join(tail))
        )
    return "\n".join(lines)


def dvc_query(args: Sequence[str], project_dir: Path) -> str:
    """Run a read-only ``dvc`` command and return its stdout; its stderr goes into the error."""
    result = subprocess.run(
        ["dvc", *args],
        cwd=project_dir,
        env=_command_env(project_dir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise CommandFailed(
            f"`dvc {' '.join(args)}` exited with {result.returncode} in {project_dir}:\n"
            + (result.stderr or result.stdout)[-4000:]
        )
    return result.stdout


def has_dvc_remote(project_dir: Path) -> bool:
    """True when ``dvc remote list`` names at least one remote."""
    return bool(dvc_query(["remote", "list"], project_dir).strip())


def prepare_stages(project_dir: Path, datasets: Sequence[str] | None) -> list[str]:
    """The dvc.yaml stages that fetch and verify data: names starting with ``prepare``.

    With ``datasets`` given, per-dataset items (``prepare...@<dataset>``) outside it are left
    out; stages that serve every dataset (``prepare_wikipedia``) are always kept.
    """
    stages = []
    for name in dvc_query(["stage", "list", "--name-only"], project_dir).split():
        base, _, item = name.partition("@")
        if not base.startswith(PREPARE_PREFIX):
            continue
        if item and datasets is not None and item not in datasets:
            continue
        stages.append(name)
    return stages


def stage_outputs(project_dir: Path, stages: Sequence[str]) -> set[str]:
    """The output paths of ``stages`` as recorded in dvc.lock."""
    lock_path = project_dir / "dvc.lock"
    if not lock_path.is_file():
        return set()
    lock = (yaml.safe_load(lock_path.read_text()) or {}).get("stages") or {}
    return {out["path"] for stage in stages for out in (lock.get(stage) or {}).get("outs", [])}


def changed_data(project_dir: Path, stages: Sequence[str]) -> list[str]:
    """Outputs of the refreshed ``stages`` that differ from what the downstream stages last used,
    per ``dvc status``: the new upstream data that the pipeline will now train on. (Comparing
    the outputs themselves would also flag run records that change on every run.)"""
    outputs = stage_outputs(project_dir, stages)
    status = json.loads(dvc_query(["status", "--json"], project_dir) or "{}")
    changed = set()
    for entries in status.values():
        for entry in entries if isinstance(entries, list) else []:
            for path in (entry.get("changed deps") or {}) if isinstance(entry, dict) else []:
                if any(path == out or path.startswith(out.rstrip("/") + "/") for out in outputs):
                    changed.add(path)
    return sorted(changed)


@task(
    name="dvc-pull",
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    retry_condition_fn=retry_unless_bad_input,
    **NO_CACHE,
)
def dvc_pull(project_dir: Path) -> bool:
    """Fetch cached outputs from the DVC remote (network I/O: retried). False: no remote."""
    if not has_dvc_remote(project_dir):
        return False
    # --run-cache: a fresh clone also gets the stage run-cache, so `dvc repro` restores any stage
    # another host already ran with the same inputs instead of recomputing it.
    run_command(["dvc", "pull", "--allow-missing", "--run-cache"], project_dir)
    return True


@task(
    name="refresh-data",
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=retry_unless_bad_input,
    **NO_CACHE,
)
def refresh_data(project_dir: Path, stages: Sequence[str]) -> list[str]:
    """Re-run the prepare ``stages`` even if DVC thinks they are up to date, so that new upstream
    data is fetched and verified (downloads: retried). Returns the prepared files that changed."""
    if not stages:
        get_run_logger().warning(
            "no prepare stages in %s/dvc.yaml: nothing to refresh", project_dir
        )
        return []
    run_command(["dvc", "repro", "--force", "--single-item", *stages], project_dir)
    changed = changed_data(project_dir, stages)
    get_run_logger().info("new upstream data: %s", ", ".join(changed) or "none")
    return changed


@task(name="run-pipeline", **NO_CACHE)
def run_pipeline(project_dir: Path, command: Sequence[str]) -> None:
    """Run the pipeline (compute, not I/O: no retries; a failure fails the flow and nothing is
    promoted)."""
    run_command(command, project_dir)


@task(name="dvc-push", retries=3, retry_delay_seconds=[5, 30, 120], **NO_CACHE)
def dvc_push(project_dir: Path) -> bool:
    """Share the new outputs through the DVC remote (network I/O: retried)."""
    if not has_dvc_remote(project_dir):
        return False
    run_command(["dvc", "push", "--run-cache"], project_dir)
    return True


def read_params(project_dir: Path) -> dict:
    """The project's params.yaml as plain YAML: the retrain flow only needs the dataset names
    and the MLflow naming, so it does not validate (or import the code of) every section."""
    path = project_dir / "params.yaml"
    if not path.is_file():
        raise InputError(
            path,
            "params.yaml not found",
            fix="pass project_dir= the folder that holds dvc.yaml and params.yaml",
        )
    return yaml.safe_load(path.read_text()) or {}


def params_datasets(params: dict, project_dir: Path) -> list[str]:
    """Dataset names: the keys of the ``datasets`` mapping in params.yaml."""
    datasets = params.get("datasets")
    if isinstance(datasets, dict) and datasets:
        return [str(name) for name in datasets]
    raise InputError(
        project_dir / "params.yaml",
        "no `datasets` mapping",
        fix="add a `datasets:` section (name: options) or pass datasets=[...] to the retrain flow",
    )


def registered_model_name(params: dict, dataset: str) -> str:
    """The registered MLflow model of ``dataset``'s classifier, named as the evaluate stage
    registers it (``tasks.registry.model_name``; ``ulmfit-<dataset>`` by default)."""
    prefix = (params.get("mlflow") or {}).get("model_name_prefix", "ulmfit")
    return model_name(prefix, dataset)


@flow(name="retrain", log_prints=True)
def retrain(
    project_dir: str = ".",
    datasets: list[str] | None = None,
    metric: str = DEFAULT_METRIC,
    pipeline_command: list[str] | None = None,
    refresh: bool = True,
) -> list[dict]:
    """Refresh data, rerun the pipeline, promote each dataset's new classifier only if its
    ``metric`` (test error, lower is better) beats the champion's. Returns the decisions."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = read_params(project)
    names = list(datasets) if datasets else params_datasets(params, project)
    models = {dataset: registered_model_name(params, dataset) for dataset in names}
    command = list(pipeline_command or DEFAULT_COMMAND)
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.retrain",
        description="Retrain now: refresh data, rerun the pipeline and promote each dataset's "
        "new classifier to alias 'champion' only if its test error is strictly lower.",
    )
    parser.add_argument("--project-dir", default=".", help="project with dvc.yaml (default: .)")
    parser.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        help="repeatable; default: all in params.yaml",
    )
    parser.add_argument(
        "--metric", default=DEFAULT_METRIC, help=f"lower is better (default: {DEFAULT_METRIC})"
    )
    parser.add_argument(
        "--no-refresh", action="store_true", help="skip re-running the prepare stages"
    )
    args = parser.parse_args(argv)
    retrain(
        project_dir=args.project_dir,
        datasets=args.datasets,
        metric=args.metric,
        refresh=not args.no_refresh,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
