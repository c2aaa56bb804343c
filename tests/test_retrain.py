"""Scheduled retraining: the promotion rule, the registry calls, and the deployed flow for real.

- ``decide`` and ``decision_markdown`` are pure and tested without servers;
- the MLflow calls (``read_candidate``, ``read_champion``, ``set_champion``, ``log_decision``) run
  against a throwaway SQLite store;
- ``test_deployed_retrain_promotes_only_a_better_model`` (slow) starts a real Prefect server, a
  ``process`` work pool and worker, and an MLflow server, all on 127.0.0.1; deploys the flow with
  the project's own ``prefect.yaml`` (its git-clone pull step included) and triggers it twice:
  once against a worse champion (promoted) and once against a better one (kept).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tasks import tracking
from tasks.promotion import (
    CHAMPION_ALIAS,
    KEPT_ALREADY_CHAMPION,
    KEPT_NO_METRIC,
    KEPT_NO_NEW_MODEL,
    KEPT_NOT_BETTER,
    PROMOTED_BETTER,
    PROMOTED_FIRST,
    RETRAIN_EXPERIMENT,
    ModelRecord,
    artifact_key,
    decide,
    decision_markdown,
    judge,
    log_decision,
    newest_version_number,
    read_candidate,
    read_champion,
    record_decision,
    set_champion,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (  # noqa: E402
    MlflowServer,
    PrefectServer,
    child_env,
    flow_run_logs,
    log_tail,
    start_prefect_server,
    start_process_worker,
    start_servers,
    wait_for_flow_run,
    wait_until,
)

METRIC = "test_error_ensemble"
MODEL = "ulmfit-news"


def record(version: str, error: float | None) -> ModelRecord:
    return ModelRecord(MODEL, version, f"run-{version}", error)


# --- the rule -----------------------------------------------------------------------------


def test_first_measured_model_becomes_champion():
    decision = decide("news", MODEL, METRIC, record("1", 0.2), None)
    assert decision.promote and decision.outcome == PROMOTED_FIRST
    assert decision.new_champion_version == "1"


def test_strictly_lower_error_is_promoted():
    decision = decide("news", MODEL, METRIC, record("3", 0.10), record("2", 0.12))
    assert decision.promote and decision.outcome == PROMOTED_BETTER
    assert "0.1000 < champion v2" in decision.reason
    assert decision.new_champion_version == "3"


@pytest.mark.parametrize("new_error", [0.12, 0.30])
def test_equal_or_higher_error_keeps_champion(new_error):
    decision = decide("news", MODEL, METRIC, record("3", new_error), record("2", 0.12))
    assert not decision.promote and decision.outcome == KEPT_NOT_BETTER
    assert decision.new_champion_version == "2"


def test_no_new_version_keeps_champion():
    decision = decide("news", MODEL, METRIC, None, record("2", 0.12))
    assert not decision.promote and decision.outcome == KEPT_NO_NEW_MODEL
    assert decision.new_champion_version == "2"


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_unmeasured_new_model_is_never_promoted(bad):
    assert decide("news", MODEL, METRIC, record("3", bad), None).outcome == KEPT_NO_METRIC
    assert not decide("news", MODEL, METRIC, record("3", bad), record("2", 0.5)).promote


def test_unmeasured_champion_is_kept_and_the_reason_says_so():
    decision = decide("news", MODEL, METRIC, record("3", 0.1), record("2", None))
    assert not decision.promote and decision.outcome == KEPT_NO_METRIC
    assert "champion v2" in decision.reason


def test_champion_itself_is_not_promoted_again():
    decision = decide("news", MODEL, METRIC, record("2", 0.1), record("2", 0.1))
    assert not decision.promote and decision.outcome == KEPT_ALREADY_CHAMPION


def test_markdown_report_names_versions_errors_and_reasons():
    decisions = [
        decide("news", MODEL, METRIC, record("3", 0.1), record("2", 0.2)),
        decide("trec", "ulmfit-trec", METRIC, None, None),
    ]
    text = decision_markdown(decisions)
    assert (
        "| news | ulmfit-news | **promoted** | 3 | 0.1000 | run-3 | 2 | 0.2000 | run-2 | 3 |"
        in text
    )
    assert "| trec | ulmfit-trec | kept | - | - | - | - | - | - | - |" in text
    assert decisions[0].reason in text and decisions[1].reason in text


def test_artifact_key_is_valid_for_prefect():
    assert artifact_key("Retrain Decision: bbc_news") == "retrain-decision-bbc-news"
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key("__"))


# --- the flow's helpers --------------------------------------------------------------------


def test_a_run_cannot_be_given_a_command_through_the_api():
    """Anyone who can reach the Prefect API can set a run's parameters, so they choose between
    fixed commands and never carry an argv (docs/deployment.md, "Who can run what")."""
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError

    from flows.retrain import RUNNERS, retrain

    assert retrain.validate_parameters({"runner": "dvc"})["runner"] == "dvc"
    assert RUNNERS == {"ulmfit": ("ulmfit", "repro"), "dvc": ("dvc", "repro")}
    with pytest.raises(ParameterTypeError, match="runner"):
        retrain.validate_parameters({"runner": "bash"})
    with pytest.raises(SignatureMismatchError, match="pipeline_command"):
        retrain.validate_parameters({"pipeline_command": ["bash", "-c", "id"]})


def test_prepare_stages_are_found_in_dvc_yaml_and_filtered_by_dataset(tmp_path):
    from tasks.commands import prepare_stages

    (tmp_path / "dvc.yaml").write_text(
        textwrap.dedent(
            """
            stages:
              prepare_wikipedia:
                cmd: echo wiki
              prepare_dataset:
                foreach: [imdb, trec]
                do:
                  cmd: echo ${item}
              evaluate:
                cmd: echo evaluate
            """
        )
    )
    subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"],
        cwd=tmp_path,
        check=True,
        env=child_env(),
        timeout=120,
    )
    everything = ["prepare_wikipedia", "prepare_dataset@imdb", "prepare_dataset@trec"]
    assert prepare_stages(tmp_path, None) == everything
    # The shared Wikipedia stage is always refreshed; other datasets' stages are left alone.
    assert prepare_stages(tmp_path, ["trec"]) == ["prepare_wikipedia", "prepare_dataset@trec"]


def test_refresh_reports_only_prepared_data_that_changed(tmp_path):
    """Forcing a prepare stage rewrites its outputs; only real upstream changes are reported,
    not run records that differ on every run."""
    from tasks.commands import changed_data

    upstream = tmp_path / "upstream.txt"
    upstream.write_text("first\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text(
        textwrap.dedent(
            f"""
            stages:
              prepare_dataset:
                cmd: cp {upstream} prepared.txt && date +%s%N > run_record.txt
                outs:
                  - prepared.txt
                  - run_record.txt:
                      cache: false
              train:
                cmd: wc -l prepared.txt > model.txt
                deps:
                  - prepared.txt
                outs:
                  - model.txt
            """
        )
    )
    dvc = str(Path(sys.executable).parent / "dvc")

    def run_dvc(*args: str) -> None:
        subprocess.run([dvc, *args], cwd=project, check=True, env=child_env(), timeout=120)

    run_dvc("init", "--no-scm", "-q")
    run_dvc("repro", "-q")
    run_dvc("repro", "-q", "--force", "--single-item", "prepare_dataset")
    assert changed_data(project, ["prepare_dataset"]) == []  # same data, new run record
    upstream.write_text("first\nsecond\n")
    run_dvc("repro", "-q", "--force", "--single-item", "prepare_dataset")
    assert changed_data(project, ["prepare_dataset"]) == ["prepared.txt"]


def test_bad_input_stops_the_refresh_without_retries():
    """A stage's bad-input exit code, from the command itself or from DVC's report of the stage
    it ran, is never retried; any other failure is."""
    from prefect.states import Failed

    from tasks.commands import BadInput, CommandFailed, retry_unless_bad_input, stopped_on_bad_input
    from tasks.pipeline import EXIT_INPUT_ERROR

    dvc_line = "ERROR: failed to reproduce 'prepare_dataset@imdb': failed to run: ulmfit "
    assert stopped_on_bad_input(EXIT_INPUT_ERROR, [])
    assert stopped_on_bad_input(255, [f"{dvc_line}prepare-dataset --dataset imdb, exited with 2"])
    assert not stopped_on_bad_input(
        255, [f"{dvc_line}prepare-dataset --dataset imdb, exited with 1"]
    )
    assert not stopped_on_bad_input(1, ["ulmfit prepare-dataset: error: x.csv: bad. Fix: y"])
    assert retry_unless_bad_input(None, None, Failed(data=BadInput("bad"))) is False
    assert retry_unless_bad_input(None, None, Failed(data=CommandFailed("network"))) is True


def test_model_names_follow_the_evaluate_stage(tmp_path):
    """The retrain flow reads params.yaml as the stages do and names each dataset's model as
    the evaluate stage registers it."""
    from tasks.params import load_params
    from tasks.registry import model_name

    data = yaml.safe_load((REPO_ROOT / "profiles" / "default.yaml").read_text())
    data["mlflow"]["model_name_prefix"] = "acme"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    params = load_params(tmp_path / "params.yaml")
    assert model_name(params.mlflow.model_name_prefix, "imdb") == "acme-imdb"
    assert list(params.datasets) == list(data["datasets"])


# --- the MLflow calls, on a local SQLite store -------------------------------------------


@pytest.fixture
def sqlite_client(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("pipeline", artifact_location=(tmp_path / "art").as_uri())
    return client, experiment


def register_version(client, experiment: str, error: float | None) -> tuple[str, str]:
    """A model version whose producing run logged ``error`` (registry bookkeeping only)."""
    run = client.create_run(experiment)
    if error is not None:
        client.log_metric(run.info.run_id, METRIC, error)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id)
    return str(version.version), run.info.run_id


def test_registry_reads_candidate_champion_and_moves_alias(sqlite_client, tmp_path):
    client, experiment = sqlite_client
    assert newest_version_number(client, MODEL) is None
    assert read_champion(client, MODEL, METRIC) is None  # no model at all

    v1, run1 = register_version(client, experiment, 0.30)
    assert read_champion(client, MODEL, METRIC) is None  # model but no alias
    candidate = read_candidate(client, MODEL, METRIC, newer_than=None)
    assert candidate == ModelRecord(MODEL, v1, run1, 0.30)
    first = decide("news", MODEL, METRIC, candidate, None)
    set_champion(client, first, flow_run_id="flow-1")
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version) == v1

    before = newest_version_number(client, MODEL)
    assert read_candidate(client, MODEL, METRIC, newer_than=before) is None
    v2, run2 = register_version(client, experiment, 0.25)
    v3, run3 = register_version(client, experiment, None)  # newest wins, even unmeasured
    candidate = read_candidate(client, MODEL, METRIC, newer_than=before)
    assert candidate == ModelRecord(MODEL, v3, run3, None)
    champion = read_champion(client, MODEL, METRIC)
    assert champion == ModelRecord(MODEL, v1, run1, 0.30)
    assert not decide("news", MODEL, METRIC, candidate, champion).promote

    better = decide("news", MODEL, METRIC, ModelRecord(MODEL, v2, run2, 0.25), champion)
    set_champion(client, better, flow_run_id="flow-2")
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version) == v2
    assert client.get_model_version(MODEL, v2).tags["promotion.flow_run_id"] == "flow-2"

    # record_decision keeps the decision's artifacts in the project, not in the ./mlruns of
    # whatever directory it runs in (MLflow's default for a database store: a test wrote into
    # the repository that way).
    run_id = record_decision.fn(tmp_path, better, "flow-2", {"data_changed": "yes"})
    assert client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    retrain = tracking.experiment_id(tmp_path, RETRAIN_EXPERIMENT)
    again = log_decision(client, better, experiment_id=retrain, flow_run_id="flow-2")  # retried
    assert again == run_id
    logged = client.get_run(run_id)
    assert logged.data.tags["decision"] == "promoted"
    assert logged.data.tags["outcome"] == PROMOTED_BETTER
    assert logged.data.tags["data_changed"] == "yes"
    assert logged.data.params["candidate_version"] == v2
    assert logged.data.params["champion_run_id"] == run1
    assert logged.data.metrics["candidate_error"] == pytest.approx(0.25)
    assert logged.data.metrics["error_improvement"] == pytest.approx(0.05)
    runs = client.search_runs([client.get_experiment_by_name(RETRAIN_EXPERIMENT).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]


def test_first_version_given_the_alias_at_registration_is_judged_a_first_model(sqlite_client):
    """The registry makes a model's first version champion when it registers it; the retrain
    flow, which saw no champion before the pipeline ran, records a first model, not a keep."""
    client, experiment = sqlite_client
    v1, _ = register_version(client, experiment, 0.3)
    client.set_registered_model_alias(MODEL, CHAMPION_ALIAS, v1)  # as tasks/registry.py does
    decision = judge(client, "news", MODEL, METRIC, newer_than=None, champion_before=None)
    assert decision.promote and decision.outcome == PROMOTED_FIRST
    # Had the alias been there before the run, the same state is "already champion".
    decision = judge(client, "news", MODEL, METRIC, newer_than=None, champion_before=v1)
    assert not decision.promote and decision.outcome == KEPT_ALREADY_CHAMPION


# --- the deployed flow, for real ----------------------------------------------------------

# A stand-in for the pipeline, cheap enough to run twice in a test: ``prepare`` copies and
# checks the upstream CSV (like the real prepare stages verify their sources); ``evaluate``
# trains a word-count naive Bayes classifier, measures its test error and registers it as a
# pyfunc model (raw text in, labels and probabilities out) under the same model name and
# metric name as the real evaluate stage (tasks/registry.py), which also tags the version with
# its error and makes a model's first version champion. (MLflow reserves the alias ``latest``:
# the newest version is ``models:/<name>/latest``.)
TINY_STAGE = '''
"""Tiny two-stage pipeline for the retrain test (see tests/test_retrain.py)."""
import collections, csv, hashlib, json, math, sys
from pathlib import Path

import mlflow
import pandas as pd
import yaml
PARAMS = yaml.safe_load(Path("params.yaml").read_text())
DATASET = next(iter(PARAMS["datasets"]))
MODEL = f"{PARAMS['mlflow']['model_name_prefix']}-{DATASET}"
PREPARED = Path("data") / DATASET / "prepared.csv"


def prepare():
    source = Path(PARAMS["datasets"][DATASET]["source"]["path"])
    rows = list(csv.DictReader(source.open(newline="")))
    if not rows or set(rows[0]) != {"text", "label"}:
        sys.exit(f"{source}: expected columns text,label. Fix: regenerate the upstream file")
    PREPARED.parent.mkdir(parents=True, exist_ok=True)
    PREPARED.write_text(source.read_text())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    (PREPARED.parent / "sources.json").write_text(json.dumps({str(source): digest}))


class WordCountClassifier(mlflow.pyfunc.PythonModel):
    """Multinomial naive Bayes over lower-cased words, with add-one smoothing."""

    def __init__(self, rows):
        self.labels = sorted({label for _, label in rows})
        self.counts = {label: collections.Counter() for label in self.labels}
        prior = collections.Counter(label for _, label in rows)
        for text, label in rows:
            self.counts[label].update(text.lower().split())
        self.vocab = set().union(*self.counts.values())
        self.log_prior = {c: math.log(prior[c] / len(rows)) for c in self.labels}
        self.totals = {c: sum(self.counts[c].values()) for c in self.labels}

    def proba(self, text):
        scores = {}
        for c in self.labels:
            denominator = self.totals[c] + len(self.vocab)
            scores[c] = self.log_prior[c] + sum(
                math.log((self.counts[c][w] + 1) / denominator) for w in text.lower().split()
            )
        top = max(scores.values())
        exp = {c: math.exp(s - top) for c, s in scores.items()}
        total = sum(exp.values())
        return {c: exp[c] / total for c in self.labels}

    def predict(self, context, model_input, params=None):
        texts = model_input["text"] if isinstance(model_input, pd.DataFrame) else model_input
        out = []
        for text in texts:
            p = self.proba(text)
            out.append({"label": max(p, key=p.get), **{f"prob_{c}": p[c] for c in self.labels}})
        return pd.DataFrame(out)


def evaluate(arranged_error=None):
    rows = [(r["text"], r["label"]) for r in csv.DictReader(PREPARED.open(newline=""))]
    # Rows come in (sport, weather) pairs; every fourth pair is held out for the test.
    train = [row for i, row in enumerate(rows) if (i // 2) % 4]
    test = [row for i, row in enumerate(rows) if not (i // 2) % 4]
    model = WordCountClassifier(train)
    predicted = model.predict(None, pd.DataFrame({"text": [t for t, _ in test]}))["label"]
    error = sum(p != y for p, (_, y) in zip(predicted, test)) / len(test)
    if arranged_error is not None:
        error = arranged_error  # a champion whose record the test arranges
    mlflow.set_experiment(PARAMS["mlflow"]["experiment"])
    with mlflow.start_run(run_name=f"{DATASET}/evaluate") as run:
        mlflow.set_tag("arranged_by_test", str(arranged_error is not None).lower())
        mlflow.log_metric("test_error_ensemble", error)
        info = mlflow.pyfunc.log_model(
            name="classifier", python_model=model, pip_requirements=["mlflow", "pandas"],
            registered_model_name=MODEL,
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(MODEL, version, "ulmfit.test_error", repr(error))
    if "champion" not in (client.get_registered_model(MODEL).aliases or {}):
        client.set_registered_model_alias(MODEL, "champion", version)  # first version
    Path("metrics.json").write_text(json.dumps({"test_error_ensemble": error}))
    print(json.dumps({"version": version, "run_id": run.info.run_id, "error": error}))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare()
    elif sys.argv[1] == "evaluate":
        evaluate()
    elif sys.argv[1] == "champion":  # the test's arranged champion: data as now, given error
        prepare()
        evaluate(float(sys.argv[2]))
'''

TINY_DVC = """
stages:
  prepare_dataset:
    foreach: ${datasets}
    do:
      cmd: python stage.py prepare
      deps:
        - stage.py
      params:
        - datasets.${key}.source
      outs:
        - data/${key}/prepared.csv
        - data/${key}/sources.json
  evaluate:
    cmd: python stage.py evaluate
    deps:
      - stage.py
      - data/news/prepared.csv
    metrics:
      - metrics.json:
          cache: false
"""


SPORT = [
    "goal",
    "match",
    "team",
    "striker",
    "keeper",
    "league",
    "cup",
    "penalty",
    "referee",
    "season",
    "coach",
    "stadium",
]
WEATHER = [
    "rain",
    "wind",
    "storm",
    "forecast",
    "cloud",
    "sunny",
    "snow",
    "frost",
    "humid",
    "thunder",
    "drizzle",
    "breeze",
]


def write_upstream(path: Path, pairs: int) -> None:
    """A labelled CSV of short texts drawn deterministically from two topic vocabularies: one
    (sport, weather) pair of rows per step, with shared filler words, and every eighth sport
    row written with weather words (label noise, as in real corpora), so that the classifier's
    test error is above zero."""
    shared = ["today", "the", "big", "report", "says"]
    lines = ["text,label"]
    for i in range(pairs):
        for label, words in (("sport", SPORT), ("weather", WEATHER)):
            if label == "sport" and i % 8 == 0:
                words = WEATHER
            picked = [words[(i * 7 + k * 5) % len(words)] for k in range(3)]
            picked += [shared[(i + k) % len(shared)] for k in range(1 + i % 3)]
            lines.append(f"{' '.join(picked)},{label}")
    path.write_text("\n".join(lines) + "\n")


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=retrain-test", "-c", "user.email=retrain-test@localhost", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        env=child_env(),
        timeout=60,
    )


def build_fleet_repository(root: Path, upstream: Path) -> Path:
    """A git repository laid out like this project (the flow, its tasks, the library,
    prefect.yaml) whose dvc.yaml is the tiny pipeline: what the worker's git-clone pull step
    fetches."""
    repo = root / "ulmfit-fleet"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("flows", "tasks", "ulmfit"):
        shutil.copytree(REPO_ROOT / package, repo / package, ignore=ignore)
    shutil.copy2(REPO_ROOT / "prefect.yaml", repo / "prefect.yaml")
    (repo / "stage.py").write_text(textwrap.dedent(TINY_STAGE).lstrip())
    (repo / "dvc.yaml").write_text(textwrap.dedent(TINY_DVC).lstrip())
    # The project's default parameters (the retrain flow validates them as the stages do),
    # with one dataset of the user's own (a text,label CSV) whose source the tiny stage reads.
    params = yaml.safe_load((REPO_ROOT / "profiles" / "default.yaml").read_text())
    source = {"name": "news", "layout": "table", "path": str(upstream)}
    params["datasets"] = {"news": {"source": source}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n/data/\n/mlflow.db\n")
    git(repo, "init", "-q", "-b", "main")
    subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "init", "-q"],
        cwd=repo,
        check=True,
        env=child_env(),
        timeout=120,
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny pipeline for the retrain test")
    return repo


def arrange_champion(repo: Path, mlflow_env: dict[str, str], error: float) -> str:
    """Register a real model version whose run logged ``error`` and make it the champion."""
    from mlflow import MlflowClient

    env = child_env({**mlflow_env, "PYTHONPATH": str(repo)})
    result = subprocess.run(
        [sys.executable, "stage.py", "champion", str(error)],
        cwd=repo,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    version = json.loads(result.stdout.strip().splitlines()[-1])["version"]
    client = MlflowClient(mlflow_env["MLFLOW_TRACKING_URI"], mlflow_env["MLFLOW_REGISTRY_URI"])
    client.set_registered_model_alias(MODEL, CHAMPION_ALIAS, version)
    return version


def trigger(prefect, repo: Path) -> str:
    """``prefect deployment run`` as a user would; returns the flow run id. The stand-in
    pipeline runs with a bare ``dvc repro`` (``ulmfit repro`` reads the real params.yaml)."""
    result = prefect.run_cli(
        "deployment",
        "run",
        "retrain/retrain-gpu",
        "--params",
        json.dumps({"runner": "dvc"}),
        cwd=repo,
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    return match.group(1)


def finished_run(prefect, flow_run_id: str, worker, timeout: float = 240.0) -> dict:
    run = wait_for_flow_run(prefect, flow_run_id, timeout=timeout, worker=worker)
    state = run["state"]["type"]
    assert state == "COMPLETED", (
        f"flow run {flow_run_id} ended {state}\n--- flow run logs ---\n"
        f"{flow_run_logs(prefect, flow_run_id)}\n--- worker log ---\n{log_tail(worker.log_path)}"
    )
    return run


def decision_run(client, flow_run_id: str):
    experiment = client.get_experiment_by_name(RETRAIN_EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert len(runs) == 1, [r.data.tags for r in runs]
    return runs[0]


def markdown_artifact(prefect, flow_run_id: str) -> str:
    artifacts = prefect.api(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    markdown = [a for a in artifacts if a["type"] == "markdown"]
    assert len(markdown) == 1, artifacts
    assert markdown[0]["key"] == "retrain-decision"
    return markdown[0]["data"]


@dataclass
class Fleet:
    """Servers, a git repository to clone and the deployment made from its prefect.yaml."""

    prefect: PrefectServer
    mlflow: MlflowServer
    repo: Path
    upstream: Path
    workdir: Path
    deployment: dict


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    """The fleet set-up of docs/deployment.md, on 127.0.0.1: a Prefect server with the
    ``ulmfit-gpu`` process pool (one run at a time), the repository to clone set as Prefect
    variables, ``prefect deploy`` of the project's prefect.yaml, and a shared MLflow server."""
    workdir = tmp_path_factory.mktemp("fleet")
    upstream = workdir / "upstream" / "news.csv"
    upstream.parent.mkdir()
    write_upstream(upstream, pairs=24)
    repo = build_fleet_repository(workdir, upstream)
    with start_servers(workdir) as (prefect, mlflow_server):
        prefect.run_cli("work-pool", "create", "ulmfit-gpu", "--type", "process", cwd=repo)
        prefect.api("PATCH", "/work_pools/ulmfit-gpu", {"concurrency_limit": 1})
        for name, value in (("ulmfit_repository", str(repo)), ("ulmfit_branch", "main")):
            prefect.api("POST", "/variables/", {"name": name, "value": value})
        prefect.run_cli("deploy", "--name", "retrain-gpu", cwd=repo)
        deployment = prefect.api("GET", "/deployments/name/retrain/retrain-gpu")
        yield Fleet(prefect, mlflow_server, repo, upstream, workdir, deployment)


@pytest.mark.slow
def test_prefect_yaml_deploys_retrain_on_a_cron_to_the_gpu_pool(fleet):
    deployment = fleet.deployment
    assert deployment["entrypoint"] == "flows/retrain.py:retrain"
    assert deployment["work_pool_name"] == "ulmfit-gpu"
    assert [
        (s["schedule"]["cron"], s["schedule"]["timezone"]) for s in deployment["schedules"]
    ] == [("0 2 * * 0", "UTC")]
    assert deployment["parameters"] == {
        "project_dir": ".",
        "datasets": None,
        "metric": METRIC,
        "runner": "ulmfit",
        "refresh": True,
    }
    assert deployment["global_concurrency_limit"]["limit"] == 1  # one retrain at a time
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    clone = deployment["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    # Resolved by the worker at run time, so the URL can change without redeploying.
    assert clone["repository"] == "{{ prefect.variables.ulmfit_repository }}"


@pytest.mark.slow
def test_cron_schedule_creates_scheduled_runs(fleet):
    """The server's scheduler turns the cron into runs: Sundays 02:00 UTC."""
    found: list = []

    def scheduled() -> bool:
        found[:] = fleet.prefect.api(
            "POST",
            "/flow_runs/filter",
            {
                "flow_runs": {
                    "deployment_id": {"any_": [fleet.deployment["id"]]},
                    "state": {"type": {"any_": ["SCHEDULED"]}},
                }
            },
        )
        return bool(found)

    wait_until(scheduled, timeout=30, what="runs scheduled by the cron", interval=3)
    starts = [datetime.fromisoformat(run["expected_start_time"]) for run in found]
    assert all((start.weekday(), start.hour, start.minute) == (6, 2, 0) for start in starts), starts


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployed_retrain_promotes_only_a_better_model(fleet):
    """Two real runs of the deployment through the worker: a worse champion is replaced, a
    better one is kept; both decisions are in MLflow and in a Prefect artifact."""
    from mlflow import MlflowClient

    prefect, repo = fleet.prefect, fleet.repo
    mlflow_env = fleet.mlflow.client_env
    client = MlflowClient(fleet.mlflow.url, fleet.mlflow.url)

    # 1. The champion is worse than anything the pipeline makes: promoted.
    worse = arrange_champion(repo, mlflow_env, error=0.99)
    with start_process_worker(
        prefect, pool="ulmfit-gpu", workdir=fleet.workdir / "worker", extra_env=mlflow_env
    ) as worker:
        first = trigger(prefect, repo)
        finished_run(prefect, first, worker)

        promoted = client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS)
        assert int(promoted.version) > int(worse)
        new_error = client.get_run(promoted.run_id).data.metrics[METRIC]
        assert 0.0 < new_error < 0.99
        assert client.get_run(promoted.run_id).data.tags["arranged_by_test"] == "false"
        logged = decision_run(client, first)
        assert logged.data.tags["decision"] == "promoted"
        assert logged.data.tags["outcome"] == PROMOTED_BETTER
        assert logged.data.params["champion_version"] == worse
        assert logged.data.params["candidate_version"] == str(promoted.version)
        assert logged.data.metrics["champion_error"] == pytest.approx(0.99)
        assert logged.data.metrics["candidate_error"] == pytest.approx(new_error)
        assert logged.data.tags["refreshed_stages"] == "prepare_dataset@news"
        report = markdown_artifact(prefect, first)
        assert f"| news | {MODEL} | **promoted** | {promoted.version} |" in report

        # 2. New upstream data arrives, but the champion is better: kept.
        write_upstream(fleet.upstream, pairs=32)
        better = arrange_champion(repo, mlflow_env, error=0.0)
        second = trigger(prefect, repo)
        finished_run(prefect, second, worker)

        assert str(client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version) == better
        logged = decision_run(client, second)
        assert logged.data.tags["decision"] == "kept"
        assert logged.data.tags["outcome"] == KEPT_NOT_BETTER
        candidate = logged.data.params["candidate_version"]
        assert int(candidate) > int(better)  # a new model was made, and not promoted
        assert logged.data.metrics["candidate_error"] > logged.data.metrics["champion_error"] == 0.0
        assert "not strictly better" in logged.data.tags["reason"]
        assert logged.data.tags["data_changed"] == "data/news/prepared.csv"
        report = markdown_artifact(prefect, second)
        assert f"| news | {MODEL} | kept | {candidate} |" in report


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.skipif(
    os.environ.get("ULMFIT_RETRAIN_MICRO") != "1",
    reason="opt-in (set ULMFIT_RETRAIN_MICRO=1): the real pipeline twice, several minutes",
)
def test_retrain_flow_on_the_real_micro_pipeline(tmp_path):
    """The retrain flow around the real ULMFiT pipeline (``ulmfit repro`` on the micro config
    of tests/test_pipeline.py): the first model becomes champion; a second retrain with
    nothing new upstream registers nothing and keeps it."""
    from mlflow import MlflowClient
    from test_pipeline import make_workspace, micro_params

    workspace = make_workspace(tmp_path / "ws", micro_params())
    model = "ulmfit-bbc_news"
    with start_prefect_server(tmp_path / "prefect") as prefect:
        env = child_env({**prefect.env, "PYTHONPATH": str(workspace)})
        outcomes = []
        for _ in range(2):
            result = subprocess.run(
                [str(Path(sys.executable).with_name("ulmfit")), "retrain"],
                cwd=workspace,
                env=env,
                capture_output=True,
                text=True,
                timeout=1500,
            )
            assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
            client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
            experiment = client.get_experiment_by_name(RETRAIN_EXPERIMENT)
            latest = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
            outcomes.append(latest[0].data.tags["outcome"])
    assert outcomes == [PROMOTED_FIRST, KEPT_NO_NEW_MODEL]
    champion = client.get_model_version_by_alias(model, CHAMPION_ALIAS)
    assert str(champion.version) == "1"
    assert METRIC in client.get_run(champion.run_id).data.metrics
