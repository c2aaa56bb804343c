"""End to end: ``ulmfit repro`` (DVC + Prefect + MLflow) on a micro config in a temporary git
repository, then everything a user does with the result.

One pipeline run is shared by the slow tests here (module-scoped fixture): DVC metrics, MLflow runs
and their tags, a second ``dvc repro`` that does nothing, ``ulmfit predict``, the registered model
loaded and served. The destructive checks (a killed stage resumes, a second pipeline is refused,
corrupt input stops cleanly) run in a copy of that workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tasks.pipeline import BY_GROUP, STAGES, producer_of, stage_spec
from tasks.workspace import Layout

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ("ulmfit", "tasks", "flows", "profiles", "dvc.yaml", "pyproject.toml", ".dvcignore")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}

# The tests of the micro pipeline are marked slow (minutes); the checks of the stage table
# are not, so they run in the fast suite.
pytestmark = pytest.mark.timeout(1500)


def micro_params() -> dict:
    """The default profile shrunk to seconds per stage: a dozen Wikipedia articles, 40 BBC
    training articles, a 3-layer AWD-LSTM of width 32, a handful of steps."""
    params = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    params["wikipedia"].update(max_articles=12, valid_fraction=0.2)
    params["tokenizer"].update(vocab_size=600)
    params["tokenize"].update(workers=1)
    params["pretrain"]["model"].update(embed_size=16, hidden_size=32)
    params["pretrain"]["train"].update(batch_size=8, bptt=20, max_steps=12, checkpoint_every=4)
    # limit_rest: unsup (the profile's) puts the other training articles in unsup: 100 of them.
    params["datasets"]["bbc_news"]["source"].update(train_limit=40, test_limit=60, unsup_limit=100)
    for section in ("pretrain", "finetune", "classifier", "evaluate"):
        params[section]["threads"] = 1  # tiny models: one thread, as the suite always ran them
    params["finetune"].update(max_docs=60)
    params["finetune"]["train"].update(batch_size=8, bptt=20, max_steps=8, checkpoint_every=4)
    params["classifier"]["train"].update(batch_size=8, epochs=5, checkpoint_every=4)
    params["classifier"]["model"].update(bptt=20, max_len=200)
    params["evaluate"].update(batch_size=16)
    params["mlflow"].update(log_every_steps=1)
    params["classifier"]["train"].update(patience=1, keep_best=True)
    params["classifier"]["lrs"] = [0.01, 0.03]
    # The controls of the benchmark profile, one of each kind, on label subsets.
    params["controls"] = {
        "bbc_news-scratch-20": {"dataset": "bbc_news", "encoder": "scratch", "labels": 20},
        # The recipe as a grid dimension: ULMFiT's at 0.01 and 0.03, then one rate at 0.003.
        "bbc_news-ulmfit-20": {
            "dataset": "bbc_news",
            "labels": 20,
            "classifier": {"one_rate_lrs": [0.003]},
        },
        "bbc_news-no_pretraining": {"dataset": "bbc_news", "encoder": "lm_from_scratch"},
        "bbc_news-no_lm_finetuning": {
            "dataset": "bbc_news",
            "encoder": "pretrained",
            "classifier": {"train": {"gradual_unfreezing": False}},
        },
    }
    params["baseline"] = {"c_grid": [1.0, 10.0]}
    return params


def _env(workspace: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        **GIT_ENV,
        "PYTHONPATH": str(workspace),
        "TQDM_DISABLE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(
    args: list[str], workspace: Path, *, check: bool = True, timeout: float = 900, **env: str
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args,
        cwd=workspace,
        env=_env(workspace, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def make_workspace(path: Path, params: dict) -> Path:
    """A fresh git + DVC repository holding the project's code and ``params``."""
    path.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, path / name)
    (path / ".gitignore").write_text(
        "/data/\n/runs/\n/mlruns/\n/mlflow.db\n/reports/\n__pycache__/\n"
    )
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], path)
    run([str(BIN / "dvc"), "init", "-q"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "micro workspace"], path)
    return path


@pytest.fixture(scope="module")
def prefect_api_url():
    """One Prefect server for this module: the pipeline's stages and the in-process flows."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api_url) -> dict:
    """``ulmfit repro`` on the micro config, timed."""
    params = micro_params()
    # The ELMo-style control (issue 13): a head on the frozen fwd and bwd AWD-LSTM LMs.
    params["controls"]["bbc_news-elmo-20"] = {
        "dataset": "bbc_news",
        "encoder": "frozen_features",
        "labels": 20,
    }
    # One point of bbc_news-scratch-20's grid alone, as the benchmark profile cuts a grid.
    params["controls"]["bbc_news-scratch-20-cut"] = {
        "dataset": "bbc_news",
        "encoder": "scratch",
        "labels": 20,
        "classifier": {"lrs": [0.003]},
    }
    workspace = make_workspace(tmp_path_factory.mktemp("pipeline") / "ws", params)
    started = time.monotonic()
    result = run(
        [str(BIN / "ulmfit"), "repro"],
        workspace,
        PREFECT_API_URL=prefect_api_url,
        ULMFIT_PIPELINE_ID="test-pipeline",
    )
    return {"workspace": workspace, "seconds": time.monotonic() - started, "result": result}


def _lock(workspace: Path) -> dict:
    return yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]


def _mlflow_client(workspace: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


# ------------------------------------------------------------------------------ the main run


@pytest.mark.slow
def test_every_stage_ran_and_wrote_its_outputs(pipeline):
    workspace = pipeline["workspace"]
    stages = _lock(workspace)
    expected = {
        "prepare_wikipedia",
        "train_tokenizer",
        "tokenize_wikipedia",
        "pretrain@fwd",
        "pretrain@bwd",
        "prepare_dataset@bbc_news",
        "tokenize_dataset@bbc_news",
        "finetune_lm@bbc_news-fwd",
        "finetune_lm@bbc_news-bwd",
        "train_classifier@bbc_news-fwd",
        "train_classifier@bbc_news-bwd",
        "evaluate@bbc_news",
        "baseline@bbc_news",
        "control@bbc_news-scratch-20",
        "control@bbc_news-scratch-20-cut",
        "control@bbc_news-ulmfit-20",
        "control@bbc_news-no_pretraining",
        "control@bbc_news-no_lm_finetuning",
        "control@bbc_news-elmo-20",
        "report",
    }
    assert expected == set(stages)
    results = (workspace / Layout.results).read_text()
    assert "bbc_news" in results and "MLflow run" in results
    for heading in ("## Setting", "## Bars", "## Ablations and baseline", "## Sample efficiency"):
        assert heading in results, heading
    assert (workspace / Layout.sample_efficiency).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for figure in ("wikipedia/pretrain_fwd", "bbc_news/classifier_bwd", "bbc_news/evaluate"):
        png = workspace / f"reports/figures/{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    # No checkpoints are left once a stage has finished, and no staging folders either.
    assert not any((workspace / Layout.checkpoints).rglob("*.pt"))
    assert not [p for p in (workspace / "data").rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
def test_controls_and_baseline_record_what_they_trained(pipeline):
    workspace = pipeline["workspace"]
    read = lambda path: json.loads((workspace / path).read_text())  # noqa: E731
    scratch = read("metrics/controls/bbc_news-scratch-20.json")
    assert scratch["encoder"] == "scratch" and scratch["train_documents"] == 20
    # The dataset's lr grid, then each rate divided by 10 (from scratch only).
    assert [c["lr"] for c in scratch["grid_search"]] == [0.01, 0.03, 0.001, 0.003]
    assert scratch["lr"] in (0.01, 0.03, 0.001, 0.003) and 0 <= scratch["test_error"] <= 1
    no_pretraining = read("metrics/controls/bbc_news-no_pretraining.json")
    assert no_pretraining["lm_valid_perplexity"] > 1  # its own LM, fine-tuned from scratch
    assert (workspace / "data/controls/bbc_news-no_pretraining/lm/model.pt").is_file()
    baseline = read("metrics/bbc_news/baseline.json")
    assert [r["labels"] for r in baseline["runs"]] == [None, 20]
    assert baseline["subsets"]["20"]["train_documents"] == 20
    assert baseline["train_documents"] == 40 and baseline["C"] in (1.0, 10.0)
    ulmfit = read("metrics/controls/bbc_news-ulmfit-20.json")
    searched = [(c["lr"], c["one_rate"]) for c in ulmfit["grid_search"]]
    assert searched == [(0.01, False), (0.03, False), (0.003, True)]
    chosen = min(ulmfit["grid_search"], key=lambda c: c["valid_error"])
    assert (ulmfit["lr"], ulmfit["one_rate"]) == (chosen["lr"], chosen["one_rate"])
    record = read("metrics/runs/controls/bbc_news-scratch-20.json")
    assert record["mlflow_run_id"] and record["wall_seconds"] > 0


@pytest.mark.slow
def test_a_grid_point_trains_alone_as_in_its_grid(pipeline):
    """Each classifier of a search starts from the same seed, so a grid cut to one of its
    points (the benchmark profile's from-scratch arm at 5,000 IMDb labels) trains that point
    bit for bit as the whole grid did."""
    workspace = pipeline["workspace"]
    read = lambda name: json.loads((workspace / f"metrics/controls/{name}.json").read_text())  # noqa: E731
    grid = read("bbc_news-scratch-20")["grid_search"]
    alone = read("bbc_news-scratch-20-cut")
    assert alone["grid_search"] == [point for point in grid if point["lr"] == 0.003]
    assert alone["valid_error"] == alone["grid_search"][0]["valid_error"]
    # A tiny validation set can give two different trainings one error; their losses, step by
    # step, cannot coincide (a grid logs each point under its folder, one point without).
    client, _ = _mlflow_client(workspace)
    run_of = lambda name: json.loads(  # noqa: E731
        (workspace / f"metrics/runs/controls/{name}.json").read_text()
    )["mlflow_run_id"]
    losses = lambda name, key: [  # noqa: E731
        (m.step, m.value) for m in client.get_metric_history(run_of(name), key)
    ]
    in_grid = losses("bbc_news-scratch-20", "lr-0.003/train_loss")
    assert in_grid and losses("bbc_news-scratch-20-cut", "train_loss") == in_grid


@pytest.mark.slow
def test_the_linear_probe_compares_another_fine_tuning_of_the_same_lm(pipeline, tmp_path):
    """bench/bench_probe.py --compare: another workspace's fine-tuned LM is one more row (the
    same LM gives the same probe), and a workspace that started from another pretrained LM is
    refused in one line naming the file."""
    workspace = pipeline["workspace"]
    other = tmp_path / "other"
    from tasks.tokens import TOKENIZER_FILE
    from tasks.training import MODEL_FILE

    pretrained = Path(Layout.pretrained("fwd"), MODEL_FILE)
    for relative in (
        pretrained,
        Path(Layout.tokenizer_dir, TOKENIZER_FILE),
        Path(Layout.finetuned("bbc_news", "fwd"), MODEL_FILE),
    ):
        (other / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workspace / relative, other / relative)
    probe = [sys.executable, str(ROOT / "bench" / "bench_probe.py"), "--workspace", str(workspace)]
    probe += ["--dataset", "bbc_news", "--labels", "20", "--threads", "1", "--compare", str(other)]
    out = tmp_path / "probe.md"
    run([*probe, "--out", str(out)], workspace)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| fwd")]
    names = [row[1] for row in rows]
    assert names[0] == "random encoder (no LM)" and names[-3] == "pretrained LM"
    assert names[-2:] == [
        f"bbc_news fine-tuned LM ({workspace.name})",
        "bbc_news fine-tuned LM (other)",
    ]
    assert rows[-1][2:] == rows[-2][2:]  # tokens, probe errors and C
    assert f"--compare {other} --out bench/results/probe.md" in out.read_text()
    (other / pretrained).write_bytes(b"another LM")
    refused = run([*probe, "--out", str(tmp_path / "refused.md")], workspace, check=False)
    assert refused.returncode != 0 and not (tmp_path / "refused.md").exists()
    assert refused.stderr.strip().splitlines() == [
        f"{other / pretrained}: missing or not the file of {workspace}. Fix: --compare a copy of "
        "that workspace whose LM fine-tuning alone differs"
    ]


@pytest.mark.slow
def test_the_seed_ensemble_bench_reproduces_the_stages_errors_and_refuses_other_data(
    pipeline, tmp_path
):
    """bench/seed_ensemble.py: each classifier alone, and the workspace's fwd + bwd, score what
    the evaluate and control stages recorded, and again when scored again; a
    workspace whose documents differ is refused in one line, with no table written."""
    workspace = pipeline["workspace"]
    evaluated = json.loads(
        (workspace / stage_spec("evaluate", dataset="bbc_news").metrics).read_text()
    )
    control = "bbc_news-ulmfit-20"
    spec = stage_spec("control", name=control, dataset="bbc_news")
    control_error = json.loads((workspace / spec.metrics).read_text())["test_error"]
    bench = [sys.executable, str(ROOT / "bench" / "seed_ensemble.py"), "--dataset", "bbc_news"]
    bench += ["--batch-size", str(micro_params()["evaluate"]["batch_size"]), "--threads", "1"]
    members = ["--member", f"a={workspace}", "--member", f"b={workspace}:{control}"]
    out = tmp_path / "ensemble.md"
    run([*bench, *members, "--member", f"again={workspace}", "--out", str(out)], workspace)
    test = {
        row.split(" | ")[0].removeprefix("| "): float(row.split(" | ")[3].split()[0])
        for row in out.read_text().splitlines()
        if row.startswith("| ") and row.split(" | ")[1][0].isdigit()
    }
    percent = lambda error: round(100 * error, 2)  # noqa: E731
    assert test["a, fwd"] == test["again, fwd"] == percent(evaluated["test_error_fwd"])
    assert test["a, bwd"] == percent(evaluated["test_error_bwd"])
    assert test["a (fwd + bwd)"] == percent(evaluated["test_error_ensemble"])
    assert test["b, fwd"] == percent(control_error)
    assert test["again (fwd + bwd)"] == test["a (fwd + bwd)"]
    assert {
        "any 2 of the 3 members: mean (lowest to highest) over the 3 choices",
        "all 3 members",
    } <= set(test)
    assert f'--member "b={workspace}:{control}"' in out.read_text()
    assert "| 3 to 4 |" in out.read_text()  # two members of 2 classifiers and one of 1
    twice = run([*bench, *members[:2], *members[:2]], workspace, check=False)
    assert twice.returncode != 0 and "--member names must differ" in twice.stderr
    other = tmp_path / "other"
    shutil.copytree(workspace / "data", other / "data")
    shutil.copy2(workspace / "params.yaml", other / "params.yaml")
    tokens = other / Layout.tokens("bbc_news")
    (tokens / "valid.parquet").write_bytes((tokens / "test.parquet").read_bytes())
    refused = tmp_path / "refused.md"
    result = run(
        [*bench, *members[:2], "--member", f"c={other}", "--out", str(refused)],
        workspace,
        check=False,
    )
    assert result.returncode != 0 and not refused.exists()
    assert result.stderr.strip().splitlines()[-1] == (
        f"{other}: its valid documents of bbc_news differ from {workspace}'s. Fix: compare "
        "classifiers of workspaces made from the same data"
    )


@pytest.mark.slow
def test_the_elmo_style_control_trains_a_head_on_the_frozen_awd_lstm_lms(pipeline):
    import torch

    from ulmfit.checkpoint import load_model
    from ulmfit.transformer import FrozenFeatureClassifier

    workspace = pipeline["workspace"]
    control, _ = load_model(workspace / Layout.control("bbc_news-elmo-20") / "classifier/model.pt")
    assert isinstance(control, FrozenFeatureClassifier)
    for name, lm in (("fwd", control.forward_lm), ("bwd", control.backward_lm)):
        finetuned, _ = load_model(workspace / Layout.finetuned("bbc_news", name) / "model.pt")
        for key, value in finetuned.state_dict().items():  # never updated by the training
            assert torch.equal(lm.state_dict()[key], value), (name, key)
    assert not torch.equal(control.mix.weights, torch.zeros_like(control.mix.weights))
    metrics = json.loads((workspace / "metrics/controls/bbc_news-elmo-20.json").read_text())
    assert metrics["encoder"] == "frozen_features" and 0 <= metrics["test_error"] <= 1


@pytest.mark.slow
def test_best_epoch_is_the_epoch_of_the_lowest_validation_error(pipeline):
    """The early-stopping epoch a control reports is the epoch-end validation its MLflow run
    logged with the lowest error (the first one on a tie)."""
    workspace = pipeline["workspace"]
    client, _ = _mlflow_client(workspace)
    name = "controls/bbc_news-scratch-20"
    metrics = json.loads((workspace / f"metrics/{name}.json").read_text())
    run_id = json.loads((workspace / f"metrics/runs/{name}.json").read_text())["mlflow_run_id"]
    several = len(metrics["grid_search"]) > 1  # each trained classifier logs under its folder
    prefix = f"lr-{metrics['lr']:g}/" if several else ""
    history = lambda key: client.get_metric_history(run_id, prefix + key)  # noqa: E731
    epoch_at = {m.step: m.value for m in history("epoch_epoch")}
    logged = sorted((m.value, epoch_at[m.step]) for m in history("epoch_error_rate"))
    assert len(logged) == metrics["epochs"] >= 2
    assert metrics["best_epoch"] == logged[0][1]


@pytest.mark.slow
def test_stage_deps_and_outs_match_the_python_layout(pipeline):
    """dvc.yaml (as DVC resolved it) and the stage table name the same paths for every stage."""
    workspace = pipeline["workspace"]
    controls = yaml.safe_load((workspace / "params.yaml").read_text())["controls"]
    for stage, entry in _lock(workspace).items():
        group, _, item = stage.partition("@")
        values = item.split("-", len(BY_GROUP[group].args) - 1) if item else []
        items = dict(zip(BY_GROUP[group].args, values, strict=True))
        if group == "control":  # the item is the control's name; its data are its dataset's
            items["dataset"] = controls[item]["dataset"]
        spec = stage_spec(group, **items)
        assert spec.stage == stage
        assert {d["path"] for d in entry["deps"]} == set(spec.deps), stage
        outs = {o["path"] for o in entry["outs"]}
        expected = set(spec.outs) | set(spec.headline)
        if group != "report":
            expected |= {spec.metrics, spec.run_record}
        if spec.plots:
            expected |= {spec.curve, spec.figure}
        assert outs == expected, stage


def test_dvc_yaml_is_generated_from_the_stage_table():
    from tasks.dvcfile import render_dvc_yaml

    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml(), (
        "dvc.yaml is stale: python -m tasks.dvcfile > dvc.yaml"
    )


FAKE_PREPARE = """
import pathlib, sys
text = pathlib.Path("input.txt").read_text()
if "bad" in text:
    sys.exit("input.txt: bad input")
for path in ("data/wikipedia/train.parquet", "metrics/wikipedia/prepare.json",
             "metrics/runs/wikipedia/prepare.json"):
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text)
"""


def test_after_a_failed_dvc_repro_checkout_restores_data_and_git_the_uncached_metrics(tmp_path):
    """What docs/pipeline.md tells a user after a stage fails under ``dvc repro``, checked
    against DVC with the outs, metrics and ``cache: false`` flags of our own dvc.yaml."""
    entry = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare_wikipedia"]
    stage = {"cmd": f"{sys.executable} stage.py", "deps": ["stage.py", "input.txt"]}
    stage.update(outs=entry["outs"])  # the metrics file and run record are uncached outs
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare_wikipedia": stage}}))
    (tmp_path / "stage.py").write_text(FAKE_PREPARE)
    (tmp_path / "input.txt").write_text("good\n")
    metrics = [tmp_path / "metrics/wikipedia/prepare.json"]
    metrics.append(tmp_path / "metrics/runs/wikipedia/prepare.json")
    run(["git", "init", "-q"], tmp_path)
    run([str(BIN / "dvc"), "init", "-q"], tmp_path)
    run([str(BIN / "dvc"), "repro"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "a good run"], tmp_path)

    (tmp_path / "input.txt").write_text("bad\n")
    assert run([str(BIN / "dvc"), "repro"], tmp_path, check=False).returncode != 0
    assert not (tmp_path / "data/wikipedia").exists()  # DVC removed every out first
    assert not any(path.exists() for path in metrics)
    run([str(BIN / "dvc"), "checkout", "prepare_wikipedia"], tmp_path)
    assert (tmp_path / "data/wikipedia/train.parquet").read_text() == "good\n"
    assert not any(path.exists() for path in metrics)  # not in DVC's cache: checkout cannot
    run(["git", "checkout", "--", "metrics"], tmp_path)
    assert all(path.read_text() == "good\n" for path in metrics)

    docs = " ".join((ROOT / "docs" / "pipeline.md").read_text().split())
    assert "`dvc checkout <stage>` restores them. Its metrics, run record and curve CSV" in docs
    assert "so DVC cannot restore them: `git checkout -- metrics plots`" in docs


def test_every_dvc_stage_is_a_row_of_the_table_run_by_its_command():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [stage.group for stage in STAGES]
    for stage in STAGES:
        entry = stages[stage.group].get("do", stages[stage.group])
        assert entry["cmd"].split()[:2] == ["ulmfit", stage.command]
        assert [w[2:] for w in entry["cmd"].split() if w.startswith("--")] == list(stage.args)
        matrix = stages[stage.group].get("matrix", {})
        assert set(matrix) == set(stage.args) - {"name"}


def test_missing_inputs_name_the_stage_item_that_writes_them():
    """The producer a missing input names comes from the table's outs, item included."""
    assert producer_of(Layout.finetuned("imdb", "bwd") + "/model.pt") == "finetune_lm@imdb-bwd"
    assert producer_of(Layout.wikipedia + "/train.parquet") == "prepare_wikipedia"
    assert producer_of(Layout.wikipedia_tokens) == "tokenize_wikipedia"
    assert producer_of(Layout.pretrained("fwd") + "/step-000375.pt") == "pretrain@fwd"
    assert producer_of(Layout.control("imdb-scratch-100") + "/lm") == "control@imdb-scratch-100"
    assert producer_of("metrics") is None  # the report reads every stage's metrics
    # Every data dependency of every stage is some stage's output (or the metrics folder).
    for stage in STAGES:
        items = {arg: "x" for arg in stage.args}
        if "name" in stage.args:
            items["dataset"] = "x"
        for dep in stage_spec(stage.group, **items).data:
            assert dep == "metrics" or producer_of(dep), (stage.group, dep)


def test_a_stage_run_without_its_inputs_names_the_stage_to_run(tmp_path):
    """run_stage checks the table's data deps before any run starts, naming their producer."""
    from tasks.stage import run_stage
    from ulmfit.errors import InputError

    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    for group, items, producer in [
        ("train_tokenizer", {}, "prepare_wikipedia"),
        ("tokenize_dataset", {"dataset": "bbc_news"}, "prepare_dataset@bbc_news"),
        ("finetune_lm", {"dataset": "bbc_news", "direction": "bwd"}, "tokenize_dataset@bbc_news"),
    ]:
        with (
            pytest.raises(
                InputError, match=f"Fix: run the stage that produces it: dvc repro {producer}$"
            ),
            run_stage(tmp_path, group, **items),
        ):
            pytest.fail("the stage ran without its inputs")
    assert not (tmp_path / "mlflow.db").exists()  # no run was opened


def test_a_stage_item_takes_exactly_its_arguments():
    spec = stage_spec("control", name="imdb-scratch", dataset="imdb")
    assert spec.stage == "control@imdb-scratch" and spec.name == "controls/imdb-scratch"
    assert Layout.tokens("imdb") in spec.data and Layout.control("imdb-scratch") in spec.outs
    assert "controls.imdb-scratch" in spec.params and "datasets.imdb" in spec.params
    with pytest.raises(TypeError, match="direction"):
        stage_spec("finetune_lm", dataset="imdb")
    with pytest.raises(KeyError):
        stage_spec("no_such_stage")


def _project_modules(*modules: str) -> set[str]:
    """Project files (relative paths) loaded by importing ``modules`` in a fresh interpreter."""
    code = (
        f"import sys, {', '.join(modules)}; print('\\n'.join(m.__file__ for m in "
        "list(sys.modules.values()) if getattr(m, '__file__', None)))"
    )
    files = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    out = set()
    for file in files:
        path = Path(file)
        if ROOT in path.parents and ".venv" not in path.parts:
            out.add(path.relative_to(ROOT).as_posix())
    return out


def test_code_deps_cover_every_project_module_a_stage_imports():
    """A stage's deps list every project file its command imports, so a code change reruns it.

    Parsing ``params.yaml`` imports the library's config dataclasses (and with them most of the
    library); what a stage imports *beyond* that is code it runs and must be a dependency.
    """
    parsing = _project_modules("tasks.params")
    for group, target in [
        ("pretrain", "flows.train"),
        ("evaluate", "flows.evaluate"),
        ("prepare_dataset", "flows.prepare"),
        ("tokenize_dataset", "flows.tokenize"),
        ("report", "flows.report"),
    ]:
        spec = stage_spec(group, **{arg: "x" for arg in BY_GROUP[group].args})
        for relative in sorted(_project_modules("flows.cli", target) - parsing):
            if relative.endswith("__init__.py") and relative.count("/") == 1:
                continue  # package markers
            assert any(relative == d or relative.startswith(d + "/") for d in spec.deps), (
                f"{group} imports {relative} but dvc.yaml does not list it as a dependency"
            )
        assert "tasks/params.py" in spec.deps


@pytest.mark.slow
def test_dvc_metrics_and_plots_are_declared(pipeline):
    workspace = pipeline["workspace"]
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], workspace).stdout)
    metrics = next(iter(shown.values()))["data"]
    assert list(metrics) == ["results/bbc_news.json"]  # the headline only (tests/test_review.py)
    headline = metrics["results/bbc_news.json"]["data"]
    for key in ("error_fwd", "error_bwd", "error_ensemble", "error_tfidf"):
        assert 0.0 <= headline[key] <= 1.0
    assert headline["ppl_fwd"] > 1
    plots = run([str(BIN / "dvc"), "plots", "show", "--json"], workspace).stdout
    assert "plots/bbc_news/classifier_fwd.csv" in plots and "evaluate.png" in plots


@pytest.mark.slow
def test_mlflow_runs_have_params_metrics_and_lineage_tags(pipeline):
    workspace = pipeline["workspace"]
    client, _ = _mlflow_client(workspace)
    experiment = client.get_experiment_by_name("ulmfit")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`ulmfit.pipeline_id` = 'test-pipeline'", max_results=100
    )
    by_stage = {r.data.tags["ulmfit.stage"]: r for r in runs}
    lock = _lock(workspace)
    assert set(lock) <= set(by_stage)
    parent = by_stage.pop("pipeline")
    assert parent.info.status == "FINISHED"
    for stage, run_ in by_stage.items():
        assert run_.info.status == "FINISHED", stage
        tags = run_.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["prefect.flow_run_id"], stage
        assert tags["mlflow.source.git.commit"] not in ("", "unknown")
        # The md5 of every dependency, as DVC recorded it in dvc.lock.
        for dep in lock[stage]["deps"]:
            assert tags[f"dvc.dep.{dep['path']}"] == dep["md5"], (stage, dep["path"])
    pretrain = by_stage["pretrain@fwd"]
    assert pretrain.data.params["pretrain.train.max_steps"] == "12"
    assert pretrain.data.metrics["valid_perplexity"] > 1
    history = client.get_metric_history(pretrain.info.run_id, "train_loss")
    assert len(history) == 12  # one point per step (log_every_steps: 1)
    assert client.get_metric_history(pretrain.info.run_id, "train_lr")
    evaluation = by_stage["evaluate@bbc_news"]
    assert 0 <= evaluation.data.metrics["test_error_ensemble"] <= 1
    artifacts = {
        a.path for a in client.list_artifacts(by_stage["train_tokenizer"].info.run_id, "outputs")
    }
    assert "outputs/tokenizer.model" in artifacts
    # The report's figures lead back to these runs.
    results = (workspace / Layout.results).read_text()
    assert evaluation.info.run_id in results


@pytest.mark.slow
def test_second_repro_does_nothing(pipeline):
    workspace = pipeline["workspace"]
    started = time.monotonic()
    result = run([str(BIN / "dvc"), "repro"], workspace)
    elapsed = time.monotonic() - started
    assert "Running stage" not in result.stdout
    assert elapsed < 60, f"a no-op dvc repro took {elapsed:.0f} s"


@pytest.mark.slow
def test_predict_csv_with_a_model_directory_and_the_registry(pipeline, tmp_path):
    import pandas as pd

    workspace = pipeline["workspace"]
    texts = [
        "Shares in the bank fell after profits missed forecasts.",
        "The striker scored twice as the club won the cup final.",
    ]
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": [1, 2], "body": texts}).to_csv(source, index=False)
    for model in ("data/datasets/bbc_news/model", "models:/ulmfit-bbc_news@latest"):
        out = tmp_path / "out.csv"
        run(
            [
                str(BIN / "ulmfit"),
                "predict",
                "--model",
                model,
                "--input",
                str(source),
                "--output",
                str(out),
                "--text-column",
                "body",
            ],
            workspace,
        )
        frame = pd.read_csv(out)
        labels = {"business", "entertainment", "politics", "sports", "tech"}
        assert list(frame["id"]) == [1, 2]
        assert set(frame["label"]) <= labels
        probs = frame[[f"prob_{name}" for name in sorted(labels)]].to_numpy()
        assert abs(probs.sum(axis=1) - 1).max() < 1e-4


@pytest.mark.slow
def test_registered_model_loads_and_serves(pipeline):
    import mlflow
    import pandas as pd

    workspace = pipeline["workspace"]
    client, uri = _mlflow_client(workspace)
    model = client.get_registered_model("ulmfit-bbc_news")
    assert str(model.aliases.get("champion")) == "1"  # the first version becomes champion
    version = client.get_model_version("ulmfit-bbc_news", "1")
    assert float(version.tags["ulmfit.test_error"]) >= 0
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/ulmfit-bbc_news@latest")
    frame = loaded.predict(pd.DataFrame({"text": ["The government announced a new tax policy."]}))
    assert list(frame.columns[:2]) == ["label", "probability"]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/ulmfit-bbc_news@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=workspace,
        env=_env(workspace, MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        body = json.dumps(
            {
                "dataframe_records": [
                    {"text": "The film won three awards."},
                    {"text": "A new phone chip was unveiled."},
                ]
            }
        )
        deadline = time.monotonic() + 240
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body.encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer"
                time.sleep(1)
        predictions = answer["predictions"]
        assert len(predictions) == 2 and {"label", "probability"} <= set(predictions[0])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# ----------------------------------------------------- failure, resume and concurrent runs


@pytest.fixture(scope="module")
def workspace_copy(pipeline, tmp_path_factory) -> Path:
    """A copy of the finished workspace for the destructive checks."""
    copy_root = tmp_path_factory.mktemp("copy") / "ws"
    shutil.copytree(pipeline["workspace"], copy_root, symlinks=True)
    return copy_root


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_concurrent_runs_are_refused(workspace_copy, prefect_api_url):
    """A second pipeline in a workspace whose DVC repo lock is held fails at once; a stage run
    by hand while another stage holds the workspace lock exits 75. Both locks are held here
    deterministically (DVC's own lock API and tasks.workspace), as a running pipeline holds them."""
    from dvc.lock import make_lock

    from tasks.workspace import workspace_lock

    workspace = workspace_copy
    repo_lock = make_lock(
        str(workspace / ".dvc" / "tmp" / "lock"), tmp_dir=str(workspace / ".dvc" / "tmp")
    )
    with repo_lock:
        second = run(
            [str(BIN / "dvc"), "repro"],
            workspace,
            check=False,
            timeout=120,
            PREFECT_API_URL=prefect_api_url,
        )
    assert second.returncode != 0
    assert "lock" in (second.stdout + second.stderr).lower()
    assert "Running stage" not in second.stdout
    with workspace_lock(workspace, "finetune_lm@bbc_news-fwd"):
        manual = run(
            [str(BIN / "ulmfit"), "finetune-lm", "--dataset", "bbc_news", "--direction", "fwd"],
            workspace,
            check=False,
            timeout=120,
            PREFECT_API_URL=prefect_api_url,
        )
    assert manual.returncode == 75, manual.stderr[-2000:]
    assert "busy" in manual.stderr and "Traceback" not in manual.stderr


@pytest.mark.slow
def test_killed_stage_resumes(workspace_copy, prefect_api_url):
    workspace = workspace_copy
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["finetune"]["train"].update(max_steps=300, checkpoint_every=5)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage = "finetune_lm@bbc_news-fwd"
    checkpoints = workspace / Layout.checkpoints / "finetune_lm" / "bbc_news-fwd"
    env = _env(workspace, PREFECT_API_URL=prefect_api_url)
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "--single-item", stage],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    # Complete checkpoints only: <key>/step-*.pt. One being written is an empty file of that
    # name in a private .tmp folder beside it (ulmfit.io.atomic_path); a kill caught there on a
    # loaded CI machine left nothing to resume from.
    def complete() -> list[Path]:
        return sorted(p.relative_to(checkpoints) for p in checkpoints.glob("*/step-*.pt"))

    try:
        # Kill the run (dvc and the stage) as soon as it has written a checkpoint.
        _wait_for(complete, 600, "a checkpoint")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    found = complete()
    assert found
    rerun = run(
        [str(BIN / "dvc"), "repro", "--single-item", stage],
        workspace,
        PREFECT_API_URL=prefect_api_url,
    )
    assert "Running stage" in rerun.stdout
    assert "resuming from step " in rerun.stdout + rerun.stderr, (
        f"the rerun started from scratch instead of the checkpoint {found}:\n"
        + rerun.stderr[-6000:]
    )
    summary = json.loads(
        (workspace / Layout.finetuned("bbc_news", "fwd") / "training.json").read_text()
    )
    # The out is what an uninterrupted run writes: where it resumed is only logged and tagged.
    assert summary["steps"] == 300 and "resumed_from" not in summary


@pytest.mark.slow
def test_corrupt_input_stops_cleanly_and_keeps_earlier_outputs(workspace_copy, prefect_api_url):
    workspace = workspace_copy
    tokens = workspace / Layout.tokens("bbc_news") / "train.parquet"
    model_dir = workspace / Layout.finetuned("bbc_news", "bwd")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    tokens.chmod(0o644)
    tokens.write_bytes(b"PAR1 this is not a parquet file")
    result = run(
        [str(BIN / "ulmfit"), "finetune-lm", "--dataset", "bbc_news", "--direction", "bwd"],
        workspace,
        check=False,
        PREFECT_API_URL=prefect_api_url,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert str(tokens) in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr
    # The stage's previous output is untouched and no half-written file is left beside it.
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]

    # A corrupt source file under DVC: the prepare stage fails naming it. DVC removed the
    # stage's previous outputs before running it (they stay in its cache: `dvc checkout`
    # brings them back); nothing half-written is left and every other stage's outputs stay.
    bad = workspace / "broken-dump.xml.bz2"
    bad.write_bytes(b"BZh91AY&SY" + b"\x00" * 64)
    wiki_before = (workspace / Layout.wikipedia / "train.parquet").read_bytes()
    pretrained_before = (workspace / Layout.pretrained("fwd") / "model.pt").read_bytes()
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["wikipedia"]["path"] = str(bad)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = run(
        [str(BIN / "dvc"), "repro", "prepare_wikipedia"],
        workspace,
        check=False,
        PREFECT_API_URL=prefect_api_url,
    )
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert str(bad) in output and "Fix:" in output and "Traceback" not in output
    assert not [p for p in (workspace / "data").iterdir() if p.name.startswith(".")]
    assert (workspace / Layout.pretrained("fwd") / "model.pt").read_bytes() == pretrained_before
    run([str(BIN / "dvc"), "checkout", "prepare_wikipedia"], workspace)
    assert (workspace / Layout.wikipedia / "train.parquet").read_bytes() == wiki_before


# --------------------------------------------------------------------- flows, in process


@pytest.mark.slow
def test_report_flow_runs_under_prefect_and_links_its_flow_run(
    pipeline, prefect_api_url, monkeypatch
):
    from prefect import get_client

    from flows.report import report_flow

    workspace = pipeline["workspace"]
    # For this test only: a later module's `ulmfit repro` must not inherit this harness's URL.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    state = report_flow(root=str(workspace), return_state=True)
    assert state.is_completed()
    client, _ = _mlflow_client(workspace)
    experiment = client.get_experiment_by_name("ulmfit")
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`ulmfit.stage` = 'report'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    flow_run_id = runs[0].data.tags["prefect.flow_run_id"]
    assert flow_run_id == str(state.state_details.flow_run_id)

    import asyncio

    async def fetch():
        async with get_client() as prefect:
            return await prefect.read_flow_run(flow_run_id)

    assert asyncio.run(fetch()).name


@pytest.mark.slow
def test_write_report_task_fn_is_plain_python(pipeline):
    from tasks.params import load_params
    from tasks.report import write_report_task

    workspace = pipeline["workspace"]
    params = load_params(workspace / "params.yaml")
    figures = write_report_task.fn(workspace, params)
    assert 0 <= figures["bbc_news.error_ensemble"] <= 1
    assert figures["wikipedia/pretrain_fwd.valid_perplexity"] > 1


def test_io_tasks_retry_but_never_on_bad_input():
    from prefect.states import Failed

    from tasks.data import prepare_dataset_task, prepare_wikipedia_task, retry_unless_input_error
    from tasks.training import train_lm_task
    from ulmfit.errors import InputError

    assert prepare_wikipedia_task.retries == prepare_dataset_task.retries == 2
    assert train_lm_task.retries == 0  # compute is never retried
    bad = Failed(data=InputError("x.csv", "bad row", fix="fix it"))
    transient = Failed(data=ConnectionError("reset by peer"))
    assert retry_unless_input_error(None, None, bad) is False
    assert retry_unless_input_error(None, None, transient) is True


@pytest.mark.slow
def test_pipeline_timing_is_recorded(pipeline):
    """Not a benchmark: the micro pipeline must stay small enough for CI."""
    print(f"micro pipeline: {pipeline['seconds']:.0f} s")
    assert pipeline["seconds"] < 1200
