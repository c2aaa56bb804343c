"""A command that cannot outlive the process that started it.

``python -m tasks.lifeline [--grace S] [--hold FD] -- COMMAND...`` runs ``COMMAND`` in a process
group of its own and stops that whole group (SIGTERM, then SIGKILL after ``--grace`` seconds)
when

- its standard input reaches end of file: the *lifeline*. The starter keeps the pipe's write end
  open and never hands it on, so the kernel closes it however the starter ends, SIGKILL included
  (a signal handler cannot run then; this needs none);
- it receives SIGTERM, SIGINT or SIGHUP: the same signal is forwarded to the group (DVC ignores
  SIGINT while a stage runs and stops after the stage; a stage ends its MLflow run KILLED and its
  Prefect flow run CRASHED), and a second signal kills the group at once.

It exits with the command's code (128 + N for a command ended by signal N) once every process
of the group is gone: on Linux it is the group's child subreaper, so a stage left behind by a
DVC that died first is still its child and is waited for, not orphaned.

``--hold FD`` keeps an inherited file descriptor open for as long as the supervisor lives:
``ulmfit repro`` hands the DVC supervisor the write end of the Prefect server's lifeline, so the
server stops only after the stages (which report their end to it) have stopped.

It has to start in a session of its own (``start_new_session=True``): a SIGKILL sent to the
starter's process group must not reach it.

A stage run by a bare ``dvc repro`` has no such supervisor: :func:`stop_with_dvc` makes the
stage itself stop (SIGTERM to itself: its runs end KILLED) once the DVC that started it is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

logger = logging.getLogger("ulmfit")

DEFAULT_GRACE = 30.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The stop signals a stage turns into an exception (Prefect's TerminationSignal,
# KeyboardInterrupt): held during MLflow calls, ignored while the stage reports its end.
STAGE_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Orphans of the group become our children (Linux); elsewhere the group check suffices."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def exit_code(status: int) -> int:
    """A ``waitpid`` status (or a ``Popen.returncode``) as a shell exit code."""
    if status < 0:  # Popen's convention: -N for signal N
        return 128 - status
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Supervisor:
    def __init__(self, command: list[str], grace: float) -> None:
        self.grace = grace
        self.requests: list[int] = []  # stop signals asked for, in order
        self.lock = threading.Lock()
        self.child = subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)
        self.group = self.child.pid

    def request(self, signum: int) -> None:
        with self.lock:
            self.requests.append(signum)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.group, signum)

    def _kill_all(self) -> None:
        """SIGKILL the group and every descendant (one that left the group included)."""
        self._signal_group(signal.SIGKILL)
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                process.kill()

    def _reap(self) -> tuple[int | None, bool]:
        """Reap every child that has ended; returns (the command's status if it ended now,
        whether any child is left)."""
        status = None
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status, False
            if pid == 0:
                return status, True
            if pid == self.child.pid:
                status = code
                self.child.returncode = exit_code(code)  # so Popen does not wait for it again

    def run(self) -> int:
        status: int | None = None
        sent = 0  # stop signals forwarded so far
        deadline = None
        while True:
            ended, left = self._reap()
            status = ended if ended is not None else status
            with self.lock:
                pending = self.requests[sent:]
            if pending and sent == 0:
                self._signal_group(pending[0])
                deadline = time.monotonic() + self.grace
                sent = 1
            elif pending or (deadline is not None and time.monotonic() > deadline):
                self._kill_all()  # a second signal, or the grace is over
                sent += len(pending)
                deadline = time.monotonic() + 3600
            if not left and status is not None:
                return exit_code(status)
            if not left:  # the command is gone but was reaped elsewhere (cannot happen)
                return 1
            if status is not None and deadline is None:
                # The command ended by itself; what it left in its group must not stay.
                self.request(signal.SIGTERM)
            time.sleep(0.1)


def _is_dvc(process) -> bool:
    """``dvc ...``, ``python .../bin/dvc ...`` or ``python -m dvc ...``."""
    with contextlib.suppress(psutil.Error):
        return any(Path(part).name == "dvc" for part in process.cmdline()[:3])
    return False


def _alive(process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def stop_with_dvc(poll: float = 1.0) -> int | None:
    """Stop this process (SIGTERM to itself) when the ``dvc repro`` among its ancestors ends:
    a DVC killed by SIGKILL or SIGTERM (it forwards neither) would otherwise leave its stage
    running on, holding the workspace. A thread polls every ``poll`` seconds; psutil's
    ``is_running`` also tells a reused pid apart. Returns the DVC pid watched, or ``None``
    when DVC did not start this process."""
    dvc = next((p for p in psutil.Process().parents() if _is_dvc(p)), None)
    if dvc is None:
        return None

    def watch() -> None:
        while _alive(dvc):
            time.sleep(poll)
        logger.warning("dvc (pid %d), which started this stage, is gone: stopping", dvc.pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-dvc", daemon=True).start()
    return dvc.pid


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends, then deliver them. A stage turns a stop
    signal into an exception (Prefect's ``TerminationSignal``, ``KeyboardInterrupt``) wherever
    its main thread is; raised inside an MLflow call, it can leave that call's SQLite
    transaction open, and the store stays locked: the stage's own ``end_run(KILLED)`` then
    waits out SQLite's 20-second busy timeout and fails, and its run stays RUNNING. Python
    runs signal handlers in the main thread only, so elsewhere this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: held.append(signum))
        for signum in STAGE_STOP_SIGNALS
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)  # the handler held back runs now


def _watch_lifeline(supervisor: Supervisor) -> None:
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    supervisor.request(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.lifeline", description=__doc__)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE)
    parser.add_argument("--hold", type=int, action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    for fd in args.hold:
        os.set_inheritable(fd, False)  # held here, never handed to the command
    _become_subreaper()
    supervisor = Supervisor(command, args.grace)
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: supervisor.request(signum))
    threading.Thread(target=_watch_lifeline, args=(supervisor,), daemon=True).start()
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
