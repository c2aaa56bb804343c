"""Experiment review (docs/review.md): after a micro pipeline run as a user runs it, MLflow and
DVC show the results first, and an experiment compares with the reference run.

Real MLflow (the workspace's SQLite store), real DVC CLI in a git repository, real Prefect
server (started by ``ulmfit repro``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import BIN, make_workspace, micro_params, run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DATASET = "bbc_news"
HEADLINE = f"results/{DATASET}.json"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A reference run, committed as docs/review.md says (dvc.lock and results/)."""
    params = micro_params()
    params["controls"] = {}
    params["classifier"]["lrs"] = []  # classifier.train.lr is the one learning rate
    path = make_workspace(tmp_path_factory.mktemp("review") / "ws", params)
    run([str(BIN / "ulmfit"), "repro"], path, PREFECT_API_URL="")  # its own server, as a user's
    run(["git", "add", "dvc.lock", "results"], path)
    run(["git", "commit", "-qm", "reference run"], path)
    return path


def _client(workspace: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")


def _runs(workspace: Path) -> dict[str, list]:
    """Every run by its stage tag, oldest first."""
    client = _client(workspace)
    experiment = client.get_experiment_by_name("ulmfit")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    by_stage: dict[str, list] = {}
    for found in runs:
        by_stage.setdefault(found.data.tags["ulmfit.stage"], []).append(found)
    return by_stage


def test_the_experiment_opens_on_its_training_runs(workspace):
    experiment = _client(workspace).get_experiment_by_name("ulmfit")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "headline figures" in experiment.tags["mlflow.note.content"]


def test_the_pipeline_run_carries_its_stages_headline_figures(workspace):
    runs = _runs(workspace)
    (parent,) = runs["pipeline"]
    metrics = parent.data.metrics
    evaluation = runs[f"evaluate@{DATASET}"][-1].data.metrics
    for direction in ("fwd", "bwd"):
        assert metrics[f"{DATASET}.error_{direction}"] == evaluation[f"test_error_{direction}"]
        lm = runs[f"finetune_lm@{DATASET}-{direction}"][-1].data.metrics
        assert metrics[f"{DATASET}.ppl_{direction}"] == lm["valid_perplexity"]
    assert metrics[f"{DATASET}.error_ensemble"] == evaluation["test_error_ensemble"]
    baseline = runs[f"baseline@{DATASET}"][-1].data.metrics
    assert metrics[f"{DATASET}.error_tfidf"] == baseline["test_error"]
    artifacts = {a.path for a in _client(workspace).list_artifacts(parent.info.run_id)}
    assert {"results.md", f"{DATASET}.json"} <= artifacts
    assert parent.data.tags["ulmfit.dvc_command"] == "dvc repro"


def test_dvc_metrics_show_lists_the_headline_in_120_columns(workspace):
    shown = run([str(BIN / "dvc"), "metrics", "show"], workspace).stdout
    lines = shown.strip().splitlines()
    assert max(len(line) for line in lines) <= 120, shown
    header, row = lines
    assert header.split() == [
        "Path",
        "error_bwd",
        "error_ensemble",
        "error_fwd",
        "error_tfidf",
        "ppl_bwd",
        "ppl_fwd",
    ]
    headline = json.loads((workspace / HEADLINE).read_text())
    assert row.split()[0] == HEADLINE
    assert float(row.split()[2]) == pytest.approx(headline["error_ensemble"], rel=1e-4)


def test_dvc_plots_show_renders_curves_and_confusion_matrices_in_one_page(workspace):
    run([str(BIN / "dvc"), "plots", "show", "-o", "review-plots"], workspace)
    page = (workspace / "review-plots" / "index.html").read_text()
    for plot in (
        f"plots/{DATASET}/classifier_fwd.csv",  # loss curve
        f"reports/figures/{DATASET}/classifier_fwd.png",  # loss and LR schedule
        f"plots/{DATASET}/evaluate.csv",  # confusion matrix
        f"reports/figures/{DATASET}/evaluate.png",
        "reports/figures/wikipedia/pretrain_fwd.png",
    ):
        assert plot in page, plot


def _exp_rows(shown: list) -> list[dict]:
    """Every row of ``dvc exp show --json``: the commit and its experiments."""
    rows = []
    for commit in shown:
        rows.append(commit)
        for experiment in commit.get("experiments") or []:
            rows.extend(experiment["revs"])
    return rows


def test_an_experiment_compares_with_the_reference_run(workspace):
    before = json.loads((workspace / HEADLINE).read_text())
    result = run(
        [str(BIN / "ulmfit"), "exp", "run", "-S", "classifier.train.lr=0.02"],
        workspace,
        PREFECT_API_URL="",
    )
    assert "Running stage 'train_classifier@bbc_news-fwd'" in result.stdout + result.stderr
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], workspace).stdout)
    rows = {}
    for row in _exp_rows(shown):
        data = row["data"]
        lr = data["params"]["params.yaml"]["data"]["classifier"]["train"]["lr"]
        rows[lr] = data["metrics"][HEADLINE]["data"]
    table = run(
        [str(BIN / "dvc"), "exp", "show", "--drop", ".*", "--keep", "Experiment|error_|ppl_"],
        workspace,
        COLUMNS="200",
    ).stdout  # the command docs/review.md gives: one row each, the headline figures
    assert "error_ensemble" in table and "error_tfidf" in table and "master" in table, table
    assert len([line for line in table.splitlines() if "0." in line]) == 3, table
    reference_lr = micro_params()["classifier"]["train"]["lr"]
    assert rows[reference_lr] == before  # the committed reference run: main's row
    after = json.loads((workspace / HEADLINE).read_text())
    assert rows[0.02] == after  # the experiment's row
    # In MLflow, the two pipeline runs compare on the same figures.
    first, second = _runs(workspace)["pipeline"]
    assert second.data.params == {"classifier.train.lr": "0.02"}
    assert second.data.tags["ulmfit.dvc_command"] == "dvc exp run -S classifier.train.lr=0.02"
    for key in ("error_fwd", "error_bwd", "error_ensemble", "error_tfidf", "ppl_fwd"):
        assert first.data.metrics[f"{DATASET}.{key}"] == before[key]
        assert second.data.metrics[f"{DATASET}.{key}"] == after[key]


def test_the_pipeline_run_records_every_spelling_of_an_experiment_parameter():
    """``-S k=v``, ``-Sk=v``, ``--set-param=k=v`` and ``--set-param file:k=v`` all set a
    parameter for DVC; the pipeline run records each (the joined forms used to be missed)."""
    from flows.repro import set_params

    argv = ["exp", "run", "-S", "a.b=1", "-Sc=2", "--set-param=d=3", "--set-param"]
    argv += ["params.yaml:e=4", "--unknown-flag", "evaluate@trec6"]
    assert set_params(argv) == {"a.b": "1", "c": "2", "d": "3", "e": "4"}
    assert set_params(["repro", "evaluate@trec6"]) == {}
