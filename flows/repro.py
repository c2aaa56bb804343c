"""``ulmfit repro``: ``dvc repro`` with one local Prefect server for every stage.

A bare ``dvc repro`` works too, but then each stage's flow starts Prefect's ephemeral server
of its own (20 s or more each here). ``ulmfit repro`` starts ``prefect server start`` once on
127.0.0.1 (a free port, PREFECT_HOME under ``runs/prefect``), points every stage at it with
``PREFECT_API_URL``, runs ``dvc repro`` and stops the server. With ``PREFECT_API_URL`` already
set (a shared server, a test harness) it uses that server and starts none.

It also groups the pipeline's MLflow runs: one parent run ``pipeline`` whose id and a fresh
pipeline id are passed to every stage (``ULMFIT_PARENT_RUN_ID``, ``ULMFIT_PIPELINE_ID``).

Before any of that, in a second or two: the whole of ``params.yaml`` is checked (every bad value
reported at once, as an ``InputError``: exit code 2), and ``repro_lock`` is taken for the
whole run (a second ``ulmfit repro``, or one while a stage command runs, stops at once with
``WorkspaceBusy``: exit code 75).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from tasks.workspace import Layout, repro_lock

logger = logging.getLogger("ulmfit")
SERVER_START_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _executable(name: str) -> str:
    """A console script of this environment (beside the running Python), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


@contextlib.contextmanager
def prefect_server(root: Path) -> Iterator[str]:
    """Start ``prefect server start`` on a free local port; yield its API URL; stop it."""
    home = root / Layout.prefect_home
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log_path = home / "server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the server writes to it until it stops
    process = subprocess.Popen(
        [_executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        started = time.monotonic()
        logger.info("starting a local Prefect server on %s (log: %s)", url, log_path)
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited with code {process.returncode}; see {log_path}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > SERVER_START_TIMEOUT:
                raise RuntimeError(
                    f"the Prefect server did not answer within "
                    f"{SERVER_START_TIMEOUT:.0f} s; see {log_path}"
                )
            time.sleep(0.5)
        logger.info(
            "Prefect server ready after %.0f s; UI at http://127.0.0.1:%d",
            time.monotonic() - started,
            port,
        )
        yield url
    finally:
        if process.poll() is None:
            # The server runs uvicorn workers in its own session: stop the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _start_parent_run(root: Path, pipeline: str, experiment: str) -> str | None:
    """The MLflow run grouping this execution's stage runs (None if MLflow is unreachable)."""
    from tasks import tracking

    try:
        client = tracking.client(root)
        run = client.create_run(
            tracking.experiment_id(root, experiment),
            run_name=f"pipeline {pipeline}",
            tags={
                "ulmfit.pipeline_id": pipeline,
                "ulmfit.stage": "pipeline",
                "mlflow.source.git.commit": tracking.git_commit(root),
            },
        )
        return run.info.run_id
    except Exception as error:  # tracking must not stop the pipeline from starting
        logger.warning("no MLflow parent run (%s); stage runs are still tagged", error)
        return None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def repro(root: Path, dvc_args: list[str]) -> int:
    """Check ``params.yaml`` and take the workspace lock, then run ``dvc repro <dvc_args>``;
    returns its exit code. Bad parameters raise ``InputError`` and a busy workspace
    ``WorkspaceBusy`` before any server, MLflow run or DVC command is started."""
    from tasks.params import load_params

    params = load_params(root / "params.yaml")
    with repro_lock(root):
        return _repro(root, dvc_args, params.mlflow.experiment)


def _repro(root: Path, dvc_args: list[str], experiment: str) -> int:
    from tasks import tracking

    pipeline = os.environ.get(tracking.PIPELINE_ID_ENV) or (
        time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    )
    parent = _start_parent_run(root, pipeline, experiment)
    env = {**os.environ, tracking.PIPELINE_ID_ENV: pipeline}
    if parent:
        env[tracking.PARENT_RUN_ENV] = parent
    command = [_executable("dvc"), "repro", *dvc_args]
    status = "FAILED"
    # A plain `kill` must also stop the Prefect server and close the parent run.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with contextlib.ExitStack() as stack:
            if not env.get("PREFECT_API_URL"):
                env["PREFECT_API_URL"] = stack.enter_context(prefect_server(root))
            logger.info("pipeline %s: %s", pipeline, " ".join(command))
            code = subprocess.run(command, cwd=root, env=env).returncode
        status = "FINISHED" if code == 0 else "FAILED"
        return code
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if parent:
            with contextlib.suppress(Exception):
                tracking.end_run(root, parent, status)
