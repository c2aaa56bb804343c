"""The report's figures (``tasks.results``) and their markdown (``tasks.report``), from metrics
files written as the stages write them, without running the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from tasks.params import parse_params
from tasks.pipeline import stage_spec
from tasks.report import epochs_cell, render
from tasks.results import collect

ROOT = Path(__file__).resolve().parents[1]


def _params(directions: list[str]):
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["datasets"]["bbc_news"]["directions"] = directions
    data["controls"] = {
        "bbc-scratch": {"dataset": "bbc_news", "encoder": "scratch"},
        "bbc-ulmfit-20": {"dataset": "bbc_news", "labels": 20},
    }
    return parse_params(data)


def _write(root: Path, spec, metrics: dict, run_id: str) -> None:
    for path, data in ((spec.metrics, metrics), (spec.run_record, {"mlflow_run_id": run_id})):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps({**data, "wall_seconds": 60.0}))


def _workspace(root: Path, directions: list[str]) -> None:
    evaluation = {"test_error_fwd": 0.10, "test_error_majority": 0.8, "train_documents": 300}
    if "bwd" in directions:
        evaluation.update(test_error_bwd=0.12, test_error_ensemble=0.09)
    _write(root, stage_spec("evaluate", dataset="bbc_news"), evaluation, "evaluate-run")
    for d in directions:
        spec = stage_spec("finetune_lm", dataset="bbc_news", direction=d)
        _write(root, spec, {"valid_perplexity": 40.0 + len(d)}, f"lm-{d}-run")
    control = stage_spec("control", name="bbc-scratch", dataset="bbc_news")
    _write(root, control, {"test_error": 0.12, "train_documents": 300}, "scratch-run")
    subset = stage_spec("control", name="bbc-ulmfit-20", dataset="bbc_news")
    metrics = {"test_error": 0.30, "train_documents": 20, "dataset": "bbc_news"}
    _write(root, subset, metrics | {"encoder": "finetuned", "labels": 20}, "subset-run")
    baseline = {
        "test_error": 0.2,
        "runs": [
            {"labels": None, "train_documents": 300, "test_error": 0.2, "C": 1.0},
            {"labels": 20, "train_documents": 20, "test_error": 0.4, "C": 1.0},
        ],
        "subsets": {"20": {"test_error": 0.4}},
    }
    _write(root, stage_spec("baseline", dataset="bbc_news"), baseline, "baseline-run")


def test_bars_are_judged_on_the_measured_errors(tmp_path):
    params = _params(["fwd", "bwd"])
    _workspace(tmp_path, ["fwd", "bwd"])
    bars = {bar.kind: bar for bar in collect(tmp_path, params).bars}
    assert not bars["scratch"].met  # 12 % vs 10 %: 2 points, the bar is 3
    assert bars["ensemble"].met and bars["ensemble"].other == 0.10  # the better direction
    assert bars["tfidf"].met and bars["tfidf"].labels == 20  # 30 % vs TF-IDF's 40 %


def test_the_report_lists_the_directions_a_dataset_trains_and_cites_each_run(tmp_path):
    params = _params(["fwd"])
    _workspace(tmp_path, ["fwd"])
    classifier = {"valid_error_rate": 0.08, "lr": 0.01, "one_rate": True, "train_documents": 300}
    spec = stage_spec("train_classifier", dataset="bbc_news", direction="fwd")
    _write(tmp_path, spec, classifier, "classifier-fwd-run")
    results = collect(tmp_path, params)
    text = "\n".join(render(results, params))
    # The ablation table says when the search's one-rate recipe won (classifier.one_rate_lrs).
    assert "| full ULMFiT | **10.00** | 8.00 | 0.01 (one rate) |" in text
    assert "| bbc_news fine-tuned (fwd) | 43.00 |" in text
    assert "bbc_news fine-tuned (bwd)" not in text
    assert [bar.kind for bar in results.bars] == ["scratch", "tfidf"]  # no ensemble trained
    for run_id in ("evaluate-run", "lm-fwd-run", "scratch-run", "baseline-run"):
        assert f"`{run_id}`" in text, run_id
    assert results.figures["bbc_news.error_fwd"] == 0.10
    assert results.figures["controls.bbc-scratch.test_error"] == 0.12
    assert results.sample_efficiency["bbc_news"]["TF-IDF + LR"] == [(300, 0.2), (20, 0.4)]


def test_the_epochs_column_names_the_epoch_whose_weights_were_kept(tmp_path):
    """Without keep_best a classifier ends with its last epoch's weights, and the validation
    error beside it is that epoch's: the report must not print the best epoch as if it were
    the model's."""
    params = _params(["fwd"])
    _workspace(tmp_path, ["fwd"])
    classifier = {"valid_error_rate": 0.146, "lr": 0.01, "best_epoch": 5, "kept_epoch": 8}
    spec = stage_spec("train_classifier", dataset="bbc_news", direction="fwd")
    _write(tmp_path, spec, {**classifier, "epochs": 8}, "classifier-fwd-run")
    text = "\n".join(render(collect(tmp_path, params), params))
    assert "| full ULMFiT | **10.00** | 14.60 | 0.01 | 8 / 8 (best 5) |" in text
    assert epochs_cell({"best_epoch": 5, "kept_epoch": 5, "epochs": 8}) == "5 / 8"  # keep_best
    assert epochs_cell({"best_epoch": 5, "epochs": 8}) == "best 5 / 8"  # before kept_epoch


def test_the_headline_holds_each_dataset_s_test_errors_and_perplexities(tmp_path):
    """results/<dataset>.json: what `dvc metrics show` and the pipeline's MLflow run show;
    what did not run (the backward direction here) is left out, not shown as 0."""
    from tasks.report import write_report_task

    params = _params(["fwd"])
    _workspace(tmp_path, ["fwd"])
    assert collect(tmp_path, params).headline == {
        "bbc_news": {"error_fwd": 0.10, "error_tfidf": 0.2, "ppl_fwd": 43.0}
    }
    params = _params(["fwd", "bwd"])
    _workspace(tmp_path, ["fwd", "bwd"])
    figures = write_report_task.fn(tmp_path, params)
    written = json.loads((tmp_path / "results" / "bbc_news.json").read_text())
    assert written == {
        "error_fwd": 0.10,
        "error_bwd": 0.12,
        "error_ensemble": 0.09,
        "error_tfidf": 0.2,
        "ppl_fwd": 43.0,
        "ppl_bwd": 43.0,
    }
    assert {key: figures[f"bbc_news.{key}"] for key in written} == written


def test_the_setting_names_a_transformer_backbone(tmp_path):
    """The report of a GPT-style arm (issue 13) describes its model instead of failing on the
    AWD-LSTM's sizes."""
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["pretrain"]["model"] = {"backbone": "transformer_causal", "dim": 16, "num_layers": 2}
    data["pretrain"]["model"].update(heads=2, max_len=128)
    data["classifier"]["model"] = {}
    params = parse_params(data)
    _workspace(tmp_path, ["fwd"])
    text = "\n".join(render(collect(tmp_path, params), params))
    assert "GPT-style causal transformer 16x2 (2 heads, max_len 128)" in text


def test_frozen_features_and_scratch_controls_are_curves_of_the_sample_efficiency_table(tmp_path):
    """The ELMo-style arm (issue 13) at a label count is its own curve beside ULMFiT's, and
    from-scratch points are not dropped for training without gradual unfreezing."""
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["controls"] = {
        "bbc-ulmfit-20": {"dataset": "bbc_news", "labels": 20},
        "bbc-elmo-20": {"dataset": "bbc_news", "labels": 20, "encoder": "frozen_features"},
        "bbc-scratch-20": {"dataset": "bbc_news", "labels": 20, "encoder": "scratch"},
        "bbc-no_stlr-20": {
            "dataset": "bbc_news",
            "labels": 20,
            "classifier": {"train": {"schedule": {"stlr": False}}},
        },
    }
    params = parse_params(data)
    _workspace(tmp_path, ["fwd", "bwd"])
    for name, error in (("bbc-elmo-20", 0.35), ("bbc-scratch-20", 0.5), ("bbc-no_stlr-20", 0.9)):
        spec = stage_spec("control", name=name, dataset="bbc_news")
        _write(tmp_path, spec, {"test_error": error, "train_documents": 20}, f"{name}-run")
    curves = collect(tmp_path, params).sample_efficiency["bbc_news"]
    assert curves["frozen features (ELMo-style)"] == [(20, 0.35)]
    # A scratch classifier's default training (no gradual unfreezing) is its curve's standard;
    # an ablation at a label count is no point of any curve.
    assert curves["from scratch"] == [(20, 0.5)]
    assert curves["ULMFiT"] == [(300, 0.10), (20, 0.30)]
    text = "\n".join(render(collect(tmp_path, params), params))
    assert "| labels | ULMFiT | from scratch | TF-IDF + LR | frozen features (ELMo-style) |" in text


def test_the_pretraining_budget_panel_and_its_bench_section_read_the_snapshot_controls(tmp_path):
    """A snapshot control's point is its own pretraining tokens; the whole run's point is the
    control with the same labels and no ``pretrain_step``; bench/budget.py tabulates the same
    points with their runs and draws the figure, reading only the workspace's files."""
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["pretrain"]["train"]["snapshot_steps"] = [10]
    data["controls"] = {
        "bbc-ulmfit-20": {"dataset": "bbc_news", "labels": 20},
        "bbc-ulmfit-20-pretrain-10": {"dataset": "bbc_news", "labels": 20, "pretrain_step": 10},
    }
    params = parse_params(data)
    _workspace(tmp_path, ["fwd"])
    _write(tmp_path, stage_spec("pretrain", direction="fwd"), {"tokens_trained": 4000}, "lm-run")
    snapshot = stage_spec("control", name="bbc-ulmfit-20-pretrain-10", dataset="bbc_news")
    metrics = {"test_error": 0.5, "pretrain_tokens": 1000, "dataset": "bbc_news", "labels": 20}
    _write(
        tmp_path, snapshot, metrics | {"encoder": "finetuned", "pretrain_step": 10}, "snapshot-run"
    )

    panel = collect(tmp_path, params).pretraining_budget["bbc_news, 20 labels, fwd"]
    assert panel["ULMFiT"] == [(1000, 0.5), (4000, 0.30)]  # fewest tokens first
    assert panel["TF-IDF + LR"] == [(1000, 0.4), (4000, 0.4)]  # the baseline on the same 20

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "section" / "budget.md"
    command = [sys.executable, str(ROOT / "bench" / "budget.py"), "--workspace", str(tmp_path)]
    command += ["--dataset", "bbc_news", "--out", str(out), "--conditions", "Code abc1234."]
    subprocess.run(command, check=True, capture_output=True, text=True)
    assert "(first 8 characters). Code abc1234.\n" in out.read_text()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| bbc_news")]
    assert rows == [
        "| bbc_news, 20 labels, fwd | snapshot at step 10 (control bbc-ulmfit-20-pretrain-10) "
        "| 1,000 | 50.00 | 40.00 | `snapshot` |",
        "| bbc_news, 20 labels, fwd | the whole run (control@bbc-ulmfit-20) "
        "| 4,000 | 30.00 | 40.00 | `subset-r` |",
    ]
    # bench/arms.py gives the whole run's row the pretraining run's minutes and a snapshot's
    # none: the snapshot's share of them is not recorded.
    arms = [sys.executable, str(ROOT / "bench" / "arms.py"), "--dataset", "bbc_news"]
    for name in ("bbc-ulmfit-20-pretrain-10", "bbc-ulmfit-20"):
        arms += ["--arm", f"{name}={tmp_path}:{name}"]
    arms += ["--out", str(tmp_path / "section" / "arms.md")]
    subprocess.run(arms, check=True, capture_output=True, text=True)
    table = (tmp_path / "section" / "arms.md").read_text().splitlines()
    minutes = {row.split(" | ")[0][2:]: row.split(" | ")[3] for row in table if "| bbc-" in row}
    assert minutes == {"bbc-ulmfit-20-pretrain-10": "–", "bbc-ulmfit-20": "1.0"}
    # The figure is one panel (5 x 4 inches at 110 dpi) with both series drawn: pixels of
    # matplotlib's first two line colours (ULMFiT, then TF-IDF + LR).
    from matplotlib.image import imread

    image = imread(out.with_suffix(".png"))[..., :3]
    assert image.shape[:2] == (440, 550)
    for colour in ("#1f77b4", "#ff7f0e"):
        rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(image - rgb).max(axis=-1) < 0.02).sum() > 50, colour


def test_bench_bars_picks_ulmfit_on_validation_and_judges_each_bar(tmp_path):
    """bench/bars.py: of two ULMFiT classifiers on the same labels the lower validation error
    stands for ULMFiT (even with the higher test error); each bar is judged against its goal,
    and a bar whose runs are absent says so."""
    bench, demo = tmp_path / "bench", tmp_path / "demo"
    for name, test, valid in (
        ("imdb-ulmfit-1000-grid", 0.20, 0.25),
        ("imdb-ulmfit-1000-scratch_recipe", 0.18, 0.26),
    ):
        spec = stage_spec("control", name=name, dataset="imdb")
        grid = [{"lr": 0.01, "valid_error": valid}, {"lr": 0.001, "valid_error": valid + 0.1}]
        _write(bench, spec, {"test_error": test, "grid_search": grid}, f"{name}-run")
    baseline = {
        "runs": [{"labels": None, "test_error": 0.12}, {"labels": 1000, "test_error": 0.21}]
    }
    _write(bench, stage_spec("baseline", dataset="imdb"), baseline, "imdb-baseline")
    ensemble = {"test_error_fwd": 0.08, "test_error_ensemble": 0.058}
    _write(bench, stage_spec("evaluate", dataset="trec6"), ensemble, "trec6-evaluate")
    demo_eval = {"test_error_fwd": 0.14, "test_error_ensemble": 0.10}
    _write(demo, stage_spec("evaluate", dataset="bbc_news"), demo_eval, "demo-evaluate")
    _write(
        demo,
        stage_spec("baseline", dataset="bbc_news"),
        {"runs": [{"labels": None, "test_error": 0.05}]},
        "demo-tfidf",
    )

    out = tmp_path / "bars.md"
    command = [sys.executable, str(ROOT / "bench" / "bars.py"), "--bench", str(bench)]
    command += ["--demo", str(demo), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:]
        for line in out.read_text().splitlines()
        if line.startswith("| ") and " | " in line
    }
    imdb = rows["IMDb, 1,000 labels: ULMFiT vs TF-IDF"]
    assert imdb[:3] == ["20.00 vs 21.00", "ULMFiT at or below", "**met**"]
    assert imdb[3].startswith("control@imdb-ulmfit-1000-grid `imdb-ulm`, valid 25.00; not chosen: ")
    assert rows["TREC-6 ensemble"][:3] == ["5.80", "below 6", "**met**"]
    assert rows["IMDb, 100 labels: ULMFiT vs TF-IDF"][:3] == [
        "not measured in these workspaces",
        "ULMFiT lower",
        "–",
    ]
    assert rows["demo: ensemble ÷ TF-IDF"][0].startswith("2.00× (10.00 vs 5.00); stages 2.0 min")
    assert rows["demo: ensemble ÷ TF-IDF"][2] == "missed"
