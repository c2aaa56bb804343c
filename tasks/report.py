"""Stage ``report``: ``reports/results.md``, one table over every dataset of ``params.yaml``,
and the sample-efficiency and pretraining-budget figures.

The figures come from :func:`tasks.results.collect`; this module only writes them as markdown
(each with the MLflow run that produced it) and draws the curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks.params import DIRECTIONS, Params, describe_model
from tasks.plots import error_curves_figure
from tasks.results import (
    PAPER_ABLATION_VALID_ERROR,
    PAPER_SAMPLE_EFFICIENCY,
    SCRATCH_MARGIN,
    Bar,
    DatasetResult,
    Results,
    StageResult,
    collect,
    language_models,
)
from tasks.workspace import Layout
from ulmfit.io import atomic_write


@task(name="write-report", cache_policy=NONE, persist_result=False)
def write_report_task(root: Path, params: Params) -> dict:
    """Write ``reports/results.md``, the headline figures (``results/<dataset>.json``) and the
    two curve figures; returns the figures it tabulated (for MLflow)."""
    results = collect(root, params)
    with atomic_write(root / Layout.results, "w") as handle:
        handle.write("\n".join(render(results, params)) + "\n")
    for dataset, figures in results.headline.items():
        with atomic_write(root / Layout.headline_file(dataset), "w") as handle:
            handle.write(json.dumps(figures, indent=2) + "\n")
    error_curves_figure(root / Layout.sample_efficiency, results.sample_efficiency)
    error_curves_figure(
        root / Layout.pretraining_budget,
        results.pretraining_budget,
        xlabel="pretraining tokens (forward LM)",
    )
    return results.figures


# ------------------------------------------------------------------------------ formatting


def _percent(value, decimals: int) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "n/a"
    return f"{100 * value:.{decimals}f}"


def _number(value, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{decimals}f}"


def cite(run_id: str | None) -> str:
    """A run id as the tables show it: its first 8 characters."""
    return f"`{run_id[:8]}`" if run_id else "n/a"


def _minutes(seconds) -> str:
    return "n/a" if not isinstance(seconds, int | float) else f"{seconds / 60:.1f} min"


def _command(result: StageResult) -> str:
    return f"`ulmfit repro {result.spec.stage}`"


# -------------------------------------------------------------------------------- sections


def render(results: Results, params: Params) -> list[str]:
    """The lines of ``reports/results.md``."""
    decimals = params.report.decimals
    lines = [f"# {params.report.title}", *_datasets(results, decimals)]
    lines += _language_models(results, decimals)
    if results.benchmark:
        lines += _setting(results, params)
        lines += _bars(results, decimals)
        for dataset in results.datasets:
            lines += _ablations(results, dataset, params, decimals)
        lines += _sample_efficiency(results, decimals)
        lines += _pretraining_budget(results, decimals)
    lines += _figure_files(results, params)
    lines += _runs(results, params)
    return lines


def _datasets(results: Results, decimals: int) -> list[str]:
    lines = [
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
    for dataset in results.datasets:
        evaluation = dataset.evaluate.metrics
        errors = [
            _percent(evaluation.get(f"test_error_{key}"), decimals)
            for key in ("majority", *DIRECTIONS)
        ]
        perplexities = [
            _number(dataset.finetuned[d].metrics.get("valid_perplexity"), 1) for d in DIRECTIONS
        ]
        paper = dataset.paper_test_error
        lines.append(
            f"| {dataset.name} | {dataset.source} | {evaluation.get('num_classes', 'n/a')} "
            f"| {evaluation.get('test_documents', 'n/a')} | {' | '.join(errors)} "
            f"| **{_percent(evaluation.get('test_error_ensemble'), decimals)}** "
            f"| {'n/a' if paper is None else f'{paper:.2f}'} | {' / '.join(perplexities)} "
            f"| {cite(dataset.evaluate.run_id)}; "
            + ", ".join(cite(dataset.classifiers[d].run_id) for d in DIRECTIONS)
            + " |"
        )
    return lines


def _language_models(results: Results, decimals: int) -> list[str]:
    lines = [
        "",
        "## Language models",
        "",
        "Validation perplexity (next-token, on the model's own subword vocabulary; not "
        "comparable with word-level perplexities).",
        "",
        "| model | valid perplexity | valid accuracy | MLflow run |",
        "|---|---|---|---|",
    ]
    for label, lm in language_models(results):
        lines.append(
            f"| {label} | {_number(lm.metrics.get('valid_perplexity'), 2)} "
            f"| {_percent(lm.metrics.get('valid_accuracy'), decimals)} % | {cite(lm.run_id)} |"
        )
    return lines


def _setting(results: Results, params: Params) -> list[str]:
    """The model, and the data, tokens seen and wall time of every LM training."""
    pretrain = params.pretrain.train
    lines = [
        "",
        "## Setting",
        "",
        f"{describe_model(params.pretrain.model)}, "
        f"{params.tokenizer.vocab_size:,}-piece SentencePiece {params.tokenizer.model_type} "
        f"vocabulary. Times are each stage's wall time in its last execution (a resumed stage "
        f"counts only its last part).",
        "",
        "| stage | data | steps x batch x bptt (tokens seen) | wall time | MLflow run | command |",
        "|---|---|---|---|---|---|",
    ]
    for direction, lm in results.pretrained.items():
        data = f"Wikipedia, {lm.metrics.get('train_documents', 'n/a')} articles"
        lines.append(_training_row(f"pretrain {direction}", data, lm, pretrain))
    for dataset in results.datasets:
        sizes = ", ".join(f"{split} {count:,}" for split, count in dataset.split_sizes.items())
        finetune = params.dataset(dataset.name).finetune
        data = f"{sizes} (texts of {', '.join(finetune.splits)})"
        for direction in dataset.directions:
            label = f"{dataset.name} LM fine-tuning {direction}"
            lines.append(_training_row(label, data, dataset.finetuned[direction], finetune.train))
    minutes = _minutes(results.total_wall_seconds)
    return lines + ["", f"Sum of the wall times of every stage: **{minutes}**."]


def _training_row(label: str, data: str, lm: StageResult, train) -> str:
    tokens = lm.metrics.get("steps", 0) * train.batch_size * train.bptt
    return (
        f"| {label} | {data} | {lm.metrics.get('steps', 'n/a')} x {train.batch_size} x "
        f"{train.bptt} ({tokens:,}) | {_minutes(lm.wall_seconds)} | {cite(lm.run_id or '')} "
        f"| {_command(lm)} |"
    )


def _bars(results: Results, decimals: int) -> list[str]:
    lines = ["", "## Bars", "", "| bar | measured | verdict |", "|---|---|---|"]
    return lines + [_bar(bar, decimals) for bar in results.bars]


def _bar(bar: Bar, decimals: int) -> str:
    ours, other = _percent(bar.ours, decimals), _percent(bar.other, decimals)
    verdict = "met" if bar.met else "missed"
    if bar.kind == "scratch":
        gap = 100 * (bar.other - bar.ours)
        return (
            f"| {bar.dataset}: ULMFiT beats the same model from scratch by >= {SCRATCH_MARGIN} "
            f"points | fwd {ours} % vs scratch {other} % ({gap:+.{decimals}f} points) "
            f"| {verdict} |"
        )
    if bar.kind == "ensemble":
        return (
            f"| {bar.dataset}: the ensemble is not worse than the better direction "
            f"| ensemble {ours} % vs best single {other} % | {verdict} |"
        )
    return (
        f"| {bar.dataset}, {bar.labels} labels: ULMFiT beats TF-IDF on the same labels "
        f"| ULMFiT {ours} % vs TF-IDF {other} % | {verdict} |"
    )


def _ablations(results: Results, dataset: DatasetResult, params: Params, decimals: int):
    baseline = dataset.baseline.metrics
    controls = results.ablations(dataset.name)
    if not controls and not baseline:
        return []
    name = dataset.name
    lines = [
        "",
        f"## Ablations and baseline: {name}",
        "",
        "Test and validation error in %, forward direction. *lr*: the learning rate the "
        "validation error chose from the grid (*one rate*: the one-rate recipe of "
        "`classifier.one_rate_lrs` won); *epochs*: the epoch whose weights the classifier "
        "kept / epochs run (early stopping), and the epoch of the lowest validation error "
        "where that is another (`keep_best` off). "
        "*paper*: the paper's validation error for the same ablation on the full dataset "
        "(a different scale: compare directions of effects, not values).",
        "",
        "| variant | test error | valid error | lr | epochs | train docs | wall time | MLflow run "
        "| command | paper (valid, full data) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    evaluation = dataset.evaluate.metrics
    paper = PAPER_ABLATION_VALID_ERROR
    full = dataset.classifiers["fwd"]
    if full.metrics:
        lines.append(
            _ablation_row(
                "full ULMFiT",
                f"**{_percent(evaluation.get('test_error_fwd'), decimals)}**",
                full.metrics.get("valid_error_rate"),
                full,
                paper["full"].get(name, "n/a"),
                decimals,
            )
        )
    for control in controls:
        label = control.control.description or control.key
        if not control.result.metrics:
            lines.append(f"| {label} | not run | | | | | | | | |")
            continue
        lines.append(
            _ablation_row(
                label,
                _percent(control.result.metrics.get("test_error"), decimals),
                control.result.metrics.get("valid_error"),
                control.result,
                paper.get(control.control.encoder, {}).get(name, "n/a"),
                decimals,
            )
        )
    if baseline:
        run = dataset.baseline
        lines.append(
            f"| TF-IDF 1-{params.baseline.ngram_max} grams + logistic regression "
            f"| {_percent(baseline.get('test_error'), decimals)} "
            f"| {_percent(baseline.get('valid_error'), decimals)} | C={baseline.get('C')} | - "
            f"| {baseline.get('train_documents', 'n/a')} | {_minutes(run.wall_seconds)} "
            f"| {cite(run.run_id or '')} | {_command(run)} | - |"
        )
    if isinstance(evaluation.get("test_error_ensemble"), int | float):
        lines.append(
            f"| ULMFiT fwd + bwd ensemble | **{_percent(evaluation['test_error_ensemble'], decimals)}**"
            f" | | | | | | {cite(dataset.evaluate.run_id or '')} "
            f"| {_command(dataset.evaluate)} | - |"
        )
    return lines


def epochs_cell(metrics: dict) -> str:
    """``kept / run``: the epoch whose weights a classifier ended with (its validation error is
    the one reported) and the epochs it ran, with ``(best N)`` where the lowest validation
    error came at another epoch (``keep_best`` off). Metrics written before ``kept_epoch``
    existed say only ``best N / run``: which epoch's weights they kept is not recorded."""
    best, kept, run = (metrics.get(k) for k in ("best_epoch", "kept_epoch", "epochs"))
    if not kept:
        return f"best {best} / {run}" if best else f"n/a / {run or 'n/a'}"
    return f"{kept} / {run}" + (f" (best {best})" if best and best != kept else "")


def _ablation_row(label, test, valid, run: StageResult, paper, decimals: int) -> str:
    metrics = run.metrics
    lr = f"{metrics.get('lr', 'n/a')}{' (one rate)' if metrics.get('one_rate') else ''}"
    return (
        f"| {label} | {test} | {_percent(valid, decimals)} | {lr} "
        f"| {epochs_cell(metrics)} "
        f"| {metrics.get('train_documents', 'n/a')} | {_minutes(run.wall_seconds)} "
        f"| {cite(run.run_id or '')} | {_command(run)} | {paper} |"
    )


def _sample_efficiency(results: Results, decimals: int) -> list[str]:
    lines: list[str] = []
    for name, series in results.sample_efficiency.items():
        sizes = sorted({n for points in series.values() for n, _ in points})
        lines += [
            "",
            f"## Sample efficiency: {name} (the paper's Figure 3, `sample_efficiency.png`)",
            "",
            f"Test error in % against the number of labelled training documents "
            f"(class-balanced, nested subsets), forward direction. The LM was fine-tuned on the "
            f"texts of every training document and the unlabelled ones, whatever the number of "
            f"labels. {PAPER_SAMPLE_EFFICIENCY}.",
            "",
            "| labels | " + " | ".join(series) + " |",
            "|---|" + "---|" * len(series),
        ]
        for size in sizes:
            cells = []
            for points in series.values():
                value = next((e for n, e in points if n == size), None)
                cells.append(_percent(value, decimals))
            lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return lines


def _pretraining_budget(results: Results, decimals: int) -> list[str]:
    if not results.pretraining_budget:
        return []
    lines = [
        "",
        "## Pretraining budget (`pretraining_budget.png`)",
        "",
        "Test error in % against the tokens the forward LM was pretrained on. Each smaller "
        "budget is a snapshot of the one pretraining run, taken before its learning rate "
        "had decayed (a run scheduled for that budget would end somewhat better), then "
        "fine-tuned on the dataset and classified with the same recipe as the full budget. "
        "TF-IDF + LR on the same labels is the flat line.",
        "",
        "| setting | pretraining tokens | ULMFiT test error | TF-IDF + LR |",
        "|---|---|---|---|",
    ]
    for panel, series in results.pretraining_budget.items():
        baseline = series["TF-IDF + LR"][0][1] if series["TF-IDF + LR"] else None
        for tokens, error in sorted(series["ULMFiT"]):
            lines.append(
                f"| {panel} | {tokens:,} | {_percent(error, decimals)} "
                f"| {_percent(baseline, decimals)} |"
            )
    return lines


def _figure_files(results: Results, params: Params) -> list[str]:
    lines = ["", "## Figures", ""]
    for dataset in results.datasets:
        name = dataset.name
        lines.append(
            f"- {name}: confusion matrix `figures/{name}/evaluate.png`; training curves "
            f"and LR schedules `figures/{name}/finetune_lm_*.png`, "
            f"`figures/{name}/classifier_*.png`"
        )
    pretraining = ", ".join(f"`figures/{lm.spec.name}.png`" for lm in results.pretrained.values())
    lines.append(f"- pretraining: {pretraining}")
    if params.controls:
        lines.append(
            "- sample efficiency (the paper's Figure 3): `sample_efficiency.png`; each "
            "control's curves: `figures/controls/<name>.png`"
        )
    return lines


def _runs(results: Results, params: Params) -> list[str]:
    """The full MLflow run id behind every figure of the tables."""
    runs: list[tuple[str, str | None]] = []
    for dataset in results.datasets:
        runs.append((f"{dataset.name} evaluate", dataset.evaluate.run_id))
        for d in DIRECTIONS:
            runs.append((f"{dataset.name} classifier_{d}", dataset.classifiers[d].run_id))
            runs.append((f"{dataset.name} finetune_{d}", dataset.finetuned[d].run_id))
    runs += [(label, lm.run_id) for label, lm in language_models(results)]
    if results.benchmark:
        for dataset in results.datasets:
            controls = results.ablations(dataset.name)
            if not controls and not dataset.baseline.metrics:
                continue
            runs += [(f"control {c.key}", c.result.run_id) for c in controls if c.result.metrics]
            if dataset.baseline.metrics:
                runs.append((f"{dataset.name} baseline", dataset.baseline.run_id))
        if results.pretraining_budget:
            budget = [c for c in results.controls if c.control.pretrain_step is not None]
            runs += [(f"control {c.key}", c.result.run_id) for c in budget]
    return [
        "",
        "## MLflow runs",
        "",
        "Open with `mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db`; each run is "
        "tagged with its DVC stage, pipeline id, git commit, Prefect flow-run id and the "
        "DVC md5 of every input.",
        "",
        "| figure | run id |",
        "|---|---|",
        *(f"| {label} | `{run_id or 'n/a'}` |" for label, run_id in runs),
    ]
