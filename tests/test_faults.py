"""Fault injection: ``ulmfit repro`` killed, crashed or out of disk leaves nothing behind.

One micro workspace goes through the faults in order (each test is one fault and the checks
after it; later ones build on earlier ones), running ``ulmfit repro pretrain@fwd`` with its own
Prefect server each time, as a user does:

1. SIGTERM to ``ulmfit repro`` while ``train_tokenizer`` runs;
2. SIGKILL of the stage ``pretrain@fwd`` alone (what the OOM killer does) after its first
   checkpoint: its MLflow and Prefect runs stay RUNNING until the next start;
3. SIGKILL of the process group of ``ulmfit repro`` (``setsid ulmfit repro & kill -9 -PGID``)
   while ``pretrain@fwd`` resumes: its supervisors, in sessions of their own, stop the stage and
   the Prefect server;
4. a full disk: a 64 KiB tmpfs mounted over ``runs/checkpoints`` (root only), so saving the first
   checkpoint fails with ENOSPC (a real full file system, not a simulated error);
5. SIGTERM to ``ulmfit repro`` while ``pretrain@fwd`` runs;
6. SIGKILL of a bare ``dvc repro`` (no ``ulmfit repro`` and no supervisor) while
   ``pretrain@fwd`` resumes: the stage sees its DVC gone and stops itself;
7. a crash inside the stage on a corrupt input (its token file overwritten).

After each: no process started from the workspace is left, no MLflow run or Prefect flow run is
left RUNNING (once the next start has cleaned up after a SIGKILL), no temporary file or staging
folder is left under ``data/``. Then the run resumed after the faults and an uninterrupted
(``--force``) run write the same metrics. The kill points are found by polling the stage's log
and checkpoint files, never by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import BIN, _env, make_workspace, micro_params, run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

STAGE = "pretrain@fwd"
METRICS = "metrics/wikipedia/pretrain_fwd.json"
CHECKPOINTS = "runs/checkpoints/pretrain/fwd"
FAULTS = {"injected": [], "handled": []}  # fault names, counted at the end
RESUMED: dict = {}  # the metrics of the run that completed after the faults


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    params = micro_params()
    params["controls"] = {}
    # Long enough to be caught mid-training, short enough for seconds of CPU.
    params["pretrain"]["train"].update(max_steps=240, checkpoint_every=10)
    return make_workspace(tmp_path_factory.mktemp("faults") / "ws", params)


# ----------------------------------------------------------------------------- helpers


class Repro:
    """``ulmfit repro ARGS`` (or a bare ``dvc repro ARGS``) in a session of its own (its pid is
    its process group), output in a file that the test polls."""

    def __init__(self, workspace: Path, *args: str, name: str, program: str = "ulmfit") -> None:
        self.log = workspace.parent / f"{name}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [str(BIN / program), "repro", *args],
                cwd=workspace,
                env=_env(workspace),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"ulmfit repro ended ({self.process.returncode}) before {what}:\n"
                    + self.output()[-4000:]
                )
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def wait_for_text(self, text: str) -> None:
        self.wait_for(lambda: text in self.output(), repr(text))

    def finish(self, timeout: float = 900) -> int:
        return self.process.wait(timeout=timeout)


def _left_processes(workspace: Path) -> list[str]:
    """Processes started from the workspace (cwd or command line in it): the Prefect server,
    supervisors, DVC, stages."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        info = process.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cwd, cmdline = info["cwd"] or "", " ".join(info["cmdline"] or [])
        if cwd.startswith(str(workspace)) or str(workspace) in cmdline:
            found.append(f"{info['pid']} {cmdline[:160]}")
    return found


def _assert_nothing_left(workspace: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while left := _left_processes(workspace):
        assert time.monotonic() < deadline, "left running:\n" + "\n".join(left)
        time.sleep(0.5)


def _runs(workspace: Path) -> list[tuple[str, str]]:
    """(stage, status) of every MLflow run, oldest first (read straight from the SQLite store)."""
    with sqlite3.connect(workspace / "mlflow.db") as db:
        return db.execute(
            "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "AND t.key = 'ulmfit.stage' ORDER BY r.start_time"
        ).fetchall()


def _flow_runs(workspace: Path) -> list[tuple[str, str]]:
    """(flow, state) of every Prefect flow run of the workspace's server, oldest first."""
    with sqlite3.connect(workspace / "runs/prefect/prefect.db") as db:
        return db.execute(
            "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
            "ORDER BY r.created"
        ).fetchall()


def _assert_nothing_running(workspace: Path) -> None:
    assert not [r for r in _runs(workspace) if r[1] == "RUNNING"], _runs(workspace)
    assert not [r for r in _flow_runs(workspace) if r[1] in ("RUNNING", "PENDING")], _flow_runs(
        workspace
    )


def _assert_no_partial_outputs(workspace: Path) -> None:
    """Temporary files and staging folders are dot-named (ulmfit.io); DVC's .gitignore aside."""
    partial = [
        p
        for root in (workspace / "data", workspace / "metrics")
        if root.exists()
        for p in root.rglob(".*")
        if p.name != ".gitignore"
    ]
    assert not partial, partial


def _checkpoints(workspace: Path) -> list[Path]:
    """Complete checkpoints (``<key>/step-*.pt``), not one being written (an empty file of that
    name in a private ``.tmp`` folder beside it, ``ulmfit.io.atomic_path``)."""
    return sorted((workspace / CHECKPOINTS).glob("*/step-*.pt"))


def _stage_process(workspace: Path):
    import psutil

    for process in psutil.process_iter(["cwd", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (
            (process.info["cwd"] or "") == str(workspace)
            and "pretrain" in cmdline
            and any(Path(part).name == "ulmfit" for part in cmdline)
        ):
            return process
    raise AssertionError("no pretrain stage process found")


def _injected(name: str) -> None:
    FAULTS["injected"].append(name)


def _handled(name: str) -> None:
    FAULTS["handled"].append(name)


# ------------------------------------------------------------------------------ faults


def test_sigterm_during_train_tokenizer(workspace):
    _injected("SIGTERM to ulmfit repro during train_tokenizer")
    repro = Repro(workspace, STAGE, name="1-sigterm-tokenizer")
    repro.wait_for_text("Running stage 'train_tokenizer'")
    repro.process.send_signal(signal.SIGTERM)
    assert repro.finish(timeout=120) == 128 + signal.SIGTERM, repro.output()[-3000:]
    _assert_nothing_left(workspace)
    _assert_nothing_running(workspace)
    _assert_no_partial_outputs(workspace)
    stages = dict(_runs(workspace))
    assert stages["pipeline"] == "KILLED"
    assert stages.get("train_tokenizer", "KILLED") in ("KILLED", "FINISHED"), stages
    _handled("SIGTERM to ulmfit repro during train_tokenizer")


def test_sigkill_of_the_stage_is_cleaned_up_at_the_next_start(workspace):
    name = "SIGKILL of the pretrain@fwd stage process (OOM killer)"
    _injected(name)
    repro = Repro(workspace, STAGE, name="2-sigkill-stage")
    repro.wait_for(lambda: _checkpoints(workspace), "a pretrain checkpoint")
    _stage_process(workspace).kill()
    code = repro.finish()
    assert code == 255, repro.output()[-3000:]  # DVC failed the stage (its exit code)
    _assert_nothing_left(workspace)
    _assert_no_partial_outputs(workspace)
    # Nothing could end the stage's runs: they stay RUNNING until the next start.
    assert (STAGE, "RUNNING") in _runs(workspace)
    assert ("pretrain", "RUNNING") in _flow_runs(workspace)
    assert dict(_runs(workspace))["pipeline"] == "FAILED"
    _handled(name)


def test_sigkill_of_the_repro_process_group(workspace):
    name = "SIGKILL of the process group of ulmfit repro during pretrain@fwd"
    _injected(name)
    repro = Repro(workspace, STAGE, name="3-sigkill-group")
    repro.wait_for_text("resuming from step")
    os.killpg(repro.process.pid, signal.SIGKILL)
    assert repro.finish(timeout=60) == -signal.SIGKILL
    output = repro.output()
    # Its start cleaned up after fault 2, one line per record.
    assert output.count("cleaned up: MLflow run") == 1 and f"({STAGE})" in output, output[-3000:]
    assert output.count("cleaned up: Prefect flow run") == 1, output[-3000:]
    # The server and the stage are not in the killed group; they stop with it all the same.
    _assert_nothing_left(workspace)
    _assert_no_partial_outputs(workspace)
    running = [stage for stage, status in _runs(workspace) if status == "RUNNING"]
    assert running == ["pipeline"]  # the stage ended its own run KILLED; the next start ends this
    assert ("pretrain", "RUNNING") not in _flow_runs(workspace)
    _handled(name)


def test_a_full_disk_fails_the_stage_cleanly(workspace):
    name = "full disk (ENOSPC) while pretrain@fwd saves a checkpoint"
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    _injected(name)
    mount = workspace / CHECKPOINTS
    mount.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        FAULTS["injected"].remove(name)
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    try:
        repro = Repro(workspace, STAGE, name="4-full-disk")
        code = repro.finish()
        output = repro.output()
        assert code != 0, output[-3000:]
        # One line names the file and the fix; no traceback (torch's zip writer loses the
        # errno, so ulmfit.checkpoint writes the bytes itself and gets the OSError(ENOSPC)).
        line = "ulmfit pretrain: error: " + str(mount)
        assert line in output and "no space left on device. Fix: free space" in output, output
        assert "Traceback" not in output, output[-3000:]
        assert "cleaned up: MLflow run" in output and "(pipeline)" in output  # fault 3's parent
        assert not [p for p in mount.rglob("*") if p.is_file()]  # no partial checkpoint
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    _assert_nothing_left(workspace)
    _assert_nothing_running(workspace)
    _assert_no_partial_outputs(workspace)
    assert dict(_runs(workspace))[STAGE] == "FAILED"
    _handled(name)


def test_sigterm_during_pretrain(workspace):
    name = "SIGTERM to ulmfit repro during pretrain@fwd"
    _injected(name)
    repro = Repro(workspace, STAGE, name="5-sigterm-pretrain")
    repro.wait_for_text("resuming from step")  # fault 3's checkpoints are back
    repro.process.send_signal(signal.SIGTERM)
    assert repro.finish(timeout=120) == 128 + signal.SIGTERM, repro.output()[-3000:]
    _assert_nothing_left(workspace)
    _assert_nothing_running(workspace)
    _assert_no_partial_outputs(workspace)
    runs = _runs(workspace)
    assert runs[-2:] == [("pipeline", "KILLED"), (STAGE, "KILLED")], runs
    assert _flow_runs(workspace)[-1] == ("pretrain", "CRASHED")
    _handled(name)


def test_sigkill_of_a_bare_dvc_repro(workspace):
    name = "SIGKILL of a bare dvc repro (no ulmfit repro) during pretrain@fwd"
    _injected(name)
    dvc = Repro(workspace, "--single-item", STAGE, name="6-sigkill-bare-dvc", program="dvc")
    dvc.wait_for_text("resuming from step")
    dvc.process.kill()  # DVC alone: no supervisor; the stage notices and stops itself
    assert dvc.finish(timeout=60) == -signal.SIGKILL
    _assert_nothing_left(workspace)
    _assert_no_partial_outputs(workspace)
    assert _runs(workspace)[-1] == (STAGE, "KILLED"), _runs(workspace)
    assert "which started this stage, is gone: stopping" in dvc.output(), dvc.output()[-3000:]
    _handled(name)


def test_a_rerun_resumes_and_completes(workspace):
    result = run([str(BIN / "ulmfit"), "repro", STAGE], workspace)
    output = result.stdout + result.stderr
    assert "resuming from step" in output
    assert not _checkpoints(workspace)
    _assert_nothing_left(workspace)
    _assert_nothing_running(workspace)
    _assert_no_partial_outputs(workspace)
    RESUMED.update(json.loads((workspace / METRICS).read_text()))


def test_a_crash_on_corrupt_input(workspace):
    name = "crash inside pretrain@fwd: corrupt token file"
    _injected(name)
    tokens = workspace / "data/wikipedia_tokens/train.parquet"
    tokens.chmod(0o644)
    tokens.write_bytes(b"PAR1 not a parquet file")
    result = run([str(BIN / "ulmfit"), "repro", "--single-item", STAGE], workspace, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and str(tokens) in output, output[-3000:]
    _assert_nothing_left(workspace)
    _assert_nothing_running(workspace)
    _assert_no_partial_outputs(workspace)
    assert dict(_runs(workspace))[STAGE] == "FAILED"
    assert _flow_runs(workspace)[-1][1] == "FAILED"
    run([str(BIN / "dvc"), "checkout", "--force", "tokenize_wikipedia"], workspace)
    _handled(name)


def test_the_resumed_run_equals_an_uninterrupted_one(workspace):
    assert RESUMED, "the resumed run did not complete"
    run([str(BIN / "ulmfit"), "repro", "--force", "--single-item", STAGE], workspace)
    fresh = json.loads((workspace / METRICS).read_text())
    assert fresh == RESUMED
    _assert_nothing_left(workspace)
    _assert_nothing_running(workspace)


def test_every_injected_fault_was_handled():
    print(f"\nfaults injected: {len(FAULTS['injected'])}, handled: {len(FAULTS['handled'])}")
    for fault in FAULTS["injected"]:
        print(f"  {'handled' if fault in FAULTS['handled'] else 'NOT HANDLED'}: {fault}")
    assert FAULTS["injected"] and FAULTS["handled"] == FAULTS["injected"]
