"""bench/stage_time.py: each stage's minutes behind a target, read from a real DVC graph and a
real MLflow store (runs written with the timestamps a paused and a resumed stage leave)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric

ROOT = Path(__file__).resolve().parents[1]
MINUTE = 60_000  # ms

DVC_YAML = {
    "stages": {
        "prepare": {"cmd": "true", "outs": ["data"]},
        "train": {
            "cmd": "true",
            "deps": ["data"],
            "outs": ["model", {"metrics/train.json": {"cache": False}}],
        },
        "skipped": {"cmd": "true", "outs": [{"metrics/skipped.json": {"cache": False}}]},
        "evaluate": {"cmd": "true", "deps": ["model", "metrics/skipped.json"], "outs": ["eval"]},
        "unrelated": {"cmd": "true", "outs": ["other"]},
    }
}


def _run(client, experiment: str, name: str, start: int, minutes: list[int], status: str) -> None:
    """A run from ``start`` (ms) that logs a metric at each of ``minutes`` and ends at the last."""
    run = client.create_run(experiment, start_time=start, run_name=name)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric("loss", 1.0, start + m * MINUTE, i) for i, m in enumerate(minutes)],
    )
    client.set_terminated(run.info.run_id, status=status, end_time=start + minutes[-1] * MINUTE)


def _dvc_workspace(tmp_path: Path) -> Path:
    """A DVC project (no git) with :data:`DVC_YAML`'s stages."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    command = [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"]
    subprocess.run(command, cwd=workspace, check=True)
    (workspace / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    return workspace


def _stage_time(workspace: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/stage_time.py", "--workspace", str(workspace)]
    return subprocess.run(
        [*command, *args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )


def _rows(out: Path) -> list[list[str]]:
    """The table's rows (below its header), as lists of cells."""
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_stage_minutes_follow_the_graph_and_leave_out_paused_stretches(tmp_path):
    workspace = _dvc_workspace(tmp_path)
    profile = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    profile["mlflow"]["experiment"] = "bench"
    (workspace / "params.yaml").write_text(yaml.safe_dump(profile))
    (workspace / "metrics").mkdir()
    (workspace / "metrics" / "skipped.json").write_text(json.dumps({"skipped": "nothing to do"}))
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.create_experiment("bench")
    t0 = 1_800_000_000_000
    _run(client, experiment, "prepare", t0, [0, 1, 2], "FINISHED")
    # train: killed after a 20-minute pause (no metric from minute 4 to 24), then resumed.
    _run(client, experiment, "train", t0 + 3 * MINUTE, [0, 2, 4, 24, 26], "KILLED")
    _run(client, experiment, "train", t0 + 40 * MINUTE, [0, 1, 3], "FINISHED")
    _run(client, experiment, "evaluate", t0 + 50 * MINUTE, [0, 1], "FINISHED")
    _run(client, experiment, "unrelated", t0 + 60 * MINUTE, [0, 30], "FINISHED")

    out = tmp_path / "stage_time.md"
    result = _stage_time(workspace, out, "--target", "evaluate")
    assert result.returncode == 0, result.stderr
    by_stage = {row[0]: row[1:] for row in _rows(out)}
    # The graph's order, dependencies first; the unrelated stage is left out.
    assert list(by_stage) == ["prepare", "train", "skipped", "evaluate", "**all 4 stages**"]
    assert by_stage["prepare"][:3] == ["2.0", "–", "2.0"]
    # Two runs: 26 + 3 minutes of wall time, of which the 20-minute pause is not active.
    assert by_stage["train"][:3] == ["29.0", "20.0", "9.0"]
    assert "(killed)" in by_stage["train"][3]
    assert by_stage["skipped"] == ["–", "–", "–", "skipped: nothing to do"]
    assert by_stage["**all 4 stages**"][:3] == ["32.0", "20.0", "**12.0**"]
    assert len(by_stage) == 5  # no second sum: every stage is the profile's

    # --added marks a stage that is not the profile's own, and a second sum leaves it out.
    result = _stage_time(workspace, out, "--target", "evaluate", "--added", "train")
    assert result.returncode == 0, result.stderr
    by_stage = {row[0]: row[1:] for row in _rows(out)}
    assert by_stage["train (added, not in the profile)"][:3] == ["29.0", "20.0", "9.0"]
    assert by_stage["**all 4 stages**"][:3] == ["32.0", "20.0", "**12.0**"]
    assert by_stage["**the profile's 3 stages**"][:3] == ["3.0", "0.0", "**3.0**"]
    result = _stage_time(workspace, out, "--target", "evaluate", "--added", "unrelated")
    assert result.returncode == 2
    assert "--added unrelated: not among the stages behind the targets" in result.stderr

    # --counted leaves out what another table counts: here everything behind train.
    result = _stage_time(workspace, out, "--target", "evaluate", "--counted", "train")
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in _rows(out)] == ["skipped", "evaluate", "**all 2 stages**"]
    assert "The stages behind train are left out (counted elsewhere)." in out.read_text()


def test_an_unknown_target_is_one_line_naming_the_file_and_the_fix(tmp_path):
    workspace = _dvc_workspace(tmp_path)
    result = _stage_time(workspace, tmp_path / "x.md", "--target", "evaluat")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"{workspace / 'dvc.yaml'}: no stage 'evaluat'. Fix: name one of its stages"
    ]
    assert not (tmp_path / "x.md").exists()
