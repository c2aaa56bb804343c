"""Issue 9's bars as measured: one table that says, for each bar, the figure the runs give, the
goal and whether it is met, from the workspaces that ran the benchmark profile and the demo.

Nothing here trains or types a figure: each is read from a stage's metrics file, with its
MLflow run id. Where a bar has several ULMFiT classifiers on the same labels (ULMFiT's recipe
and the one-rate recipe, as controls of one workspace), the one with the lowest validation
error stands for ULMFiT, as a user choosing on validation would pick it; the table names it and
the others. A bar whose runs are not in the workspaces says so instead of a figure.

    python bench/bars.py --bench ../bench [--bench ../other-workspace] --demo ../demo
    python bench/collect.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from arms import _chosen, _percent, _stage, chosen_valid, valid_note  # noqa: E402
from collect import publish  # noqa: E402

from tasks.pipeline import stage_spec  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Figure:
    """A measured test error (or ratio) and where it comes from."""

    value: float
    source: str  # workspace item and MLflow run id, with the validation error that chose it
    valid: float | None = None


@dataclasses.dataclass(frozen=True)
class Bar:
    """One row of issue 9's table. ``ulmfit``: the controls of the benchmark workspace that
    are ULMFiT classifiers on the bar's labels (the lowest validation error stands for it): the
    profile's own, and those of ``bench/imdb_recipes.yaml`` and ``bench/imdb_lm_vs_random.yaml``
    where a workspace added them (each at the profile's classifier seed)."""

    name: str
    goal: str
    dataset: str
    ulmfit: tuple[str, ...] = ()
    pipeline: bool = True  # the pipeline's own classifiers (all the dataset's labels) count too
    labels: int | None = None
    below: float | None = None  # an absolute goal (test error, as a fraction)
    strict: bool = False  # "lower" rather than "at or below"


BARS = (
    Bar(
        "IMDb, 100 labels: ULMFiT vs TF-IDF",
        "ULMFiT lower",
        "imdb",
        ("imdb-ulmfit-100", "imdb-ulmfit-100-grid", "imdb-ulmfit-100-one_rate-lr01"),
        pipeline=False,
        labels=100,
        strict=True,
    ),
    Bar(
        "IMDb, 1,000 labels: ULMFiT vs TF-IDF",
        "ULMFiT at or below",
        "imdb",
        (
            "imdb-ulmfit-1000",
            "imdb-ulmfit-1000-grid",
            "imdb-ulmfit-1000-scratch_recipe",
            "imdb-ulmfit-1000-one_rate",
            "imdb-ulmfit-1000-one_rate-lr003",
            "imdb-ulmfit-1000-one_rate-lr01",
            "imdb-ulmfit-1000-one_rate-lr03",
        ),
        pipeline=False,
        labels=1000,
    ),
    Bar(
        "IMDb, 5,000 labels: ULMFiT vs TF-IDF",
        "ULMFiT at or below",
        "imdb",
        (
            "imdb-ulmfit-5000-grid",
            "imdb-ulmfit-5000-dropout01",
            "imdb-ulmfit-5000-scratch_recipe",
            "imdb-ulmfit-5000-one_rate-lr01",
        ),
    ),
    Bar(
        "IMDb, 5,000 labels, from scratch",
        "below 25 (it learns)",
        "imdb",
        ("imdb-scratch-5000",),
        pipeline=False,
        below=0.25,
        strict=True,
    ),
    Bar("AG News 8k: ULMFiT vs TF-IDF", "ULMFiT at or below", "ag_news"),
    Bar("TREC-6 ensemble", "below 6", "trec6", below=0.06, strict=True),
)


def _control(workspace: Path, name: str, dataset: str) -> Figure | None:
    if not (workspace / stage_spec("control", name=name, dataset=dataset).metrics).is_file():
        return None
    metrics, record = _stage(workspace, "control", name=name, dataset=dataset)
    valid = chosen_valid(metrics)
    source = f"control@{name} `{record['mlflow_run_id'][:8]}`{valid_note(valid)}"
    return Figure(metrics["test_error"], source, valid)


def _evaluated(workspace: Path, dataset: str, key: str) -> Figure | None:
    if not (workspace / stage_spec("evaluate", dataset=dataset).metrics).is_file():
        return None
    metrics, record = _stage(workspace, "evaluate", dataset=dataset)
    if key not in metrics:
        return None
    choices = []  # what each direction's validation search chose
    valid = None  # the forward classifier's, when it alone stands for ULMFiT
    for direction in ("fwd", "bwd"):
        spec = stage_spec("train_classifier", dataset=dataset, direction=direction)
        if (workspace / spec.metrics).is_file():
            trained, _ = _stage(workspace, "train_classifier", dataset=dataset, direction=direction)
            chose = chosen_valid(trained)
            if chose is not None:  # _chosen names its validation error
                choices.append(f"{direction} {_chosen(trained)}")
                if direction == "fwd" and key == "test_error_fwd":
                    valid = chose
    chosen = f" ({'; '.join(choices)})" if choices else ""
    source = f"evaluate@{dataset} `{record['mlflow_run_id'][:8]}`{chosen}"
    return Figure(metrics[key], source, valid)


def _tfidf(workspace: Path, dataset: str, labels: int | None) -> Figure | None:
    if not (workspace / stage_spec("baseline", dataset=dataset).metrics).is_file():
        return None
    metrics, record = _stage(workspace, "baseline", dataset=dataset)
    fit = next((run for run in metrics["runs"] if run["labels"] == labels), None)
    if fit is None:
        return None
    return Figure(fit["test_error"], f"baseline@{dataset} `{record['mlflow_run_id'][:8]}`")


def _verdict(value: float, goal: float, strict: bool) -> str:
    return "**met**" if (value < goal if strict else value <= goal) else "missed"


def _found(bar: Bar, bench: Path) -> list[Figure]:
    """The bar's ULMFiT (or from-scratch) classifiers that ran in ``bench``."""
    found = [_control(bench, name, bar.dataset) for name in bar.ulmfit]
    if bar.pipeline:  # the pipeline's own classifiers: the ensemble for an absolute goal
        key = "test_error_fwd" if bar.below is None else "test_error_ensemble"
        found.append(_evaluated(bench, bar.dataset, key))
    return [f for f in found if f]


def bar_row(bar: Bar, benches: list[Path]) -> list[str]:
    """``[bar, measured, goal, verdict, sources]`` of one bar, from the first benchmark
    workspace that ran its classifiers (its TF-IDF baseline from the same workspace)."""
    bench, found = next(((b, f) for b in benches if (f := _found(bar, b))), (None, []))
    if bench is None:
        return [bar.name, "not measured in these workspaces", bar.goal, "–", "–"]
    best = min(found, key=lambda f: (f.valid is None, f.valid or 0.0))
    others = [f for f in found if f is not best]
    chosen = best.source + "".join(
        f"; not chosen: {f.source}, test {_percent(f.value)}" for f in others
    )
    if bar.below is not None:
        return [
            bar.name,
            _percent(best.value),
            bar.goal,
            _verdict(best.value, bar.below, bar.strict),
            chosen,
        ]
    tfidf = _tfidf(bench, bar.dataset, bar.labels)
    if tfidf is None:
        return [bar.name, f"{_percent(best.value)} vs TF-IDF not run", bar.goal, "–", chosen]
    return [
        bar.name,
        f"{_percent(best.value)} vs {_percent(tfidf.value)}",
        bar.goal,
        _verdict(best.value, tfidf.value, bar.strict),
        f"{chosen}; {tfidf.source}",
    ]


def demo_row(demo: Path, dataset: str = "bbc_news", goal: float = 1.5) -> list[str]:
    """The demo's ensemble error over TF-IDF's, and the stages' summed wall time."""
    name = "demo: ensemble ÷ TF-IDF"
    ensemble = _evaluated(demo, dataset, "test_error_ensemble")
    tfidf = _tfidf(demo, dataset, None)
    if ensemble is None or tfidf is None:
        return [name, "not measured in this workspace", f"at most {goal}×", "–", "–"]
    ratio = ensemble.value / tfidf.value
    seconds = sum(
        json.loads(p.read_text()).get("wall_seconds") or 0.0
        for p in (demo / "metrics" / "runs").rglob("*.json")
        if p.parent.name != "controls"
    )
    return [
        name,
        f"{ratio:.2f}× ({_percent(ensemble.value)} vs {_percent(tfidf.value)}); stages "
        f"{seconds / 60:.1f} min, set-up not included",
        f"at most {goal}×, and at most 15 min end to end",
        _verdict(ratio, goal, strict=False),
        f"{ensemble.source}; {tfidf.source}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bench",
        type=Path,
        action="append",
        required=True,
        help="a benchmark-profile workspace (repeat: each bar reads the first that ran it)",
    )
    parser.add_argument("--demo", type=Path, required=True, help="a workspace that ran the demo")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bars.md")
    parser.add_argument(
        "--conditions", default="", help="how the workspaces were made (code, sessions)"
    )
    parser.add_argument("--title", default="Issue 9's bars, as measured")
    args = parser.parse_args(argv)
    benches = [bench.resolve() for bench in args.bench]
    args.out = args.out.resolve()
    rows = [bar_row(bar, benches) for bar in BARS] + [demo_row(args.demo.resolve())]
    lines = [
        f"# {args.title}",
        "",
        "Reproduce: `python bench/bars.py"
        + "".join(f" --bench {bench}" for bench in args.bench)
        + f" --demo {args.demo}"
        + (f" --out {args.out.relative_to(ROOT)}" if args.out.is_relative_to(ROOT) else "")
        + f' --title "{args.title}"'
        + (f' --conditions "{args.conditions}"' if args.conditions else "")
        + "` (workspace paths as on the machine that ran them), then `python bench/collect.py`.",
        "",
        "Test error in %. Where several ULMFiT classifiers ran on a bar's labels (ULMFiT's "
        "recipe and the one-rate recipe, as controls), the one with the lowest validation "
        "error stands for ULMFiT and the others are listed; the test set never chose. Each "
        "figure names its stage and MLflow run (first 8 characters); the sections below say how "
        "each was run." + (f" {args.conditions}" if args.conditions else ""),
        "",
        "| bar | measured | goal | verdict | from |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    publish(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
