"""Where every stage reads and writes, the workspace lock, and DVC-compatible content hashes.

``dvc.yaml`` declares the same paths (DVC needs them literally); ``tests/test_pipeline.py``
checks that every stage's deps and outs there match :class:`Layout`, so the two cannot drift.

Resumable training checkpoints live *outside* the declared outs, because DVC deletes a stage's
outs before running it: ``runs/checkpoints/<stage>/<item>/<key>/``, where ``key`` hashes the
stage's effective params and the DVC md5 of every dependency, so a changed config or input
never resumes a stale run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CODE_COMMON = (
    "flows/cli.py",
    "tasks/params.py",
    "tasks/workspace.py",
    "tasks/tracking.py",
    "tasks/stage.py",
    "tasks/progress.py",
    "tasks/plots.py",
    "ulmfit/config.py",
    "ulmfit/corpora/sources.py",
    "ulmfit/corpora/output.py",
    "ulmfit/errors.py",
    "ulmfit/io.py",
)
CODE_MODEL = (
    "ulmfit/model.py",
    "ulmfit/cross_entropy.py",
    "ulmfit/train.py",
    "ulmfit/loop.py",
    "ulmfit/phases.py",
    "ulmfit/evaluate.py",
    "ulmfit/runtime.py",
    "ulmfit/batches.py",
    "ulmfit/schedule.py",
    "ulmfit/optim.py",
    "ulmfit/regularization.py",
    "ulmfit/checkpoint.py",
    "ulmfit/distributed.py",
    "ulmfit/storage.py",
    "ulmfit/tokenizer.py",
    "ulmfit/text.py",
    "tasks/tokens.py",
    "tasks/training.py",
    "flows/train.py",
)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One DVC stage (one item of a foreach/matrix group) as the Python side sees it."""

    group: str  # "finetune_lm"
    item: str  # "bbc_news-fwd" ("" for single stages)
    name: str  # "bbc_news/finetune_lm_fwd": names its metrics, run record, curve and figure
    deps: tuple[str, ...]  # data and code, relative to the project root
    outs: tuple[str, ...]  # cached outputs
    params: tuple[str, ...]  # params.yaml keys (dotted) the stage reads
    plots: bool = False  # writes a curve CSV (plots/<name>.csv) and a figure (reports/figures/)

    @property
    def stage(self) -> str:
        """The DVC stage name, e.g. ``finetune_lm@bbc_news-fwd``."""
        return f"{self.group}@{self.item}" if self.item else self.group

    @property
    def metrics(self) -> str:
        return f"metrics/{self.name}.json"

    @property
    def run_record(self) -> str:
        """``{"mlflow_run_id": ...}`` of the run that made the stage's outputs (for the report)."""
        return f"metrics/runs/{self.name}.json"

    @property
    def curve(self) -> str:
        return f"plots/{self.name}.csv"

    @property
    def figure(self) -> str:
        return f"reports/figures/{self.name}.png"


TOKENS_CODE = (
    "flows/tokenize.py",
    "tasks/tokens.py",
    "ulmfit/tokenizer.py",
    "ulmfit/text.py",
    "ulmfit/storage.py",
)
PREPARE_CODE = ("flows/prepare.py", "tasks/data.py", "ulmfit/corpora")
EVALUATE_CODE = (
    "flows/evaluate.py",
    "tasks/evaluation.py",
    "tasks/registry.py",
    "tasks/pyfunc_model.py",
    "ulmfit/predict.py",
    "ulmfit/quantize.py",
    *(path for path in CODE_MODEL if path != "flows/train.py"),
)


CONTROL_CODE = ("flows/control.py", "tasks/baseline.py")
BASELINE_CODE = ("flows/baseline.py", "tasks/baseline.py", "tasks/data.py")
REPORT_CODE = ("flows/report.py", "tasks/report.py")


class Layout:
    """Paths of the project (relative to its root) and every stage's :class:`StageSpec`."""

    wikipedia = "data/wikipedia"
    tokenizer_dir = "data/tokenizer"
    wikipedia_tokens = "data/wikipedia_tokens"
    results = "reports/results.md"
    sample_efficiency = "reports/sample_efficiency.png"  # the paper's Figure 3, from the runs
    pretraining_budget = "reports/pretraining_budget.png"  # test error against pretraining tokens
    checkpoints = "runs/checkpoints"
    lock_file = "runs/ulmfit.lock"
    cache_dir = "runs/cache"
    prefect_home = "runs/prefect"

    @staticmethod
    def pretrained(direction: str) -> str:
        return f"data/pretrained/{direction}"

    @staticmethod
    def prepared(dataset: str) -> str:
        return f"data/datasets/{dataset}/prepared"

    @staticmethod
    def tokens(dataset: str) -> str:
        return f"data/datasets/{dataset}/tokens"

    @staticmethod
    def finetuned(dataset: str, direction: str) -> str:
        return f"data/datasets/{dataset}/lm_{direction}"

    @staticmethod
    def classifier(dataset: str, direction: str) -> str:
        return f"data/datasets/{dataset}/classifier_{direction}"

    @staticmethod
    def control(name: str) -> str:
        return f"data/controls/{name}"

    @staticmethod
    def model(dataset: str) -> str:
        """The saved ``TextClassifier`` (tokenizer + forward + backward): what gets served."""
        return f"data/datasets/{dataset}/model"

    @classmethod
    def stage(
        cls, group: str, dataset: str | None = None, direction: str | None = None
    ) -> StageSpec:
        """The :class:`StageSpec` of one stage, as declared in ``dvc.yaml``."""
        L = cls
        if group == "prepare_wikipedia":
            return StageSpec(
                group,
                "",
                "wikipedia/prepare",
                (*CODE_COMMON, *PREPARE_CODE),
                (L.wikipedia,),
                ("wikipedia",),
            )
        if group == "train_tokenizer":
            return StageSpec(
                group,
                "",
                "wikipedia/tokenizer",
                (*CODE_COMMON, *TOKENS_CODE, f"{L.wikipedia}/train.parquet"),
                (L.tokenizer_dir,),
                ("tokenizer",),
            )
        if group == "tokenize_wikipedia":
            return StageSpec(
                group,
                "",
                "wikipedia/tokenize",
                (*CODE_COMMON, *TOKENS_CODE, L.wikipedia, L.tokenizer_dir),
                (L.wikipedia_tokens,),
                ("tokenize",),
            )
        if group == "pretrain":
            return StageSpec(
                group,
                direction,
                f"wikipedia/pretrain_{direction}",
                (*CODE_COMMON, *CODE_MODEL, L.wikipedia_tokens, L.tokenizer_dir),
                (L.pretrained(direction),),
                ("pretrain",),
                plots=True,
            )
        if group == "prepare_dataset":
            return StageSpec(
                group,
                dataset,
                f"{dataset}/prepare",
                (*CODE_COMMON, *PREPARE_CODE),
                (L.prepared(dataset),),
                (f"datasets.{dataset}.source",),
            )
        if group == "tokenize_dataset":
            return StageSpec(
                group,
                dataset,
                f"{dataset}/tokenize",
                (*CODE_COMMON, *TOKENS_CODE, L.prepared(dataset), L.tokenizer_dir),
                (L.tokens(dataset),),
                ("tokenize",),
            )
        if group == "finetune_lm":
            return StageSpec(
                group,
                f"{dataset}-{direction}",
                f"{dataset}/finetune_lm_{direction}",
                (
                    *CODE_COMMON,
                    *CODE_MODEL,
                    L.tokens(dataset),
                    L.pretrained(direction),
                    L.tokenizer_dir,
                ),
                (L.finetuned(dataset, direction),),
                ("pretrain.model", "finetune", f"datasets.{dataset}"),
                plots=True,
            )
        if group == "train_classifier":
            return StageSpec(
                group,
                f"{dataset}-{direction}",
                f"{dataset}/classifier_{direction}",
                (
                    *CODE_COMMON,
                    *CODE_MODEL,
                    L.tokens(dataset),
                    L.prepared(dataset),
                    L.tokenizer_dir,
                    L.finetuned(dataset, direction),
                ),
                (L.classifier(dataset, direction),),
                ("pretrain.model", "classifier", f"datasets.{dataset}"),
                plots=True,
            )
        if group == "evaluate":
            return StageSpec(
                group,
                dataset,
                f"{dataset}/evaluate",
                (
                    *CODE_COMMON,
                    *EVALUATE_CODE,
                    L.tokens(dataset),
                    L.prepared(dataset),
                    L.tokenizer_dir,
                    L.classifier(dataset, "fwd"),
                    L.classifier(dataset, "bwd"),
                ),
                (L.model(dataset),),
                ("evaluate",),
                plots=True,
            )
        if group == "control":
            # ``dataset`` is the control's name here; its data and LMs are the dataset's. Both
            # directions' LMs are deps: dvc.yaml cannot pick one per control, so a control
            # re-runs when either changes (more often than needed, never less).
            name, of = dataset, direction
            return StageSpec(
                group,
                name,
                f"controls/{name}",
                (
                    *CODE_COMMON,
                    *CODE_MODEL,
                    *CONTROL_CODE,
                    L.tokens(of),
                    L.prepared(of),
                    L.tokenizer_dir,
                    L.pretrained("fwd"),
                    L.pretrained("bwd"),
                    L.finetuned(of, "fwd"),
                    L.finetuned(of, "bwd"),
                ),
                (L.control(name),),
                ("pretrain.model", "finetune", "classifier", f"datasets.{of}", f"controls.{name}"),
                plots=True,
            )
        if group == "baseline":
            return StageSpec(
                group,
                dataset,
                f"{dataset}/baseline",
                (*CODE_COMMON, *BASELINE_CODE, L.prepared(dataset)),
                (),
                ("baseline", "controls"),
            )
        if group == "report":
            return StageSpec(
                group,
                "",
                "report",
                (*CODE_COMMON, *REPORT_CODE, "metrics"),
                (L.results, L.sample_efficiency, L.pretraining_budget),
                ("report", "controls"),
            )
        raise KeyError(f"unknown stage '{group}'")


# ------------------------------------------------------------------------------- hashing


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records in ``dvc.lock`` for ``path``: the file's md5, or for a directory
    the md5 of its sorted ``[{"md5", "relpath"}]`` listing plus ``.dir`` (dvc_data's Tree)."""
    if path.is_file():
        return _file_md5(path)
    entries = [
        {"md5": _file_md5(file), "relpath": file.relative_to(path).as_posix()}
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not _ignored(p, path))
    ]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def _ignored(file: Path, root: Path) -> bool:
    """What ``.dvcignore`` excludes from directory hashes: Python byte-code caches."""
    return file.suffix == ".pyc" or "__pycache__" in file.relative_to(root).parts


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def deps_md5(root: Path, spec: StageSpec) -> dict[str, str]:
    """DVC md5 of every dependency of ``spec`` that exists (missing ones are the stage's to
    report, with the file named)."""
    out = {}
    for dep in spec.deps:
        path = root / dep
        if path.exists():
            out[dep] = dvc_md5(path)
    return out


def stage_key(spec: StageSpec, params: dict[str, Any], deps: dict[str, str]) -> str:
    """A short hash of everything that determines the stage's result."""
    blob = json.dumps(
        {"stage": spec.stage, "params": params, "deps": deps}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def checkpoint_dir(root: Path, spec: StageSpec, key: str, sub: str = "") -> Path:
    """``runs/checkpoints/<group>/<item>/<key>[/<sub>]``; older keys of the same stage item are
    removed (they can never be resumed: their params or inputs changed)."""
    base = root / Layout.checkpoints / spec.group / (spec.item or "_")
    if base.is_dir():
        for old in base.iterdir():
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True)
    path = base / key / sub if sub else base / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_checkpoints(root: Path, spec: StageSpec) -> None:
    """Remove the stage item's checkpoints once its outputs are safely written."""
    shutil.rmtree(root / Layout.checkpoints / spec.group / (spec.item or "_"), ignore_errors=True)


# -------------------------------------------------------------------------------- locking


class WorkspaceBusy(RuntimeError):
    """Another ``ulmfit`` stage command holds the workspace lock."""


@contextlib.contextmanager
def workspace_lock(root: Path, stage: str) -> Iterator[Path]:
    """An exclusive, non-blocking ``flock`` on ``runs/ulmfit.lock`` for one stage command.

    DVC already refuses a second ``dvc repro`` in the same workspace (its own repo lock), but
    stage commands can also be run by hand; this lock stops two of them from writing the same
    outputs at once. The kernel drops the lock when the process dies, so a killed stage never
    leaves a stale lock behind.
    """
    path = root / Layout.lock_file
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole stage
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkspaceBusy(
                f"the workspace {root} is busy: {holder} holds {path}. Wait for it to finish "
                "(or stop it), then run this command again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} running stage {stage}\n")
        handle.flush()
        yield path
    finally:
        handle.close()


# ------------------------------------------------------------------------------- dvc.yaml

DVC_YAML_HEADER = """\
# The ULMFiT pipeline (Howard & Ruder 2018). Each stage runs 'ulmfit <stage>' (a Prefect flow,
# tracked in MLflow). Generated from tasks/workspace.py: python -m tasks.workspace > dvc.yaml
# (tests/test_pipeline.py checks that the two agree). Run it with 'ulmfit repro'; see
# docs/pipeline.md.
"""

# (group, command, matrix lines): ${item.*} placeholders are filled in by DVC.
_DVC_STAGES = (
    ("prepare_wikipedia", "ulmfit prepare-wikipedia", ()),
    ("train_tokenizer", "ulmfit train-tokenizer", ()),
    ("tokenize_wikipedia", "ulmfit tokenize-wikipedia", ()),
    ("pretrain", "ulmfit pretrain --direction ${item.direction}", ("direction: [fwd, bwd]",)),
    (
        "prepare_dataset",
        "ulmfit prepare-dataset --dataset ${item.dataset}",
        ("dataset: ${datasets}",),
    ),
    (
        "tokenize_dataset",
        "ulmfit tokenize-dataset --dataset ${item.dataset}",
        ("dataset: ${datasets}",),
    ),
    (
        "finetune_lm",
        "ulmfit finetune-lm --dataset ${item.dataset} --direction ${item.direction}",
        ("dataset: ${datasets}", "direction: [fwd, bwd]"),
    ),
    (
        "train_classifier",
        "ulmfit train-classifier --dataset ${item.dataset} --direction ${item.direction}",
        ("dataset: ${datasets}", "direction: [fwd, bwd]"),
    ),
    ("evaluate", "ulmfit evaluate --dataset ${item.dataset}", ("dataset: ${datasets}",)),
    ("baseline", "ulmfit baseline --dataset ${item.dataset}", ("dataset: ${datasets}",)),
    ("control", "ulmfit control --name ${key}", ("foreach",)),
    ("report", "ulmfit report", ()),
)


def render_dvc_yaml() -> str:
    """``dvc.yaml`` from the stage specs: matrix stages over ``datasets`` and directions."""
    lines = [DVC_YAML_HEADER.rstrip("\n"), "stages:"]
    for group, command, matrix in _DVC_STAGES:
        if matrix == ("foreach",):  # one stage per entry of the controls mapping
            spec = Layout.stage(group, "${key}", "${item.dataset}")
            lines += [f"  {group}:", "    foreach: ${controls}", "    do:"]
            lines += ["  " + line for line in _stage_body(spec, group, command)]
            continue
        spec = Layout.stage(group, "${item.dataset}", "${item.direction}")
        lines.append(f"  {group}:")
        if matrix:
            lines.append("    matrix:")
            lines += [f"      {entry}" for entry in matrix]
        lines += _stage_body(spec, group, command)
    return "\n".join(lines) + "\n"


def _stage_body(spec: StageSpec, group: str, command: str) -> list[str]:
    """The cmd, deps, params, outs, metrics and plots lines of one stage (4-space indent)."""
    lines = [f"    cmd: {command}", "    deps:"]
    lines += [f"      - {dep}" for dep in spec.deps]
    lines.append("    params:")
    lines += [f"      - {param}" for param in spec.params]
    lines.append("    outs:")
    lines += [f"      - {out}" for out in spec.outs]
    if group != "report":
        lines += [f"      - {spec.run_record}:", "          cache: false"]
        lines += ["    metrics:", f"      - {spec.metrics}:", "          cache: false"]
    if spec.plots:
        lines += ["    plots:", f"      - {spec.curve}:", "          cache: false"]
        if group == "evaluate":
            lines += [
                "          template: confusion",
                "          x: predicted",
                "          y: actual",
            ]
        else:
            lines += ["          x: step", "          y: loss"]
        lines.append(f"      - {spec.figure}")
    return lines


if __name__ == "__main__":
    print(render_dvc_yaml(), end="")
