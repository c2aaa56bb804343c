"""Stage ``report``: ``reports/results.md``, one table over every dataset of ``params.yaml``.

Figures come from the stages' metrics files (``metrics/``), never recomputed here, each with the
MLflow run that produced it (``metrics/runs/``), so any number leads back to its run, and from
there to its data (``dvc.dep.*`` md5 tags) and code (git commit tag).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks.params import Params
from tasks.pipeline import stage_spec
from tasks.plots import error_curves_figure
from tasks.workspace import Layout
from ulmfit.io import atomic_write

# Validation error (%) of the paper's ablations (Howard & Ruder 2018, Tables 4-6, full data:
# IMDb, TREC-6, AG News), by control encoder; the schedule ablations are not in METHOD.md.
PAPER_ABLATION_VALID_ERROR = {
    "full": {"imdb": 5.00, "trec6": 5.69, "ag_news": 5.38},
    "lm_from_scratch": {"imdb": 5.63, "trec6": 10.67, "ag_news": 5.52},
    "pretrained": {"imdb": 6.99, "trec6": 6.38, "ag_news": 6.09},
    "scratch": {"imdb": 9.93, "trec6": 13.36, "ag_news": 6.81},
}
PAPER_SAMPLE_EFFICIENCY = (
    "paper (Figure 3, full IMDb / AG News): with 100 labels ULMFiT matches a model trained from "
    "scratch on 10x (IMDb) and 20x (AG) more labels; 100x with 50k unlabelled documents for LM "
    "fine-tuning"
)

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
    if not isinstance(value, int | float) or math.isnan(value):
        return "n/a"
    return f"{100 * value:.{decimals}f}"


def cite(run_id: str | None) -> str:
    """A run id as the tables show it: its first 8 characters."""
    return f"`{run_id[:8]}`" if run_id else "n/a"


def _number(value, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{decimals}f}"


@task(name="write-report", cache_policy=NONE, persist_result=False)
def write_report_task(root: Path, params: Params) -> dict:
    """Write ``reports/results.md``; returns the figures it tabulated (for MLflow)."""
    decimals = params.report.decimals

    def run_of(spec) -> str:
        return _read(root / spec.run_record).get("mlflow_run_id", "")

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
        evaluation = _read(root / stage_spec("evaluate", dataset=name).metrics)
        runs = {"evaluate": run_of(stage_spec("evaluate", dataset=name))}
        for direction in ("fwd", "bwd"):
            runs[f"classifier_{direction}"] = run_of(
                stage_spec("train_classifier", dataset=name, direction=direction)
            )
            runs[f"finetune_{direction}"] = run_of(
                stage_spec("finetune_lm", dataset=name, direction=direction)
            )
        perplexity = [
            _read(root / stage_spec("finetune_lm", dataset=name, direction=d).metrics).get(
                "valid_perplexity"
            )
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
    models = [(f"pretrained ({d})", stage_spec("pretrain", direction=d)) for d in ("fwd", "bwd")]
    models += [
        (f"{name} fine-tuned ({d})", stage_spec("finetune_lm", dataset=name, direction=d))
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

    lines += benchmark_sections(root, params, decimals, figures, all_runs)
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
    if params.controls:
        lines.append(
            "- sample efficiency (the paper's Figure 3): `sample_efficiency.png`; each "
            "control's curves: `figures/controls/<name>.png`"
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
    error_curves_figure(
        root / Layout.pretraining_budget,
        pretraining_budget_points(root, params),
        xlabel="pretraining tokens (forward LM)",
    )
    return figures


def sample_efficiency_figure(root: Path, params: Params) -> Path:
    """``reports/sample_efficiency.png``: the paper's Figure 3 from the stages' metrics."""
    return error_curves_figure(
        root / Layout.sample_efficiency, sample_efficiency_points(root, params)
    )


def sample_efficiency_points(root: Path, params: Params) -> dict[str, dict[str, list]]:
    """{dataset: {"ULMFiT": [(labels, test error)], "from scratch": [...], "TF-IDF + LR": [...]}}
    for every dataset with label-subset controls. A control is a point of a curve when its
    encoder is ``finetuned`` or ``scratch`` and it trains like the dataset's classifier apart
    from the epoch budget (an ablation such as "no STLR" is not)."""
    out: dict[str, dict[str, list]] = {}
    for name, dataset in params.datasets.items():
        if not any(c.dataset == name and c.labels is not None for c in params.controls.values()):
            continue
        curves: dict[str, list] = {"ULMFiT": [], "from scratch": [], "TF-IDF + LR": []}
        evaluation = _read(root / stage_spec("evaluate", dataset=name).metrics)
        if isinstance(evaluation.get("test_error_fwd"), int | float):
            curves["ULMFiT"].append((evaluation["train_documents"], evaluation["test_error_fwd"]))
        budget = {"epochs": 1, "patience": 0}  # the fields a curve may vary per label count
        standard = dataclasses.replace(dataset.classifier.train, **budget)
        for key, control in params.controls.items():
            if (
                control.dataset != name
                or control.encoder not in ("finetuned", "scratch")
                or control.pretrain_step is not None
                or dataclasses.replace(control.classifier.train, **budget) != standard
            ):
                continue
            metrics = _read(root / stage_spec("control", name=key, dataset=name).metrics)
            if isinstance(metrics.get("test_error"), int | float):
                label = "ULMFiT" if control.encoder == "finetuned" else "from scratch"
                curves[label].append((metrics["train_documents"], metrics["test_error"]))
        baseline = _read(root / stage_spec("baseline", dataset=name).metrics)
        for run in baseline.get("runs", []):
            curves["TF-IDF + LR"].append((run["train_documents"], run["test_error"]))
        out[name] = curves
    return out


# ------------------------------------------------------------------- benchmark sections


def _run(root: Path, spec) -> dict:
    return _read(root / spec.run_record)


def _minutes(seconds) -> str:
    return "n/a" if not isinstance(seconds, int | float) else f"{seconds / 60:.1f} min"


def _command(stage: str) -> str:
    return f"`ulmfit repro {stage}`"


def benchmark_sections(
    root: Path, params: Params, decimals: int, figures: dict, all_runs: list
) -> list[str]:
    """The setting, the bars, the ablations, the baselines and the sample-efficiency table,
    when ``params.yaml`` has controls or a baseline stage ran. Every number is read from the
    stages' metrics and run records; each row names its MLflow run, wall time and command."""
    baselines = {
        n: _read(root / stage_spec("baseline", dataset=n).metrics) for n in params.datasets
    }
    if not params.controls and not any(baselines.values()):
        return []
    lines = ["", "## Setting", ""]
    model = params.pretrain.model
    pretrain = params.pretrain.train
    lines.append(
        f"AWD-LSTM {model.embed_size}/{model.hidden_size}x{model.num_layers}, "
        f"{params.tokenizer.vocab_size:,}-piece SentencePiece {params.tokenizer.model_type} "
        f"vocabulary. Times are each stage's wall time in its last execution (a resumed stage "
        f"counts only its last part)."
    )
    lines += [
        "",
        "| stage | data | steps x batch x bptt (tokens seen) | wall time | MLflow run | command |",
        "|---|---|---|---|---|---|",
    ]
    total_seconds = 0.0
    for direction in ("fwd", "bwd"):
        spec = stage_spec("pretrain", direction=direction)
        metrics, run = _read(root / spec.metrics), _run(root, spec)
        tokens = metrics.get("steps", 0) * pretrain.batch_size * pretrain.bptt
        lines.append(
            f"| pretrain {direction} | Wikipedia, {metrics.get('train_documents', 'n/a')} "
            f"articles | {metrics.get('steps', 'n/a')} x {pretrain.batch_size} x "
            f"{pretrain.bptt} ({tokens:,}) | {_minutes(run.get('wall_seconds'))} "
            f"| {cite(run.get('mlflow_run_id', ''))} | {_command(spec.stage)} |"
        )
    for name, dataset in params.datasets.items():
        summary = _read(root / Layout.prepared(name) / "summary.json").get("splits", {})
        sizes = ", ".join(f"{split} {info.get('count', 0):,}" for split, info in summary.items())
        for direction in dataset.directions:
            spec = stage_spec("finetune_lm", dataset=name, direction=direction)
            metrics, run = _read(root / spec.metrics), _run(root, spec)
            train = dataset.finetune.train
            tokens = metrics.get("steps", 0) * train.batch_size * train.bptt
            lines.append(
                f"| {name} LM fine-tuning {direction} | {sizes} (texts of "
                f"{', '.join(dataset.finetune.splits)}) | {metrics.get('steps', 'n/a')} x "
                f"{train.batch_size} x {train.bptt} ({tokens:,}) "
                f"| {_minutes(run.get('wall_seconds'))} | {cite(run.get('mlflow_run_id', ''))} "
                f"| {_command(spec.stage)} |"
            )
    for path in sorted((root / "metrics" / "runs").rglob("*.json")):
        seconds = _read(path).get("wall_seconds")
        total_seconds += seconds if isinstance(seconds, int | float) else 0.0
    lines += ["", f"Sum of the wall times of every stage: **{_minutes(total_seconds)}**."]

    lines += _bars(root, params, decimals, baselines)
    for name in params.datasets:
        lines += _ablations(root, params, name, decimals, baselines.get(name) or {}, all_runs)
    lines += _sample_efficiency(root, params, decimals)
    lines += _pretraining_budget(root, params, decimals, all_runs)
    for key, value in (
        (f"{n}.baseline.test_error", b.get("test_error")) for n, b in baselines.items()
    ):
        if isinstance(value, int | float):
            figures[key] = float(value)
    for key, control in params.controls.items():
        value = _read(root / stage_spec("control", name=key, dataset=control.dataset).metrics).get(
            "test_error"
        )
        if isinstance(value, int | float):
            figures[f"controls.{key}.test_error"] = float(value)
    return lines


def _control_rows(root: Path, params: Params, dataset: str, with_labels: bool):
    """The dataset's controls (pretraining-budget points aside) with or without label subsets."""
    for key, control in params.controls.items():
        if (
            control.dataset == dataset
            and (control.labels is not None) == with_labels
            and control.pretrain_step is None
        ):
            spec = stage_spec("control", name=key, dataset=dataset)
            yield key, control, spec, _read(root / spec.metrics), _run(root, spec)


def _bars(root: Path, params: Params, decimals: int, baselines: dict) -> list[str]:
    """The issue's three bars, each checked on the measured numbers (never tuned away)."""
    lines = ["", "## Bars", "", "| bar | measured | verdict |", "|---|---|---|"]
    for name in params.datasets:
        evaluation = _read(root / stage_spec("evaluate", dataset=name).metrics)
        fwd = evaluation.get("test_error_fwd")
        for _key, control, _, metrics, _ in _control_rows(root, params, name, False):
            if control.encoder == "scratch" and isinstance(fwd, int | float):
                scratch = metrics.get("test_error")
                if isinstance(scratch, int | float):
                    gap = 100 * (scratch - fwd)
                    lines.append(
                        f"| {name}: ULMFiT beats the same model from scratch by >= 3 points "
                        f"| fwd {_percent(fwd, decimals)} % vs scratch {_percent(scratch, decimals)} "
                        f"% ({gap:+.{decimals}f} points) | {'met' if gap >= 3 else 'missed'} |"
                    )
        if isinstance(evaluation.get("test_error_ensemble"), int | float):
            best = min(evaluation["test_error_fwd"], evaluation["test_error_bwd"])
            ensemble = evaluation["test_error_ensemble"]
            lines.append(
                f"| {name}: the ensemble is not worse than the better direction "
                f"| ensemble {_percent(ensemble, decimals)} % vs best single "
                f"{_percent(best, decimals)} % | {'met' if ensemble <= best else 'missed'} |"
            )
        subsets = (baselines.get(name) or {}).get("subsets", {})
        fewest = min(
            (c.labels for c in params.controls.values() if c.dataset == name and c.labels),
            default=None,
        )
        for _key, control, _, metrics, _ in _control_rows(root, params, name, True):
            if control.encoder != "finetuned" or control.labels != fewest:
                continue
            baseline = subsets.get(str(control.labels), {}).get("test_error")
            ours = metrics.get("test_error")
            if isinstance(ours, int | float) and isinstance(baseline, int | float):
                lines.append(
                    f"| {name}, {control.labels} labels: ULMFiT beats TF-IDF on the same labels "
                    f"| ULMFiT {_percent(ours, decimals)} % vs TF-IDF "
                    f"{_percent(baseline, decimals)} % | {'met' if ours < baseline else 'missed'} |"
                )
    return lines


def _ablations(
    root: Path, params: Params, name: str, decimals: int, baseline: dict, all_runs: list
) -> list[str]:
    controls = list(_control_rows(root, params, name, False))
    if not controls and not baseline:
        return []
    lines = [
        "",
        f"## Ablations and baseline: {name}",
        "",
        "Test and validation error in %, forward direction. *lr*: the learning rate the "
        "validation error chose from the grid; *epochs*: best / run (early stopping). "
        "*paper*: the paper's validation error for the same ablation on the full dataset "
        "(a different scale: compare directions of effects, not values).",
        "",
        "| variant | test error | valid error | lr | epochs | train docs | wall time | MLflow run "
        "| command | paper (valid, full data) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    evaluation = _read(root / stage_spec("evaluate", dataset=name).metrics)
    spec = stage_spec("train_classifier", dataset=name, direction="fwd")
    metrics, run = _read(root / spec.metrics), _run(root, spec)
    paper = PAPER_ABLATION_VALID_ERROR
    if metrics:
        lines.append(
            f"| full ULMFiT | **{_percent(evaluation.get('test_error_fwd'), decimals)}** "
            f"| {_percent(metrics.get('valid_error_rate'), decimals)} | {metrics.get('lr', 'n/a')} "
            f"| {metrics.get('best_epoch', 'n/a')} / {metrics.get('epochs', 'n/a')} "
            f"| {metrics.get('train_documents', 'n/a')} | {_minutes(run.get('wall_seconds'))} "
            f"| {cite(run.get('mlflow_run_id', ''))} | {_command(spec.stage)} "
            f"| {paper['full'].get(name, 'n/a')} |"
        )
    for key, control, spec, metrics, run in controls:
        if not metrics:
            lines.append(f"| {control.description or key} | not run | | | | | | | | |")
            continue
        lines.append(
            f"| {control.description or key} | {_percent(metrics.get('test_error'), decimals)} "
            f"| {_percent(metrics.get('valid_error'), decimals)} | {metrics.get('lr', 'n/a')} "
            f"| {metrics.get('best_epoch', 'n/a')} / {metrics.get('epochs', 'n/a')} "
            f"| {metrics.get('train_documents', 'n/a')} | {_minutes(run.get('wall_seconds'))} "
            f"| {cite(run.get('mlflow_run_id', ''))} | {_command(spec.stage)} "
            f"| {paper.get(control.encoder, {}).get(name, 'n/a')} |"
        )
        all_runs.append((f"control {key}", run.get("mlflow_run_id", "")))
    if baseline:
        spec = stage_spec("baseline", dataset=name)
        run = _run(root, spec)
        lines.append(
            f"| TF-IDF 1-{params.baseline.ngram_max} grams + logistic regression "
            f"| {_percent(baseline.get('test_error'), decimals)} "
            f"| {_percent(baseline.get('valid_error'), decimals)} | C={baseline.get('C')} | - "
            f"| {baseline.get('train_documents', 'n/a')} | {_minutes(run.get('wall_seconds'))} "
            f"| {cite(run.get('mlflow_run_id', ''))} | {_command(spec.stage)} | - |"
        )
        all_runs.append((f"{name} baseline", run.get("mlflow_run_id", "")))
    if isinstance(evaluation.get("test_error_ensemble"), int | float):
        lines.append(
            f"| ULMFiT fwd + bwd ensemble | **{_percent(evaluation['test_error_ensemble'], decimals)}**"
            f" | | | | | | {cite(_run(root, stage_spec('evaluate', dataset=name)).get('mlflow_run_id', ''))} "
            f"| {_command(stage_spec('evaluate', dataset=name).stage)} | - |"
        )
    return lines


def _sample_efficiency(root: Path, params: Params, decimals: int) -> list[str]:
    curves = sample_efficiency_points(root, params)
    lines: list[str] = []
    for name, series in curves.items():
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


# ------------------------------------------------------------------- pretraining budget


def pretraining_budget_points(root: Path, params: Params) -> dict[str, dict[str, list]]:
    """{panel: {"ULMFiT": [(pretraining tokens, test error)], "TF-IDF + LR": flat line}}, one
    panel per dataset and label count that has ``pretrain_step`` controls. The largest budget
    is the pipeline's own classifier (or its control with the same labels), trained on the
    LM of the whole pretraining run; the others are the snapshot controls."""
    panels: dict[str, dict[str, list]] = {}
    for key, control in params.controls.items():
        if control.pretrain_step is None:
            continue
        panel = _budget_panel(control)
        if panel not in panels:
            full = _full_budget_point(root, params, control)
            panels[panel] = {"ULMFiT": [full] if full else [], "TF-IDF + LR": []}
        metrics = _read(root / stage_spec("control", name=key, dataset=control.dataset).metrics)
        if isinstance(metrics.get("test_error"), int | float):
            panels[panel]["ULMFiT"].append((metrics["pretrain_tokens"], metrics["test_error"]))
    for panel, series in panels.items():
        control = next(c for c in params.controls.values() if _budget_panel(c) == panel)
        baseline = _read(root / stage_spec("baseline", dataset=control.dataset).metrics)
        if control.labels is not None:
            baseline = baseline.get("subsets", {}).get(str(control.labels), {})
        if series["ULMFiT"] and isinstance(baseline.get("test_error"), int | float):
            xs = [x for x, _ in series["ULMFiT"]]
            series["TF-IDF + LR"] = [
                (min(xs), baseline["test_error"]),
                (max(xs), baseline["test_error"]),
            ]
    return panels


def _budget_panel(control) -> str:
    labels = "all labels" if control.labels is None else f"{control.labels:,} labels"
    return f"{control.dataset}, {labels}, {control.direction}"


def _full_budget_point(root: Path, params: Params, snapshot) -> tuple[int, float] | None:
    """(tokens of the whole pretraining run, test error) of the classifier that the snapshot
    control ``snapshot`` repeats on less pretraining, if that classifier ran."""
    tokens = _read(root / stage_spec("pretrain", direction=snapshot.direction).metrics).get(
        "tokens_trained"
    )
    error = None
    if snapshot.labels is None:
        evaluation = _read(root / stage_spec("evaluate", dataset=snapshot.dataset).metrics)
        error = evaluation.get(f"test_error_{snapshot.direction}")
    else:
        for key, control in params.controls.items():
            same = dataclasses.replace(snapshot, name=key, pretrain_step=None)
            if control == dataclasses.replace(same, description=control.description):
                metrics = _read(
                    root / stage_spec("control", name=key, dataset=control.dataset).metrics
                )
                error = metrics.get("test_error")
    if isinstance(tokens, int | float) and isinstance(error, int | float):
        return int(tokens), float(error)
    return None


def _pretraining_budget(root: Path, params: Params, decimals: int, all_runs: list) -> list[str]:
    panels = pretraining_budget_points(root, params)
    if not panels:
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
    for panel, series in panels.items():
        baseline = series["TF-IDF + LR"][0][1] if series["TF-IDF + LR"] else None
        for tokens, error in sorted(series["ULMFiT"]):
            lines.append(
                f"| {panel} | {tokens:,} | {_percent(error, decimals)} "
                f"| {_percent(baseline, decimals)} |"
            )
    for key, control in params.controls.items():
        if control.pretrain_step is not None:
            run = _run(root, stage_spec("control", name=key, dataset=control.dataset))
            all_runs.append((f"control {key}", run.get("mlflow_run_id", "")))
    return lines
