"""The figures of the report, read from the stages' metrics and run records (``metrics/``),
never recomputed from models: plain dataclasses that ``tasks/report.py`` renders as markdown.

Every figure keeps the MLflow run that produced it (``metrics/runs/``), so any number leads back
to its run, and from there to its data (``dvc.dep.*`` md5 tags) and code (git commit tag).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tasks.params import DIRECTIONS, ControlParams, Params
from tasks.pipeline import StageSpec, stage_spec
from tasks.workspace import Layout

# Validation error (%) of the paper's ablations (Howard & Ruder 2018, Tables 4-6, full data:
# IMDb, TREC-6, AG News), by control encoder. The paper's schedule ablations (no STLR, no
# discriminative learning rates, no gradual unfreezing) are not transcribed: they show n/a.
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
SCRATCH_MARGIN = 3  # points: the bar ULMFiT must beat the same model from scratch by


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


@dataclasses.dataclass(frozen=True)
class StageResult:
    """One stage item's metrics and run record (empty when it has not run)."""

    spec: StageSpec
    metrics: dict
    record: dict

    @property
    def run_id(self) -> str | None:
        return self.record.get("mlflow_run_id", "")

    @property
    def wall_seconds(self) -> float | None:
        return self.record.get("wall_seconds")


def read_stage(root: Path, spec: StageSpec) -> StageResult:
    return StageResult(spec, _read(root / spec.metrics), _read(root / spec.run_record))


@dataclasses.dataclass(frozen=True)
class DatasetResult:
    name: str
    source: str  # the corpus (``datasets.<name>.source.name``)
    directions: tuple[str, ...]  # the directions params.yaml trains for it
    evaluate: StageResult
    classifiers: dict[str, StageResult]  # every direction (an untrained one: skipped)
    finetuned: dict[str, StageResult]
    baseline: StageResult
    split_sizes: dict[str, int]  # documents per prepared split
    paper_test_error: float | None


@dataclasses.dataclass(frozen=True)
class ControlResult:
    key: str
    control: ControlParams
    result: StageResult


@dataclasses.dataclass(frozen=True)
class Bar:
    """One of the issue's bars, checked on the measured numbers (never tuned away)."""

    dataset: str
    kind: str  # "scratch": ULMFiT vs scratch; "ensemble": vs the better direction; "tfidf"
    ours: float
    other: float
    met: bool
    labels: int | None = None  # "tfidf": the label count compared


@dataclasses.dataclass(frozen=True)
class Results:
    datasets: list[DatasetResult]
    pretrained: dict[str, StageResult]  # direction -> pretrain stage
    controls: list[ControlResult]
    total_wall_seconds: float  # every stage's last execution
    bars: list[Bar]
    # {panel: {method: [(x, test error)]}}: the sample-efficiency and pretraining-budget curves
    sample_efficiency: dict[str, dict[str, list]]
    pretraining_budget: dict[str, dict[str, list]]
    headline: dict[str, dict[str, float]]  # {dataset: {key: value}}: results/<dataset>.json
    figures: dict[str, float]  # what the report stage logs to MLflow

    @property
    def benchmark(self) -> bool:
        """Whether the report has the benchmark sections (controls, or a baseline ran)."""
        return bool(self.controls) or any(d.baseline.metrics for d in self.datasets)

    def ablations(self, dataset: str, with_labels: bool = False) -> list[ControlResult]:
        """The dataset's controls, pretraining-budget points aside, with or without labels."""
        return [
            c
            for c in self.controls
            if c.control.dataset == dataset
            and (c.control.labels is not None) == with_labels
            and c.control.pretrain_step is None
        ]


def collect(root: Path, params: Params) -> Results:
    """Every figure the report shows, from the stages' metrics and run records under ``root``."""
    datasets = [_dataset(root, name, params) for name in params.datasets]
    pretrained = {d: read_stage(root, stage_spec("pretrain", direction=d)) for d in DIRECTIONS}
    controls = [
        ControlResult(key, c, read_stage(root, stage_spec("control", name=key, dataset=c.dataset)))
        for key, c in params.controls.items()
    ]
    wall = (_read(path).get("wall_seconds") for path in (root / "metrics" / "runs").rglob("*.json"))
    results = Results(
        datasets,
        pretrained,
        controls,
        sum(s for s in wall if _is_number(s)),
        [],
        sample_efficiency_points(root, params),
        pretraining_budget_points(root, params),
        {dataset.name: headline(dataset) for dataset in datasets},
        {},
    )
    results.bars.extend(_bars(results, params))
    results.figures.update(_figures(results))
    return results


def _dataset(root: Path, name: str, params: Params) -> DatasetResult:
    dataset = params.dataset(name)
    summary = _read(root / Layout.prepared(name) / "summary.json").get("splits", {})
    return DatasetResult(
        name,
        dataset.source.name,
        dataset.directions,
        read_stage(root, stage_spec("evaluate", dataset=name)),
        {
            d: read_stage(root, stage_spec("train_classifier", dataset=name, direction=d))
            for d in DIRECTIONS
        },
        {
            d: read_stage(root, stage_spec("finetune_lm", dataset=name, direction=d))
            for d in DIRECTIONS
        },
        read_stage(root, stage_spec("baseline", dataset=name)),
        {split: info.get("count", 0) for split, info in summary.items()},
        PAPER_TEST_ERROR.get(dataset.source.name),
    )


def _bars(results: Results, params: Params) -> list[Bar]:
    bars = []
    for dataset in results.datasets:
        name, evaluation = dataset.name, dataset.evaluate.metrics
        fwd = evaluation.get("test_error_fwd")
        for control in results.ablations(name):
            scratch = control.result.metrics.get("test_error")
            if control.control.encoder == "scratch" and _is_number(fwd) and _is_number(scratch):
                bars.append(
                    Bar(name, "scratch", fwd, scratch, 100 * (scratch - fwd) >= SCRATCH_MARGIN)
                )
        if _is_number(evaluation.get("test_error_ensemble")):
            best = min(evaluation["test_error_fwd"], evaluation["test_error_bwd"])
            ensemble = evaluation["test_error_ensemble"]
            bars.append(Bar(name, "ensemble", ensemble, best, ensemble <= best))
        subsets = dataset.baseline.metrics.get("subsets", {})
        fewest = min(
            (c.labels for c in params.controls.values() if c.dataset == name and c.labels),
            default=None,
        )
        for control in results.ablations(name, with_labels=True):
            if control.control.encoder != "finetuned" or control.control.labels != fewest:
                continue
            baseline = subsets.get(str(fewest), {}).get("test_error")
            ours = control.result.metrics.get("test_error")
            if _is_number(ours) and _is_number(baseline):
                bars.append(Bar(name, "tfidf", ours, baseline, ours < baseline, fewest))
    return bars


# The headline figures of a dataset: (key, stage, its metric); the direction fills ``{d}``.
HEADLINE = (
    ("error_fwd", "evaluate", "test_error_fwd"),
    ("error_bwd", "evaluate", "test_error_bwd"),
    ("error_ensemble", "evaluate", "test_error_ensemble"),
    ("error_tfidf", "baseline", "test_error"),
    ("ppl_fwd", "finetune_lm_fwd", "valid_perplexity"),
    ("ppl_bwd", "finetune_lm_bwd", "valid_perplexity"),
)


def headline(dataset: DatasetResult) -> dict[str, float]:
    """What a newcomer looks at first, per dataset: test error of each classifier, of their
    ensemble and of TF-IDF (fractions), and the fine-tuned LMs' validation perplexity. What
    did not run is left out. ``dvc metrics show`` and the pipeline's MLflow run show these."""
    stages = {
        "evaluate": dataset.evaluate,
        "baseline": dataset.baseline,
        **{f"finetune_lm_{d}": lm for d, lm in dataset.finetuned.items()},
    }
    values = ((key, stages[stage].metrics.get(metric)) for key, stage, metric in HEADLINE)
    return {key: float(value) for key, value in values if _is_number(value)}


def _figures(results: Results) -> dict[str, float]:
    """The figures logged to the report's MLflow run."""
    figures = {}
    for dataset in results.datasets:
        for key, value in results.headline[dataset.name].items():
            figures[f"{dataset.name}.{key}"] = value
        if _is_number(majority := dataset.evaluate.metrics.get("test_error_majority")):
            figures[f"{dataset.name}.error_majority"] = float(majority)
    for _, lm in language_models(results):
        if _is_number(lm.metrics.get("valid_perplexity")):
            figures[f"{lm.spec.name}.valid_perplexity"] = float(lm.metrics["valid_perplexity"])
    if results.benchmark:
        for control in results.controls:
            value = control.result.metrics.get("test_error")
            if _is_number(value):
                figures[f"controls.{control.key}.test_error"] = float(value)
    return figures


def language_models(results: Results) -> list[tuple[str, StageResult]]:
    """(label, stage) of every language model: the pretrained ones, then each dataset's
    fine-tuned ones in the directions it trains."""
    models = [(f"pretrained ({d})", lm) for d, lm in results.pretrained.items()]
    for dataset in results.datasets:
        models += [
            (f"{dataset.name} fine-tuned ({d})", dataset.finetuned[d]) for d in dataset.directions
        ]
    return models


# ---------------------------------------------------------------------------------- curves


# The encoders whose label-subset controls are points of the sample-efficiency curves.
CURVES = {
    "finetuned": "ULMFiT",
    "scratch": "from scratch",
    "frozen_features": "frozen features (ELMo-style)",
}


def sample_efficiency_points(root: Path, params: Params) -> dict[str, dict[str, list]]:
    """{dataset: {"ULMFiT": [(labels, test error)], "from scratch": [...], "TF-IDF + LR": [...]}}
    for every dataset with label-subset controls, and "frozen features (ELMo-style)" where a
    control uses that encoder. A control is a point of a curve when its encoder is one of
    :data:`CURVES` and it trains like the dataset's classifier apart from the epoch budget (an
    ablation such as "no STLR" is not)."""
    out: dict[str, dict[str, list]] = {}
    for name, dataset in params.datasets.items():
        if not any(c.dataset == name and c.labels is not None for c in params.controls.values()):
            continue
        curves: dict[str, list] = {"ULMFiT": [], "from scratch": [], "TF-IDF + LR": []}
        if any(
            c.dataset == name and c.encoder == "frozen_features" for c in params.controls.values()
        ):
            curves[CURVES["frozen_features"]] = []
        evaluation = _read(root / stage_spec("evaluate", dataset=name).metrics)
        if _is_number(evaluation.get("test_error_fwd")):
            curves["ULMFiT"].append((evaluation["train_documents"], evaluation["test_error_fwd"]))
        budget = {"epochs": 1, "patience": 0}  # the fields a curve may vary per label count
        standard = dataclasses.replace(dataset.classifier.train, **budget)
        # A random or frozen encoder trains without gradual unfreezing or discriminative LRs
        # by default (tasks.params.ONE_RATE): that is its standard, not an ablation.
        unprotected = dataclasses.replace(
            standard,
            gradual_unfreezing=False,
            schedule=dataclasses.replace(standard.schedule, discriminative=False),
        )
        for key, control in params.controls.items():
            if (
                control.dataset != name
                or control.encoder not in CURVES
                or control.pretrain_step is not None
                or dataclasses.replace(control.classifier.train, **budget)
                != (standard if control.encoder == "finetuned" else unprotected)
            ):
                continue
            metrics = _read(root / stage_spec("control", name=key, dataset=name).metrics)
            if _is_number(metrics.get("test_error")):
                curves[CURVES[control.encoder]].append(
                    (metrics["train_documents"], metrics["test_error"])
                )
        baseline = _read(root / stage_spec("baseline", dataset=name).metrics)
        for run in baseline.get("runs", []):
            curves["TF-IDF + LR"].append((run["train_documents"], run["test_error"]))
        out[name] = curves
    return out


@dataclasses.dataclass(frozen=True)
class BudgetPoint:
    """One point of a pretraining-budget panel: a classifier on an LM pretrained on ``tokens``."""

    tokens: int
    error: float  # test error
    stage: StageSpec  # the classifier's stage: its run record names the MLflow run
    snapshot_step: int | None  # the pretraining snapshot the LM started from; None: the whole run


def pretraining_budget_runs(root: Path, params: Params) -> dict[str, list[BudgetPoint]]:
    """{panel: points, fewest tokens first}, one panel per dataset and label count that has
    ``pretrain_step`` controls. The largest budget is the pipeline's own classifier (or its
    control with the same labels), trained on the LM of the whole pretraining run; the others
    are the snapshot controls. Stages that have not run give no point."""
    panels: dict[str, list[BudgetPoint]] = {}
    for key, control in params.controls.items():
        if control.pretrain_step is None:
            continue
        panel = budget_panel(control)
        if panel not in panels:
            full = _full_budget_point(root, params, control)
            panels[panel] = [full] if full else []
        spec = stage_spec("control", name=key, dataset=control.dataset)
        metrics = _read(root / spec.metrics)
        if _is_number(metrics.get("test_error")) and _is_number(metrics.get("pretrain_tokens")):
            point = (int(metrics["pretrain_tokens"]), float(metrics["test_error"]))
            panels[panel].append(BudgetPoint(*point, spec, control.pretrain_step))
    return {panel: sorted(points, key=lambda p: p.tokens) for panel, points in panels.items()}


def pretraining_budget_points(
    root: Path, params: Params, runs: dict[str, list[BudgetPoint]] | None = None
) -> dict[str, dict[str, list]]:
    """{panel: {"ULMFiT": [(pretraining tokens, test error)], "TF-IDF + LR": flat line}}: the
    figure's series of ``runs`` (default: :func:`pretraining_budget_runs`), with TF-IDF + LR on
    the same labels drawn flat across the panel's budgets."""
    runs = pretraining_budget_runs(root, params) if runs is None else runs
    panels: dict[str, dict[str, list]] = {}
    for panel, points in runs.items():
        series = panels[panel] = {"ULMFiT": [(p.tokens, p.error) for p in points]}
        control = next(c for c in params.controls.values() if budget_panel(c) == panel)
        baseline = _read(root / stage_spec("baseline", dataset=control.dataset).metrics)
        if control.labels is not None:
            baseline = baseline.get("subsets", {}).get(str(control.labels), {})
        error = baseline.get("test_error")
        series["TF-IDF + LR"] = []
        if points and _is_number(error):
            series["TF-IDF + LR"] = [(points[0].tokens, error), (points[-1].tokens, error)]
    return panels


def budget_panel(control: ControlParams) -> str:
    labels = "all labels" if control.labels is None else f"{control.labels:,} labels"
    return f"{control.dataset}, {labels}, {control.direction}"


def _full_budget_stage(params: Params, snapshot: ControlParams) -> tuple[StageSpec, str] | None:
    """The stage (and its metrics key) of the classifier that the snapshot control ``snapshot``
    repeats on the LM of the whole pretraining run: the dataset's evaluation when the snapshot
    uses all labels, else the control with the same settings and no ``pretrain_step``."""
    if snapshot.labels is None:
        spec = stage_spec("evaluate", dataset=snapshot.dataset)
        return spec, f"test_error_{snapshot.direction}"
    for key, control in params.controls.items():
        same = dataclasses.replace(snapshot, name=key, pretrain_step=None)
        if control == dataclasses.replace(same, description=control.description):
            return stage_spec("control", name=key, dataset=control.dataset), "test_error"
    return None


def _full_budget_point(root: Path, params: Params, snapshot) -> BudgetPoint | None:
    """The point of the classifier that the snapshot control ``snapshot`` repeats on the whole
    pretraining run, if that classifier ran."""
    pretrain = stage_spec("pretrain", direction=snapshot.direction)
    tokens = _read(root / pretrain.metrics).get("tokens_trained")
    full = _full_budget_stage(params, snapshot)
    error = None if full is None else _read(root / full[0].metrics).get(full[1])
    if _is_number(tokens) and _is_number(error):
        return BudgetPoint(int(tokens), float(error), full[0], None)
    return None
