"""A pretraining-budget section of BENCHMARKS.md for one dataset, from a workspace that ran its
snapshot controls (``pretrain_step``).

The report stage draws the same figure, but only once every dataset of the profile has been
evaluated; this script draws one dataset's panels from the runs that exist, with the report's
own code (:func:`tasks.results.pretraining_budget_points`, :func:`tasks.plots.error_curves_figure`).
Nothing here trains or types a figure: each row is read from a stage's metrics file and names its
MLflow run. Produce the workspace with the pipeline's own commands, for example:

    ulmfit profile benchmark
    ulmfit repro control@imdb-ulmfit-1000-pretrain-375 control@imdb-ulmfit-1000-pretrain-750 \\
        control@imdb-ulmfit-1000
    python bench/budget.py --workspace . --dataset imdb    # then: python bench/collect.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from collect import publish  # noqa: E402

from tasks.params import load_params  # noqa: E402
from tasks.pipeline import stage_spec  # noqa: E402
from tasks.plots import error_curves_figure  # noqa: E402
from tasks.results import budget_panel, full_budget_stage, pretraining_budget_points  # noqa: E402


def _read(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: not found. Fix: run that stage in its workspace first")
    return json.loads(path.read_text(encoding="utf-8"))


def rows(workspace: Path, params, dataset: str) -> list[tuple[str, str, int, float, str]]:
    """(panel, LM, pretraining tokens, test error, MLflow run id) per point, smallest first."""
    out = []
    snapshots = {
        key: c
        for key, c in params.controls.items()
        if c.dataset == dataset and c.pretrain_step is not None
    }
    fulls = {}
    for key, control in snapshots.items():
        spec = stage_spec("control", name=key, dataset=dataset)
        metrics = _read(workspace / spec.metrics)
        record = _read(workspace / spec.run_record)
        lm = f"snapshot at step {control.pretrain_step} (control {key})"
        out.append((budget_panel(control), lm, metrics["pretrain_tokens"], metrics["test_error"],
                    record["mlflow_run_id"]))  # fmt: skip
        full = full_budget_stage(params, control)
        if full is not None:
            fulls[budget_panel(control)] = (full, control.direction)
    for panel, ((spec, key), direction) in fulls.items():
        pretrain = _read(workspace / stage_spec("pretrain", direction=direction).metrics)
        metrics, record = _read(workspace / spec.metrics), _read(workspace / spec.run_record)
        lm = f"the whole run ({spec.group}@{spec.item})" if spec.item else "the whole run"
        out.append((panel, lm, pretrain["tokens_trained"], metrics[key], record["mlflow_run_id"]))
    return sorted(out, key=lambda row: (row[0], row[2]))


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
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"pretraining_budget_{args.dataset}.md"
    workspace = args.workspace.resolve()
    params = load_params(workspace / "params.yaml", check_paths=False)
    points = rows(workspace, params, args.dataset)
    if not points:
        raise SystemExit(
            f"{workspace}/params.yaml: no control on {args.dataset} sets pretrain_step"
        )
    panels = {p: s for p, s in pretraining_budget_points(workspace, params).items()
              if p in {row[0] for row in points}}  # fmt: skip
    figure = error_curves_figure(
        out.with_suffix(".png"), panels, xlabel="pretraining tokens (forward LM)"
    )
    tfidf = {panel: series["TF-IDF + LR"] for panel, series in panels.items()}
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
        "metrics files; the run ids are the classifiers' MLflow runs (first 8 characters).",
        "",
        f"![pretraining budget, {args.dataset}](bench/results/{figure.name})",
        "",
        "| setting | pretrained LM | pretraining tokens | ULMFiT test error % "
        "| TF-IDF + LR % | MLflow run |",
        "|---|---|---|---|---|---|",
    ]
    for panel, lm, tokens, error, run in points:
        flat = tfidf.get(panel) or [(None, None)]
        baseline = "n/a" if flat[0][1] is None else f"{100 * flat[0][1]:.2f}"
        lines.append(
            f"| {panel} | {lm} | {tokens:,} | {100 * error:.2f} | {baseline} | `{run[:8]}` |"
        )
    publish(out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
