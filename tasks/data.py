"""Stages ``prepare_wikipedia`` and ``prepare_dataset``: raw corpora -> normalised Parquet
(paper section 3.1 general-domain corpus; section 4.1 target datasets), via ``ulmfit.corpora``.

These are the only tasks with retries: they read sources that may be remote (downloads resume
from where they stopped). Bad input (:class:`~ulmfit.errors.InputError`) is never retried: a
corrupt file stays corrupt.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks.progress import StageProgress
from ulmfit.corpora import DatasetSource, WikipediaSource, prepare_dataset, prepare_wikipedia
from ulmfit.errors import InputError


def retry_unless_input_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient I/O failures, never bad input."""
    return not isinstance(getattr(state, "data", None), InputError)


IO_TASK = dict(
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NONE,
    persist_result=False,
)


@task(name="prepare-wikipedia", **IO_TASK)
def prepare_wikipedia_task(source: WikipediaSource, out_dir: Path, cache_dir: Path) -> dict:
    """Stream the Wikipedia source into ``out_dir`` (replaced atomically); returns its summary."""
    progress = StageProgress("wikipedia")
    try:
        return prepare_wikipedia(source, out_dir, cache_dir=cache_dir, progress=progress)
    finally:
        progress.close()


@task(name="prepare-dataset", **IO_TASK)
def prepare_dataset_task(source: DatasetSource, out_dir: Path, cache_dir: Path) -> dict:
    """Read one classification dataset into ``out_dir`` (replaced atomically); returns its summary."""
    progress = StageProgress(source.name)
    try:
        return prepare_dataset(source, out_dir, cache_dir=cache_dir, progress=progress)
    finally:
        progress.close()
