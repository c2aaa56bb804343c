"""Real servers for integration tests: a Prefect API server, a process worker, an MLflow server.

Every server binds 127.0.0.1 on a free port, keeps its state in a temporary folder, runs in its
own process group (so teardown also ends the children it spawned: uvicorn workers, flow-run
processes) and is waited for with a bounded timeout whose error message carries the tail of the
server's log. Nothing here talks to the internet; telemetry is switched off in every child.

Use the context managers, typically from a module-scoped fixture::

    with start_servers(tmp) as (prefect, mlflow):
        prefect.run_cli("work-pool", "create", "ulmfit-gpu", "--type", "process", cwd=repo)
        with start_process_worker(prefect, pool="ulmfit-gpu", workdir=tmp,
                                  extra_env=mlflow.client_env) as worker:
            run = wait_for_flow_run(prefect, flow_run_id, timeout=300, worker=worker)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Every child process gets these: no telemetry leaves the machine, no progress bars in logs.
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TQDM_DISABLE": "1",
    "PYTHONUNBUFFERED": "1",
    # A shared 2-core machine can take a long time to bring up an ephemeral server.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}

BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus the quiet settings and ``extra``; the virtualenv's
    ``bin`` comes first on PATH so that ``prefect``, ``mlflow`` and ``dvc`` are this project's."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    # A developer's own Prefect/MLflow settings must not leak into a test.
    for key in ("PREFECT_API_KEY", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    if extra:
        env.update(extra)
    return env


def log_tail(path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a log file (empty when it does not exist)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


@dataclass
class ManagedProcess:
    """A child started in its own session (process group), with its output in ``log_path``."""

    name: str
    process: subprocess.Popen
    log_path: Path
    stop_timeout: float = 15.0  # grace period after SIGTERM

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the whole process group, wait up to ``timeout`` s (default: the process's
        ``stop_timeout``), then SIGKILL it; the time it took is appended to the log."""
        timeout = self.stop_timeout if timeout is None else timeout
        started = time.monotonic()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        # The leader may be gone while children it spawned still hold the group: kill them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        with contextlib.suppress(OSError), open(self.log_path, "a") as log:
            log.write(
                f"\n[tests/servers.py] {self.name} stopped in {time.monotonic() - started:.1f}s\n"
            )

    def failure(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{what}\n--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
        )


def spawn(
    name: str, command: list[str], *, log_path: Path, env: Mapping[str, str], cwd: Path
) -> ManagedProcess:
    """Start ``command`` in a new process group with stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name=name, process=process, log_path=log_path)


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: ManagedProcess | None = None,
    interval: float = 0.5,
) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` s or as soon as ``process`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if process is not None and not process.alive():
            raise process.failure(
                f"{process.name} exited ({process.process.returncode}) before {what}"
            )
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:.0f}s waiting for {what}"
            raise process.failure(message) if process is not None else TimeoutError(message)
        time.sleep(interval)


def http_ok(url: str, timeout: float = 5.0) -> bool:
    """True when GET ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


# The codes Prefect's own client retries (prefect/client/base.py): its server answers 503 when
# SQLite is busy, which a loaded 2-core machine makes likely while its services also write.
RETRY_CODES = {408, 429, 502, 503}


def http_json(
    method: str,
    url: str,
    body: object | None = None,
    timeout: float = 30.0,
    retries: int = 5,
) -> object:
    """Send a JSON request and decode the JSON answer. An answer in ``RETRY_CODES`` is retried
    up to ``retries`` times, waiting 1, 2, 4, ... s; any other HTTP error raises at once."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    attempt = 0
    while True:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
            return json.loads(payload) if payload else None
        except urllib.error.HTTPError as error:
            if error.code not in RETRY_CODES or attempt == retries:
                raise
        time.sleep(2**attempt)
        attempt += 1


@dataclass
class PrefectServer:
    """A running ``prefect server start``; ``env`` points any Prefect client or CLI at it."""

    api_url: str
    home: Path
    process: ManagedProcess
    env: dict[str, str] = field(default_factory=dict)

    def run_cli(
        self,
        *args: str,
        cwd: Path,
        timeout: float = 180.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``prefect <args>`` against this server; raise with its output if it fails."""
        env = child_env({**self.env, **(extra_env or {})})
        result = subprocess.run(
            [str(BIN_DIR / "prefect"), "--no-prompt", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def api(self, method: str, path: str, body: object | None = None) -> object:
        """Call the server's REST API (``path`` below ``/api``)."""
        return http_json(method, f"{self.api_url}{path}", body)


def launch_prefect_server(workdir: Path) -> PrefectServer:
    """Start ``prefect server start`` on 127.0.0.1:<free port> with PREFECT_HOME (and its SQLite
    database) under ``workdir``, without waiting for it (see :func:`wait_ready`)."""
    workdir = Path(workdir).resolve()
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Workers and deploy steps in the tests must never fall back to an ephemeral server.
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    process = spawn(
        "prefect server",
        [str(BIN_DIR / command[0]), *command[1:], "--log-level", "WARNING"],
        log_path=workdir / "logs" / "prefect-server.log",
        env=child_env(env),
        cwd=workdir,
    )
    return PrefectServer(api_url=api_url, home=home, process=process, env=env)


@dataclass
class MlflowServer:
    """A running ``mlflow server`` with a SQLite backend and a local artifact store."""

    url: str
    backend_uri: str
    artifacts: Path
    process: ManagedProcess

    @property
    def client_env(self) -> dict[str, str]:
        """Environment that sends MLflow tracking and registry calls to this server."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_REGISTRY_URI": self.url}


def launch_mlflow_server(workdir: Path) -> MlflowServer:
    """Start ``mlflow server`` on 127.0.0.1:<free port>, SQLite at ``workdir/mlflow.db`` (an
    absolute URI), artifacts proxied to ``workdir/mlflow-artifacts``, without waiting for it."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = workdir / "mlflow-artifacts"
    artifacts.mkdir(exist_ok=True)
    command = [
        str(BIN_DIR / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--workers",
        "1",
    ]
    process = spawn(
        "mlflow server",
        command,
        log_path=workdir / "logs" / "mlflow-server.log",
        env=child_env(),
        cwd=workdir,
    )
    # uvicorn's graceful shutdown waits for idle keep-alive clients; every request has been
    # committed to SQLite by then, so a short grace period loses nothing.
    process.stop_timeout = 3.0
    return MlflowServer(
        url=f"http://127.0.0.1:{port}",
        backend_uri=backend_uri,
        artifacts=artifacts,
        process=process,
    )


def health_url(server: PrefectServer | MlflowServer) -> str:
    if isinstance(server, PrefectServer):
        return f"{server.api_url}/health"
    return f"{server.url}/health"


def wait_ready(server: PrefectServer | MlflowServer, timeout: float) -> None:
    """Wait (bounded) until the server's health endpoint answers; fail early if it exits."""
    url = health_url(server)
    wait_until(lambda: http_ok(url), timeout=timeout, what=url, process=server.process)


@contextlib.contextmanager
def start_prefect_server(workdir: Path, *, timeout: float = 240.0) -> Iterator[PrefectServer]:
    """A Prefect server for the block; yields once ``/api/health`` answers; stops the group."""
    server = launch_prefect_server(workdir)
    try:
        wait_ready(server, timeout)
        yield server
    finally:
        server.process.stop()


@contextlib.contextmanager
def start_mlflow_server(workdir: Path, *, timeout: float = 240.0) -> Iterator[MlflowServer]:
    """An MLflow server for the block; yields once ``/health`` answers; stops the group."""
    server = launch_mlflow_server(workdir)
    try:
        wait_ready(server, timeout)
        yield server
    finally:
        server.process.stop()


@contextlib.contextmanager
def start_servers(
    workdir: Path, *, timeout: float = 240.0
) -> Iterator[tuple[PrefectServer, MlflowServer]]:
    """Both servers, started side by side (each takes tens of seconds to come up on a busy
    machine), under ``workdir/prefect`` and ``workdir/mlflow``."""
    workdir = Path(workdir).resolve()
    servers: list[PrefectServer | MlflowServer] = []
    try:
        servers.append(launch_prefect_server(workdir / "prefect"))
        servers.append(launch_mlflow_server(workdir / "mlflow"))
        for server in servers:
            wait_ready(server, timeout)
        yield servers[0], servers[1]  # type: ignore[misc]
    finally:
        for server in reversed(servers):
            server.process.stop()


def worker_online(server: PrefectServer, pool: str) -> bool:
    """True once a worker has sent a heartbeat for ``pool``."""
    try:
        workers = server.api("POST", f"/work_pools/{pool}/workers/filter", {})
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(worker.get("status") == "ONLINE" for worker in workers or [])


@contextlib.contextmanager
def start_process_worker(
    server: PrefectServer,
    *,
    pool: str,
    workdir: Path,
    extra_env: Mapping[str, str] | None = None,
    limit: int | None = None,
    timeout: float = 180.0,
) -> Iterator[ManagedProcess]:
    """``prefect worker start --pool <pool> --type process`` against ``server``; the pool is
    created if missing. Flow runs it starts are children of its process group, so leaving the
    block also ends any run still going. ``extra_env`` reaches every flow run it starts."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **server.env,
        # Poll often so that a triggered run starts within seconds, not the default 10-15 s.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        **(extra_env or {}),
    }
    command = [str(BIN_DIR / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    if limit is not None:
        command += ["--limit", str(limit)]
    process = spawn(
        f"prefect worker ({pool})",
        command,
        log_path=workdir / "logs" / f"worker-{pool}.log",
        env=child_env(env),
        cwd=workdir,
    )
    try:
        wait_until(
            lambda: worker_online(server, pool),
            timeout=timeout,
            what=f"a worker heartbeat on pool {pool!r}",
            process=process,
            interval=1.0,
        )
        yield process
    finally:
        process.stop()


TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_for_flow_run(
    server: PrefectServer, flow_run_id: str, *, timeout: float, worker: ManagedProcess | None = None
) -> dict:
    """Poll a flow run until it reaches a terminal state; return the flow run as JSON."""
    latest: dict = {}

    def finished() -> bool:
        nonlocal latest
        latest = server.api("GET", f"/flow_runs/{flow_run_id}")  # type: ignore[assignment]
        return (latest.get("state") or {}).get("type") in TERMINAL_STATES

    wait_until(
        finished,
        timeout=timeout,
        what=f"flow run {flow_run_id} to finish",
        process=worker,
        interval=2.0,
    )
    return latest


def flow_run_logs(server: PrefectServer, flow_run_id: str, limit: int = 200) -> str:
    """The flow run's log lines as text (for failure messages)."""
    logs = server.api(
        "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": limit}
    )
    return "\n".join(f"{entry['level']:>2} {entry['message']}" for entry in logs or [])
