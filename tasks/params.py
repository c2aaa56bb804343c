"""``params.yaml`` -> frozen dataclasses, one per section (= one per pipeline stage).

``params.yaml`` is the one source of parameters. Each section is named after the stage that
reads it (and after that stage's MLflow run). Sections are built with
:func:`ulmfit.config.from_dict` into the library's own config dataclasses, so an unknown or
misspelt key stops the pipeline with the section and the valid keys named, before any work.

Dropouts follow the ULMFiT scripts (paper section 3): the AWD-LSTM's base dropouts are given
once (``pretrain.model``) and each phase scales them by its own multiplier (``pretrain``: 0.1
in the fastai v1 WikiText-103 recipe, ``finetune``: 0.7, the paper's LM fine-tuning value);
the classifier has its own base dropouts (fastai's ``awd_lstm_clas_config``) and multiplier.

``pretrain.model.backbone`` picks the model of every stage: ``awd_lstm`` (the default: a file
without the key parses exactly as before), ``awd_qrnn`` (the same keys, QRNN layers: MultiFiT),
``transformer_causal`` (GPT-style) or
``transformer_mlm`` (BERT-style), whose sizes are keys of the same section
(:class:`~ulmfit.transformer.TransformerConfig`); the classifier section then takes the
transformer's ``pooling`` and base ``dropout`` (docs/pipeline.md, "Choosing a backbone").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import yaml

from tasks.pipeline import DIRECTIONS
from ulmfit.config import (
    ConfigError,
    Device,
    Dropout,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    NotEmpty,
    OneOf,
    PositiveFloat,
    PositiveInt,
    Problem,
    Range,
    Text,
    check,
    from_dict,
    problems_of,
    to_dict,
)
from ulmfit.corpora import DATASETS, DatasetSource, WikipediaSource
from ulmfit.errors import InputError
from ulmfit.model import AWDLSTMConfig, ClassifierConfig
from ulmfit.tokenizer import UNK_ID, TokenizerConfig
from ulmfit.train import ClassifierTrainConfig, LMTrainConfig
from ulmfit.transformer import (
    POOLINGS,
    TransformerClassifierConfig,
    TransformerConfig,
    backbone_name,
)

LM_SPLITS = ("train", "valid", "test", "unsup")
# What a classifier's encoder takes from the pretrained LM: every field but the dropouts.
_ENCODER_SIZE_KEYS = tuple(
    f.name for f in dataclasses.fields(AWDLSTMConfig) if not f.name.endswith("_dropout")
)
# pretrain.model.backbone: the AWD-LSTM of ULMFiT (the default), the same with QRNN layers
# (MultiFiT's AWD-QRNN, ulmfit.qrnn), or a transformer trained as GPT (next token) or as BERT
# (masked tokens) - ulmfit.transformer, docs/model.md.
BACKBONES = ("awd_lstm", "awd_qrnn", "transformer_causal", "transformer_mlm")
# The keys of pretrain.model for a transformer backbone; TransformerConfig's other fields follow
# from the backbone (objective, mask_id) and the tokenizer (vocab_size).
_TRANSFORMER_KEYS = ("dim", "num_layers", "heads", "ff_mult", "max_len", "dropout", "pad_id")
# The byte-fallback tokenizer has no mask piece and never emits UNK (every byte has a piece),
# so UNK's id serves as BERT's [MASK]: the tokenizer, and so every AWD-LSTM result, is unchanged.
MASK_ID = UNK_ID


def describe_model(model: AWDLSTMConfig | TransformerConfig) -> str:
    """One line naming the backbone and its sizes (for reports and logs)."""
    if isinstance(model, TransformerConfig):
        kind = {"causal": "GPT-style causal", "mlm": "BERT-style masked"}[model.objective]
        return (
            f"{kind} transformer {model.dim}x{model.num_layers} ({model.heads} heads, "
            f"max_len {model.max_len})"
        )
    kind = "AWD-QRNN" if model.qrnn else "AWD-LSTM"
    return f"{kind} {model.embed_size}/{model.hidden_size}x{model.num_layers}"


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    """Stage ``tokenize_*``: how texts are encoded into token files."""

    workers: PositiveInt | None = None  # None: every core
    chunk_docs: PositiveInt = 512


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """One entry of ``pretrain.reuse``: where a language model pretrained elsewhere comes from,
    exactly one of a local ``path`` (a pretrain stage's output folder, or its ``model.pt`` with
    ``tokenizer.model`` beside it), a ``url`` of such a folder as a tar or zip archive (with its
    ``sha256``, required), or an MLflow ``model_uri`` (``models:/<name>/<version>`` or
    ``models:/<name>@<alias>``) in the store at ``tracking_uri`` (default: the project's own).
    The LM's tokenizer always comes with it (docs/pretrained.md)."""

    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None


@dataclasses.dataclass(frozen=True)
class PretrainParams:
    """Stage ``pretrain``: general-domain LM pretraining (paper section 3.1).

    ``reuse`` (direction -> :class:`PretrainedSource`) takes LMs pretrained elsewhere instead:
    the Wikipedia stages then do no work, ``train_tokenizer`` takes the LMs' tokenizer and
    ``pretrain`` places the LM as its output. ``register``: a trained LM becomes a version of
    ``<mlflow.model_name_prefix>-lm-<direction>`` in the MLflow registry.
    """

    # By pretrain.model.backbone; vocab_size comes from the tokenizer at run time.
    model: AWDLSTMConfig | TransformerConfig
    train: LMTrainConfig
    dropout_multiplier: NonNegativeFloat = 1.0
    device: Device = "auto"
    threads: NonNegativeInt = 0  # CPU threads for PyTorch; 0: its default (one per core)
    register: bool = True
    reuse: Mapping[str, PretrainedSource] = dataclasses.field(default_factory=dict)

    @property
    def backbone(self) -> str:
        return backbone_name(self.model)


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    """Stage ``finetune_lm``: target-task LM fine-tuning (paper section 3.2).

    The LM sees the texts of ``splits`` (never a label); ``valid_fraction`` of those documents
    (seeded) is held out to report the fine-tuned perplexity.
    """

    train: LMTrainConfig
    dropout_multiplier: NonNegativeFloat = 0.7
    splits: Annotated[tuple[Annotated[str, OneOf(LM_SPLITS)], ...], NotEmpty()] = LM_SPLITS
    valid_fraction: Fraction = 0.1
    max_docs: PositiveInt | None = None  # cap on the documents used (seeded sample), None: all
    device: Device = "auto"
    threads: NonNegativeInt = 0


def _default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name``: each default is written once."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@dataclasses.dataclass(frozen=True)
class ClassifierModelParams:
    """``classifier.model``: :class:`ClassifierConfig` without the sizes that are known only at
    run time (the vocabulary and the number of classes); :meth:`ClassifierParams.build` adds
    them. ``encoder``: the pretrained LM's sizes with the classifier's base dropouts."""

    encoder: AWDLSTMConfig
    head_hidden: PositiveInt = _default(ClassifierConfig, "head_hidden")
    head_dropouts: tuple[Dropout, Dropout] = _default(ClassifierConfig, "head_dropouts")
    bptt: PositiveInt = _default(ClassifierConfig, "bptt")
    max_len: PositiveInt = _default(ClassifierConfig, "max_len")
    pool_embeddings: bool = _default(ClassifierConfig, "pool_embeddings")


@dataclasses.dataclass(frozen=True)
class TransformerClassifierModelParams:
    """``classifier.model`` for a transformer backbone: :class:`TransformerClassifierConfig`
    without the run-time sizes. ``encoder``: the pretrained LM's sizes with the classifier's
    base ``dropout``; ``pooling``: the document summary, default ``last`` (the last real token)
    for a causal encoder and ``mean`` for an MLM one (``first``, the ``xxbos`` token, is
    BERT's ``[CLS]`` and needs an MLM encoder). No BPT3C: a document is cut to its first
    ``max_len`` tokens."""

    encoder: TransformerConfig
    pooling: Annotated[str, OneOf(POOLINGS)] = "last"
    head_hidden: PositiveInt = _default(TransformerClassifierConfig, "head_hidden")
    head_dropouts: tuple[Dropout, Dropout] = _default(TransformerClassifierConfig, "head_dropouts")


# The one-rate recipe: every layer at one learning rate from the first step. How a classifier
# with a random (or frozen) encoder trains unless its control says otherwise, and the recipe of
# ``classifier.one_rate_lrs``.
ONE_RATE = {"gradual_unfreezing": False, "schedule": {"discriminative": False}}


class GridPoint(NamedTuple):
    """One classifier of the hyperparameter search. ``one_rate``: trained with one learning
    rate on every layer from the first step (no discriminative rates, no gradual unfreezing),
    the recipe of ``classifier.one_rate_lrs``; otherwise with ``classifier.train`` as written."""

    lr: float
    dropout_multiplier: float
    one_rate: bool = False


@dataclasses.dataclass(frozen=True)
class ClassifierParams:
    """Stage ``train_classifier``: classifier fine-tuning (paper section 3.3).

    ``model`` holds the head and BPT3C settings and, in ``model.encoder``, the classifier's base
    dropouts; the encoder's sizes always come from the pretrained LM.
    """

    model: ClassifierModelParams | TransformerClassifierModelParams  # by the backbone
    train: ClassifierTrainConfig
    dropout_multiplier: NonNegativeFloat = 0.5
    device: Device = "auto"
    threads: NonNegativeInt = 0
    # Hyperparameter search: one classifier per (learning rate, dropout multiplier) pair (and
    # per recipe, with one_rate_lrs), each with train.patience/keep_best; the lowest validation
    # error wins. Empty: train.lr / dropout_multiplier alone. A dataset's controls get the same
    # grid as its ULMFiT classifier.
    lrs: tuple[PositiveFloat, ...] = ()
    dropout_multipliers: tuple[NonNegativeFloat, ...] = ()
    # The recipe as one more dimension of the search: also train, at each of these rates and
    # each dropout multiplier, with one rate on every layer from the first step (no
    # discriminative rates, no gradual unfreezing). On the same fine-tuned LM that recipe beat
    # ULMFiT's by 1-2 points on IMDb and TREC-6 at CPU scale (BENCHMARKS.md, issue 9); it wants
    # rates about a tenth of ULMFiT's top-layer rate. Empty: ``train`` as written, alone.
    one_rate_lrs: tuple[PositiveFloat, ...] = ()

    def grid(self) -> list[GridPoint]:
        """The classifiers of the search, in order: ``train`` at each (learning rate, dropout
        multiplier), then the one-rate recipe at each of ``one_rate_lrs``."""
        multipliers = self.dropout_multipliers or (self.dropout_multiplier,)
        return [
            GridPoint(lr, multiplier, one_rate)
            for one_rate, lrs in ((False, self.lrs or (self.train.lr,)), (True, self.one_rate_lrs))
            for lr in lrs
            for multiplier in multipliers
        ]

    def train_for(self, point: GridPoint, *, backward: bool) -> ClassifierTrainConfig:
        """``train`` for one classifier of the search: its learning rate, its direction and,
        for a one-rate point, no discriminative rates and no gradual unfreezing."""
        train = dataclasses.replace(self.train, lr=point.lr, backward=backward)
        if not point.one_rate:
            return train
        schedule = dataclasses.replace(train.schedule, **ONE_RATE["schedule"])
        return dataclasses.replace(
            train, gradual_unfreezing=ONE_RATE["gradual_unfreezing"], schedule=schedule
        )

    def build(
        self, vocab_size: int, num_classes: int, dropout_multiplier: float
    ) -> ClassifierConfig | TransformerClassifierConfig:
        """The library's :class:`ClassifierConfig` (or :class:`TransformerClassifierConfig`)
        once the sizes are known: the tokenizer's vocabulary, the dataset's classes, the
        encoder's dropouts times ``dropout_multiplier``."""
        model = self.model
        encoder = dataclasses.replace(model.encoder, vocab_size=vocab_size)
        sized = {
            **{f.name: getattr(model, f.name) for f in dataclasses.fields(model)},
            "encoder": encoder.scaled(dropout_multiplier),
            "num_classes": num_classes,
        }
        if isinstance(model, TransformerClassifierModelParams):
            return TransformerClassifierConfig(**sized)
        return ClassifierConfig(**sized)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """Stage ``evaluate``: test error of forward, backward and the ensemble (paper section 3.3)."""

    batch_size: PositiveInt = 64
    device: Device = "auto"
    threads: NonNegativeInt = 0
    register: bool = True  # register the ensemble in the MLflow model registry


@dataclasses.dataclass(frozen=True)
class BaselineParams:
    """Stage ``baseline``: TF-IDF n-grams + logistic regression (scikit-learn) per dataset, on
    the full train split and on every label subset the controls use; C tuned on valid."""

    ngram_max: PositiveInt = 2
    min_df: PositiveInt = 1
    max_features: PositiveInt | None = None
    sublinear_tf: bool = True
    c_grid: Annotated[tuple[PositiveFloat, ...], NotEmpty()] = (0.01, 0.1, 1.0, 10.0, 100.0)
    seed: NonNegativeInt = 42


ENCODERS = ("finetuned", "pretrained", "lm_from_scratch", "scratch", "frozen_features")
# A ``scratch`` control's learning-rate grid is the dataset's with each rate also divided by
# this: one rate on every layer of a random stack wants less than ULMFiT's top-layer rate.
SCRATCH_LR_DIVISOR = 10


def scratch_lrs(classifier: ClassifierParams) -> tuple[float, ...]:
    """The learning-rate grid of a ``scratch`` control whose own section sets none: the
    dataset's grid (or ``train.lr``), then each rate divided by :data:`SCRATCH_LR_DIVISOR`,
    without repeats."""
    base = classifier.lrs or (classifier.train.lr,)
    grid = (*base, *(float(f"{lr / SCRATCH_LR_DIVISOR:.6g}") for lr in base))
    return tuple(dict.fromkeys(grid))


@dataclasses.dataclass(frozen=True)
class ControlParams:
    """One entry of ``controls``: a classifier trained another way than the pipeline's, on the
    same data and with the same tuning (lr grid, early stopping), for ablations and sample
    efficiency (paper section 5, Tables 6-7 and Figure 3).

    encoder: where the classifier's encoder starts. ``finetuned``: the dataset's fine-tuned LM
        (full ULMFiT); ``pretrained``: the Wikipedia LM (no LM fine-tuning); ``lm_from_scratch``:
        an LM fine-tuned on the dataset from random weights (no pretraining); ``scratch``:
        random weights (no LM at all); ``frozen_features``: the ELMo-style control, the
        dataset's fine-tuned forward and backward AWD-LSTM LMs frozen, their layers mixed by a
        learned softmax-weighted sum with a scale, read by a small head (needs
        ``pretrain.model.backbone: awd_lstm`` and both directions; the encoder never trains,
        so the control reads text forward and ``direction`` stays ``fwd``). A ``scratch`` or
        ``frozen_features`` classifier trains every layer from the first step at one learning
        rate (``gradual_unfreezing`` and ``discriminative`` default to false for it): those two
        protect what a pretrained encoder knows (paper section 3.3), and a random encoder has
        nothing to protect; frozen, its random layers only pass noise to the head (a frozen
        encoder's two trainable groups, mix and head, gain nothing from them either). A
        ``scratch`` control also searches each learning rate of the dataset's grid divided by
        10 (:func:`scratch_lrs`): at ULMFiT's 0.01 on every layer, a random 3-layer encoder
        stayed at chance on IMDb, and at 0.001 it learned (issue 9). The control's own
        ``classifier`` section can still set all of these.
    labels: train on a seeded class-balanced subset of this many training documents (nested:
        a smaller subset is part of a larger one); None: the whole train split.
    pretrain_step: with ``encoder: finetuned``, start the LM fine-tuning from the pretraining
        snapshot of this step (one of ``pretrain.train.snapshot_steps``) instead of the final
        pretrained LM, then train the classifier as usual: the same recipe on less
        pretraining, a point of the pretraining-budget curve. None: the pipeline's own LM.
    classifier / finetune: the dataset's sections with this control's overrides merged in.
    """

    name: str
    dataset: str
    classifier: ClassifierParams
    finetune: FinetuneParams
    encoder: Annotated[str, OneOf(ENCODERS)] = "finetuned"
    labels: Annotated[int, Range(2)] | None = None
    labels_seed: NonNegativeInt = 42
    pretrain_step: PositiveInt | None = None
    direction: Annotated[str, OneOf(DIRECTIONS)] = "fwd"
    description: str = ""


@dataclasses.dataclass(frozen=True)
class ReportParams:
    """Stage ``report``: ``reports/results.md`` over every dataset."""

    title: str = "ULMFiT results"
    decimals: Annotated[int, Range(0, 10)] = 2


@dataclasses.dataclass(frozen=True)
class MlflowParams:
    """How runs and models are named in MLflow (the tracking URI comes from the environment)."""

    experiment: Text = "ulmfit"
    model_name_prefix: Text = "ulmfit"
    log_every_steps: PositiveInt = (
        10  # training curves: one point per that many steps (keeps the DB small)
    )


@dataclasses.dataclass(frozen=True)
class DatasetParams:
    """One entry of ``datasets``: where the data comes from and per-dataset overrides."""

    name: str
    source: DatasetSource
    finetune: FinetuneParams
    classifier: ClassifierParams
    # The directions trained by the pipeline; the stages of a direction left out record that
    # they did not run, and evaluate reports that direction alone (no ensemble).
    directions: tuple[str, ...] = DIRECTIONS


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``."""

    wikipedia: WikipediaSource
    tokenizer: TokenizerConfig
    tokenize: TokenizeParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    classifier: ClassifierParams
    datasets: Mapping[str, DatasetParams]
    evaluate: EvaluateParams
    report: ReportParams
    mlflow: MlflowParams
    controls: Mapping[str, ControlParams] = dataclasses.field(default_factory=dict)
    baseline: BaselineParams = BaselineParams()

    def control(self, name: str) -> ControlParams:
        if name not in self.controls:
            raise KeyError(
                f"control '{name}' is not in params.yaml controls {sorted(self.controls)}"
            )
        return self.controls[name]

    def label_subsets(self, dataset: str) -> list[tuple[int, int]]:
        """The (labels, seed) subsets the controls of ``dataset`` train on, smallest first."""
        return sorted(
            {
                (c.labels, c.labels_seed)
                for c in self.controls.values()
                if c.dataset == dataset and c.labels is not None
            }
        )

    def dataset(self, name: str) -> DatasetParams:
        if name not in self.datasets:
            raise KeyError(
                f"dataset '{name}' is not in params.yaml datasets {sorted(self.datasets)}"
            )
        return self.datasets[name]


SECTIONS = (
    "wikipedia",
    "tokenizer",
    "tokenize",
    "pretrain",
    "datasets",
    "finetune",
    "classifier",
    "evaluate",
    "controls",
    "baseline",
    "report",
    "mlflow",
)


def load_params(
    path: str | Path = "params.yaml", *, root: str | Path | None = None, check_paths: bool = True
) -> Params:
    """Read and check the whole of ``params.yaml`` before any work: every bad value is reported
    at once, as one :class:`InputError` with a line per problem (key path, value given, what is
    allowed, fix). Local source paths (``wikipedia.path``, ``datasets.<name>.source.*path``)
    must exist, relative to ``root`` (default: the file's folder, the project root), unless
    ``check_paths`` is false (a profile checked before it is copied in place)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path,
            "parameter file not found",
            fix="run from the project root, or pick a profile: ulmfit profile default",
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        raise InputError(
            path,
            f"not valid YAML ({error})",
            line=None if line is None else line + 1,
            fix="correct the YAML syntax",
        ) from error
    root = Path(root) if root is not None else path.resolve().parent
    try:
        return parse_params(data, root=root if check_paths else None)
    except ConfigError as error:
        count = len(error.problems)
        raise InputError(
            path,
            f"{count} invalid value{'s' if count > 1 else ''}, listed below; nothing was run",
            fix="correct each one as its line says (profiles/default.yaml documents every key)",
            details=[str(problem) for problem in error.problems],
        ) from error


def parse_params(data: Mapping[str, Any], *, root: Path | None = None) -> Params:
    """Build :class:`Params` from the parsed YAML, checking every value (types, ranges,
    choices, names, and with ``root`` the local source paths); raises :class:`ConfigError` (a
    ``ValueError``) listing every problem, each named by its key path."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            [Problem("params.yaml", "must be a mapping of sections", "write 'section:' lines")]
        )
    problems: list[Problem] = []

    def attempt(key: str, build: Any, *args: Any, **kwargs: Any) -> Any:
        """``build(...)``, or None with its problems recorded: one bad section does not hide
        the problems of the others."""
        try:
            return build(*args, **kwargs)
        except (ValueError, TypeError) as error:
            problems.extend(problems_of(error, key))
            return None

    for name in data:
        if name not in SECTIONS:
            problems.append(
                Problem(str(name), f"unknown section; valid sections: {list(SECTIONS)}", _SPELL)
            )
    for name in ("wikipedia", "tokenizer", "pretrain", "datasets"):
        if name not in data:
            problems.append(Problem(name, "missing section", "add it (see profiles/default.yaml)"))
    if data.get("controls") is None:  # dvc.yaml's control stage iterates over it
        problems.append(
            Problem(
                "controls",
                "missing or empty (null): dvc.yaml's control stage iterates over it, and DVC "
                "refuses the whole pipeline without it",
                "write 'controls: {}' when there are no controls",
            )
        )
    sections = {name: attempt(name, _section, data, name) or {} for name in SECTIONS}

    tokenizer = attempt(
        "tokenizer", from_dict, TokenizerConfig, sections["tokenizer"], where="tokenizer"
    )
    vocab_size = tokenizer.vocab_size if tokenizer else TokenizerConfig().vocab_size
    pretrain = attempt("pretrain", _pretrain, sections["pretrain"], vocab_size)
    # Without a valid pretrain.model, the default sizes stand in so the rest is still checked.
    encoder = pretrain.model if pretrain else AWDLSTMConfig(vocab_size=vocab_size)
    finetune = attempt("finetune", _finetune, sections["finetune"], "finetune")
    classifier = attempt("classifier", _classifier, sections["classifier"], encoder, "classifier")

    datasets_data = sections["datasets"]
    if isinstance(data.get("datasets") or {}, Mapping) and not datasets_data:
        problems.append(
            Problem(
                "datasets",
                "got no dataset, expected at least one dataset name and its options",
                "add a dataset, such as 'bbc_news: {}' (see profiles/default.yaml)",
            )
        )
    datasets = {}
    for name, entry in datasets_data.items():
        datasets[name] = attempt(
            f"datasets.{name}",
            _dataset,
            str(name),
            entry or {},
            sections["finetune"],
            sections["classifier"],
            encoder,
            root,
        )
    controls = {
        str(name): attempt(
            f"controls.{name}", _control, str(name), entry or {}, datasets_data, data, encoder
        )
        for name, entry in sections["controls"].items()
    }
    parsed_datasets = {name: d for name, d in datasets.items() if d}
    parsed_controls = {name: c for name, c in controls.items() if c}
    if pretrain and pretrain.reuse:
        attempt("pretrain.reuse", _check_reuse, pretrain, parsed_datasets, parsed_controls)
    attempt("controls", _check_control_lms, parsed_datasets, parsed_controls)
    if pretrain and isinstance(pretrain.model, TransformerConfig):
        trainings = {"pretrain.train": pretrain.train}
        if finetune:
            trainings["finetune.train"] = finetune.train
        for group, entries in (("datasets", datasets), ("controls", controls)):
            for name, entry in entries.items():
                if entry:
                    trainings[f"{group}.{name}.finetune.train"] = entry.finetune.train
        attempt("pretrain.model", _check_transformer_training, pretrain.model, trainings)

    def section(cls: type, name: str) -> Any:
        return attempt(name, from_dict, cls, sections[name], where=name, root=root)

    built = {
        "wikipedia": section(WikipediaSource, "wikipedia"),
        "tokenize": section(TokenizeParams, "tokenize"),
        "evaluate": section(EvaluateParams, "evaluate"),
        "report": section(ReportParams, "report"),
        "mlflow": section(MlflowParams, "mlflow"),
        "baseline": section(BaselineParams, "baseline"),
    }
    if problems:
        raise ConfigError(_once(problems, data))
    return Params(
        tokenizer=tokenizer,
        pretrain=pretrain,
        finetune=finetune,
        classifier=classifier,
        datasets=datasets,
        controls=controls,
        **built,
    )


_SPELL = "correct the spelling, or remove it"
# Dataset names become DVC stage items (``finetune_lm@<name>-fwd``, where ``-`` separates the
# direction), folder names and MLflow model names; control names become ``control@<name>``.
DATASET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
CONTROL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _once(problems: list[Problem], data: Mapping[str, Any]) -> list[Problem]:
    """Each problem once: a bad value of the shared ``finetune``/``classifier`` sections (or of
    a dataset's override) is merged into every dataset and control; it is reported where it is
    written, not again under each dataset or control that does not set the key itself."""
    seen = {(p.key, p.message) for p in problems}
    out = []
    for problem in problems:
        parts = problem.key.split(".")
        if parts[0] in ("datasets", "controls") and len(parts) > 3:
            written_here = _sets(data, re.sub(r"\[\d+\]", "", problem.key).split("."))
            inherited = [".".join(parts[2:])]  # the shared section's key
            if parts[0] == "controls":  # ... or a dataset's override
                inherited += [k for k, _ in seen if k.endswith("." + ".".join(parts[2:]))]
            if not written_here and any((k, problem.message) in seen for k in inherited):
                continue
        out.append(problem)
    return list(dict.fromkeys(out))


def _sets(data: Any, keys: list[str]) -> bool:
    """Whether the raw YAML sets the key path ``keys``."""
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return False
        data = data[key]
    return True


def section_dict(params: Params, *names: str, dataset: str | None = None) -> dict[str, Any]:
    """The effective (defaults filled in, overrides applied) sections a stage reads, as plain
    dicts: what its MLflow run logs and what keys its checkpoints."""
    out: dict[str, Any] = {}
    for name in names:
        if name == "datasets":
            assert dataset is not None
            out["dataset"] = to_dict(params.dataset(dataset))
        elif name == "controls":
            assert dataset is not None  # here: the control's name
            out["control"] = to_dict(params.control(dataset))
        elif dataset is not None and name in ("finetune", "classifier"):
            out[name] = to_dict(getattr(params.dataset(dataset), name))
        else:
            value = getattr(params, name)
            out[name] = to_dict(value)
    return out


# ------------------------------------------------------------------------------------ helpers


def _problem(key: str, message: str, fix: str) -> ConfigError:
    return ConfigError([Problem(key, message, fix)])


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, Mapping):
        raise _problem(
            name,
            f"got {value!r}, expected a mapping of keys",
            "write the section as 'key: value' lines indented under its name",
        )
    return dict(value)


def _split(data: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> list[Problem]:
    return [
        Problem(
            f"{where}.{key}",
            f"unknown key in section '{where}'; valid keys: {sorted(allowed)}",
            _SPELL,
        )
        for key in data
        if key not in allowed
    ]


def _mapping(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise _problem(
            where, f"got {entry!r}, expected a mapping of keys", "indent its keys under it"
        )
    return dict(entry)


def _nested(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    return _mapping(data.get(key) or {}, f"{where}.{key}")


def _scaled_dropouts(
    encoder: AWDLSTMConfig | TransformerConfig, multipliers: tuple[float, ...], where: str
) -> list[Problem]:
    """Each phase multiplies the base dropouts by its multiplier: the products must stay < 1."""
    names = [f.name for f in dataclasses.fields(encoder) if f.name.endswith("dropout")]
    worst = max(getattr(encoder, name) for name in names)
    return [
        Problem(
            where,
            f"got {m:g}, expected a multiplier that keeps every dropout below 1 (the largest, "
            f"{worst:g}, becomes {worst * m:g})",
            f"use a multiplier below {1 / worst:.3g}" if worst else "lower the multiplier",
        )
        for m in multipliers
        if worst * m >= 1
    ]


def _pretrain(data: dict[str, Any], vocab_size: int) -> PretrainParams:
    model = _nested(data, "model", "pretrain")
    if "vocab_size" in model:
        raise _problem(
            "pretrain.model.vocab_size",
            "the vocabulary size is set once, in tokenizer.vocab_size",
            "remove this key",
        )
    model["vocab_size"] = vocab_size
    built = _model(model, "pretrain.model")
    reuse = _reuse(data.get("reuse") or {})
    params = from_dict(
        PretrainParams,
        {**data, "model": built, "train": _nested(data, "train", "pretrain"), "reuse": {}},
        where="pretrain",
    )
    params = dataclasses.replace(params, reuse=reuse)
    problems = _scaled_dropouts(
        params.model, (params.dropout_multiplier,), "pretrain.dropout_multiplier"
    )
    if problems:
        raise ConfigError(problems)
    return params


def _model(model: dict[str, Any], where: str) -> AWDLSTMConfig | TransformerConfig:
    """``pretrain.model`` by its ``backbone``: an :class:`AWDLSTMConfig` (the default, every
    key as before) or a :class:`TransformerConfig` of the keys ``_TRANSFORMER_KEYS``."""
    backbone = model.pop("backbone", "awd_lstm")
    if backbone not in BACKBONES:
        raise _problem(
            f"{where}.backbone",
            f"got {backbone!r}, expected one of {', '.join(BACKBONES)}",
            "write awd_lstm (ULMFiT), awd_qrnn (MultiFiT), transformer_causal (GPT-style) or "
            "transformer_mlm (BERT-style)",
        )
    if "qrnn" in model:
        raise _problem(
            f"{where}.qrnn",
            "the layer type is the backbone's",
            "remove it and write backbone: awd_qrnn (or awd_lstm)",
        )
    if backbone in ("awd_lstm", "awd_qrnn"):
        return from_dict(AWDLSTMConfig, {**model, "qrnn": backbone == "awd_qrnn"}, where=where)
    objective = backbone.removeprefix("transformer_")
    allowed = (*_TRANSFORMER_KEYS, "mask_rate") if objective == "mlm" else _TRANSFORMER_KEYS
    problems = [
        Problem(
            f"{where}.{key}",
            f"not a key of backbone {backbone}; valid keys: {sorted(allowed)}",
            "remove it (the AWD-LSTM's sizes and dropouts are for backbone awd_lstm)",
        )
        for key in model
        if key not in (*allowed, "vocab_size")
    ]
    if problems:
        raise ConfigError(problems)
    fixed = {"objective": objective, "mask_id": MASK_ID if objective == "mlm" else None}
    return from_dict(TransformerConfig, {**model, **fixed}, where=where)


def _reuse(data: Any) -> dict[str, PretrainedSource]:
    """``pretrain.reuse``: direction -> one source each (exactly one of path, url, model_uri;
    a url needs its sha256)."""
    data = _mapping(data, "pretrain.reuse")
    problems = _split(data, "pretrain.reuse", DIRECTIONS)
    out = {}
    for direction, entry in data.items():
        where = f"pretrain.reuse.{direction}"
        if direction not in DIRECTIONS:
            continue
        source = from_dict(PretrainedSource, _mapping(entry, where), where=where)
        given = [k for k in ("path", "url", "model_uri") if getattr(source, k)]
        if len(given) != 1:
            problems.append(
                Problem(
                    where,
                    f"got {given}, expected exactly one of path, url, model_uri",
                    "keep the one origin of this LM",
                )
            )
        if source.url and not source.sha256:
            problems.append(
                Problem(f"{where}.sha256", "a url needs its sha256", "add the archive's sha256sum")
            )
        if source.model_uri and not source.model_uri.startswith("models:/"):
            problems.append(
                Problem(
                    f"{where}.model_uri",
                    f"got {source.model_uri!r}, expected a models:/ URI",
                    "write models:/<name>/<version> or models:/<name>@<alias>",
                )
            )
        if source.tracking_uri and not source.model_uri:
            problems.append(
                Problem(f"{where}.tracking_uri", "goes with model_uri only", "remove it")
            )
        out[direction] = source
    if problems:
        raise ConfigError(problems)
    return out


def _check_reuse(
    pretrain: PretrainParams,
    datasets: Mapping[str, DatasetParams],
    controls: Mapping[str, ControlParams],
) -> None:
    """With reused LMs, every direction a dataset or control trains needs one, and no control
    can ask for a pretraining snapshot (no pretraining runs here)."""
    problems = []
    for name, dataset in datasets.items():
        missing = sorted(set(dataset.directions) - set(pretrain.reuse))
        if missing:
            problems.append(
                Problem(
                    f"datasets.{name}.directions",
                    f"trains {missing} but pretrain.reuse gives no LM for it",
                    f"add pretrain.reuse.{missing[0]}, or set datasets.{name}.directions: [fwd]",
                )
            )
    for name, control in controls.items():
        if control.direction not in pretrain.reuse:
            problems.append(
                Problem(
                    f"controls.{name}.direction",
                    f"pretrain.reuse gives no {control.direction} LM",
                    f"add pretrain.reuse.{control.direction}",
                )
            )
        if control.pretrain_step is not None:
            problems.append(
                Problem(
                    f"controls.{name}.pretrain_step",
                    "needs pretraining in this project, and pretrain.reuse is set",
                    "remove the control or pretrain.reuse",
                )
            )
    if problems:
        raise ConfigError(problems)


def _check_control_lms(
    datasets: Mapping[str, DatasetParams], controls: Mapping[str, ControlParams]
) -> None:
    """A control that starts from its dataset's fine-tuned LM needs the dataset to train that
    direction (one with ``pretrain_step`` fine-tunes its own LM; other encoders need none)."""
    problems = [
        Problem(
            f"controls.{name}.direction",
            f"got {control.direction}, and datasets.{control.dataset}.directions leaves "
            f"{control.direction} out, so there is no {control.direction} LM fine-tuned on "
            f"{control.dataset} to start from",
            f"train both: remove datasets.{control.dataset}.directions (or remove direction)",
        )
        for name, control in controls.items()
        if control.encoder == "finetuned"
        and control.pretrain_step is None
        and control.dataset in datasets
        and control.direction not in datasets[control.dataset].directions
    ]
    if problems:
        raise ConfigError(problems)


def _check_transformer_training(
    model: TransformerConfig, trainings: Mapping[str, LMTrainConfig]
) -> None:
    """A transformer LM reads windows of at most ``max_len`` tokens (variable BPTT draws up to
    ``bptt + 20``), and an MLM has no next-token validation perplexity for NT-ASGD to watch."""
    problems = []
    for where, train in trainings.items():
        longest = train.bptt + (20 if train.variable_bptt else 0)
        if longest > model.max_len:
            problems.append(
                Problem(
                    f"{where}.bptt",
                    f"got {train.bptt}, whose longest window ({longest} tokens) exceeds "
                    f"pretrain.model.max_len {model.max_len}",
                    "lower bptt (by 20 more with variable_bptt) or raise pretrain.model.max_len",
                )
            )
        if model.objective == "mlm" and train.optim.name == "ntasgd":
            problems.append(
                Problem(
                    f"{where}.optim.name",
                    "got 'ntasgd', which switches on validation perplexity; a masked LM has "
                    "none (it is validated by its masked-token loss)",
                    "use adam",
                )
            )
    if problems:
        raise ConfigError(problems)


def _finetune(data: dict[str, Any], where: str) -> FinetuneParams:
    return from_dict(FinetuneParams, {**data, "train": _nested(data, "train", where)}, where=where)


def _classifier(
    data: dict[str, Any], encoder: AWDLSTMConfig | TransformerConfig, where: str
) -> ClassifierParams:
    model = _nested(data, "model", where)
    encoder_overrides = _nested(model, "encoder", f"{where}.model")
    model.pop("encoder", None)
    if isinstance(encoder, TransformerConfig):
        built = _transformer_classifier_model(model, encoder_overrides, encoder, where)
    else:
        built = _awd_lstm_classifier_model(model, encoder_overrides, encoder, where)
    params = from_dict(
        ClassifierParams,
        {**data, "model": built, "train": _nested(data, "train", where)},
        where=where,
    )
    multipliers = params.dropout_multipliers or (params.dropout_multiplier,)
    key = f"{where}.dropout_multiplier{'s' if params.dropout_multipliers else ''}"
    problems = _scaled_dropouts(params.model.encoder, multipliers, key)
    if problems:
        raise ConfigError(problems)
    return params


def _awd_lstm_classifier_model(
    model: dict[str, Any], encoder_overrides: dict[str, Any], encoder: AWDLSTMConfig, where: str
) -> ClassifierModelParams:
    problems = [
        Problem(
            f"{where}.model.encoder.{key}",
            "the classifier's encoder sizes come from pretrain.model; only dropouts may be set "
            "here",
            "remove this key (set it in pretrain.model)",
        )
        for key in sorted(set(encoder_overrides) & set(_ENCODER_SIZE_KEYS))
    ]
    if "num_classes" in model:
        problems.append(
            Problem(f"{where}.model.num_classes", "is set from the dataset's labels", "remove it")
        )
    if "pooling" in model:
        problems.append(
            Problem(
                f"{where}.model.pooling",
                "is for the transformer backbones; the AWD-LSTM classifier concat-pools "
                "(last, max, mean)",
                "remove it, or set pretrain.model.backbone",
            )
        )
    if problems:
        raise ConfigError(problems)
    model["encoder"] = {**to_dict(encoder), **encoder_overrides}
    return from_dict(ClassifierModelParams, model, where=f"{where}.model")


def _transformer_classifier_model(
    model: dict[str, Any],
    encoder_overrides: dict[str, Any],
    encoder: TransformerConfig,
    where: str,
) -> TransformerClassifierModelParams:
    """``classifier.model`` of a transformer: pooling, the head and the encoder's dropout."""
    backbone = backbone_name(encoder)
    problems = [
        Problem(
            f"{where}.model.encoder.{key}",
            f"with backbone {backbone} only the encoder's dropout may be set here (its sizes "
            "come from pretrain.model)",
            "remove this key",
        )
        for key in encoder_overrides
        if key != "dropout"
    ]
    problems += [
        Problem(
            f"{where}.model.{key}",
            f"BPT3C's {key} is for backbone awd_lstm; a transformer classifier reads each "
            "document's first pretrain.model.max_len tokens",
            "remove it",
        )
        for key in ("bptt", "max_len")
        if key in model
    ]
    if "num_classes" in model:
        problems.append(
            Problem(f"{where}.model.num_classes", "is set from the dataset's labels", "remove it")
        )
    if model.get("pooling") == "first" and encoder.objective == "causal":
        problems.append(
            Problem(
                f"{where}.model.pooling",
                "got 'first' with a causal encoder, whose first position sees no other token",
                "use last or mean (first, BERT's [CLS], is for transformer_mlm)",
            )
        )
    if problems:
        raise ConfigError(problems)
    model.setdefault("pooling", "last" if encoder.objective == "causal" else "mean")
    model["encoder"] = {**to_dict(encoder), **encoder_overrides}
    return from_dict(TransformerClassifierModelParams, model, where=f"{where}.model")


def _frozen_features(
    where: str,
    entry: Mapping[str, Any],
    dataset_entry: Mapping[str, Any],
    encoder: AWDLSTMConfig | TransformerConfig,
) -> list[Problem]:
    """An ELMo-style control reads the dataset's forward and backward AWD-LSTM LMs."""
    problems = []
    if not isinstance(encoder, AWDLSTMConfig):
        problems.append(
            Problem(
                f"{where}.encoder",
                f"frozen_features reads the dataset's AWD-LSTM LMs, and pretrain.model.backbone "
                f"is {backbone_name(encoder)}",
                "run this control in a workspace with backbone awd_lstm (docs/pipeline.md)",
            )
        )
    if dataset_entry.get("directions") not in (None, list(DIRECTIONS)):
        problems.append(
            Problem(
                f"{where}.encoder",
                "frozen_features needs the dataset's fwd and bwd LMs, and its directions leave "
                "one out",
                f"train both: remove datasets.{entry.get('dataset')}.directions",
            )
        )
    if entry.get("direction", "fwd") != "fwd":
        problems.append(
            Problem(
                f"{where}.direction",
                "frozen_features reads both directions itself; the classifier reads text forward",
                "remove direction",
            )
        )
    return problems


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins, nested mappings are merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _dataset(
    name: str,
    entry: Any,
    finetune: dict[str, Any],
    classifier: dict[str, Any],
    encoder: AWDLSTMConfig | TransformerConfig,
    root: Path | None = None,
) -> DatasetParams:
    """One dataset: every problem of its name, source, overrides and directions together."""
    where = f"datasets.{name}"
    entry = _mapping(entry, where)
    problems = _split(entry, where, ("source", "finetune", "classifier", "directions"))
    if not DATASET_NAME.fullmatch(name):
        problems.append(
            Problem(
                where,
                f"got the name {name!r}, expected a letter followed by letters, digits or _ "
                "(it becomes stage, folder and model names; - separates the direction)",
                "rename it, such as my_data",
            )
        )
    parts = {}
    for part, build in [
        ("source", lambda: _source(name, _nested(entry, "source", where), where, root)),
        (
            "finetune",
            lambda: _finetune(
                _merge(finetune, _nested(entry, "finetune", where)), f"{where}.finetune"
            ),
        ),
        (
            "classifier",
            lambda: _classifier(
                _merge(classifier, _nested(entry, "classifier", where)),
                encoder,
                f"{where}.classifier",
            ),
        ),
    ]:
        try:
            parts[part] = build()
        except (ValueError, TypeError) as error:
            problems.extend(problems_of(error, f"{where}.{part}"))
    directions = entry.get("directions") or list(DIRECTIONS)
    if not isinstance(directions, list) or directions not in (["fwd"], ["fwd", "bwd"]):
        problems.append(
            Problem(
                f"{where}.directions",
                f"got {directions!r}, expected [fwd] or [fwd, bwd]",
                "write [fwd] to train the forward model only, or leave it unset for both",
            )
        )
    if problems:
        raise ConfigError(problems)
    return DatasetParams(name=name, directions=tuple(directions), **parts)


def _source(name: str, source: dict[str, Any], where: str, root: Path | None) -> DatasetSource:
    source.setdefault("name", name)
    built = from_dict(DatasetSource, source, where=f"{where}.source", root=root)
    if built.layout is None and built.name not in DATASETS:
        raise _problem(
            f"{where}.source.layout",
            f"got null for {built.name!r}, which is not a built-in dataset "
            f"({', '.join(sorted(DATASETS))}); expected table or folder",
            "for your own data set layout: table (a CSV, TSV, JSON Lines or Parquet file) or "
            "layout: folder (one sub-folder per class), and path: (see docs/own-data.md)",
        )
    return built


def _control(
    name: str,
    entry: Any,
    datasets: Mapping[str, Any],
    data: Mapping[str, Any],
    encoder: AWDLSTMConfig | TransformerConfig,
) -> ControlParams:
    """A control: its dataset's finetune/classifier sections (global, then the dataset's
    overrides, then the control's own) and its options."""
    where = f"controls.{name}"
    entry = _mapping(entry, where)
    keys = tuple(
        f.name
        for f in dataclasses.fields(ControlParams)
        if f.name not in ("name", "classifier", "finetune")
    )
    problems = _split(entry, where, (*keys, "finetune", "classifier"))
    if not CONTROL_NAME.fullmatch(name):
        problems.append(
            Problem(
                where,
                f"got the name {name!r}, expected a letter followed by letters, digits, _ or - "
                "(it becomes the stage control@<name>)",
                "rename it, such as imdb-scratch",
            )
        )
    dataset = entry.get("dataset")
    if dataset not in datasets:
        problems.append(
            Problem(
                f"{where}.dataset",
                f"got {dataset!r}, expected one of the datasets {sorted(map(str, datasets))}",
                "name a dataset of the datasets section",
            )
        )
        dataset = None
    step = entry.get("pretrain_step")
    if step is not None:
        pretrain = data.get("pretrain") if isinstance(data.get("pretrain"), Mapping) else {}
        train = pretrain.get("train") if isinstance(pretrain.get("train"), Mapping) else {}
        snapshots = train.get("snapshot_steps") or ()
        if entry.get("encoder", "finetuned") != "finetuned":
            problems.append(
                Problem(
                    f"{where}.pretrain_step",
                    f"got {step!r} with encoder {entry.get('encoder')!r}; a pretraining "
                    "snapshot needs encoder: finetuned",
                    "set encoder: finetuned, or remove pretrain_step",
                )
            )
        elif step not in snapshots:
            problems.append(
                Problem(
                    f"{where}.pretrain_step",
                    f"got {step!r}, which is not one of pretrain.train.snapshot_steps "
                    f"{list(snapshots)}",
                    "add it there so that pretraining saves that snapshot",
                )
            )
    dataset_entry = (data.get("datasets") or {}).get(dataset) or {} if dataset else {}
    if not isinstance(dataset_entry, Mapping):
        dataset_entry = {}
    finetune = _merge(
        _merge(
            _section(data, "finetune"), _nested(dataset_entry, "finetune", f"datasets.{dataset}")
        ),
        _nested(entry, "finetune", where),
    )
    classifier = _merge(
        _section(data, "classifier"), _nested(dataset_entry, "classifier", f"datasets.{dataset}")
    )
    if entry.get("encoder") in ("scratch", "frozen_features"):
        # Its train section is the one-rate recipe, so no second, one-rate copy of the grid.
        classifier = _merge(classifier, {"train": ONE_RATE, "one_rate_lrs": []})
    if entry.get("encoder") == "frozen_features":
        problems += _frozen_features(where, entry, dataset_entry, encoder)
    own = _nested(entry, "classifier", where)
    classifier = _merge(classifier, own)
    options = {k: entry[k] for k in keys if k in entry}
    problems += check(
        ControlParams, {k: v for k, v in options.items() if k != "dataset"}, where=where
    )
    built = {}
    for part, build in [
        ("classifier", lambda: _classifier(classifier, encoder, f"{where}.classifier")),
        ("finetune", lambda: _finetune(finetune, f"{where}.finetune")),
    ]:
        try:
            built[part] = build()
        except (ValueError, TypeError) as error:
            problems.extend(problems_of(error, f"{where}.{part}"))
    if problems:
        raise ConfigError(problems)
    if entry.get("encoder") == "scratch" and "lrs" not in own:
        built["classifier"] = dataclasses.replace(
            built["classifier"], lrs=scratch_lrs(built["classifier"])
        )
    return ControlParams(name=name, **options, **built)
