"""Where a workspace's time went: the minutes of each stage behind some targets, from its MLflow
runs, and their sum (issue 9's budget: the benchmark profile in at most 120 minutes).

DVC's stage graph gives the targets and every stage upstream of them. Each stage's MLflow runs
(all of them: a stage killed and resumed has two) give its wall minutes, from a run's start to
its end. A run that was paused (SIGSTOP while another job had the machine) or left idle shows
it as a stretch with no metric logged; training logs every few steps, so a stretch longer than
``--idle`` seconds (5 minutes by default; the longest stretch of a running stage measured here,
an evaluation, was under 2) is counted apart, and *active* minutes are the rest. A run killed
mid-stage loses the steps after its last checkpoint, which the resumed run trains again: active
minutes count those twice, so a stage's sum is an upper bound. Nothing is typed by hand.

    python bench/stage_time.py --workspace ../bench32 \\
        --target evaluate@trec6 --target control@imdb-ulmfit-100
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
from collect import publish  # noqa: E402

from tasks import tracking  # noqa: E402
from tasks.params import load_params  # noqa: E402

TITLE = "Where the benchmark profile's time goes"
OUT = ROOT / "bench" / "results" / "stage_time_bars.md"  # a name bench/collect.py reads


@dataclasses.dataclass
class StageTime:
    """One stage's runs: wall seconds (start to end) and the idle stretches among them."""

    stage: str
    runs: list[str] = dataclasses.field(default_factory=list)
    statuses: list[str] = dataclasses.field(default_factory=list)
    wall: float = 0.0
    idle: float = 0.0
    skipped: str = ""  # the reason a stage had nothing to do (it starts no MLflow run)

    @property
    def active(self) -> float:
        return self.wall - self.idle


def stages_behind(workspace: Path, targets: list[str], counted: list[str]) -> dict[str, str]:
    """The targets and every stage they depend on, dependencies first (DVC's own graph), less
    the stages behind ``counted`` (another table counts them); each with the reason its
    metrics file gives where it skipped its work (else "")."""
    from dvc.repo import Repo
    from dvc.repo.graph import collect_pipeline
    from dvc.stage.exceptions import StageNotFound

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph

        def behind(names: list[str]) -> dict[str, list]:
            found: dict[str, list] = {}
            for target in names:
                try:  # a path, not a bare name: DVC reads that from the current directory
                    (stage,) = repo.stage.collect(f"{workspace / 'dvc.yaml'}:{target}")
                except StageNotFound:
                    raise SystemExit(
                        f"{workspace / 'dvc.yaml'}: no stage {target!r}. "
                        "Fix: name one of its stages"
                    ) from None
                for upstream in collect_pipeline(stage, graph):
                    found.setdefault(upstream.name, [str(out.def_path) for out in upstream.outs])
            return found

        left_out = behind(counted)
        return {
            name: skipped(workspace, outs)
            for name, outs in behind(targets).items()
            if name not in left_out
        }


def skipped(workspace: Path, outs: list[str]) -> str:
    """The ``skipped`` reason of a stage's metrics file (a stage that had nothing to do, e.g.
    a direction the dataset leaves out), or ""."""
    for out in outs:
        path = workspace / out
        if out.startswith("metrics/") and out.endswith(".json") and path.is_file():
            reason = json.loads(path.read_text()).get("skipped")
            if reason:
                return str(reason)
    return ""


def stage_times(workspace: Path, stages: dict[str, str], idle_seconds: float) -> list[StageTime]:
    """Each stage's MLflow runs in the workspace's experiment, summed."""
    params = load_params(workspace / "params.yaml", check_paths=False)
    client = tracking.client(workspace)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None:
        raise SystemExit(f"{workspace}: no MLflow experiment. Fix: run the stages there first")
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    times = {name: StageTime(name, skipped=reason) for name, reason in stages.items()}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        name = run.info.run_name
        if name not in times or run.info.end_time is None:
            continue
        stamps = sorted(
            {
                point.timestamp
                for key in run.data.metrics
                for point in client.get_metric_history(run.info.run_id, key)
            }
            | {run.info.start_time, run.info.end_time}
        )
        gaps = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:], strict=False)]
        entry = times[name]
        entry.runs.append(run.info.run_id[:8])
        entry.statuses.append(run.info.status)
        entry.wall += (run.info.end_time - run.info.start_time) / 1000
        entry.idle += sum(gap for gap in gaps if gap > idle_seconds)
    return [times[name] for name in stages]


def _total(label: str, times: list[StageTime]) -> str:
    wall = sum(t.wall for t in times) / 60
    idle = sum(t.idle for t in times) / 60
    active = sum(t.active for t in times) / 60
    return f"| **{label}** | {wall:.1f} | {idle:.1f} | **{active:.1f}** | |"


def table(times: list[StageTime], idle_seconds: float, added: list[str]) -> str:
    """A row per stage, the sum of all, and where ``added`` names stages that are not the
    profile's own (controls added for one measurement), the sum of the profile's."""
    lines = [
        f"| stage | wall min | no metric for over {idle_seconds / 60:g} min | active min "
        "| MLflow runs |",
        "|---|---|---|---|---|",
    ]
    for t in times:
        stage = f"{t.stage} (added, not in the profile)" if t.stage in added else t.stage
        if not t.runs:
            why = f"skipped: {t.skipped}" if t.skipped else "no run in this workspace's MLflow"
            lines.append(f"| {stage} | – | – | – | {why} |")
            continue
        runs = [
            f"{r} ({s.lower()})" if s != "FINISHED" else r
            for r, s in zip(t.runs, t.statuses, strict=True)
        ]
        idle = f"{t.idle / 60:.1f}" if t.idle else "–"
        lines.append(
            f"| {stage} | {t.wall / 60:.1f} | {idle} | {t.active / 60:.1f} | {', '.join(runs)} |"
        )
    lines.append(_total(f"all {len(times)} stages", times))
    own = [t for t in times if t.stage not in added]
    if len(own) < len(times):
        lines.append(_total(f"the profile's {len(own)} stages", own))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--target", action="append", required=True, help="a DVC stage (repeat)")
    parser.add_argument(
        "--counted",
        action="append",
        default=[],
        help="a DVC stage whose stages (it and those upstream) another table counts: left out",
    )
    parser.add_argument(
        "--added",
        action="append",
        default=[],
        help="a stage among them that is not the profile's own: marked, and a second sum leaves "
        "it out",
    )
    parser.add_argument("--idle", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--title", default=TITLE)
    parser.add_argument("--conditions", default="", help="what ran on the machine meanwhile")
    args = parser.parse_args(argv)
    workspace = args.workspace.resolve()
    stages = stages_behind(workspace, args.target, args.counted)
    for name in args.added:
        if name not in stages:
            parser.error(f"--added {name}: not among the stages behind the targets")
    times = stage_times(workspace, stages, args.idle)
    command = " ".join(
        ["python bench/stage_time.py", f"--workspace {args.workspace}"]
        + [f"--target {t}" for t in args.target]
        + [f"--counted {t}" for t in args.counted]
        + [f"--added {t}" for t in args.added]
        + ([] if args.out == OUT else [f"--out bench/results/{args.out.name}"])
        + ([] if args.title == TITLE else [f'--title "{args.title}"'])
    )
    left_out = (
        f" The stages behind {', '.join(args.counted)} are left out (counted elsewhere)."
        if args.counted
        else ""
    )
    text = (
        f"# {args.title}\n\n"
        f"Reproduce: `{command}` (the workspace path as on the machine that ran it), then "
        "`python bench/collect.py`.\n\n"
        f"The stages behind {', '.join(args.target)}, with everything upstream of them (DVC's "
        "graph), and each stage's MLflow runs: wall minutes from start to end; the stretches "
        "with no metric logged for longer than the threshold (a run paused or idle: training "
        "logs every few steps); active minutes, the rest. A run killed and resumed counts both "
        f"runs, so the steps after the last checkpoint count twice (an upper bound).{left_out} "
        f"{args.conditions}\n\n" + table(times, args.idle, args.added) + "\n"
    )
    publish(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
