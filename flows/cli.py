"""``ulmfit``: the command line of the pipeline.

The stage commands are what ``dvc.yaml`` runs; a person normally runs ``ulmfit repro`` (the
whole pipeline), ``ulmfit predict`` and ``ulmfit profile``. Heavy imports (torch, Prefect,
MLflow) happen only inside the command that needs them, so ``ulmfit --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

from tasks.pipeline import ARGUMENTS, EXIT_BUSY, EXIT_FULL_DISK, EXIT_INPUT_ERROR, STAGES

# Environment defaults for every command (an explicit value in the environment wins).
ENV_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    # Prefect's ephemeral server (a flow run with no server, as `ulmfit retrain` without one)
    # can take well over 20 s to start on a loaded machine; the default timeout would fail it.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    # DVC is the one cache: Prefect keeps no results.
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    # The `ulmfit` logger (progress lines) goes through Prefect's handlers: console and UI.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "ulmfit",
    # A stage whose server is gone gives up after seconds (2 + 4 s of back-off per call), not
    # minutes (5 retries: about a minute per call) while it holds the workspace lock.
    "PREFECT_CLIENT_MAX_RETRIES": "2",
}


def _project_root() -> Path:
    return Path.cwd().resolve()


def _set_environment(root: Path) -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from tasks.workspace import Layout

    os.environ.setdefault("PREFECT_HOME", str(root / Layout.prefect_home))


def _setup_logging(verbose: bool, flow: bool) -> None:
    """Commands that run a Prefect flow (the stages, retrain) log through Prefect's handlers
    (console, and the server's UI); the other commands through a plain stderr handler.
    Libraries stay at WARNING either way."""
    logging.getLogger("ulmfit").setLevel(logging.DEBUG if verbose else logging.INFO)
    if flow:
        import prefect  # noqa: F401 - importing Prefect configures its logging
    else:
        logging.basicConfig(
            level=logging.WARNING,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )


class _NoInputErrorTraceback(logging.Filter):
    """Prefect logs a failing task's traceback; for bad input or a full disk the CLI's
    one-line message (file, problem, fix) is the whole story, so the traceback is dropped from
    the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ulmfit.errors import InputError, full_disk

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, InputError) or full_disk(error) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_input_error_tracebacks() -> None:
    """Attach :class:`_NoInputErrorTraceback` to every console handler (the root logger's,
    where Prefect's run loggers propagate, and Prefect's own); API handlers keep the traceback
    for the Prefect UI."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith("prefect")]
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _NoInputErrorTraceback) for f in handler.filters
            ):
                handler.addFilter(_NoInputErrorTraceback())


# ----------------------------------------------------------------------------- stage commands


def cmd_stage(args: argparse.Namespace) -> int:
    """Check the whole of ``params.yaml`` (before Prefect starts), then run one stage's flow
    under the workspace lock; its arguments (dataset, direction or control name) also name the
    stage item (``finetune_lm@imdb-fwd``). The flow reports to ``ulmfit repro``'s Prefect
    server, or the configured one; failing both (a bare ``dvc repro``), to the workspace's own
    server, started for the stage and stopped with it however it ends."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.repro import prefect_server
    from tasks.lifeline import stop_with_dvc
    from tasks.params import load_params
    from tasks.pipeline import BY_GROUP
    from tasks.workspace import workspace_lock

    stage = BY_GROUP[args.command.replace("-", "_")]
    items = {arg: getattr(args, arg) for arg in stage.args}
    root = _project_root()
    load_params(root / "params.yaml")  # every bad value at once, before any work
    stop_with_dvc()  # under a bare `dvc repro`: end with it, not as an orphan
    item = "-".join(items.values())
    lock = workspace_lock(root, f"{stage.group}@{item}" if item else stage.group)
    with lock, contextlib.ExitStack() as stack:
        if not PREFECT_API_URL.value():  # not under `ulmfit repro`, nor a configured server
            # The workspace's own server, under a lifeline: Prefect's ephemeral one would
            # outlive a stage killed by a signal.
            url = stack.enter_context(prefect_server(root))
            stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
        module, name = stage.flow.split(":")
        flow_fn = getattr(importlib.import_module(module), name)
        _quiet_input_error_tracebacks()
        flow_fn(root=str(root), **items)
    return 0


# -------------------------------------------------------------------------------- commands


def cmd_repro(args: argparse.Namespace) -> int:
    from flows.repro import repro

    command = ("exp", "run") if args.command == "exp" else ("repro",)
    return repro(_project_root(), list(args.dvc_args), command)


def cmd_retrain(args: argparse.Namespace) -> int:
    from flows.retrain import DEFAULT_METRIC, retrain

    retrain(
        project_dir=str(_project_root()),
        datasets=args.datasets,
        metric=args.metric or DEFAULT_METRIC,
        refresh=not args.no_refresh,
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from flows.predict import predict_file

    out = predict_file(
        _project_root(),
        args.model,
        Path(args.input),
        Path(args.output),
        text_column=args.text_column,
        batch_size=args.batch_size,
    )
    logging.getLogger("ulmfit").info("wrote %s", out)
    return 0


def cmd_add_dataset(args: argparse.Namespace) -> int:
    from flows.add_dataset import add_dataset, describe

    added = add_dataset(
        _project_root(),
        Path(args.path),
        name=args.name,
        text_columns=args.text,
        label_column=args.label,
        test_path=Path(args.test) if args.test else None,
        unsup_path=Path(args.unsup) if args.unsup else None,
        only=args.only,
        check=not args.no_check,
    )
    print(describe(added))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from flows.profiles import list_profiles, use_profile

    root = _project_root()
    if args.list or not args.name:
        for name, summary in list_profiles(root):
            print(f"{name:14s} {summary}")
        return 0
    path = use_profile(root, args.name)
    print(f"params.yaml now holds profile '{args.name}' ({path}); run: ulmfit repro")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ulmfit",
        description=(
            "ULMFiT (Howard & Ruder 2018) as a reproducible pipeline: pretrain an AWD-LSTM "
            "language model on Wikipedia, fine-tune it on each dataset's texts, train "
            "classifiers, evaluate and report. DVC decides what needs re-running, each stage "
            "runs as a Prefect flow, and MLflow records every run. Run commands from the "
            "project root."
        ),
        epilog=(
            "Start here: 'ulmfit repro' runs the whole pipeline for the parameters in "
            "params.yaml (the offline demo by default); 'ulmfit profile --list' shows other "
            "settings; 'ulmfit predict --model data/datasets/bbc_news/model --input in.csv "
            "--output out.csv' classifies texts. Stage commands are what dvc.yaml calls."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    repro = sub.add_parser(
        "repro",
        help="run the whole pipeline (dvc repro) with one local Prefect server",
        description=(
            "Run every stage that is out of date ('dvc repro'), as Prefect flows tracked in "
            "MLflow. Starts one local Prefect server for all stages (unless PREFECT_API_URL "
            "points at one), groups the MLflow runs under one pipeline run, and stops the "
            "server at the end. Anything after 'repro' goes to 'dvc repro', e.g. "
            "'ulmfit repro --force report' or 'ulmfit repro evaluate@bbc_news'."
        ),
    )
    repro.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments for dvc repro")
    repro.set_defaults(func=cmd_repro)

    exp = sub.add_parser(
        "exp",
        help="run an experiment (dvc exp run) the way 'repro' runs the pipeline",
        description=(
            "'ulmfit exp run ARGS' runs 'dvc exp run ARGS' with 'repro''s Prefect server, "
            "supervisor and MLflow pipeline run, which gets the parameters set with -S as its "
            "params and the headline figures as its metrics, e.g. "
            "'ulmfit exp run -S classifier.train.lr=0.02'. Then 'dvc exp show' puts the "
            "experiments side by side (docs/review.md)."
        ),
    )
    exp.add_argument("action", choices=["run"], help="run: dvc exp run")
    exp.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments for dvc exp run")
    exp.set_defaults(func=cmd_repro)

    retrain = sub.add_parser(
        "retrain",
        help="refresh the data, rerun the pipeline, promote only a better classifier",
        description=(
            "Retrain now, as the scheduled deployment does (docs/deployment.md): re-run the "
            "prepare stages so new upstream data is fetched, run 'ulmfit repro', and move "
            "each dataset's registry alias 'champion' to its new classifier only if its test "
            "error is strictly lower. Every decision is recorded in MLflow (experiment "
            "'retrain') and as a Prefect artifact."
        ),
    )
    retrain.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        help="repeatable; default: every dataset in params.yaml",
    )
    retrain.add_argument(
        "--metric",
        help="the evaluate stage's metric to compare, lower is better (default: the ensemble's "
        "test error)",
    )
    retrain.add_argument(
        "--no-refresh", action="store_true", help="skip re-running the prepare stages"
    )
    retrain.set_defaults(func=cmd_retrain)

    predict = sub.add_parser(
        "predict",
        help="classify the texts of a CSV, TSV, JSON Lines or Parquet file",
        description=(
            "Read a CSV, TSV, JSON Lines, JSON or Parquet file (compressed too) with a text column, classify every row with a trained classifier, "
            "and write the rows back with 'label', 'probability' and one 'prob_<label>' "
            "column per class. --model is a registered MLflow model "
            "(models:/ulmfit-bbc_news@champion, models:/ulmfit-bbc_news@latest, "
            "models:/ulmfit-bbc_news/3) or a directory written by the evaluate stage "
            "(data/datasets/bbc_news/model)."
        ),
    )
    predict.add_argument(
        "--model", required=True, help="models:/<name>@<alias> or a model directory"
    )
    predict.add_argument(
        "--input",
        required=True,
        help="file to classify: CSV, TSV, JSON Lines, JSON or Parquet (by extension)",
    )
    predict.add_argument("--output", required=True, help="file to write, format by extension")
    predict.add_argument(
        "--text-column", default="text", help="column holding the texts (default: text)"
    )
    predict.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    predict.set_defaults(func=cmd_predict)

    add = sub.add_parser(
        "add-dataset",
        help="add your own labelled table or folder to params.yaml as a dataset",
        description=(
            "Check a labelled file (CSV, TSV, JSON Lines or Parquet) or a folder with one "
            "sub-folder per class (optionally under train/ and test/) exactly as the prepare "
            "stage will read it, then write it into params.yaml as 'datasets.<name>.source', "
            "keeping the file's comments. Without --test, a seeded stratified 20%% of the rows "
            "becomes the test split. Then run 'ulmfit repro'. docs/own-data.md has every option."
        ),
    )
    add.add_argument("path", help="the labelled file, or a folder of class folders")
    add.add_argument("--name", help="dataset name (default: from the file name)")
    add.add_argument(
        "--text",
        action="append",
        help="text column; repeat to join several (e.g. --text title --text body)",
    )
    add.add_argument("--label", help="label column")
    add.add_argument("--test", help="a separate test file in the same format")
    add.add_argument("--unsup", help="unlabelled texts for LM fine-tuning, same format")
    add.add_argument(
        "--only",
        action="store_true",
        help="make it the only dataset (drops the others and their controls from params.yaml)",
    )
    add.add_argument(
        "--no-check", action="store_true", help="write params.yaml without reading the data"
    )
    add.set_defaults(func=cmd_add_dataset)

    profile = sub.add_parser(
        "profile",
        help="switch params.yaml to a named profile (default, paper, paper-slice)",
        description=(
            "Copy profiles/<name>.yaml over params.yaml. 'default': the offline demo "
            "(embedded data, CPU, minutes). 'paper': the paper's setting (WikiText-103 or a "
            "Wikipedia dump, the six datasets, the paper's hyperparameters; GPU). "
            "'paper-slice': the paper's setting on small slices of the real corpora in "
            "../shared/data. Then run 'ulmfit repro'."
        ),
    )
    profile.add_argument("name", nargs="?", help="profile name (see --list)")
    profile.add_argument("--list", action="store_true", help="list the profiles")
    profile.set_defaults(func=cmd_profile)

    for row in STAGES:
        stage = sub.add_parser(
            row.command,
            help=row.help.split(": ", 1)[1].split(" (")[0].split(" ->")[0],
            description=row.help + " Normally run by 'ulmfit repro' / 'dvc repro'.",
        )
        for arg in row.args:
            argument = ARGUMENTS[arg]
            stage.add_argument(
                f"--{arg}", required=True, choices=argument.choices, help=argument.help
            )
        stage.set_defaults(func=cmd_stage)
    return parser


def _split_repro(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``ulmfit [options] repro ARGS`` (or ``exp run ARGS``): ARGS go to ``dvc repro`` (``dvc
    exp run``) as they are, options first included (``--force``, ``--single-item``), which
    argparse's REMAINDER refuses; ``repro -h`` and ``exp run -h`` are still ours."""
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if at is not None and argv[at : at + 2] == ["exp", "run"]:
        at += 1  # `exp run ARGS`: ARGS go to `dvc exp run`
    elif at is None or argv[at] != "repro":
        return argv, None
    if set(argv[at + 1 : at + 2]) & {"-h", "--help"}:
        return argv, None
    return argv[: at + 1], argv[at + 1 :]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, dvc_args = _split_repro(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    if dvc_args is not None:
        args.dvc_args = dvc_args
    _set_environment(_project_root())
    _setup_logging(args.verbose, flow=args.func in (cmd_stage, cmd_retrain))
    from tasks.workspace import WorkspaceBusy
    from ulmfit.errors import InputError, full_disk

    try:
        return int(args.func(args) or 0)
    except InputError as error:
        print(f"ulmfit {args.command}: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except WorkspaceBusy as error:
        print(f"ulmfit {args.command}: {error}", file=sys.stderr)
        return EXIT_BUSY
    except OSError as error:
        if (message := full_disk(error)) is None:
            raise
        print(f"ulmfit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FULL_DISK
    except KeyboardInterrupt:
        print(f"ulmfit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
