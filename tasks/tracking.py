"""MLflow: every stage is a run, grouped by pipeline execution and traceable to data and code.

- Tracking URI: ``MLFLOW_TRACKING_URI`` if set (e.g. a shared server), else
  ``sqlite:///<absolute project path>/mlflow.db``: absolute, so a run started from any directory
  (DVC, Prefect workers, tests) lands in the same database.
- Each run is tagged with ``ulmfit.stage`` (the DVC stage name), ``ulmfit.pipeline_id`` (set by
  ``ulmfit repro`` for one execution, else git commit + params hash), ``mlflow.source.git.commit``,
  ``prefect.flow_run_id`` and ``dvc.dep.<path>`` = the DVC md5 of each dependency, so every
  figure leads back to its data, code and run. Under ``ulmfit repro`` the runs are also nested
  under one parent run (``ULMFIT_PARENT_RUN_ID``).
- Training curves arrive as the library's ``TrainEvent`` and are logged in batches.

Runs are addressed by id through ``MlflowClient`` (no fluent "active run"), because Prefect may
run a task in another thread than its flow.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks.lifeline import stop_signals_held
from tasks.progress import Progress

PIPELINE_ID_ENV = "ULMFIT_PIPELINE_ID"
PARENT_RUN_ENV = "ULMFIT_PARENT_RUN_ID"
# The process that owns a run: a run left RUNNING by a process that is gone was killed.
PID_TAG, STARTED_TAG, HOST_TAG = "ulmfit.pid", "ulmfit.pid_started", "ulmfit.host"
FLOW_RUN_TAG = "prefect.flow_run_id"

logger = logging.getLogger("ulmfit")


def default_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` or the project's SQLite database (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri(root)


def client(root: Path) -> HeldClient:
    """An ``MlflowClient`` on :func:`tracking_uri` (tracking and registry), its calls held
    together against stop signals (:class:`HeldClient`)."""
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    with stop_signals_held():
        return HeldClient(MlflowClient(tracking_uri=uri, registry_uri=uri))


class HeldClient:
    """An ``MlflowClient`` whose every call runs with stop signals held
    (``lifeline.stop_signals_held``): a SIGTERM that lands inside a write would leave the
    SQLite store locked, and the stage could not end its run KILLED. The signal is delivered
    as soon as the call returns."""

    def __init__(self, mlflow_client) -> None:
        self._client = mlflow_client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def held(*args, **kwargs):
            with stop_signals_held():
                return attribute(*args, **kwargs)

        return held


def use_store(root: Path) -> str:
    """Point MLflow's module-level API (``log_model``, ``load_model``, ``models:/`` URIs) at the
    project's store; returns the URI."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses and shows the
# GenAI traces page; a model-training experiment opens on its runs.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "ULMFiT pipeline runs. Each `pipeline ...` run carries the headline figures of its "
        "stages (per dataset: test error fwd / bwd / ensemble and TF-IDF, fine-tuned LM "
        "perplexity) and results.md; expand it for the stage runs. Compare two executions by "
        "selecting their pipeline runs and clicking Compare (docs/review.md)."
    ),
}


def experiment_id(root: Path, name: str) -> str:
    """The experiment's id, created on first use as a model-training experiment (artifacts
    under ``<project>/mlruns`` when the store is a local database: MLflow's own default there
    is ``./mlruns`` of whatever directory the process runs in); an experiment made by an older
    version gets its kind tag."""
    mlflow_client = client(root)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if not tracking_uri(root).startswith(("http:", "https:", "databricks")):
            location = (Path(root).resolve() / "mlruns").as_uri()  # a server decides its own
        try:
            return mlflow_client.create_experiment(
                name, artifact_location=location, tags=EXPERIMENT_TAGS
            )
        except Exception:  # another stage created it between the two calls
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def git_commit(root: Path) -> str:
    """The checked-out commit (with ``-dirty`` when tracked files are modified), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def pipeline_id(root: Path) -> str:
    """The id grouping one pipeline execution's runs: ``ULMFIT_PIPELINE_ID`` (set by
    ``ulmfit repro``), else derived from the git commit and ``params.yaml``."""
    if value := os.environ.get(PIPELINE_ID_ENV):
        return value
    params = Path(root) / "params.yaml"
    digest = hashlib.sha256(params.read_bytes() if params.is_file() else b"").hexdigest()[:10]
    return f"{git_commit(root)[:12]}-{digest}"


def prefect_flow_run_id() -> str:
    """The current Prefect flow run's id ('' outside a flow)."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # prefect runtime unavailable: not inside a flow
        return ""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> ``{"finetune.train.lr": "0.004"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of nested metrics as ``{"splits.train.count": 98.0}``."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def start_stage_run(
    root: Path,
    stage: str,
    params: Mapping[str, Any],
    *,
    experiment: str,
    deps: Mapping[str, str],
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Create the stage's run (status RUNNING) with its params and tags; returns the run id."""
    from mlflow.entities import Param, RunTag

    mlflow_client = client(root)
    tags = {
        "ulmfit.stage": stage,
        "ulmfit.pipeline_id": pipeline_id(root),
        "mlflow.source.git.commit": git_commit(root),
        "mlflow.runName": stage,
        FLOW_RUN_TAG: prefect_flow_run_id(),
        **process_tags(),
        **{f"dvc.dep.{path}": md5 for path, md5 in deps.items()},
        **(extra_tags or {}),
    }
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent
    run = mlflow_client.create_run(experiment_id(root, experiment), run_name=stage)
    run_id = run.info.run_id
    flat = flatten(params)
    mlflow_client.log_batch(
        run_id,
        params=[Param(k[:250], v) for k, v in flat.items()],
        tags=[RunTag(k[:250], str(v)[:5000]) for k, v in tags.items()],
    )
    return run_id


def end_run(root: Path, run_id: str, status: str = "FINISHED") -> None:
    client(root).set_terminated(run_id, status=status)


def _started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), None if there is none."""
    import psutil  # a dependency of DVC

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # another user's process: it exists
        return float("nan")


def process_tags() -> dict[str, str]:
    """The tags naming this process: pid, its start time (a reused pid is another process)
    and host."""
    return {
        PID_TAG: str(os.getpid()),
        STARTED_TAG: f"{_started(os.getpid()):.2f}",
        HOST_TAG: socket.gethostname(),
    }


def _owner_gone(tags: Mapping[str, str]) -> bool:
    """True when the run's tags name a process of this host that no longer exists. A run
    without them (made elsewhere, or by an older version) is never judged."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    started = _started(int(tags[PID_TAG]))
    if started is None:
        return True
    try:
        recorded = float(tags.get(STARTED_TAG, "nan"))
    except ValueError:
        return False
    return math.isfinite(recorded) and math.isfinite(started) and abs(started - recorded) > 1


def clean_stale_runs(root: Path) -> list[str]:
    """End as KILLED every MLflow run left RUNNING by a process of this host that is gone (a
    SIGKILL, a power cut: nothing could end it then), one log line each; returns the Prefect
    flow run ids recorded on them, for :func:`crash_flow_runs`. Tracking problems are logged,
    never raised: cleaning must not stop a pipeline from starting."""
    flow_runs = []
    try:
        mlflow_client = client(root)
        experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
        runs = (
            mlflow_client.search_runs(
                experiments, "attributes.status = 'RUNNING'", max_results=1000
            )
            if experiments
            else []
        )
        for run in runs:
            tags = run.data.tags
            if not _owner_gone(tags):
                continue
            mlflow_client.set_terminated(run.info.run_id, status="KILLED")
            logger.warning(
                "cleaned up: MLflow run %s (%s) was left RUNNING by process %s on %s, which is "
                "gone: now KILLED",
                run.info.run_id,
                tags.get("ulmfit.stage", run.info.run_name),
                tags[PID_TAG],
                tags[HOST_TAG],
            )
            if tags.get(FLOW_RUN_TAG):
                flow_runs.append(tags[FLOW_RUN_TAG])
    except Exception as error:  # see the docstring
        logger.warning("could not look for MLflow runs left RUNNING (%s)", error)
    return flow_runs


def crash_flow_runs(flow_run_ids: Iterable[str], api_url: str | None = None) -> None:
    """Mark these Prefect flow runs CRASHED unless they already reached a final state (their
    process was killed; Prefect's server does this by itself only for deployments' runs), one
    log line each. ``api_url``: the server (default: the current settings)."""
    flow_run_ids = list(flow_run_ids)
    if not flow_run_ids:
        return
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    settings = {PREFECT_API_URL: api_url} if api_url else {}
    try:
        with temporary_settings(settings), get_client(sync_client=True) as prefect_client:
            for flow_run_id in flow_run_ids:
                flow_run = prefect_client.read_flow_run(flow_run_id)
                if flow_run.state is not None and flow_run.state.is_final():
                    continue
                message = "its process was killed (found at the next start)"
                prefect_client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                logger.warning(
                    "cleaned up: Prefect flow run %s (%s) was left %s: now CRASHED",
                    flow_run_id,
                    flow_run.name,
                    flow_run.state.name if flow_run.state else "without a state",
                )
    except Exception as error:  # the server may be another one, or gone
        logger.warning("could not mark Prefect flow runs %s CRASHED (%s)", flow_run_ids, error)


def log_metrics(root: Path, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Final (or any) numeric metrics; non-finite values are skipped (MLflow rejects NaN in
    some stores and they mean 'not measured' here)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    if batch:
        client(root).log_batch(run_id, metrics=batch)


def log_artifacts(
    root: Path, run_id: str, paths: Iterable[Path], artifact_path: str | None = None
) -> None:
    """Files or folders as run artifacts."""
    mlflow_client = client(root)
    for path in paths:
        path = Path(path)
        if path.is_dir():
            mlflow_client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
        elif path.is_file():
            mlflow_client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def set_tags(root: Path, run_id: str, tags: Mapping[str, str]) -> None:
    mlflow_client = client(root)
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


class TrainLogger:
    """The ``TrainEvent`` callback of a training stage.

    It batches step metrics (``train_loss``, ``lr``, ...) every ``every`` steps and validation
    metrics (``valid_loss``, ``valid_perplexity``, ``valid_error_rate``, ...) to MLflow, keeps
    every curve point for the stage's CSV and PNG, and drives a progress bar.
    """

    def __init__(
        self,
        root: Path,
        run_id: str,
        *,
        every: int,
        description: str,
        total_steps: int | None = None,
        metric_prefix: str = "",
    ) -> None:
        self.root = root
        self.run_id = run_id
        # Several trainings in one run (a learning-rate search) log under their own prefix.
        self.metric_prefix = metric_prefix
        self.every = max(1, every)
        self.steps: list[dict[str, float]] = []  # every step: step, epoch, loss, lr, ...
        self.evals: list[dict[str, float]] = []  # every validation
        self._pending: list = []
        self.progress = Progress(description, total_steps, unit="step")
        self._last_flush = time.monotonic()

    def __call__(self, event) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if event.kind == "step":
            row = {"step": event.step, "epoch": event.epoch, **event.metrics}
            self.steps.append(row)
            self.progress.update(
                1, loss=event.metrics.get("loss", math.nan), lr=event.metrics.get("lr", math.nan)
            )
            if event.step % self.every == 0:
                self._pending += [
                    Metric(self.metric_prefix + f"train_{k}", float(v), now, event.step)
                    for k, v in event.metrics.items()
                    if math.isfinite(float(v))
                ]
        elif event.kind in ("eval", "epoch"):
            prefix = "valid" if event.kind == "eval" else "epoch"
            if event.kind == "eval":
                self.evals.append({"step": event.step, "epoch": event.epoch, **event.metrics})
            self._pending += [
                Metric(self.metric_prefix + f"{prefix}_{k}", float(v), now, event.step)
                for k, v in event.metrics.items()
                if isinstance(v, int | float) and math.isfinite(float(v))
            ]
            if event.kind == "epoch":
                self.progress._log(
                    f"epoch {event.epoch} done at step {event.step}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in event.metrics.items())
                )
        elif event.kind == "resume":
            total = self.progress.total
            self.progress._log(
                f"resuming from step {event.step}"
                + (f" of {total}" if total else "")
                + f" (checkpoint {event.checkpoint})"
            )
            self.progress.start_at(event.step)
            set_tags(
                self.root,
                self.run_id,
                {f"ulmfit.{self.metric_prefix}resumed_from": f"{event.checkpoint}"},
            )
        elif event.kind == "stage":
            self._pending += [
                Metric(self.metric_prefix + f"unfreeze_{k}", float(v), now, event.step)
                for k, v in event.metrics.items()
                if isinstance(v, int | float)
            ]
        if len(self._pending) >= 500 or time.monotonic() - self._last_flush > 10:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            client(self.root).log_batch(self.run_id, metrics=self._pending[:1000])
            self._pending = self._pending[1000:]
            if self._pending:
                self.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.progress.close()
