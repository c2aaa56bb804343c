"""Stage ``report``: ``reports/results.md``, one table over every dataset of ``params.yaml``.

Figures come from the stages' metrics files (``metrics/``), never recomputed here, each with the
MLflow run that produced it (``metrics/runs/``), so any number leads back to its run, and from
there to its data (``dvc.dep.*`` md5 tags) and code (git commit tag).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks.params import Params
from tasks.workspace import Layout
from ulmfit.io import atomic_write

# Test error (%) of ULMFiT in the paper (Howard & Ruder 2018, Tables 2 and 3), full datasets.
PAPER_TEST_ERROR = {
    "imdb": 4.6,
    "yelp_bi": 2.16,
    "yelp_full": 29.98,
    "ag_news": 5.01,
    "dbpedia": 0.80,
    "trec6": 3.6,
}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _percent(value, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.{decimals}f}"


def _number(value, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{decimals}f}"


@task(name="write-report", cache_policy=NONE, persist_result=False)
def write_report_task(root: Path, params: Params) -> dict:
    """Write ``reports/results.md``; returns the figures it tabulated (for MLflow)."""
    decimals = params.report.decimals
    stage = Layout.stage

    def run_of(spec) -> str:
        return _read(root / spec.run_record).get("mlflow_run_id", "")

    def cite(run_id: str) -> str:
        return f"`{run_id[:8]}`" if run_id else "n/a"

    lines = [
        f"# {params.report.title}",
        "",
        "Test error in % (lower is better). *fwd*/*bwd*: the forward and backward "
        "classifiers; *ensemble*: their averaged probabilities (paper section 3.3). "
        "*majority*: always predicting the most frequent training label. Each figure's "
        "MLflow run id (first 8 characters) is in the *runs* column; full ids below.",
        "",
        "| dataset | source | classes | test docs | majority | fwd | bwd | ensemble "
        "| ULMFiT paper (full data) | LM perplexity fwd / bwd | runs (eval; clf fwd, bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    figures: dict[str, float] = {}
    all_runs: list[tuple[str, str]] = []
    for name, dataset in params.datasets.items():
        evaluation = _read(root / stage("evaluate", name).metrics)
        runs = {"evaluate": run_of(stage("evaluate", name))}
        for direction in ("fwd", "bwd"):
            runs[f"classifier_{direction}"] = run_of(stage("train_classifier", name, direction))
            runs[f"finetune_{direction}"] = run_of(stage("finetune_lm", name, direction))
        perplexity = [
            _read(root / stage("finetune_lm", name, d).metrics).get("valid_perplexity")
            for d in ("fwd", "bwd")
        ]
        paper = PAPER_TEST_ERROR.get(dataset.source.name)
        lines.append(
            f"| {name} | {dataset.source.name} | {evaluation.get('num_classes', 'n/a')} "
            f"| {evaluation.get('test_documents', 'n/a')} "
            f"| {_percent(evaluation.get('test_error_majority'), decimals)} "
            f"| {_percent(evaluation.get('test_error_fwd'), decimals)} "
            f"| {_percent(evaluation.get('test_error_bwd'), decimals)} "
            f"| **{_percent(evaluation.get('test_error_ensemble'), decimals)}** "
            f"| {'n/a' if paper is None else f'{paper:.2f}'} "
            f"| {_number(perplexity[0], 1)} / {_number(perplexity[1], 1)} "
            f"| {cite(runs['evaluate'])}; {cite(runs['classifier_fwd'])}, "
            f"{cite(runs['classifier_bwd'])} |"
        )
        for key in (
            "test_error_fwd",
            "test_error_bwd",
            "test_error_ensemble",
            "test_error_majority",
        ):
            if isinstance(evaluation.get(key), int | float):
                figures[f"{name}.{key}"] = float(evaluation[key])
        all_runs += [(f"{name} {k}", v) for k, v in runs.items()]

    lines += [
        "",
        "## Language models",
        "",
        "Validation perplexity (next-token, on the model's own subword vocabulary; not "
        "comparable with word-level perplexities).",
        "",
        "| model | valid perplexity | valid accuracy | MLflow run |",
        "|---|---|---|---|",
    ]
    models = [(f"pretrained ({d})", stage("pretrain", direction=d)) for d in ("fwd", "bwd")]
    models += [
        (f"{name} fine-tuned ({d})", stage("finetune_lm", name, d))
        for name in params.datasets
        for d in ("fwd", "bwd")
    ]
    for label, spec in models:
        metrics = _read(root / spec.metrics)
        run_id = run_of(spec)
        lines.append(
            f"| {label} | {_number(metrics.get('valid_perplexity'), 2)} "
            f"| {_percent(metrics.get('valid_accuracy'), decimals)} % | {cite(run_id)} |"
        )
        if isinstance(metrics.get("valid_perplexity"), int | float):
            figures[f"{spec.name}.valid_perplexity"] = float(metrics["valid_perplexity"])
        all_runs.append((label, run_id))

    lines += ["", "## Figures", ""]
    for name in params.datasets:
        lines.append(
            f"- {name}: confusion matrix `figures/{name}/evaluate.png`; training curves "
            f"and LR schedules `figures/{name}/finetune_lm_*.png`, "
            f"`figures/{name}/classifier_*.png`"
        )
    lines.append(
        "- pretraining: `figures/wikipedia/pretrain_fwd.png`, `figures/wikipedia/pretrain_bwd.png`"
    )
    lines += [
        "",
        "## MLflow runs",
        "",
        "Open with `mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db`; each run is "
        "tagged with its DVC stage, pipeline id, git commit, Prefect flow-run id and the "
        "DVC md5 of every input.",
        "",
        "| figure | run id |",
        "|---|---|",
    ]
    lines += [f"| {label} | `{run_id or 'n/a'}` |" for label, run_id in all_runs]
    path = root / Layout.results
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    sample_efficiency_figure(root, params)
    return figures


def sample_efficiency_figure(root: Path, params: Params) -> Path:
    """``reports/sample_efficiency.png``: test error against the number of labelled training
    documents (the paper's Figure 3), one panel per dataset, for ULMFiT (the pipeline's forward
    classifier and the ``finetuned`` controls), classifiers from scratch (``scratch``
    controls) and the TF-IDF baseline, all read from the stages' metrics."""
    from tasks.plots import _pyplot, _save

    curves = sample_efficiency_points(root, params)
    plt = _pyplot()
    names = list(curves) or ["(no datasets)"]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for label, points in curves.get(name, {}).items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training documents")
        ax.set_ylabel("test error (%)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        if curves.get(name):
            ax.legend()
    fig.tight_layout()
    return _save(fig, root / Layout.sample_efficiency)


def sample_efficiency_points(root: Path, params: Params) -> dict[str, dict[str, list]]:
    """{dataset: {"ULMFiT": [(labels, test error)], "from scratch": [...], "TF-IDF + LR": [...]}}
    for every dataset with label-subset controls (standard training settings only)."""
    out: dict[str, dict[str, list]] = {}
    for name in params.datasets:
        controls = [
            (key, c)
            for key, c in params.controls.items()
            if c.dataset == name and c.labels is not None
        ]
        if not controls:
            continue
        curves: dict[str, list] = {"ULMFiT": [], "from scratch": [], "TF-IDF + LR": []}
        evaluation = _read(root / Layout.stage("evaluate", name).metrics)
        if isinstance(evaluation.get("test_error_fwd"), int | float):
            curves["ULMFiT"].append((evaluation["train_documents"], evaluation["test_error_fwd"]))
        for key, control in params.controls.items():
            if control.dataset != name or control.encoder not in ("finetuned", "scratch"):
                continue
            metrics = _read(root / Layout.stage("control", key, name).metrics)
            if isinstance(metrics.get("test_error"), int | float):
                label = "ULMFiT" if control.encoder == "finetuned" else "from scratch"
                curves[label].append((metrics["train_documents"], metrics["test_error"]))
        baseline = _read(root / Layout.stage("baseline", name).metrics)
        for run in baseline.get("runs", []):
            curves["TF-IDF + LR"].append((run["train_documents"], run["test_error"]))
        out[name] = curves
    return out
