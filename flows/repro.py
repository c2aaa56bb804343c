"""``ulmfit repro``: ``dvc repro`` with one local Prefect server for every stage; ``ulmfit exp
run``: ``dvc exp run`` (an experiment, e.g. ``-S classifier.train.lr=0.02``) the same way.

A bare ``dvc repro`` works too, but then each stage starts a Prefect server of its own (3 to
11 s each here). ``ulmfit repro`` starts ``prefect server start`` once on
127.0.0.1 (a free port, PREFECT_HOME under ``runs/prefect``), points every stage at it with
``PREFECT_API_URL``, runs ``dvc repro`` and stops the server. With ``PREFECT_API_URL`` already
set (a shared server, a test harness) it uses that server and starts none.

It also groups the pipeline's MLflow runs: one parent run ``pipeline`` whose id and a fresh
pipeline id are passed to every stage (``ULMFIT_PARENT_RUN_ID``, ``ULMFIT_PIPELINE_ID``). When
DVC succeeds, the parent run gets the headline figures (``results/<dataset>.json``, written by
the report stage) and ``results.md``, so the runs table shows every execution's results on its
own row; the parameters an experiment sets (``-S``) are its params.

Before any of that, in a second or two: the whole of ``params.yaml`` is checked (every bad value
reported at once, as an ``InputError``: exit code 2), and ``repro_lock`` is taken for the
whole run (a second ``ulmfit repro``, or one while a stage command runs, stops at once with
``WorkspaceBusy``: exit code 75). Then MLflow runs (and their Prefect flow runs) left RUNNING
by a process that is gone are ended as KILLED (CRASHED).

Nothing it starts outlives it. The server and ``dvc repro`` each run under a supervisor
(``tasks.lifeline``) in a session of its own, that stops its command's whole process group
when our end of a pipe closes, which the kernel does however we end, SIGKILL included. The DVC
supervisor also holds the server's pipe, so the server stops only after the stages have ended
(they report their end to it). SIGTERM or SIGINT is forwarded to DVC's group (the running stage
ends its MLflow run KILLED and its flow run CRASHED); what is left after ``STAGE_STOP_GRACE``
seconds is killed; then the server stops, the parent run ends KILLED and ``ulmfit repro``
returns ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import json
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
SERVER_STOP_GRACE = 20.0
# How long a stage has, once signalled, to end its runs and exit before it is killed.
STAGE_STOP_GRACE = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _executable(name: str) -> str:
    """A console script of this environment (beside the running Python), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def supervised(
    root: Path,
    command: list[str],
    *,
    grace: float,
    env: dict[str, str],
    hold: tuple[int, ...] = (),
    **popen,
) -> tuple[subprocess.Popen, int]:
    """Start ``command`` under ``tasks.lifeline`` in a session of its own; returns the
    supervisor and the write end of its lifeline (close it, or die, and the command stops).
    ``hold``: file descriptors the supervisor keeps open while it lives."""
    read_end, write_end = os.pipe()  # both non-inheritable: only the supervisor gets read_end
    holding = [arg for fd in hold for arg in ("--hold", str(fd))]
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "tasks.lifeline", "--grace", str(grace), *holding, "--"]
            + command,
            cwd=root,
            env=env,
            stdin=read_end,
            pass_fds=hold,
            start_new_session=True,  # a SIGKILL of our process group must not reach it
            **popen,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return process, write_end


def stop_supervised(process: subprocess.Popen, lifeline: int, timeout: float) -> int:
    """Close the lifeline and wait for the supervisor (which stops its command); kill its
    session if it has not ended within ``timeout`` seconds. Returns its exit code."""
    with contextlib.suppress(OSError):
        os.close(lifeline)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


@contextlib.contextmanager
def prefect_server(root: Path, hold: list[int] | None = None) -> Iterator[str]:
    """Start ``prefect server start`` on a free local port, under a lifeline so that it stops
    with this process however it ends (SIGKILL included); yield its API URL; stop it.
    ``hold`` receives the lifeline's write end, for a process that the server must outlive."""
    home = root / Layout.prefect_home
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log_path = home / "server.log"
    with open(log_path, "ab") as log:
        process, lifeline = supervised(
            root,
            [_executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            grace=SERVER_STOP_GRACE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if hold is not None:
        hold.append(lifeline)
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
        stop_supervised(process, lifeline, SERVER_STOP_GRACE + 10)


def set_params(dvc_args: list[str]) -> dict[str, str]:
    """The parameters an experiment sets (``-S key=value``, ``-Skey=value``, ``--set-param``
    in any of argparse's spellings), read by DVC's own argument parser from the DVC command
    line (``["exp", "run", ...]``). Arguments it does not know are left to DVC to report."""
    from dvc.cli.parser import get_main_parser

    try:
        known, _ = get_main_parser().parse_known_args(dvc_args)
    except SystemExit:  # e.g. an unknown DVC command: argparse has printed why
        return {}
    settings = getattr(known, "set_param", None) or []
    found = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if equals:
            found[key.rpartition(":")[2]] = value  # params.yaml:key -> key
    return found


def _start_parent_run(
    root: Path, pipeline: str, experiment: str, dvc_args: list[str]
) -> str | None:
    """The MLflow run grouping this execution's stage runs (None if MLflow is unreachable),
    with the DVC command and the parameters it sets."""
    from tasks import tracking

    try:
        client = tracking.client(root)
        run = client.create_run(
            tracking.experiment_id(root, experiment),
            run_name=f"pipeline {pipeline}",
            tags={
                "ulmfit.pipeline_id": pipeline,
                "ulmfit.stage": "pipeline",
                "ulmfit.dvc_command": " ".join(["dvc", *dvc_args]),
                "mlflow.source.git.commit": tracking.git_commit(root),
                **tracking.process_tags(),
            },
        )
        for key, value in set_params(dvc_args).items():
            client.log_param(run.info.run_id, key, value)
        return run.info.run_id
    except Exception as error:  # tracking must not stop the pipeline from starting
        logger.warning("no MLflow parent run (%s); stage runs are still tagged", error)
        return None


def _log_headline(root: Path, run_id: str) -> None:
    """The headline figures of every dataset (``<dataset>.<key>``) and ``results.md`` on the
    pipeline's run: read from the report stage's files, so a run whose stages DVC skipped
    shows the same figures as the run that made them."""
    from tasks import tracking

    figures: dict[str, float] = {}
    files = sorted((root / Layout.headline).glob("*.json"))
    try:
        for path in files:
            figures.update({f"{path.stem}.{k}": v for k, v in json.loads(path.read_text()).items()})
        tracking.log_metrics(root, run_id, figures)
        tracking.log_artifacts(root, run_id, [root / Layout.results, *files])
    except Exception as error:  # the pipeline succeeded; its tracking must not fail it
        logger.warning("the headline figures were not logged to the pipeline run: %s", error)


class Interrupted(BaseException):
    """``ulmfit repro`` received SIGTERM or SIGINT: exit with ``128 + signum``. A
    ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` must not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def repro(root: Path, dvc_args: list[str], dvc_command: tuple[str, ...] = ("repro",)) -> int:
    """Check ``params.yaml`` and take the workspace lock, then run ``dvc repro <dvc_args>``
    (``dvc_command``: ``("exp", "run")`` for an experiment); returns its exit code. Bad
    parameters raise ``InputError`` and a busy workspace ``WorkspaceBusy`` before any server,
    MLflow run or DVC command is started. SIGTERM or SIGINT stops DVC and its stage (each ends
    its runs as KILLED), then the server, and returns ``128 + signal``."""
    from tasks.params import load_params

    params = load_params(root / "params.yaml")
    with repro_lock(root):
        return _repro(root, [*dvc_command, *dvc_args], params.mlflow.experiment)


def _repro(root: Path, dvc_args: list[str], experiment: str) -> int:
    from tasks import tracking

    command = [_executable("dvc"), *dvc_args]
    status = "FAILED"
    parent = None
    dvc: list[subprocess.Popen] = []
    received: list[int] = []
    starting: list[bool] = []

    def on_signal(signum, frame) -> None:
        received.append(signum)
        if not starting:  # the server is stopped on the way out, if it was started
            raise Interrupted(signum)
        if not dvc:
            return
        # The stage gets it too: it ends its MLflow run KILLED, its flow run CRASHED.
        with contextlib.suppress(ProcessLookupError):
            dvc[0].send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Nothing of this workspace runs now (we hold its locks): runs left RUNNING by a
        # process that is gone were killed. Their flow runs are marked once the server is up.
        stale = tracking.clean_stale_runs(root)
        pipeline = os.environ.get(tracking.PIPELINE_ID_ENV) or (
            time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        )
        parent = _start_parent_run(root, pipeline, experiment, dvc_args)
        env = {**os.environ, tracking.PIPELINE_ID_ENV: pipeline}
        if parent:
            env[tracking.PARENT_RUN_ENV] = parent
        with contextlib.ExitStack() as stack:
            hold: list[int] = []
            if not env.get("PREFECT_API_URL"):
                env["PREFECT_API_URL"] = stack.enter_context(prefect_server(root, hold))
            tracking.crash_flow_runs(stale, env["PREFECT_API_URL"])
            logger.info("pipeline %s: %s", pipeline, " ".join(command))
            starting.append(True)  # a signal now is held back, then forwarded to DVC
            process, lifeline = supervised(
                root, command, grace=STAGE_STOP_GRACE, env=env, hold=tuple(hold)
            )
            dvc.append(process)
            if received:
                process.send_signal(received[0])
            try:
                # Forwarded signals stop DVC's group; its supervisor kills what is left after
                # STAGE_STOP_GRACE seconds, so this wait is bounded once a signal came.
                code = process.wait()
            finally:
                os.close(lifeline)
        if received:
            status = "KILLED"
            logger.warning("pipeline %s: stopped by %s", pipeline, signal.Signals(received[0]).name)
            return 128 + received[0]
        status = "FINISHED" if code == 0 else "FAILED"
        if code == 0 and parent:
            _log_headline(root, parent)
        return code
    except Interrupted as interrupted:
        status = "KILLED"
        return 128 + interrupted.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if parent:
            with contextlib.suppress(Exception):
                tracking.end_run(root, parent, status)
