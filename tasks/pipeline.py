"""The pipeline: one table of stages.

Each :class:`Stage` row declares everything about one DVC stage: the Prefect flow that runs it,
its command-line arguments and help, its code and data dependencies, its outputs, the
``params.yaml`` keys DVC tracks for it and the sections its MLflow run logs. The ``ulmfit``
stage commands (``flows/cli.py``), ``dvc.yaml`` (``tasks/dvcfile.py``) and the producer named
when an input is missing (:func:`producer_of`) are all generated from :data:`STAGES`.
Adding a stage means adding one row here and writing one flow.

Paths are :class:`~tasks.workspace.Layout` paths with ``{dataset}``, ``{direction}`` or
``{name}`` left in: formatted with a stage item's values they are that item's paths, formatted
with DVC's ``${item.*}`` placeholders they are ``dvc.yaml``'s.

This module imports nothing heavy: ``ulmfit --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import re

from tasks.workspace import Layout as L

# Exit codes of the stage commands: bad input (retrying cannot help) and a busy workspace.
EXIT_INPUT_ERROR = 2
EXIT_BUSY = 75  # EX_TEMPFAIL: try again later
EXIT_FULL_DISK = 74  # EX_IOERR: a write failed for want of space

# The two reading directions (declared here, where `ulmfit --help` can read them without torch).
DIRECTIONS = ("fwd", "bwd")


@dataclasses.dataclass(frozen=True)
class Argument:
    """A stage command's argument (``--dataset``), and how ``dvc.yaml`` iterates over it."""

    help: str
    matrix: str  # the values dvc.yaml iterates over
    placeholder: str  # what stands for one value in dvc.yaml
    choices: tuple[str, ...] | None = None


ARGUMENTS = {
    "dataset": Argument("a dataset name from params.yaml", "${datasets}", "${item.dataset}"),
    "direction": Argument(
        "fwd: left-to-right text; bwd: right-to-left",
        f"[{', '.join(DIRECTIONS)}]",
        "${item.direction}",
        DIRECTIONS,
    ),
    # One stage per entry of the controls mapping (a foreach, not a matrix).
    "name": Argument("a control name from params.yaml", "${controls}", "${key}"),
}


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One DVC stage (one item of a matrix or foreach group) as the Python side sees it."""

    group: str  # "finetune_lm"
    item: str  # "bbc_news-fwd" ("" for single stages)
    name: str  # "bbc_news/finetune_lm_fwd": names its metrics, run record, curve and figure
    code: tuple[str, ...]  # code deps, relative to the project root
    data: tuple[str, ...]  # data deps
    outs: tuple[str, ...]  # cached outputs
    params: tuple[str, ...]  # params.yaml keys (dotted) the stage reads
    plots: bool = False  # writes a curve CSV (plots/<name>.csv) and a figure (reports/figures/)
    headline: tuple[str, ...] = ()  # what DVC declares as metrics (uncached)

    @property
    def deps(self) -> tuple[str, ...]:
        return (*self.code, *self.data)

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


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the table: a stage group of ``dvc.yaml`` and the command that runs it."""

    group: str  # the DVC stage (group) name; its command is ``ulmfit <group with dashes>``
    flow: str  # "module:function" of its Prefect flow
    help: str
    args: tuple[str, ...]  # command-line arguments; their values name the item
    name: str  # template of StageSpec.name
    code: tuple[str, ...]  # code deps beyond COMMON_CODE
    data: tuple[str, ...]  # data deps (templates)
    outs: tuple[str, ...]  # templates
    params: tuple[str, ...]  # params.yaml keys DVC tracks (templates)
    sections: tuple[str, ...]  # params sections its MLflow run logs (tasks.params.section_dict)
    plots: bool = False
    metrics: bool = True  # writes metrics/<name>.json and its run record (uncached outs)
    headline: tuple[str, ...] = ()  # the headline figures: DVC's only declared metrics

    @property
    def command(self) -> str:
        return self.group.replace("_", "-")

    def spec(self, **items: str) -> StageSpec:
        """The :class:`StageSpec` of one item: ``items`` are the stage's arguments, plus the
        control's ``dataset`` for a control (its data are its dataset's)."""
        needed = set(self.args) | ({"dataset"} if "name" in self.args else set())
        if set(items) != needed:
            raise TypeError(f"stage {self.group} takes {sorted(needed)}, got {sorted(items)}")

        def fill(templates: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(template.format(**items) for template in templates)

        return StageSpec(
            self.group,
            "-".join(items[arg] for arg in self.args),
            self.name.format(**items),
            (*COMMON_CODE, *self.code),
            fill(self.data),
            fill(self.outs),
            fill(self.params),
            self.plots,
            self.headline,
        )


COMMON_CODE = (
    "flows/cli.py",
    "tasks/params.py",
    "tasks/workspace.py",
    "tasks/pipeline.py",
    "tasks/checkpoints.py",
    "tasks/tracking.py",
    "tasks/lifeline.py",
    "tasks/stage.py",
    "tasks/progress.py",
    "tasks/plots.py",
    "ulmfit/config.py",
    "ulmfit/corpora/sources.py",
    "ulmfit/corpora/output.py",
    "ulmfit/errors.py",
    "ulmfit/io.py",
)
MODEL_CODE = (
    "ulmfit/model.py",
    "ulmfit/transformer.py",
    "ulmfit/qrnn.py",
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
)
TRAIN_CODE = (*MODEL_CODE, "tasks/recipes.py", "flows/train.py")
TOKENS_CODE = (
    "flows/tokenize.py",
    "tasks/tokens.py",
    "ulmfit/tokenizer.py",
    "ulmfit/text.py",
    "ulmfit/storage.py",
)
PREPARE_CODE = ("flows/prepare.py", "tasks/data.py", "ulmfit/corpora")
# Every key of section pretrain but `register`: registering an LM or not never retrains it
# (tests/test_pretrained.py checks the list against tasks.params.PretrainParams).
PRETRAIN_PARAMS = tuple(
    f"pretrain.{key}"
    for key in ("model", "train", "dropout_multiplier", "device", "threads", "reuse")
)
# An LM pretrained elsewhere (pretrain.reuse): fetched and checked by train_tokenizer and pretrain.
REUSE_CODE = ("tasks/pretrained.py",)

STAGES = (
    Stage(
        "prepare_wikipedia",
        "flows.prepare:prepare_wikipedia_flow",
        "Stage 1: read the Wikipedia source of params.yaml (section 'wikipedia': a dump, "
        "WikiText-103 or WikiExtractor output; local, packaged or downloaded) into "
        "data/wikipedia/{train,valid}.parquet (nothing with pretrain.reuse).",
        args=(),
        name="wikipedia/prepare",
        code=PREPARE_CODE,
        data=(),
        outs=(L.wikipedia,),
        params=("wikipedia", "pretrain.reuse"),
        sections=("wikipedia",),
    ),
    Stage(
        "train_tokenizer",
        "flows.tokenize:train_tokenizer_flow",
        "Stage 2: train the SentencePiece tokenizer (section 'tokenizer') on the Wikipedia "
        "training text -> data/tokenizer/tokenizer.model (with pretrain.reuse: the reused "
        "LMs' tokenizer).",
        args=(),
        name="wikipedia/tokenizer",
        code=(*TOKENS_CODE, *REUSE_CODE, "tasks/training.py"),  # training: the LM file names
        data=(L.wikipedia,),
        outs=(L.tokenizer_dir,),
        params=("tokenizer", "pretrain.reuse"),
        sections=("tokenizer",),
    ),
    Stage(
        "tokenize_wikipedia",
        "flows.tokenize:tokenize_wikipedia_flow",
        "Stage 3: encode the Wikipedia splits into token files (section 'tokenize') -> "
        "data/wikipedia_tokens/.",
        args=(),
        name="wikipedia/tokenize",
        code=TOKENS_CODE,
        data=(L.wikipedia, L.tokenizer_dir),
        outs=(L.wikipedia_tokens,),
        params=("tokenize",),
        sections=("tokenize",),
    ),
    Stage(
        "pretrain",
        "flows.train:pretrain_flow",
        "Stage 4: pretrain the AWD-LSTM language model on Wikipedia (section 'pretrain'), one "
        "direction per run -> data/pretrained/<direction>/model.pt, registered in MLflow as "
        "'<prefix>-lm-<direction>'; with pretrain.reuse, the LM pretrained elsewhere.",
        args=("direction",),
        name="wikipedia/pretrain_{direction}",
        code=(*TRAIN_CODE, *REUSE_CODE),
        data=(L.wikipedia_tokens, L.tokenizer_dir),
        outs=(L.pretrained("{direction}"),),
        params=PRETRAIN_PARAMS,
        sections=("pretrain",),
        plots=True,
    ),
    Stage(
        "prepare_dataset",
        "flows.prepare:prepare_dataset_flow",
        "Stage 5a: read one classification dataset (section 'datasets.<name>.source') into "
        "data/datasets/<name>/prepared/{train,valid,test[,unsup]}.parquet.",
        args=("dataset",),
        name="{dataset}/prepare",
        code=PREPARE_CODE,
        data=(),
        outs=(L.prepared("{dataset}"),),
        params=("datasets.{dataset}.source",),
        sections=(),  # the flow logs the source alone
    ),
    Stage(
        "tokenize_dataset",
        "flows.tokenize:tokenize_dataset_flow",
        "Stage 5b: encode one dataset's splits, labels kept -> data/datasets/<name>/tokens/.",
        args=("dataset",),
        name="{dataset}/tokenize",
        code=TOKENS_CODE,
        data=(L.prepared("{dataset}"), L.tokenizer_dir),
        outs=(L.tokens("{dataset}"),),
        params=("tokenize",),
        sections=("tokenize",),
    ),
    Stage(
        "finetune_lm",
        "flows.train:finetune_lm_flow",
        "Stage 5c: fine-tune the pretrained LM on the dataset's texts, all splits, never the "
        "labels (section 'finetune') -> data/datasets/<name>/lm_<direction>/.",
        args=("dataset", "direction"),
        name="{dataset}/finetune_lm_{direction}",
        code=TRAIN_CODE,
        data=(L.tokens("{dataset}"), L.pretrained("{direction}"), L.tokenizer_dir),
        outs=(L.finetuned("{dataset}", "{direction}"),),
        params=("pretrain.model", "finetune", "datasets.{dataset}"),
        sections=("finetune",),
        plots=True,
    ),
    Stage(
        "train_classifier",
        "flows.train:train_classifier_flow",
        "Stage 5d: train the classifier on the fine-tuned encoder with gradual unfreezing, "
        "discriminative learning rates, slanted triangular LRs and BPT3C (section "
        "'classifier') -> data/datasets/<name>/classifier_<direction>/.",
        args=("dataset", "direction"),
        name="{dataset}/classifier_{direction}",
        code=TRAIN_CODE,
        data=(
            L.tokens("{dataset}"),
            L.prepared("{dataset}"),
            L.tokenizer_dir,
            L.finetuned("{dataset}", "{direction}"),
        ),
        outs=(L.classifier("{dataset}", "{direction}"),),
        params=("pretrain.model", "classifier", "datasets.{dataset}"),
        sections=("classifier",),
        plots=True,
    ),
    Stage(
        "evaluate",
        "flows.evaluate:evaluate_flow",
        "Stage 5e: test error of the forward, backward and ensembled classifiers, confusion "
        "matrix, and the ensemble saved to data/datasets/<name>/model/ and registered in "
        "MLflow as '<prefix>-<name>'.",
        args=("dataset",),
        name="{dataset}/evaluate",
        code=(
            "flows/evaluate.py",
            "tasks/evaluation.py",
            "tasks/registry.py",
            "tasks/pyfunc_model.py",
            "ulmfit/predict.py",
            "ulmfit/quantize.py",
            *MODEL_CODE,
            "tasks/recipes.py",
        ),
        data=(
            L.tokens("{dataset}"),
            L.prepared("{dataset}"),
            L.tokenizer_dir,
            *(L.classifier("{dataset}", d) for d in DIRECTIONS),
        ),
        outs=(L.model("{dataset}"),),
        params=("evaluate",),
        sections=("evaluate",),
        plots=True,
    ),
    Stage(
        "baseline",
        "flows.baseline:baseline_flow",
        "Stage 5f: TF-IDF n-grams + logistic regression (section 'baseline') on the dataset's "
        "full train split and on each label subset its controls use -> "
        "metrics/<name>/baseline.json.",
        args=("dataset",),
        name="{dataset}/baseline",
        code=("flows/baseline.py", "tasks/baseline.py", "tasks/tokens.py", "tasks/data.py"),
        data=(L.prepared("{dataset}"),),
        outs=(),
        params=("baseline", "controls"),
        sections=("baseline",),
    ),
    Stage(
        "control",
        "flows.control:control_flow",
        "Stage 5g: one entry of section 'controls' (an ablation or a label subset): its "
        "classifier trained and tested with the dataset's tuning -> data/controls/<name>/.",
        args=("name",),
        name="controls/{name}",
        code=(
            *MODEL_CODE,
            "tasks/recipes.py",
            "tasks/controls.py",
            "flows/control.py",
            "tasks/baseline.py",
        ),
        # Both directions' LMs: dvc.yaml cannot pick one per control, so a control re-runs
        # when either changes (more often than needed, never less).
        data=(
            L.tokens("{dataset}"),
            L.prepared("{dataset}"),
            L.tokenizer_dir,
            *(L.pretrained(d) for d in DIRECTIONS),
            *(L.finetuned("{dataset}", d) for d in DIRECTIONS),
        ),
        outs=(L.control("{name}"),),
        params=(
            "pretrain.model",
            "finetune",
            "classifier",
            "datasets.{dataset}",
            "controls.{name}",
        ),
        sections=("controls",),
        plots=True,
    ),
    Stage(
        "report",
        "flows.report:report_flow",
        "Stage 6: write reports/results.md (every dataset, ablation and baseline with the "
        "MLflow run id of each figure), the headline figures results/<dataset>.json and "
        "reports/sample_efficiency.png.",
        args=(),
        name="report",
        code=("flows/report.py", "tasks/report.py", "tasks/results.py"),
        data=("metrics",),
        outs=(L.results, L.sample_efficiency, L.pretraining_budget),
        params=("report", "controls"),
        sections=("report",),
        metrics=False,
        headline=(L.headline,),
    ),
)
BY_GROUP = {stage.group: stage for stage in STAGES}


def stage_spec(group: str, **items: str) -> StageSpec:
    """The :class:`StageSpec` of one stage item, e.g. ``stage_spec("pretrain", direction="fwd")``
    or ``stage_spec("control", name="imdb-scratch", dataset="imdb")``."""
    if group not in BY_GROUP:
        raise KeyError(f"unknown stage '{group}'")
    return BY_GROUP[group].spec(**items)


def producer_of(path: str) -> str | None:
    """The stage item whose outputs hold ``path`` (relative to the project root), e.g.
    ``data/datasets/imdb/lm_fwd/model.pt`` -> ``finetune_lm@imdb-fwd`` (None: no stage)."""
    for stage in STAGES:
        for out in (*stage.outs, *stage.headline):
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(out))
            match = re.fullmatch(pattern + r"(/.*)?", path)
            if match:
                item = "-".join(match[arg] for arg in stage.args)
                return f"{stage.group}@{item}" if item else stage.group
    return None
