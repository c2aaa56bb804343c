"""Where every stage reads and writes, and the workspace lock.

Every path of the project is a :class:`Layout` attribute or method; the stage table
(``tasks/pipeline.py``) builds each stage's deps and outs from them, and ``dvc.yaml`` is
generated from that table (``tasks/dvcfile.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class Layout:
    """Paths of the project, relative to its root. ``tasks/pipeline.py`` calls the methods with
    ``"{dataset}"``-style placeholders to get each stage's path templates."""

    wikipedia = "data/wikipedia"
    tokenizer_dir = "data/tokenizer"
    wikipedia_tokens = "data/wikipedia_tokens"
    results = "reports/results.md"
    # The headline figures, one small JSON per dataset: the only files DVC declares as metrics,
    # so `dvc metrics show` and `dvc exp show` list them first (docs/review.md).
    headline = "results"
    sample_efficiency = "reports/sample_efficiency.png"  # the paper's Figure 3, from the runs
    pretraining_budget = "reports/pretraining_budget.png"  # test error against pretraining tokens
    checkpoints = "runs/checkpoints"
    lock_file = "runs/ulmfit.lock"
    repro_lock_file = "runs/repro.lock"
    cache_dir = "runs/cache"
    prefect_home = "runs/prefect"

    @staticmethod
    def headline_file(dataset: str) -> str:
        return f"results/{dataset}.json"

    @staticmethod
    def pretrained(direction: str) -> str:
        return f"data/pretrained/{direction}"

    @staticmethod
    def prepared(dataset: str) -> str:
        return f"data/datasets/{dataset}/prepared"

    @staticmethod
    def tokens(dataset: str) -> str:
        return f"data/datasets/{dataset}/tokens"

    @staticmethod
    def finetuned(dataset: str, direction: str) -> str:
        return f"data/datasets/{dataset}/lm_{direction}"

    @staticmethod
    def classifier(dataset: str, direction: str) -> str:
        return f"data/datasets/{dataset}/classifier_{direction}"

    @staticmethod
    def control(name: str) -> str:
        return f"data/controls/{name}"

    @staticmethod
    def model(dataset: str) -> str:
        """The saved ``TextClassifier`` (tokenizer + forward + backward): what gets served."""
        return f"data/datasets/{dataset}/model"


class WorkspaceBusy(RuntimeError):
    """Another ``ulmfit`` stage command, or another ``ulmfit repro``, holds the workspace."""


@contextlib.contextmanager
def workspace_lock(root: Path, stage: str) -> Iterator[Path]:
    """An exclusive, non-blocking ``flock`` on ``runs/ulmfit.lock`` for one stage command.

    DVC already refuses a second ``dvc repro`` in the same workspace (its own repo lock), but
    stage commands can also be run by hand; this lock stops two of them from writing the same
    outputs at once. The kernel drops the lock when the process dies, so a killed stage never
    leaves a stale lock behind.
    """
    with _flock(root, root / Layout.lock_file, f"stage {stage}") as path:
        yield path


@contextlib.contextmanager
def repro_lock(root: Path) -> Iterator[Path]:
    """``ulmfit repro``'s own lock, ``runs/repro.lock``, held for its whole run and taken before
    it starts anything: a second ``ulmfit repro`` stops at once, not after starting a Prefect
    server and an MLflow run and failing on DVC's lock. It also fails at once while a stage
    command (run by hand, or left by a killed pipeline) holds the stage lock. The stages that
    ``dvc repro`` runs take the stage lock as usual."""
    with _flock(root, root / Layout.repro_lock_file, "ulmfit repro") as path:
        with workspace_lock(root, "probe"):  # a stage running now: busy
            pass
        yield path


@contextlib.contextmanager
def _flock(root: Path, path: Path, what: str) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole command
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkspaceBusy(
                f"the workspace {root} is busy: {holder} holds {path}. Wait for it to finish "
                "(or stop it), then run this command again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} running {what}\n")
        handle.flush()
        yield path
    finally:
        handle.close()
