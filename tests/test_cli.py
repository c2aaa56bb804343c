"""The ``ulmfit`` command line: help a newcomer can read, profiles, clean errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from tasks.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["repro", "retrain", "predict", "profile", *(stage.command for stage in STAGES)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert len(text.split()) > 25, f"'ulmfit {command} --help' explains too little"


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
    assert "ulmfit repro" in text  # where to start


@pytest.mark.parametrize("stage", STAGES, ids=[stage.group for stage in STAGES])
def test_every_stage_command_runs_its_flow_with_its_arguments(stage):
    """Each row of the stage table is a command whose arguments are the row's, and its flow
    (imported for real) takes exactly those arguments and the project root."""
    import importlib
    import inspect

    values = {"dataset": "imdb", "direction": "bwd", "name": "imdb-scratch"}
    argv = [stage.command, *(f"--{arg}={values[arg]}" for arg in stage.args)]
    args = build_parser().parse_args(argv)
    assert args.func.__name__ == "cmd_stage"
    assert {arg: getattr(args, arg) for arg in stage.args} == {a: values[a] for a in stage.args}
    module, name = stage.flow.split(":")
    flow = getattr(importlib.import_module(module), name)
    assert flow.name == stage.group  # the Prefect flow is named after its DVC stage
    assert set(inspect.signature(flow.fn).parameters) == {*stage.args, "root"}


def test_direction_is_checked_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["pretrain", "--direction", "sideways"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_runs_without_heavy_imports():
    """``ulmfit --help`` must not import torch, Prefect or MLflow (it is instant)."""
    code = (
        "import sys; from flows.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'prefect', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("[]")


def _project_copy(tmp_path: Path) -> Path:
    for name in ("profiles",):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_profile_list_and_switch(tmp_path, monkeypatch, capsys):
    project = _project_copy(tmp_path)
    monkeypatch.chdir(project)
    assert main(["profile", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "default" in listing and "paper-slice" in listing
    assert main(["profile", "paper"]) == 0
    assert (project / "params.yaml").read_text() == (project / "profiles/paper.yaml").read_text()
    assert main(["profile", "default"]) == 0
    assert (project / "params.yaml").read_text() == (ROOT / "profiles/default.yaml").read_text()


def test_unknown_profile_is_a_clean_input_error(tmp_path, monkeypatch, capsys):
    project = _project_copy(tmp_path)
    monkeypatch.chdir(project)
    before = (project / "params.yaml").read_text()
    assert main(["profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "Fix:" in err and "default" in err
    assert (project / "params.yaml").read_text() == before


def test_broken_profile_never_replaces_params(tmp_path, monkeypatch, capsys):
    project = _project_copy(tmp_path)
    broken = (project / "profiles" / "default.yaml").read_text().replace("  model:", "  modle:", 1)
    (project / "profiles" / "broken.yaml").write_text(broken)
    monkeypatch.chdir(project)
    before = (project / "params.yaml").read_text()
    assert main(["profile", "broken"]) == 2
    assert "modle" in capsys.readouterr().err
    assert (project / "params.yaml").read_text() == before


def test_predict_reports_missing_model_and_input_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    source = tmp_path / "in.csv"
    source.write_text("text\nhello\n")
    ulmfit = str(Path(sys.executable).with_name("ulmfit"))
    for args, needle in [
        (["--model", str(tmp_path / "nomodel"), "--input", str(source)], "classifier.json"),
        (["--model", str(tmp_path), "--input", str(tmp_path / "missing.csv")], "missing.csv"),
    ]:
        result = subprocess.run(
            [ulmfit, "predict", *args, "--output", str(tmp_path / "o.csv")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and "Fix:" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.csv").exists()


def test_repro_passes_every_argument_to_dvc_options_first_included():
    from flows.cli import _split_repro, build_parser

    for given in (["--force", "report"], ["--single-item", "pretrain@fwd"], ["report"], []):
        argv, dvc_args = _split_repro(["-v", "repro", *given])
        assert dvc_args == given
        assert build_parser().parse_args(argv).command == "repro"
    assert _split_repro(["repro", "--help"])[1] is None
    assert _split_repro(["predict", "--model", "x"])[1] is None
