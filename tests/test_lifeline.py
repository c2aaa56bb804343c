"""The supervisor that keeps ``ulmfit repro``'s children from outliving it (``tasks.lifeline``),
how a run's owner is judged gone (``tasks.tracking``) and what a stage removes of an interrupted
write (``tasks.stage``). Seconds each; the pipeline under fault injection is
``tests/test_faults.py``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from flows.repro import supervised
from tasks import tracking

ROOT = Path(__file__).resolve().parents[1]
# A command whose group holds two processes: a background sleep and the shell's exec'd one.
TWO_SLEEPS = ["sh", "-c", "sleep 300 & exec sleep 300"]


def _start(command: list[str], grace: float = 5.0):
    process, lifeline = supervised(ROOT, command, grace=grace, env=dict(os.environ))
    deadline = time.monotonic() + 30
    while len(psutil.Process(process.pid).children(recursive=True)) < 2:
        assert time.monotonic() < deadline, "the supervised command did not start"
        time.sleep(0.05)
    return process, lifeline, psutil.Process(process.pid).children(recursive=True)


def _gone(processes) -> bool:
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_closing_the_lifeline_stops_the_whole_group():
    process, lifeline, children = _start(TWO_SLEEPS)
    os.close(lifeline)  # what the kernel does when the starter dies, SIGKILL included
    assert process.wait(timeout=20) == 128 + signal.SIGTERM
    assert _gone(children)


def test_a_signal_is_forwarded_and_a_command_that_ignores_it_is_killed_after_the_grace():
    process, lifeline, children = _start(["sh", "-c", "trap '' TERM; sleep 300 & wait"], 1.0)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 128 + signal.SIGKILL
    assert time.monotonic() - started >= 1.0  # the grace was given before the SIGKILL
    assert _gone(children)
    os.close(lifeline)


def test_the_command_exit_code_is_passed_on():
    process, lifeline = supervised(ROOT, ["sh", "-c", "exit 3"], grace=5, env=dict(os.environ))
    assert process.wait(timeout=20) == 3
    os.close(lifeline)


def test_the_supervisor_is_out_of_its_starter_process_group():
    process, lifeline, children = _start(TWO_SLEEPS)
    try:
        assert os.getpgid(process.pid) != os.getpgrp()
        assert os.getsid(process.pid) == process.pid
    finally:
        os.close(lifeline)
        process.wait(timeout=20)


def _tags(pid: int, started: str, host: str | None = None) -> dict[str, str]:
    return {
        tracking.PID_TAG: str(pid),
        tracking.STARTED_TAG: started,
        tracking.HOST_TAG: host or socket.gethostname(),
    }


def test_a_run_owner_is_gone_only_when_its_process_of_this_host_is():
    me = tracking.process_tags()
    assert not tracking._owner_gone(me)  # alive
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert tracking._owner_gone(_tags(dead.pid, me[tracking.STARTED_TAG]))
    # The same pid started at another time: a reused pid, so the owner is gone.
    assert tracking._owner_gone(_tags(os.getpid(), "1000.00"))
    # Another host, or no tags at all: never judged.
    assert not tracking._owner_gone(_tags(dead.pid, "1000.00", host="elsewhere.invalid"))
    assert not tracking._owner_gone({})


def test_a_stage_removes_what_an_interrupted_write_left_of_its_outputs(tmp_path):
    from tasks.pipeline import stage_spec
    from tasks.stage import remove_leftovers

    spec = stage_spec("pretrain", direction="fwd")
    out = tmp_path / spec.outs[0]  # data/pretrained/fwd
    (out / ".model.pt.x1.tmp").mkdir(parents=True)  # atomic_path's private folder
    (out / "model.pt").write_bytes(b"complete")
    (out.parent / ".fwd.x2.tmp").mkdir()  # a staging folder
    metrics = tmp_path / spec.metrics
    metrics.parent.mkdir(parents=True)
    (metrics.parent / f".{metrics.name}.x3.tmp").write_text("{")  # atomic_write's temp file
    (out.parent / "bwd").mkdir()  # another stage's output
    (out.parent / ".bwd.x4.tmp").mkdir()  # another stage's: not ours to judge
    assert len(remove_leftovers(tmp_path, spec)) == 3
    remaining = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert remaining == [
        "data",
        "data/pretrained",
        "data/pretrained/.bwd.x4.tmp",
        "data/pretrained/bwd",
        "data/pretrained/fwd",
        "data/pretrained/fwd/model.pt",
        "metrics",
        "metrics/wikipedia",
    ]


def test_a_previous_output_moved_aside_by_an_interrupted_write_is_restored(tmp_path):
    """A kill between staged_directory's two renames leaves the previous output in a ``.old``
    folder and none in place: it is put back, not deleted. Where the new one is in place, the
    old one goes."""
    from tasks.pipeline import stage_spec
    from tasks.stage import remove_leftovers

    spec = stage_spec("pretrain", direction="fwd")
    out = tmp_path / spec.outs[0]  # data/pretrained/fwd
    (out.parent / ".fwd.x1.old" / "fwd").mkdir(parents=True)
    (out.parent / ".fwd.x1.old" / "fwd" / "model.pt").write_bytes(b"previous")
    assert remove_leftovers(tmp_path, spec) == [out.parent / ".fwd.x1.old"]
    assert (out / "model.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in out.parent.iterdir()) == ["fwd"]

    (out.parent / ".fwd.x2.old" / "fwd").mkdir(parents=True)
    (out.parent / ".fwd.x2.old" / "fwd" / "model.pt").write_bytes(b"older")
    remove_leftovers(tmp_path, spec)
    assert (out / "model.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in out.parent.iterdir()) == ["fwd"]


def test_a_stage_under_a_bare_dvc_stops_when_that_dvc_is_killed(tmp_path):
    """``stop_with_dvc``: a process whose ancestor is ``dvc`` SIGTERMs itself once that DVC is
    gone (here a stand-in script named ``dvc``; tests/test_faults.py kills a real one)."""
    import sys

    stage = (
        "import signal, sys, time\n"
        "from tasks.lifeline import stop_with_dvc\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('stopped', flush=True), sys.exit(143)))\n"
        "print('watching', stop_with_dvc(poll=0.1), flush=True)\n"
        "time.sleep(300)\n"
    )
    dvc, out = tmp_path / "dvc", tmp_path / "out"
    dvc.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {stage!r}], stdout=open({str(out)!r}, 'w'))\n"
        "time.sleep(300)\n"
    )
    dvc.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([str(dvc)], env=env)
    deadline = time.monotonic() + 60
    while "watching" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, "the stand-in stage did not start"
        time.sleep(0.05)
    assert out.read_text().split()[:2] == ["watching", str(parent.pid)]
    child = psutil.Process(parent.pid).children()[0]
    parent.kill()
    child.wait(timeout=30)  # not our child: psutil cannot tell its exit code
    assert out.read_text().split()[-1] == "stopped"  # through its own SIGTERM handler
    parent.wait()


def test_a_process_not_started_by_dvc_watches_nothing():
    from tasks.lifeline import stop_with_dvc

    assert stop_with_dvc() is None


# A stage whose body is SIGTERMed; a second SIGTERM lands while Prefect reports the crash.
SECOND_SIGTERM_STAGE = """
import logging, os, signal, sys, time
from pathlib import Path
from prefect import flow
from tasks.params import load_params
from tasks.pipeline import stage_spec
from tasks.stage import stage_run

class SecondSigterm(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Crash detected"):
            os.kill(os.getpid(), signal.SIGTERM)

logging.getLogger("prefect.flow_runs").addHandler(SecondSigterm())
root = Path(sys.argv[1])

@flow(name="pretrain")
def stage():
    params = load_params(root / "params.yaml")
    with stage_run(root, stage_spec("pretrain", direction="fwd"), params, {}):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(120)

stage()
"""


def test_a_second_sigterm_during_the_crash_report_leaves_no_flow_run_running(tmp_path):
    """Under ``ulmfit repro`` DVC's whole group gets SIGTERM, DVC dies of it, and
    ``stop_with_dvc`` sends the stage a second one. On a loaded CI machine that one landed inside
    Prefect's crash report and the flow run stayed RUNNING for good (no later start could tell).
    Here the second SIGTERM is sent exactly then, from the engine's "Crash detected" log line."""
    import shutil
    import sqlite3
    import sys

    from flows.repro import prefect_server

    shutil.copy(ROOT / "profiles" / "default.yaml", tmp_path / "params.yaml")
    with prefect_server(tmp_path) as api_url:
        stage = subprocess.run(
            [sys.executable, "-c", SECOND_SIGTERM_STAGE, str(tmp_path)],
            env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api_url},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert stage.returncode == -signal.SIGTERM, stage.stderr[-3000:]  # still ended by it
    with sqlite3.connect(tmp_path / "runs/prefect/prefect.db") as db:
        states = db.execute("SELECT state_type FROM flow_run").fetchall()
    assert states == [("CRASHED",)], stage.stderr[-3000:]
    runs = tracking.client(tmp_path).search_runs(
        [e.experiment_id for e in tracking.client(tmp_path).search_experiments()]
    )
    assert [run.info.status for run in runs] == ["KILLED"]


def test_stop_signals_held_until_the_block_ends():
    """A SIGTERM or SIGINT inside the block reaches the handler in place once the block ends
    (each once), and that handler is back; outside the main thread nothing is held (Python
    runs handlers in the main thread only, and ``signal.signal`` refuses other threads)."""
    import threading

    from tasks.lifeline import stop_signals_held

    got = []

    def record(signum, frame):
        got.append(signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with stop_signals_held():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)
            assert got == []
        assert got == [signal.SIGTERM, signal.SIGINT]
        assert signal.getsignal(signal.SIGTERM) is record
        assert signal.getsignal(signal.SIGINT) is record
        errors = []

        def elsewhere():
            try:
                with stop_signals_held():
                    pass
            except Exception as error:  # signal.signal outside the main thread: ValueError
                errors.append(error)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert errors == []
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
