"""What every stage does around its work (:func:`run_stage`): read ``params.yaml``, check its
inputs, hash them, open its MLflow run, write its metrics and run record atomically, and close
the run as FINISHED or FAILED.

A stage's outputs are complete or absent: the library writes each file atomically, and the run
record (``metrics/runs/<name>.json``, read by the report) is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.exceptions import TerminationSignal

from tasks import tracking
from tasks.checkpoints import checkpoint_dir, clear_checkpoints, deps_md5, stage_key
from tasks.lifeline import STAGE_STOP_SIGNALS
from tasks.params import Params, load_params, section_dict
from tasks.pipeline import BY_GROUP, StageSpec, producer_of, stage_spec
from tasks.plots import note_figure, training_figure, write_rows
from ulmfit.errors import InputError
from ulmfit.io import atomic_write

logger = logging.getLogger("ulmfit")


@dataclasses.dataclass(frozen=True)
class StageContext:
    """Everything a stage's tasks need, as plain values (paths and strings)."""

    root: Path
    spec: StageSpec
    params: Params
    section: Mapping[str, Any]  # the effective params the stage reads (what keys its checkpoints)
    deps: Mapping[str, str]  # DVC md5 of each dependency
    key: str
    run_id: str

    def path(self, relative: str) -> Path:
        return self.root / relative

    def checkpoint_dir(self, sub: str = "") -> Path:
        return checkpoint_dir(self.root, self.spec, self.key, sub)

    def require(self, relative: str) -> Path:
        return require(self.root, relative)


def require(root: Path, relative: str) -> Path:
    """``root / relative`` must exist; else an :class:`InputError` naming the stage that makes
    it (from the stage table)."""
    path = root / relative
    if not path.exists():
        raise InputError(
            path,
            "missing input",
            fix=f"run the stage that produces it: dvc repro {producer_of(relative)}",
        )
    return path


def project_params(root: str | Path) -> Params:
    return load_params(Path(root).resolve() / "params.yaml")


@contextlib.contextmanager
def run_stage(
    root: str | Path,
    group: str,
    *,
    params: Params | None = None,
    extra: Mapping[str, Any] | None = None,
    **items: str,
) -> Iterator[StageContext]:
    """One stage item of the table (``items``: its command-line arguments) around its work:
    its data deps must exist, and :func:`stage_run` records the params sections the table
    names for it (the direction and ``extra`` added). ``params`` defaults to ``params.yaml``'s.
    """
    root = Path(root).resolve()
    params = params or project_params(root)
    stage = BY_GROUP[group]
    if "name" in items:  # a control: its data are its dataset's
        items["dataset"] = params.control(items["name"]).dataset
    elif "dataset" in items:
        params.dataset(items["dataset"])  # an unknown dataset is bad input
    spec = stage_spec(group, **items)
    for dep in spec.data:
        if producer_of(dep):
            require(root, dep)
    # section_dict reads a control's section by the control's name.
    section = section_dict(params, *stage.sections, dataset=items.get("name", items.get("dataset")))
    if "direction" in items:
        section["direction"] = items["direction"]
    section.update(extra or {})
    with stage_run(root, spec, params, section) as ctx:
        yield ctx


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    with atomic_write(path, "w") as handle:
        json.dump(_finite(data), handle, indent=2, sort_keys=True)
        handle.write("\n")
    return path


def _finite(value: Any) -> Any:
    """JSON has no NaN: unmeasured values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def runtime(device: str, threads: int) -> str:
    """Resolve ``device`` (``auto``: ``cuda`` when a GPU is visible, else ``cpu``) and set
    PyTorch's CPU threads (``0`` keeps its default, one per core). Small models on a busy CPU
    train several times faster on one thread than on two competing ones."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def stage_run(
    root: Path, spec: StageSpec, params: Params, section: Mapping[str, Any]
) -> Iterator[StageContext]:
    """Open the stage's MLflow run around its work; on success write its run record and drop
    its resume checkpoints."""
    started = time.time()
    # Runs left RUNNING by a process that is gone (a SIGKILL: nothing could end them then) end
    # as KILLED, and their flow runs CRASHED.
    tracking.crash_flow_runs(tracking.clean_stale_runs(root))
    remove_leftovers(root, spec)
    deps = deps_md5(root, spec)
    key = stage_key(spec, dict(section), deps)
    run_id = tracking.start_stage_run(
        root,
        spec.stage,
        section,
        experiment=params.mlflow.experiment,
        deps=deps,
        extra_tags={"ulmfit.stage_key": key, "ulmfit.stage_group": spec.group},
    )
    logger.info("%s: MLflow run %s (%s)", spec.stage, run_id, tracking.tracking_uri(root))
    ctx = StageContext(root, spec, params, section, deps, key, run_id)
    try:
        yield ctx
    except (KeyboardInterrupt, TerminationSignal):
        # SIGINT, or SIGTERM (Prefect's flow engine raises TerminationSignal, marks the flow
        # run CRASHED, then lets the signal end the process: a non-zero exit).
        ignore_stop_signals()
        tracking.end_run(root, run_id, "KILLED")
        logger.warning("%s: stopped by a signal; MLflow run %s KILLED", spec.stage, run_id)
        raise
    except BaseException:
        tracking.end_run(root, run_id, "FAILED")
        raise
    if BY_GROUP[spec.group].metrics:
        write_json(
            root / spec.run_record,
            {
                "mlflow_run_id": run_id,
                "stage": spec.stage,
                "stage_key": key,
                "pipeline_id": tracking.pipeline_id(root),
                # Wall time of this execution (a resumed stage counts its last execution).
                "wall_seconds": round(time.time() - started, 1),
            },
        )
    tracking.end_run(root, run_id, "FINISHED")
    clear_checkpoints(root, spec)


def ignore_stop_signals() -> None:
    """A stopping stage reports its end (MLflow run KILLED, Prefect flow run CRASHED) without
    being cut short by a second SIGTERM or SIGINT: DVC's whole process group gets the first,
    DVC dies of it, and ``stop_with_dvc`` then sends this process another. On a loaded machine
    that one used to land inside Prefect's crash report and leave the flow run RUNNING for good.
    Prefect's engine restores the previous handler and re-sends the signal once it has reported,
    so the process still ends by it; a supervisor's SIGKILL after its grace stays the backstop."""
    for signum in STAGE_STOP_SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to hold back
            signal.signal(signum, signal.SIG_IGN)


def remove_leftovers(root: Path, spec: StageSpec) -> list[Path]:
    """Clean up what a SIGKILL in the middle of a write left of this stage's outputs: the
    dot-named temporary files and staging folders (``ulmfit.io``, ``staged_directory``) beside
    each output and inside an output folder are deleted. A moved-aside previous output
    (``.<name>.*.old/<name>``, between ``staged_directory``'s two renames) is put back when
    the output itself is missing, and deleted otherwise. The stage holds the workspace lock, so
    no writer of them is running; one log line each. Returns what was removed."""
    paths = [root / p for p in (*spec.outs, spec.metrics, spec.run_record, spec.curve, spec.figure)]
    found = set()
    for path in paths:
        found.update(path.parent.glob(f".{path.name}.*.tmp"))
        if path.is_dir():
            found.update(path.glob(".*.tmp"))
        for old in sorted(path.parent.glob(f".{path.name}.*.old")):
            if not path.exists() and (old / path.name).exists():
                os.replace(old / path.name, path)
                logger.warning("restored: %s, moved aside by an interrupted write", path)
            found.add(old)
    for leftover in sorted(found):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        logger.warning("cleaned up: %s, left by an interrupted write", leftover)
    return sorted(found)


def skip_left_out(
    root: str | Path, params: Params, group: str, dataset: str, direction: str
) -> bool:
    """True (after recording it with :func:`skip_stage`) when ``datasets.<dataset>.directions``
    leaves ``direction`` out: the stage item exists in dvc.yaml for every dataset but does no
    work."""
    if direction in params.dataset(dataset).directions:
        return False
    spec = stage_spec(group, dataset=dataset, direction=direction)
    skip_stage(Path(root).resolve(), spec, f"datasets.{dataset}.directions leaves out {direction}")
    return True


SKIPPED_FILE = "SKIPPED.json"  # what each out folder of a stage item that did not run holds


def skip_stage(root: Path, spec: StageSpec, reason: str) -> None:
    """A stage item that the parameters leave out (a direction a dataset does not train):
    every declared output is written, saying so, so DVC and the report see a finished stage."""
    for out in spec.outs:
        path = root / out
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.mkdir(parents=True)
        write_json(path / SKIPPED_FILE, {"skipped": reason})
    write_json(root / spec.metrics, {"skipped": reason})
    write_json(root / spec.run_record, {"mlflow_run_id": None, "skipped": reason})
    if spec.plots:
        write_rows(root / spec.curve, [], ["step", "loss"])
        note_figure(root / spec.figure, f"{spec.stage}: not run ({reason})")
    logger.info("%s: not run (%s)", spec.stage, reason)


# Model files bigger than this are recorded by path (a run tag) instead of copied into the
# MLflow artifact store (the DVC cache already keeps them; the store should stay small).
MAX_ARTIFACT_BYTES = 50 * 2**20


@task(name="record-outputs", cache_policy=NONE, persist_result=False)
def record_outputs(
    ctx: StageContext,
    metrics: Mapping[str, Any],
    steps: list[dict] | None = None,
    evals: list[dict] | None = None,
    artifacts: tuple[Path, ...] = (),
) -> dict[str, str]:
    """Write the stage's metrics JSON (and for training stages its curve CSV and figure), log
    them and ``artifacts`` to its MLflow run; returns the paths written."""
    root, run_id, spec = ctx.root, ctx.run_id, ctx.spec
    paths = [write_json(root / spec.metrics, metrics)]
    tracking.log_metrics(root, run_id, tracking.flatten_numbers(metrics))
    if spec.plots and steps is not None:
        columns = list(dict.fromkeys(k for row in steps[:50] for k in row)) or [
            "step",
            "loss",
            "lr",
        ]
        paths.append(write_rows(root / spec.curve, steps, columns))
        paths.append(training_figure(root / spec.figure, steps, evals or [], spec.stage))
    small, large = [], {}
    for artifact in artifacts:
        if artifact.is_file() and artifact.stat().st_size > MAX_ARTIFACT_BYTES:
            large[f"ulmfit.artifact.{artifact.name}"] = str(artifact)
        else:
            small.append(artifact)
    tracking.log_artifacts(root, run_id, paths)
    tracking.log_artifacts(root, run_id, small, artifact_path="outputs")
    if large:
        tracking.set_tags(root, run_id, large)
    return {"metrics": str(paths[0]), **{p.name: str(p) for p in paths[1:]}}
