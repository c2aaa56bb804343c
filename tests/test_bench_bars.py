"""bench/bars.py: issue 9's bars read from a workspace's stage files (no training here: the
files are written as the stages write them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tasks.pipeline import stage_spec

ROOT = Path(__file__).resolve().parents[1]


def _write(workspace: Path, group: str, metrics: dict, run_id: str, **items: str) -> None:
    spec = stage_spec(group, **items)
    for relative, data in ((spec.metrics, metrics), (spec.run_record, {"mlflow_run_id": run_id})):
        path = workspace / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


def _classifier(lr: float, valid: float) -> dict:
    grid = [{"lr": lr, "one_rate": True, "valid_error": valid, "kept_epoch": 5, "epochs": 5}]
    return {"lr": lr, "one_rate": True, "kept_epoch": 5, "epochs": 5, "grid_search": grid}


def test_bars_read_the_pipeline_classifiers_and_the_controls_chosen_on_validation(tmp_path):
    bench, demo = tmp_path / "bench", tmp_path / "demo"
    # AG News: the pipeline's own forward classifier against TF-IDF on all labels.
    _write(bench, "evaluate", {"test_error_fwd": 0.1313}, "a" * 32, dataset="ag_news")
    _write(
        bench,
        "train_classifier",
        _classifier(0.003, 0.105),
        "b" * 32,
        dataset="ag_news",
        direction="fwd",
    )
    _write(
        bench,
        "baseline",
        {"runs": [{"labels": None, "test_error": 0.1339}]},
        "c" * 32,
        dataset="ag_news",
    )
    # IMDb at 5,000 labels: the pipeline's classifier and a recipe control; validation chooses.
    _write(bench, "evaluate", {"test_error_fwd": 0.20}, "d" * 32, dataset="imdb")
    _write(
        bench,
        "train_classifier",
        _classifier(0.01, 0.19),
        "e" * 32,
        dataset="imdb",
        direction="fwd",
    )
    control = {"test_error": 0.16, "grid_search": [{"valid_error": 0.17}]}
    _write(bench, "control", control, "f" * 32, name="imdb-ulmfit-5000-grid", dataset="imdb")
    # IMDb at 100 labels: the profile's own control; the pipeline's classifier must not count.
    control = {"test_error": 0.3946, "grid_search": [{"valid_error": 0.364}]}
    _write(bench, "control", control, "9" * 32, name="imdb-ulmfit-100", dataset="imdb")
    baseline = {
        "runs": [{"labels": None, "test_error": 0.1156}, {"labels": 100, "test_error": 0.2934}]
    }
    _write(bench, "baseline", baseline, "8" * 32, dataset="imdb")
    out = tmp_path / "bars.md"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bars.py"),
            "--bench",
            str(bench),
            "--demo",
            str(demo),
        ]
        + ["--out", str(out), "--title", "Bars after the fix"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert text.startswith("# Bars after the fix\n")
    ag_news = rows["AG News 8k: ULMFiT vs TF-IDF"]
    assert "| 13.13 vs 13.39 | ULMFiT at or below | **met** |" in ag_news
    assert ag_news.count("valid 10.50") == 1, ag_news  # named once
    five_k = rows["IMDb, 5,000 labels: ULMFiT vs TF-IDF"]
    assert "| 16.00 vs 11.56 |" in five_k and "missed" in five_k  # the control: valid 17 < 19
    assert "not chosen: evaluate@imdb `dddddddd`" in five_k and "test 20.00" in five_k
    hundred = rows["IMDb, 100 labels: ULMFiT vs TF-IDF"]
    assert (
        "| 39.46 vs 29.34 |" in hundred
        and "control@imdb-ulmfit-100 `99999999`, valid 36.40" in hundred
    )
    assert "evaluate@" not in hundred
    assert "not measured in these workspaces" in rows["TREC-6 ensemble"]


def test_every_control_a_bar_reads_is_defined_on_the_bars_labels(benchmark_with):
    """Each control name in bench/bars.py's bars is a control of the benchmark profile or of a
    bench/*.yaml file pasted into it, on the bar's dataset and labels, at the profile's
    classifier seed: a renamed control would otherwise drop out of the table unnoticed."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bars import BARS

    params, _ = benchmark_with("imdb_recipes.yaml", "imdb_lm_vs_random.yaml")
    seed = params.dataset("imdb").classifier.train.seed
    for bar in BARS:
        for name in bar.ulmfit:
            control = params.control(name)
            assert (control.dataset, control.labels) == (bar.dataset, bar.labels), name
            assert control.classifier.train.seed == seed, name
