"""The arms section of BENCHMARKS.md (issue 13): ULMFiT beside the GPT-, BERT- and ELMo-style
arms on one dataset, from workspaces that ran them.

One workspace holds one backbone (``pretrain.model.backbone``), so each fine-tuned arm is its own
clone of the project; the ELMo-style arm is a ``frozen_features`` control inside the ULMFiT
workspace (it reads that workspace's fwd and bwd AWD-LSTM LMs). Nothing here trains or types a
figure: every number is read from the stages' metrics files and run records (each row names its
MLflow run ids). Equal compute means equal tokens: the table shows the tokens each phase read and
its wall time, so the cost per token of each backbone is there too. Produce the workspaces with
the pipeline's own commands (``profiles/arms.yaml`` says how), then:

    python bench/arms.py --dataset trec6 \\
        --arm "ULMFiT=../bench" --arm "GPT-style=../arms-gpt" \\
        --arm "ELMo-style=../bench:trec6-elmo"
    python bench/collect.py

``NAME=WORKSPACE`` is a fine-tuned arm (its forward classifier: the same direction for every
arm); ``NAME=WORKSPACE:CONTROL`` is a control of that workspace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from collect import publish  # noqa: E402

from tasks.pipeline import stage_spec  # noqa: E402
from tasks.report import epochs_cell  # noqa: E402

TITLE = "Arms: ULMFiT beside GPT-, BERT- and ELMo-style transfer on {dataset}"
PRODUCE = "run each arm's workspace as `profiles/arms.yaml` says"


def read_json(workspace: Path, relative: str) -> dict:
    """A stage file of ``workspace``, or one line that names it and the fix."""
    path = workspace / relative
    if not path.is_file():
        raise SystemExit(f"{path}: not found. Fix: run that stage in {workspace} first")
    return json.loads(path.read_text())


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f}"


def _percent(error: float | None) -> str:
    return "–" if error is None else f"{100 * error:.2f}"


def chosen_valid(metrics: dict) -> float | None:
    """The validation error of the point a classifier's grid search chose (its lowest), or
    ``None`` where it searched nothing."""
    searched = [g["valid_error"] for g in metrics.get("grid_search", []) if "valid_error" in g]
    return min(searched) if searched else None


def valid_note(valid: float | None) -> str:
    """``", valid X"`` for a chosen validation error, or nothing where there was none."""
    return "" if valid is None else f", valid {_percent(valid)}"


def _chosen(metrics: dict) -> str:
    """The learning rate (and whether the one-rate recipe won) and dropout multiplier the
    validation grid chose (of which), the epoch whose weights were kept (and the best one where
    that is another) and their validation error (the search's choice): a choice at the grid's
    edge or at the last epoch says the arm may be under-tuned."""

    def pick(key: str, prefix: str, suffix: str = "") -> str:
        grid = sorted({g[key] for g in metrics.get("grid_search", []) if key in g})
        value = metrics.get(key)
        of = f" of {', '.join(f'{prefix}{g:g}' for g in grid)}" if len(grid) > 1 else ""
        return "–" if value is None else f"{prefix}{value:g}{suffix}{of}"

    dropout = f", {pick('dropout_multiplier', 'x')}" if "dropout_multiplier" in metrics else ""
    epoch = f", epoch {epochs_cell(metrics)}"
    recipe = " (one rate)" if metrics.get("one_rate") else ""
    return pick("lr", "", recipe) + dropout + epoch + valid_note(chosen_valid(metrics))


def _millions(tokens: float | None) -> str:
    return "–" if tokens is None else f"{tokens / 1e6:.2f}M"


def _stage(workspace: Path, group: str, **items: str) -> tuple[dict, dict]:
    """A stage item's metrics and run record, at the paths the stage table gives them."""
    spec = stage_spec(group, **items)
    return read_json(workspace, spec.metrics), read_json(workspace, spec.run_record)


def arm_row(name: str, spec: str, dataset: str) -> dict:
    """The figures of one arm: ``WORKSPACE`` (its fwd LM and classifier) or
    ``WORKSPACE:CONTROL``."""
    workspace, _, control = spec.partition(":")
    workspace = Path(workspace).resolve()
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    backbone = params["pretrain"]["model"].get("backbone", "awd_lstm")
    pretrain, pretrain_run = _stage(workspace, "pretrain", direction="fwd")
    row = {
        "arm": name,
        "backbone": backbone,
        "pretrain_tokens": pretrain.get("tokens_trained"),
        "pretrain_minutes": pretrain_run.get("wall_seconds"),
        "pretrain_ppl": pretrain.get("valid_perplexity"),
        "runs": [pretrain_run["mlflow_run_id"]],
    }
    if not control:
        lm, lm_run = _stage(workspace, "finetune_lm", dataset=dataset, direction="fwd")
        classifier, classifier_run = _stage(
            workspace, "train_classifier", dataset=dataset, direction="fwd"
        )
        evaluation, evaluation_run = _stage(workspace, "evaluate", dataset=dataset)
        row["runs"] += [r["mlflow_run_id"] for r in (lm_run, classifier_run, evaluation_run)]
        return row | {
            "finetune_tokens": lm.get("tokens_trained"),
            "finetune_minutes": lm_run.get("wall_seconds"),
            "classifier_minutes": classifier_run.get("wall_seconds"),
            "test_error": evaluation["test_error_fwd"],
            "ensemble_error": evaluation.get("test_error_ensemble"),
            "chosen": _chosen(classifier),
        }
    metrics, record = _stage(workspace, "control", name=control, dataset=dataset)
    if metrics.get("dataset") != dataset:
        raise SystemExit(f"{spec}: control {control} is on {metrics.get('dataset')}")
    encoder = metrics.get("encoder")
    # The workspace's fine-tuned LMs the control's classifier reads: both for the frozen
    # ELMo-style features, its direction for a fine-tuned encoder; none for a control with no
    # pretraining or with its own LM from a pretraining snapshot.
    directions: tuple[str, ...] = ()
    if encoder in ("scratch", "lm_from_scratch"):
        row.update(pretrain_tokens=None, pretrain_minutes=None, pretrain_ppl=None, runs=[])
        reads = "no pretraining"
    elif "pretrain_step" in metrics:
        # the snapshot's share of the pretraining run's minutes is not recorded: no figure
        row.update(pretrain_tokens=metrics.get("pretrain_tokens"), pretrain_minutes=None)
        row.update(pretrain_ppl=None)
        reads = f"its own LM from pretraining step {metrics['pretrain_step']}"
    else:
        directions = {
            "frozen_features": ("fwd", "bwd"),
            "finetuned": (metrics.get("direction", "fwd"),),
        }
        directions = directions.get(encoder, ())
        reads = "+".join(directions)
    lms = [_stage(workspace, "finetune_lm", dataset=dataset, direction=d) for d in directions]
    row["runs"] += [lm_run["mlflow_run_id"] for _, lm_run in lms] + [record["mlflow_run_id"]]
    return row | {
        "backbone": f"{backbone}, control ({encoder}{', ' + reads if reads else ''})",
        "finetune_tokens": sum(lm.get("tokens_trained") or 0 for lm, _ in lms) or None,
        "finetune_minutes": sum(run.get("wall_seconds") or 0.0 for _, run in lms) or None,
        "classifier_minutes": record.get("wall_seconds"),
        "test_error": metrics["test_error"],
        "chosen": _chosen(metrics),
        "labels": metrics.get("labels"),
    }


def tfidf_row(workspace: Path, dataset: str, labels: int | None = None) -> dict:
    """The TF-IDF + logistic regression baseline stage of a workspace, on the same labels:
    the whole train split, or the subset of ``labels`` documents a control trained on."""
    baseline, record = _stage(workspace, "baseline", dataset=dataset)
    fit = next((run for run in baseline["runs"] if run["labels"] == labels), None)
    if fit is None:
        raise SystemExit(
            f"{workspace}: its baseline@{dataset} has no fit on {labels} labels. Fix: add the "
            "control to params.yaml and re-run the baseline stage"
        )
    return {
        "arm": "TF-IDF + logistic regression" + (f", {labels:,} labels" if labels else ""),
        "backbone": "bag of n-grams, no pretraining",
        "pretrain_tokens": None,
        "pretrain_minutes": None,
        "classifier_minutes": record.get("wall_seconds"),
        "test_error": fit["test_error"],
        "chosen": f"C = {fit.get('C'):g} (validation grid)",
        "runs": [record["mlflow_run_id"]],
    }


def table(rows: list[dict], dataset: str) -> str:
    lines = [
        f"| arm | backbone | pretraining tokens (fwd) | pretraining min | pretrained LM ppl "
        f"| LM fine-tuning tokens | LM fine-tuning min | classifier min | {dataset} test error % "
        "| fwd + bwd ensemble % | classifier lr, dropout (grid), epoch kept / run, valid error % | MLflow runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ppl = row.get("pretrain_ppl")
        lines.append(
            f"| {row['arm']} | {row['backbone']} | {_millions(row['pretrain_tokens'])} "
            f"| {_minutes(row['pretrain_minutes'])} | {'–' if ppl is None else f'{ppl:.1f}'} "
            f"| {_millions(row.get('finetune_tokens'))} | {_minutes(row.get('finetune_minutes'))} "
            f"| {_minutes(row.get('classifier_minutes'))} | {100 * row['test_error']:.2f} "
            f"| {_percent(row.get('ensemble_error'))} | {row.get('chosen', '–')} "
            f"| {', '.join(r[:8] for r in row['runs'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="trec6")
    parser.add_argument(
        "--arm", action="append", required=True, help="NAME=WORKSPACE or NAME=WORKSPACE:CONTROL"
    )
    parser.add_argument(
        "--conditions",
        default="no other job ran during the runs",
        help="what else the machine was doing (wall times depend on it)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "arms.md")
    parser.add_argument("--title", default=TITLE, help="the section's heading ({dataset}: its)")
    parser.add_argument(
        "--produce",
        default=PRODUCE,
        help="how the workspaces were produced (the section's reproduce line starts with it)",
    )
    args = parser.parse_args(argv)
    rows = []
    for arm in args.arm:
        name, sep, spec = arm.partition("=")
        if not sep:
            parser.error(f"--arm {arm!r}: expected NAME=WORKSPACE or NAME=WORKSPACE:CONTROL")
        rows.append(arm_row(name, spec, args.dataset))
    first = Path(args.arm[0].partition("=")[2].partition(":")[0]).resolve()
    if (first / stage_spec("baseline", dataset=args.dataset).metrics).is_file():
        for labels in dict.fromkeys(row.get("labels") for row in rows):
            rows.append(tfidf_row(first, args.dataset, labels))
    text = "\n".join(
        [
            "# " + args.title.format(dataset=args.dataset),
            "",
            f"Reproduce: {args.produce}, then "
            f"`python bench/arms.py --dataset {args.dataset} "
            + " ".join(f'--arm "{a}"' for a in args.arm)
            + ("" if args.out.name == "arms.md" else f" --out bench/results/{args.out.name}")
            + ("" if args.title == TITLE else f' --title "{args.title}"')
            + ("" if args.produce == PRODUCE else f' --produce "{args.produce}"')
            + "` (workspace paths as on the machine that ran them).",
            "",
            f"CPU scale, the forward direction of each fine-tuned arm; {args.conditions}. "
            "Pretraining tokens are those the forward LM read; the ELMo-style arm's LM "
            "fine-tuning column adds its two LMs. Wall times include evaluation and saving. "
            "Every figure is read from the stages' metrics files; the MLflow run ids (first 8 "
            "characters) are pretraining, LM fine-tuning, classifier and evaluation. The TF-IDF "
            "rows are the first workspace's baseline stage, on the same labels as the arms.",
            "",
            table(rows, args.dataset),
            "",
        ]
    )
    publish(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
