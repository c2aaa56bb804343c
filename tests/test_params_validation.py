"""Every value of ``params.yaml`` is checked before any work: types, ranges, choices, names and
local paths, every problem at once, each naming its key path, the value given and the fix;
``ulmfit repro`` refuses a bad file (and a busy workspace) at once, before any server starts."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.params import load_params
from tasks.pipeline import EXIT_BUSY, EXIT_INPUT_ERROR
from ulmfit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
ULMFIT = str(Path(sys.executable).with_name("ulmfit"))


def _default() -> dict:
    return yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())


def _set(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _refusal(tmp_path: Path, data: dict) -> InputError:
    with pytest.raises(InputError) as info:
        load_params(_write(tmp_path, data))
    return info.value


A_CONTROL = {"dataset": "bbc_news"}

# (key set, value written, key path the error names, the value as the error shows it)
WRONG_VALUES = [
    ("pretrain.train.epochs", "ten", "pretrain.train.epochs", "'ten'"),
    ("pretrain.train.lr", "0.01x", "pretrain.train.lr", "'0.01x'"),
    ("classifier.train.lr", "nan", "classifier.train.lr", "'nan'"),
    ("finetune.train.lr", "1_000", "finetune.train.lr", "'1_000'"),
    ("evaluate.batch_size", -1, "evaluate.batch_size", "-1"),
    ("wikipedia.kind", "dumpp", "wikipedia.kind", "'dumpp'"),
    ("datasets.bbc_news.source.path", "data/raw/bbc", "datasets.bbc_news.source.path", "bbc"),
    ("wikipedia.path", "dumps/enwiki.xml.bz2", "wikipedia.path", "enwiki.xml.bz2"),
    ("pretrain.model.input_dropout", -0.1, "pretrain.model.input_dropout", "-0.1"),
    (
        "datasets.bbc_news.source.valid_fraction",
        1.5,
        "datasets.bbc_news.source.valid_fraction",
        "1.5",
    ),
    ("finetune.train.amp", "fp8", "finetune.train.amp", "'fp8'"),
    ("classifier.train.optim.name", "sgd", "classifier.train.optim.name", "'sgd'"),
    ("controls", {"c": {"dataset": "imbd"}}, "controls.c.dataset", "'imbd'"),
    ("controls", {"c": {**A_CONTROL, "encoder": "random"}}, "controls.c.encoder", "'random'"),
    ("controls", {"c": {**A_CONTROL, "labels": 1}}, "controls.c.labels", "1"),
    ("controls", {"c d": A_CONTROL}, "controls.c d", "'c d'"),
    ("tokenizer.model_type", "wordpiece", "tokenizer.model_type", "'wordpiece'"),
    ("tokenizer.vocab_size", 4000.5, "tokenizer.vocab_size", "4000.5"),
    ("tokenize.chunk_docs", "256", "tokenize.chunk_docs", "'256'"),
    ("pretrain.device", "gpu", "pretrain.device", "'gpu'"),
    ("pretrain.threads", -1, "pretrain.threads", "-1"),
    ("pretrain.dropout_multiplier", 5, "pretrain.dropout_multiplier", "5"),
    ("pretrain.train.optim.betas", [0.9], "pretrain.train.optim.betas", "[0.9]"),
    ("pretrain.train.snapshot_steps", [0], "pretrain.train.snapshot_steps[0]", "0"),
    ("finetune.train.batch_size", 0, "finetune.train.batch_size", "0"),
    ("finetune.splits", ["train", "dev"], "finetune.splits[1]", "'dev'"),
    ("finetune.max_docs", 0, "finetune.max_docs", "0"),
    ("classifier.train.schedule.cut_frac", 1.0, "classifier.train.schedule.cut_frac", "1.0"),
    ("classifier.train.patience", -2, "classifier.train.patience", "-2"),
    ("classifier.model.head_dropouts", [0.4, 1.2], "classifier.model.head_dropouts[1]", "1.2"),
    ("classifier.lrs", [0.01, -0.02], "classifier.lrs[1]", "-0.02"),
    ("evaluate.register", "yes", "evaluate.register", "'yes'"),
    ("datasets.bbc_news.directions", ["bwd"], "datasets.bbc_news.directions", "['bwd']"),
    ("datasets.bbc_news.source.sha256", "abc", "datasets.bbc_news.source.sha256", "'abc'"),
    ("datasets.bbc_news.source.layout", "sheet", "datasets.bbc_news.source.layout", "'sheet'"),
    ("datasets.bbc_news.source.encoding", "utf-9", "datasets.bbc_news.source.encoding", "'utf-9'"),
    ("datasets.tickets", {"source": {}}, "datasets.tickets.source.layout", "'tickets'"),
    ("datasets.bbc-news", {"source": {"name": "bbc_news"}}, "datasets.bbc-news", "'bbc-news'"),
    ("wikipedia.valid_fraction", 0, "wikipedia.valid_fraction", "0"),
    ("baseline.c_grid", [], "baseline.c_grid", "[]"),
    ("mlflow.experiment", "", "mlflow.experiment", "''"),
    ("report.decimals", -1, "report.decimals", "-1"),
]


@pytest.mark.parametrize(
    ("key", "value", "named", "shown"), WRONG_VALUES, ids=[row[2] for row in WRONG_VALUES]
)
def test_a_wrong_value_is_refused_naming_key_value_and_fix(tmp_path, key, value, named, shown):
    data = _default()
    _set(data, key, value)
    error = _refusal(tmp_path, data)
    assert len(error.details) == 1, str(error)
    line = error.details[0]
    assert line.startswith(f"{named}: "), line
    assert shown in line and "expected" in line and "Fix: " in line, line
    assert "params.yaml" in str(error) and "Traceback" not in str(error)


@pytest.mark.parametrize("controls", ["null", "absent"])
def test_controls_must_be_there_even_when_empty(tmp_path, controls):
    """dvc.yaml's control stage iterates over ``controls``: without it DVC refuses the whole
    pipeline with its own message ("failed to resolve 'stages.control.foreach'")."""
    data = _default()
    if controls == "null":
        data["controls"] = None
    else:
        del data["controls"]
    (line,) = _refusal(tmp_path, data).details
    assert line.startswith("controls: missing or empty (null)") and "controls: {}" in line


def test_at_least_22_wrong_values_are_tried():
    assert len(WRONG_VALUES) >= 22


def test_every_problem_is_reported_at_once_one_per_line(tmp_path):
    data = _default()
    _set(data, "pretrain.train.epochs", "ten")
    _set(data, "evaluate.batch_size", -1)
    _set(data, "wikipedia.kind", "dumpp")
    _set(data, "datasets.bbc_news.source.path", "data/raw/bbc")
    _set(data, "classifier.train.optim.nmae", "adam")
    data["controls"] = {"c": {"dataset": "imbd", "labels": 1}}
    error = _refusal(tmp_path, data)
    keys = sorted(line.split(": ")[0] for line in error.details)
    assert keys == [
        "classifier.train.optim.nmae",
        "controls.c.dataset",
        "controls.c.labels",
        "datasets.bbc_news.source.path",
        "evaluate.batch_size",
        "pretrain.train.epochs",
        "wikipedia.kind",
    ]
    assert "7 invalid values" in str(error)
    assert str(error).count("\n  ") == 7  # one indented line each


def test_a_bad_shared_value_is_reported_once_not_per_dataset(tmp_path):
    data = _default()
    data["datasets"]["other"] = {"source": {"name": "bbc_news"}}
    data["controls"] = {"c": A_CONTROL}
    _set(data, "classifier.train.lr", "fast")
    error = _refusal(tmp_path, data)
    assert [line.split(": ")[0] for line in error.details] == ["classifier.train.lr"]
    # A dataset that writes the bad value itself is named too.
    _set(data, "datasets.other.classifier", {"train": {"lr": "fast"}})
    error = _refusal(tmp_path, data)
    assert [line.split(": ")[0] for line in error.details] == [
        "classifier.train.lr",
        "datasets.other.classifier.train.lr",
    ]


@pytest.mark.parametrize("text", ["0.01", "1e-3", "2.5E+2", ".5", "3"])
def test_a_float_field_reads_a_plain_float_literal_written_as_text(tmp_path, text):
    """PyYAML (YAML 1.1) reads ``1e-3`` as text: a float field accepts text that is exactly a
    float literal, and a whole number."""
    data = _default()
    _set(data, "classifier.train.lr", text)
    _set(data, "finetune.train.lr", 1)
    params = load_params(_write(tmp_path, data))
    assert params.classifier.train.lr == float(text)
    assert params.finetune.train.lr == 1.0 and isinstance(params.finetune.train.lr, float)


def test_negative_float_literal_is_read_then_refused_by_its_range(tmp_path):
    data = _default()
    _set(data, "classifier.train.lr", "-2.5E+2")
    error = _refusal(tmp_path, data)
    assert "classifier.train.lr: got '-2.5E+2'" in error.details[0] and "> 0" in error.details[0]


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("classifier.train.lr", "inf", "'inf'"),
        ("classifier.train.lr", "0,01", "'0,01'"),
        ("classifier.train.lr", " 0.01", "' 0.01'"),
        ("classifier.train.lr", True, "true"),
        ("pretrain.train.epochs", "10", "'10'"),  # text is read as a number for floats only
        ("pretrain.train.epochs", 2.0, "2.0"),
        ("pretrain.train.epochs", True, "true"),
        ("report.title", 2024, "2024"),
    ],
)
def test_types_are_strict_otherwise(tmp_path, key, value, shown):
    data = _default()
    _set(data, key, value)
    line = _refusal(tmp_path, data).details[0]
    assert line.startswith(f"{key}: got {shown}") and "Fix: " in line, line


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_validates(path):
    load_params(path, root=ROOT)  # their data paths (../shared/data) start at the project root


def test_local_paths_start_at_the_project_root_and_urls_and_packages_are_not_checked(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.csv").write_text("text,label\nhi,a\n")
    data = _default()
    data["datasets"]["bbc_news"]["source"].update(
        train_path="raw/train.csv", test_path="https://example.invalid/test.csv"
    )
    assert load_params(_write(tmp_path, data)).datasets["bbc_news"].source.train_path
    # A profile can be picked before its data are in place; the pipeline checks them.
    data["datasets"]["bbc_news"]["source"]["train_path"] = "raw/nope.csv"
    load_params(_write(tmp_path, data), check_paths=False)


# ------------------------------------------------------------------------- the command line


def _project(tmp_path: Path, data: dict | None = None) -> Path:
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    _write(tmp_path, data if data is not None else _default())
    return tmp_path


def _guarded_env(project: Path) -> dict[str, str]:
    """If a regression let ``ulmfit repro`` get that far, it could neither start a Prefect
    server (one is named) nor write the project's MLflow database."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'guard-mlflow.db'}"
    env.pop("ULMFIT_WORKSPACE_HOLDER", None)
    return env


def _ulmfit(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ULMFIT, *args],
        cwd=project,
        env=_guarded_env(project),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _bad(data: dict | None = None) -> dict:
    data = copy.deepcopy(data or _default())
    _set(data, "pretrain.train.epochs", "ten")
    _set(data, "evaluate.batch_size", -1)
    return data


def test_repro_refuses_bad_params_at_once(tmp_path):
    project = _project(tmp_path, _bad())
    result = _ulmfit(project, "repro")
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert "pretrain.train.epochs: got 'ten'" in result.stderr
    assert "evaluate.batch_size: got -1" in result.stderr
    assert "Traceback" not in result.stderr and "warning" not in result.stderr.lower()
    assert not (project / "guard-mlflow.db").exists()  # no MLflow pipeline run
    assert not (project / "runs").exists()  # no lock, no Prefect home, no server log


def test_repro_checks_before_starting_a_server(tmp_path, monkeypatch, capsys):
    """In process, with no Prefect server named: the server and MLflow are never reached."""
    import flows.repro
    from flows.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("a Prefect server or MLflow run was started")

    monkeypatch.setattr(flows.repro, "prefect_server", refuse)
    monkeypatch.setattr(flows.repro, "_start_parent_run", refuse)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(_project(tmp_path, _bad()))
    assert main(["repro"]) == EXIT_INPUT_ERROR
    assert "pretrain.train.epochs" in capsys.readouterr().err


def test_a_stage_command_refuses_bad_params_before_its_flow(tmp_path):
    project = _project(tmp_path, _bad())
    result = _ulmfit(project, "prepare-wikipedia")
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert "evaluate.batch_size: got -1" in result.stderr and "Traceback" not in result.stderr
    assert not (project / "data").exists()


@pytest.mark.parametrize("holder", ["repro", "stage"])
def test_a_second_repro_fails_at_once_while_the_workspace_is_held(tmp_path, holder):
    """While a ``ulmfit repro`` (or a stage command) holds the workspace, another ``ulmfit
    repro`` exits 75 with one line, before any Prefect server or MLflow run."""
    from tasks.workspace import repro_lock, workspace_lock

    project = _project(tmp_path)
    lock = repro_lock(project) if holder == "repro" else workspace_lock(project, "pretrain@fwd")
    with lock:
        result = _ulmfit(project, "repro")
    assert result.returncode == EXIT_BUSY, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "busy" in lines[0], lines
    assert ("ulmfit repro" if holder == "repro" else "pretrain@fwd") in lines[0]
    assert not (project / "guard-mlflow.db").exists()
    assert not (project / "runs" / "prefect").exists()


def test_the_stages_of_a_repro_take_the_stage_lock_as_usual(tmp_path):
    from tasks.workspace import WorkspaceBusy, repro_lock, workspace_lock

    with repro_lock(tmp_path):
        with workspace_lock(tmp_path, "pretrain@fwd"):
            pass
        with pytest.raises(WorkspaceBusy, match="ulmfit repro"), repro_lock(tmp_path):
            pass
    with repro_lock(tmp_path):  # released at the end
        pass
