"""The retrain flow's steps: pipeline commands (``dvc pull``, ``dvc repro``, ``ulmfit repro``,
``dvc push``) run as subprocesses with their output streamed to the Prefect log, and what DVC
says about the data they refreshed.

Network steps retry; a stage that stopped on bad input (exit code ``EXIT_INPUT_ERROR``) does
not: retrying cannot fix a corrupt file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.pipeline import EXIT_INPUT_ERROR

# Stage-name prefix of the data-preparation stages in dvc.yaml (prepare_wikipedia, prepare@<ds>).
PREPARE_PREFIX = "prepare"
# DVC names a failed stage's exit code: "failed to run: ulmfit prepare-dataset ..., exited with 2".
DVC_STAGE_EXIT = re.compile(r"failed to run: ulmfit .*, exited with (\d+)")
# DVC is the project's one cache: Prefect keeps no task results.
NO_CACHE = {"cache_policy": NONE, "persist_result": False}


def stopped_on_bad_input(returncode: int, lines: Sequence[str]) -> bool:
    """True when a stage command exited with ``EXIT_INPUT_ERROR``: the command itself (an
    ``ulmfit`` stage), or a stage that DVC ran (DVC exits 255 and names the stage's code)."""
    if returncode == EXIT_INPUT_ERROR:
        return True
    codes = [int(m[1]) for m in map(DVC_STAGE_EXIT.search, lines) if m]
    return EXIT_INPUT_ERROR in codes


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
        error = BadInput if stopped_on_bad_input(returncode, lines) else CommandFailed
        raise error(
            f"`{' '.join(command)}` exited with {returncode} in {project_dir}; last lines:\n"
            + "\n".join(tail)
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
