"""A pretraining-budget section of BENCHMARKS.md for one dataset, from a workspace that ran its
snapshot controls (``pretrain_step``).

The report stage draws the same figure, but only once every dataset of the profile has been
evaluated; this script draws one dataset's panels from the runs that exist, with the report's
own code (:func:`tasks.results.pretraining_budget_runs` for the table and the figure's points,
:func:`tasks.plots.error_curves_figure`).
Nothing here trains or types a figure: each row is read from a stage's metrics file and names its
MLflow run. Produce the workspace with the pipeline's own commands, for example:

    ulmfit profile benchmark
    ulmfit repro control@imdb-ulmfit-1000-pretrain-375 control@imdb-ulmfit-1000-pretrain-750 \\
        control@imdb-ulmfit-1000
    python bench/budget.py --workspace . --dataset imdb    # then: python bench/collect.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from arms import read_json  # noqa: E402
from collect import publish  # noqa: E402

from tasks.params import load_params  # noqa: E402
from tasks.plots import error_curves_figure  # noqa: E402
from tasks.results import (  # noqa: E402
    BudgetPoint,
    budget_panel,
    pretraining_budget_points,
    pretraining_budget_runs,
)


def _lm(point: BudgetPoint) -> str:
    stage = point.stage
    if point.snapshot_step is not None:
        return f"snapshot at step {point.snapshot_step} (control {stage.item})"
    return f"the whole run ({stage.group}@{stage.item})" if stage.item else "the whole run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=ROOT, help="where the controls ran")
    parser.add_argument("--dataset", default="imdb")
    parser.add_argument(
        "--out",
        type=Path,
        help="the section's markdown (default: bench/results/pretraining_budget_<dataset>.md); "
        "the figure goes beside it, with the same name and .png",
    )
    parser.add_argument("--conditions", default="", help="the code and what shared the machine")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"pretraining_budget_{args.dataset}.md"
    workspace = args.workspace.resolve()
    params = load_params(workspace / "params.yaml", check_paths=False)
    mine = {budget_panel(c) for c in params.controls.values() if c.dataset == args.dataset}
    runs = {p: points for p, points in pretraining_budget_runs(workspace, params).items()
            if p in mine}  # fmt: skip
    if not runs:
        raise SystemExit(
            f"{workspace}/params.yaml: no control on {args.dataset} sets pretrain_step"
        )
    panels = pretraining_budget_points(workspace, params, runs)
    figure = error_curves_figure(
        out.with_suffix(".png"), panels, xlabel="pretraining tokens (forward LM)"
    )
    lines = [
        f"# Pretraining budget on {args.dataset}: test error against pretraining tokens",
        "",
        "Reproduce: the controls named below in a `ulmfit profile benchmark` workspace (`ulmfit "
        f"repro control@<name>`, one at a time), then `python bench/budget.py --workspace <it> "
        f"--dataset {args.dataset} && python bench/collect.py`.",
        "",
        "CPU scale. Each smaller budget is a snapshot of the one pretraining "
        "run, taken before its learning rate had decayed, then fine-tuned on the dataset and "
        "classified with the same recipe as the whole run's LM (the report stage's definition). "
        "TF-IDF + LR on the same labels is the flat line. Every figure is read from the stages' "
        "metrics files; the run ids are the classifiers' MLflow runs (first 8 characters)."
        + (f" {args.conditions}" if args.conditions else ""),
        "",
        f"![pretraining budget, {args.dataset}](bench/results/{figure.name})",
        "",
        "| setting | pretrained LM | pretraining tokens | ULMFiT test error % "
        "| TF-IDF + LR % | MLflow run |",
        "|---|---|---|---|---|---|",
    ]
    for panel, points in runs.items():
        line = panels[panel]["TF-IDF + LR"]  # flat: its first point's error is its value
        baseline = f"{100 * line[0][1]:.2f}" if line else "n/a"
        for point in points:
            run = read_json(workspace, point.stage.run_record)["mlflow_run_id"]
            lines.append(
                f"| {panel} | {_lm(point)} | {point.tokens:,} | {100 * point.error:.2f} "
                f"| {baseline} | `{run[:8]}` |"
            )
    publish(out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
