"""Champion/challenger promotion for scheduled retraining (issue #3, "Scheduled retraining").

ULMFiT's figure of merit is the classifier's test error rate (Howard & Ruder 2018, Sec. 4,
Tables 2-3; the ensemble of the forward and backward classifiers, Sec. 3.3 "Bidirectional
language model", is the headline number). A retrained classifier replaces the one in service
only if its test error is *strictly* lower than the current champion's.

The registry convention (shared with the training stages, which register every classifier as a
pyfunc model and move the ``latest`` alias onto each new version):

- one registered model per dataset;
- alias ``champion`` marks the version in service; only this module moves it;
- the error of a version is the metric ``<metric>`` (``test_error_ensemble`` by default) logged by
  the MLflow run that produced the version (``ModelVersion.run_id``).

The module has three layers:

1. ``decide`` and ``decision_markdown``: pure logic, testable without any server;
2. ``read_*``/``set_champion``/``log_decision``: MLflow client calls, given a ``MlflowClient``;
3. thin Prefect tasks wrapping layer 2, with retries because they are network I/O.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NONE

from tasks import tracking

CHAMPION_ALIAS = "champion"
LATEST_ALIAS = "latest"
RETRAIN_EXPERIMENT = "retrain"

# Outcomes of one decision; the first two promote.
PROMOTED_FIRST = "promoted-first-model"
PROMOTED_BETTER = "promoted-better"
KEPT_NOT_BETTER = "kept-not-better"
KEPT_NO_NEW_MODEL = "kept-no-new-model"
KEPT_NO_METRIC = "kept-no-metric"
KEPT_ALREADY_CHAMPION = "kept-already-champion"


@dataclass(frozen=True)
class ModelRecord:
    """One registered model version and the error its producing run logged."""

    model_name: str
    version: str
    run_id: str
    error: float | None  # None: the run logged no finite value of the metric


@dataclass(frozen=True)
class Decision:
    """Whether a dataset's new classifier replaces the champion, and why."""

    dataset: str
    model_name: str
    metric: str
    promote: bool
    outcome: str
    reason: str
    candidate: ModelRecord | None
    champion: ModelRecord | None

    @property
    def new_champion_version(self) -> str | None:
        """The version that holds the ``champion`` alias once the decision is applied."""
        if self.promote and self.candidate is not None:
            return self.candidate.version
        return self.champion.version if self.champion is not None else None

    def to_dict(self) -> dict:
        return {**asdict(self), "new_champion_version": self.new_champion_version}


def _usable(error: float | None) -> bool:
    return error is not None and math.isfinite(error)


def decide(
    dataset: str,
    model_name: str,
    metric: str,
    candidate: ModelRecord | None,
    champion: ModelRecord | None,
) -> Decision:
    """Promote ``candidate`` only if it is strictly better than ``champion`` (pure function).

    - no new version from this pipeline run: keep the champion;
    - the new version's run has no finite ``metric``: keep (an unmeasured model never ships);
    - no champion yet: the first measured model becomes champion;
    - the champion has no finite ``metric``: keep it, since "strictly better" cannot be shown
      (fix the champion's run or move the alias by hand);
    - otherwise promote iff ``candidate.error < champion.error``; a tie keeps the champion, so a
      retrain that reproduces the same model does not churn the alias.
    """

    def made(promote: bool, outcome: str, reason: str) -> Decision:
        return Decision(dataset, model_name, metric, promote, outcome, reason, candidate, champion)

    if candidate is None:
        held = f"champion v{champion.version}" if champion else "no champion"
        return made(
            False,
            KEPT_NO_NEW_MODEL,
            f"the pipeline registered no new version of {model_name} (nothing changed upstream); "
            f"{held} stays",
        )
    if not _usable(candidate.error):
        return made(
            False,
            KEPT_NO_METRIC,
            f"new version v{candidate.version} (run {candidate.run_id}) logged no finite "
            f"{metric}; it cannot be compared, so it is not promoted",
        )
    if champion is None:
        return made(
            True,
            PROMOTED_FIRST,
            f"no champion yet: v{candidate.version} ({metric}={candidate.error:.4f}) is the first "
            f"measured model of {model_name}",
        )
    if champion.version == candidate.version:
        return made(
            False, KEPT_ALREADY_CHAMPION, f"v{candidate.version} already holds the champion alias"
        )
    if not _usable(champion.error):
        return made(
            False,
            KEPT_NO_METRIC,
            f"champion v{champion.version} (run {champion.run_id}) has no finite {metric}, so "
            f"v{candidate.version} ({metric}={candidate.error:.4f}) cannot be shown to be "
            "strictly better; kept the champion",
        )
    if candidate.error < champion.error:
        return made(
            True,
            PROMOTED_BETTER,
            f"v{candidate.version} {metric}={candidate.error:.4f} < champion v{champion.version} "
            f"{metric}={champion.error:.4f} (better by {champion.error - candidate.error:.4f})",
        )
    return made(
        False,
        KEPT_NOT_BETTER,
        f"v{candidate.version} {metric}={candidate.error:.4f} >= champion v{champion.version} "
        f"{metric}={champion.error:.4f}: not strictly better, champion kept",
    )


def _cell(value: object) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _error_cell(record: ModelRecord | None) -> str:
    if record is None or record.error is None:
        return "-"
    return f"{record.error:.4f}"


def decision_markdown(decisions: Sequence[Decision], *, title: str = "Retrain decisions") -> str:
    """A markdown report of the decisions: one table row per dataset, then the reasons."""
    metric = decisions[0].metric if decisions else "test error"
    lines = [
        f"# {title}",
        "",
        f"Metric: `{metric}` (lower is better; promotion only when strictly lower).",
        "",
        "| dataset | model | decision | new version | new error | new run | champion version "
        "| champion error | champion run | champion now |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in decisions:
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    d.dataset,
                    d.model_name,
                    "**promoted**" if d.promote else "kept",
                    d.candidate.version if d.candidate else None,
                    _error_cell(d.candidate),
                    d.candidate.run_id if d.candidate else None,
                    d.champion.version if d.champion else None,
                    _error_cell(d.champion),
                    d.champion.run_id if d.champion else None,
                    d.new_champion_version,
                )
            )
            + " |"
        )
    lines += ["", "## Why", ""]
    lines += [f"- **{d.dataset}** ({d.outcome}): {d.reason}." for d in decisions]
    return "\n".join(lines) + "\n"


# --- MLflow client calls ----------------------------------------------------------------------


def _not_found(error: MlflowException) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def newest_version_number(client: MlflowClient, model_name: str) -> int | None:
    """The highest version number registered under ``model_name`` (None: no version yet)."""
    versions = client.search_model_versions(f"name = '{_quote(model_name)}'")
    numbers = [int(v.version) for v in versions]
    return max(numbers) if numbers else None


def _quote(name: str) -> str:
    # MLflow filter strings quote with single quotes; registered model names never need them.
    if "'" in name:
        raise ValueError(f"registered model name {name!r} contains a single quote")
    return name


def _run_error(client: MlflowClient, run_id: str, metric: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def read_candidate(
    client: MlflowClient, model_name: str, metric: str, *, newer_than: int | None
) -> ModelRecord | None:
    """The newest version of ``model_name`` registered after version ``newer_than`` (the
    newest one before the pipeline ran), with its run's ``metric``; None if there is none."""
    versions = client.search_model_versions(f"name = '{_quote(model_name)}'")
    fresh = [v for v in versions if newer_than is None or int(v.version) > newer_than]
    if not fresh:
        return None
    newest = max(fresh, key=lambda v: int(v.version))
    return ModelRecord(
        model_name, str(newest.version), newest.run_id, _run_error(client, newest.run_id, metric)
    )


def read_champion(client: MlflowClient, model_name: str, metric: str) -> ModelRecord | None:
    """The version holding alias ``champion`` (None when the model or the alias does not exist).

    The alias is looked up on the registered model first: MLflow reports a missing alias as an
    invalid parameter, which must not be confused with a real error."""
    if champion_version(client, model_name) is None:
        return None
    version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    return ModelRecord(
        model_name, str(version.version), version.run_id, _run_error(client, version.run_id, metric)
    )


def set_champion(client: MlflowClient, decision: Decision, *, flow_run_id: str | None) -> None:
    """Move alias ``champion`` onto the promoted version and tag the version with why."""
    assert decision.promote and decision.candidate is not None
    name, version = decision.model_name, decision.candidate.version
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(name, version, "promotion.reason", decision.reason[:5000])
    client.set_model_version_tag(name, version, "promotion.flow_run_id", flow_run_id or "")
    client.set_model_version_tag(
        name, version, "promotion.time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )


def log_decision(
    client: MlflowClient,
    decision: Decision,
    *,
    experiment_id: str,
    flow_run_id: str | None,
    context: Mapping[str, str] | None = None,
) -> str:
    """Record one decision as a finished MLflow run in ``experiment``; return the run id.

    Tags carry the decision and its reason (searchable: ``tags.decision = 'promoted'``), params
    the versions and run ids compared, metrics the two errors and the improvement. Idempotent per
    (flow run, dataset), so a retried task does not log the same decision twice.
    """
    tags = {
        "dataset": decision.dataset,
        "registered_model": decision.model_name,
        "decision": "promoted" if decision.promote else "kept",
        "outcome": decision.outcome,
        "reason": decision.reason[:5000],
        "prefect.flow_run_id": flow_run_id or "",
        **dict(context or {}),
    }
    existing = []
    if flow_run_id:
        existing = client.search_runs(
            [experiment_id],
            f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.dataset = '{_quote(decision.dataset)}'",
            max_results=1,
        )
    if existing:
        run_id = existing[0].info.run_id
    else:
        run_id = client.create_run(
            experiment_id, tags=tags, run_name=f"retrain-{decision.dataset}"
        ).info.run_id
    candidate, champion = decision.candidate, decision.champion
    params = {
        "metric": decision.metric,
        "candidate_version": candidate.version if candidate else "none",
        "candidate_run_id": candidate.run_id if candidate else "none",
        "champion_version": champion.version if champion else "none",
        "champion_run_id": champion.run_id if champion else "none",
        "new_champion_version": decision.new_champion_version or "none",
    }
    now = int(time.time() * 1000)
    metrics = {"promoted": 1.0 if decision.promote else 0.0}
    if candidate is not None and candidate.error is not None:
        metrics["candidate_error"] = candidate.error
    if champion is not None and champion.error is not None:
        metrics["champion_error"] = champion.error
    if "candidate_error" in metrics and "champion_error" in metrics:
        metrics["error_improvement"] = metrics["champion_error"] - metrics["candidate_error"]
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
        params=[] if existing else [Param(key, value) for key, value in params.items()],
        tags=[RunTag(key, str(value)) for key, value in tags.items()],
    )
    client.log_text(run_id, decision_markdown([decision]), "decision.md")
    client.set_terminated(run_id, "FINISHED")
    return run_id


# --- Prefect tasks (network I/O: retried) -----------------------------------------------------

# Retries on network I/O only; no Prefect result cache (DVC is the project's one cache).
_IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "cache_policy": NONE,
    "persist_result": False,
}


def _client(project_dir: Path) -> MlflowClient:
    """The pipeline's MLflow store: ``MLFLOW_TRACKING_URI`` (the fleet's shared server) or the
    project's SQLite database, exactly as the stages that registered the models."""
    return tracking.client(project_dir)


def champion_version(client: MlflowClient, model_name: str) -> str | None:
    """The version the ``champion`` alias points at (None: no model or no alias)."""
    try:
        aliases = client.get_registered_model(model_name).aliases or {}
    except MlflowException as error:
        if _not_found(error):
            return None
        raise
    version = aliases.get(CHAMPION_ALIAS)
    return None if version is None else str(version)


def judge(
    client: MlflowClient,
    dataset: str,
    model_name: str,
    metric: str,
    newer_than: int | None,
    champion_before: str | None,
) -> Decision:
    """Read the version registered since ``newer_than`` and the champion, and decide.

    When there was no champion before the pipeline ran and the registration itself gave the
    alias to the new version (the registry does that for a model's first version), the new
    version is judged as the first model, so the record says so.
    """
    candidate = read_candidate(client, model_name, metric, newer_than=newer_than)
    champion = read_champion(client, model_name, metric)
    if (
        champion_before is None
        and champion is not None
        and candidate is not None
        and champion.version == candidate.version
    ):
        champion = None
    return decide(dataset, model_name, metric, candidate, champion)


@task(name="registry-snapshot", **_IO_RETRIES)
def registry_snapshot(
    project_dir: Path, model_names: Sequence[str]
) -> dict[str, tuple[int | None, str | None]]:
    """``{model: (newest version number, champion version)}`` before the pipeline runs."""
    client = _client(project_dir)
    return {
        name: (newest_version_number(client, name), champion_version(client, name))
        for name in model_names
    }


@task(name="judge-candidate", **_IO_RETRIES)
def judge_candidate(
    project_dir: Path,
    dataset: str,
    model_name: str,
    metric: str,
    newer_than: int | None,
    champion_before: str | None,
) -> Decision:
    """Read the new version and the champion from MLflow and decide (no side effects)."""
    return judge(_client(project_dir), dataset, model_name, metric, newer_than, champion_before)


@task(name="promote-champion", **_IO_RETRIES)
def promote_champion(project_dir: Path, decision: Decision, flow_run_id: str | None) -> str:
    """Apply a promoting decision: alias ``champion`` -> the new version. Idempotent."""
    set_champion(_client(project_dir), decision, flow_run_id=flow_run_id)
    assert decision.candidate is not None
    return decision.candidate.version


@task(name="record-decision", **_IO_RETRIES)
def record_decision(
    project_dir: Path,
    decision: Decision,
    flow_run_id: str | None,
    context: Mapping[str, str] | None = None,
) -> str:
    """Log the decision as a run of MLflow experiment ``retrain``; return its run id."""
    return log_decision(
        _client(project_dir),
        decision,
        experiment_id=tracking.experiment_id(project_dir, RETRAIN_EXPERIMENT),
        flow_run_id=flow_run_id,
        context=context,
    )


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) made from ``text``."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "retrain"
