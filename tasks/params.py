"""``params.yaml`` -> frozen dataclasses, one per section (= one per pipeline stage).

``params.yaml`` is the one source of parameters. Each section is named after the stage that
reads it (and after that stage's MLflow run). Sections are built with
:func:`ulmfit.config.from_dict` into the library's own config dataclasses, so an unknown or
misspelt key stops the pipeline with the section and the valid keys named, before any work.

Dropouts follow the ULMFiT scripts (paper section 3): the AWD-LSTM's base dropouts are given
once (``pretrain.model``) and each phase scales them by its own multiplier (``pretrain``: 0.1
in the fastai v1 WikiText-103 recipe, ``finetune``: 0.7, the paper's LM fine-tuning value);
the classifier has its own base dropouts (fastai's ``awd_lstm_clas_config``) and multiplier.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.pipeline import DIRECTIONS
from ulmfit.config import from_dict, to_dict
from ulmfit.corpora import DatasetSource, WikipediaSource
from ulmfit.errors import InputError
from ulmfit.model import AWDLSTMConfig, ClassifierConfig
from ulmfit.tokenizer import TokenizerConfig
from ulmfit.train import ClassifierTrainConfig, LMTrainConfig

LM_SPLITS = ("train", "valid", "test", "unsup")
# What a classifier's encoder takes from the pretrained LM: every field but the dropouts.
_ENCODER_SIZE_KEYS = tuple(
    f.name for f in dataclasses.fields(AWDLSTMConfig) if not f.name.endswith("_dropout")
)


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    """Stage ``tokenize_*``: how texts are encoded into token files."""

    workers: int | None = None  # None: every core
    chunk_docs: int = 512


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

    model: AWDLSTMConfig  # vocab_size comes from the tokenizer at run time
    train: LMTrainConfig
    dropout_multiplier: float = 1.0
    device: str = "auto"
    threads: int = 0  # CPU threads for PyTorch; 0: its default (one per core)
    register: bool = True
    reuse: Mapping[str, PretrainedSource] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    """Stage ``finetune_lm``: target-task LM fine-tuning (paper section 3.2).

    The LM sees the texts of ``splits`` (never a label); ``valid_fraction`` of those documents
    (seeded) is held out to report the fine-tuned perplexity.
    """

    train: LMTrainConfig
    dropout_multiplier: float = 0.7
    splits: tuple[str, ...] = LM_SPLITS
    valid_fraction: float = 0.1
    max_docs: int | None = None  # cap on the documents used (seeded sample), None: all
    device: str = "auto"
    threads: int = 0


def _default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name``: each default is written once."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@dataclasses.dataclass(frozen=True)
class ClassifierModelParams:
    """``classifier.model``: :class:`ClassifierConfig` without the sizes that are known only at
    run time (the vocabulary and the number of classes); :meth:`ClassifierParams.build` adds
    them. ``encoder``: the pretrained LM's sizes with the classifier's base dropouts."""

    encoder: AWDLSTMConfig
    head_hidden: int = _default(ClassifierConfig, "head_hidden")
    head_dropouts: tuple[float, float] = _default(ClassifierConfig, "head_dropouts")
    bptt: int = _default(ClassifierConfig, "bptt")
    max_len: int = _default(ClassifierConfig, "max_len")


@dataclasses.dataclass(frozen=True)
class ClassifierParams:
    """Stage ``train_classifier``: classifier fine-tuning (paper section 3.3).

    ``model`` holds the head and BPT3C settings and, in ``model.encoder``, the classifier's base
    dropouts; the encoder's sizes always come from the pretrained LM.
    """

    model: ClassifierModelParams
    train: ClassifierTrainConfig
    dropout_multiplier: float = 0.5
    device: str = "auto"
    threads: int = 0
    # Hyperparameter search: one classifier per (learning rate, dropout multiplier) pair, each
    # with train.patience/keep_best; the lowest validation error wins. Empty: train.lr /
    # dropout_multiplier alone. A dataset's controls get the same grid as its ULMFiT classifier.
    lrs: tuple[float, ...] = ()
    dropout_multipliers: tuple[float, ...] = ()

    def grid(self) -> list[tuple[float, float]]:
        """The (learning rate, dropout multiplier) pairs of the search, in order."""
        lrs = self.lrs or (self.train.lr,)
        multipliers = self.dropout_multipliers or (self.dropout_multiplier,)
        return [(lr, multiplier) for lr in lrs for multiplier in multipliers]

    def build(
        self, vocab_size: int, num_classes: int, dropout_multiplier: float
    ) -> ClassifierConfig:
        """The library's :class:`ClassifierConfig` once the sizes are known: the tokenizer's
        vocabulary, the dataset's classes, the encoder's dropouts times ``dropout_multiplier``."""
        model = self.model
        encoder = dataclasses.replace(model.encoder, vocab_size=vocab_size)
        return ClassifierConfig(
            encoder=encoder.scaled(dropout_multiplier),
            num_classes=num_classes,
            head_hidden=model.head_hidden,
            head_dropouts=model.head_dropouts,
            bptt=model.bptt,
            max_len=model.max_len,
        )


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """Stage ``evaluate``: test error of forward, backward and the ensemble (paper section 3.3)."""

    batch_size: int = 64
    device: str = "auto"
    threads: int = 0
    register: bool = True  # register the ensemble in the MLflow model registry


@dataclasses.dataclass(frozen=True)
class BaselineParams:
    """Stage ``baseline``: TF-IDF n-grams + logistic regression (scikit-learn) per dataset, on
    the full train split and on every label subset the controls use; C tuned on valid."""

    ngram_max: int = 2
    min_df: int = 1
    max_features: int | None = None
    sublinear_tf: bool = True
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    seed: int = 42


ENCODERS = ("finetuned", "pretrained", "lm_from_scratch", "scratch")
# How a classifier with a random encoder trains unless its control says otherwise.
SCRATCH_TRAINING = {"gradual_unfreezing": False, "schedule": {"discriminative": False}}


@dataclasses.dataclass(frozen=True)
class ControlParams:
    """One entry of ``controls``: a classifier trained another way than the pipeline's, on the
    same data and with the same tuning (lr grid, early stopping), for ablations and sample
    efficiency (paper section 5, Tables 6-7 and Figure 3).

    encoder: where the classifier's encoder starts. ``finetuned``: the dataset's fine-tuned LM
        (full ULMFiT); ``pretrained``: the Wikipedia LM (no LM fine-tuning); ``lm_from_scratch``:
        an LM fine-tuned on the dataset from random weights (no pretraining); ``scratch``:
        random weights (no LM at all). A ``scratch`` classifier trains every layer from the
        first step at one learning rate (``gradual_unfreezing`` and ``discriminative`` default
        to false for it): those two protect what a pretrained encoder knows (paper section
        3.3), and a random encoder has nothing to protect; frozen, its random layers only pass
        noise to the head. The control's own ``classifier`` section can still set them.
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
    encoder: str = "finetuned"
    labels: int | None = None
    labels_seed: int = 42
    pretrain_step: int | None = None
    direction: str = "fwd"
    description: str = ""


@dataclasses.dataclass(frozen=True)
class ReportParams:
    """Stage ``report``: ``reports/results.md`` over every dataset."""

    title: str = "ULMFiT results"
    decimals: int = 2


@dataclasses.dataclass(frozen=True)
class MlflowParams:
    """How runs and models are named in MLflow (the tracking URI comes from the environment)."""

    experiment: str = "ulmfit"
    model_name_prefix: str = "ulmfit"
    log_every_steps: int = 10  # training curves: one point per that many steps (keeps the DB small)


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


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; bad content raises :class:`InputError` naming the fix."""
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
    try:
        return parse_params(data)
    except InputError as error:  # a section's own check (wikipedia.kind) names its key and fix
        raise InputError(path, f"{error.path}: {error.message}", fix=error.fix) from error
    except (ValueError, TypeError) as error:
        raise InputError(
            path,
            str(error),
            fix="correct the key or section named above (profiles/default.yaml documents every one)",
        ) from error


def parse_params(data: Mapping[str, Any]) -> Params:
    """Build :class:`Params` from the parsed YAML; raises ``ValueError`` naming the section."""
    if not isinstance(data, Mapping):
        raise ValueError("params.yaml must be a mapping of sections")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    missing = [s for s in ("wikipedia", "tokenizer", "pretrain", "datasets") if s not in data]
    if missing:
        raise ValueError(f"missing section(s) {missing}")

    tokenizer = from_dict(TokenizerConfig, _section(data, "tokenizer"), where="tokenizer")
    pretrain = _pretrain(_section(data, "pretrain"), tokenizer.vocab_size)
    finetune_data = _section(data, "finetune")
    classifier_data = _section(data, "classifier")
    finetune = _finetune(finetune_data, "finetune")
    classifier = _classifier(classifier_data, pretrain.model, "classifier")

    datasets_data = data.get("datasets") or {}
    if not isinstance(datasets_data, Mapping) or not datasets_data:
        raise ValueError("section 'datasets' must map at least one dataset name to its options")
    datasets = {}
    for name, entry in datasets_data.items():
        datasets[name] = _dataset(
            str(name), entry or {}, finetune_data, classifier_data, pretrain.model
        )
    controls_data = data.get("controls") or {}
    if not isinstance(controls_data, Mapping):
        raise ValueError("section 'controls' must map control names to their options")
    controls = {
        str(name): _control(str(name), entry or {}, datasets, data, pretrain.model)
        for name, entry in controls_data.items()
    }

    if pretrain.reuse:
        _check_reuse(pretrain, datasets, controls)

    return Params(
        wikipedia=from_dict(WikipediaSource, _section(data, "wikipedia"), where="wikipedia"),
        tokenizer=tokenizer,
        tokenize=from_dict(TokenizeParams, _section(data, "tokenize"), where="tokenize"),
        pretrain=pretrain,
        finetune=finetune,
        classifier=classifier,
        datasets=datasets,
        evaluate=from_dict(EvaluateParams, _section(data, "evaluate"), where="evaluate"),
        report=from_dict(ReportParams, _section(data, "report"), where="report"),
        mlflow=from_dict(MlflowParams, _section(data, "mlflow"), where="mlflow"),
        controls=controls,
        baseline=from_dict(BaselineParams, _section(data, "baseline"), where="baseline"),
    )


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


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"section '{name}' must be a mapping, got {type(value).__name__}")
    return dict(value)


def _split(data: dict[str, Any], where: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in section '{where}'; valid keys: {sorted(allowed)}"
        )


def _pretrain(data: dict[str, Any], vocab_size: int) -> PretrainParams:
    model = dict(data.get("model") or {})
    if "vocab_size" in model:
        raise ValueError(
            "key 'vocab_size' in section 'pretrain.model': the vocabulary size is "
            "set once, in tokenizer.vocab_size"
        )
    model["vocab_size"] = vocab_size
    reuse = _reuse(data.get("reuse") or {})
    return from_dict(
        PretrainParams,
        {**data, "model": model, "train": data.get("train") or {}, "reuse": reuse},
        where="pretrain",
    )


def _reuse(data: Any) -> dict[str, PretrainedSource]:
    """``pretrain.reuse``: direction -> one source each (exactly one of path, url, model_uri;
    a url needs its sha256)."""
    if not isinstance(data, Mapping):
        raise ValueError("pretrain.reuse must map directions (fwd, bwd) to sources")
    _split(dict(data), "pretrain.reuse", DIRECTIONS)
    out = {}
    for direction, entry in data.items():
        where = f"pretrain.reuse.{direction}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a mapping (path:, url: + sha256:, or model_uri:)")
        source = from_dict(PretrainedSource, dict(entry), where=where)
        given = [k for k in ("path", "url", "model_uri") if getattr(source, k)]
        if len(given) != 1:
            raise ValueError(f"{where} needs exactly one of path, url, model_uri (got {given})")
        if source.url and not source.sha256:
            raise ValueError(f"{where}.url needs its sha256 (sha256sum of the archive)")
        if source.model_uri and not source.model_uri.startswith("models:/"):
            raise ValueError(f"{where}.model_uri must read models:/<name>/<version> or @<alias>")
        if source.tracking_uri and not source.model_uri:
            raise ValueError(f"{where}.tracking_uri goes with model_uri only")
        out[direction] = source
    return out


def _check_reuse(
    pretrain: PretrainParams,
    datasets: Mapping[str, DatasetParams],
    controls: Mapping[str, ControlParams],
) -> None:
    """With reused LMs, every direction a dataset or control trains needs one, and no control
    can ask for a pretraining snapshot (no pretraining runs here)."""
    for name, dataset in datasets.items():
        missing = sorted(set(dataset.directions) - set(pretrain.reuse))
        if missing:
            raise ValueError(
                f"datasets.{name} trains {missing} but pretrain.reuse gives no LM for it: add "
                f"pretrain.reuse.{missing[0]}, or set datasets.{name}.directions: [fwd]"
            )
    for name, control in controls.items():
        if control.direction not in pretrain.reuse:
            raise ValueError(f"controls.{name}: pretrain.reuse gives no {control.direction} LM")
        if control.pretrain_step is not None:
            raise ValueError(
                f"controls.{name}.pretrain_step needs pretraining in this project; "
                "pretrain.reuse is set"
            )


def _finetune(data: dict[str, Any], where: str) -> FinetuneParams:
    params = from_dict(FinetuneParams, {**data, "train": data.get("train") or {}}, where=where)
    bad = sorted(set(params.splits) - set(LM_SPLITS))
    if bad:
        raise ValueError(f"{where}.splits: unknown split(s) {bad}; valid: {list(LM_SPLITS)}")
    if not 0.0 < params.valid_fraction < 1.0:
        raise ValueError(f"{where}.valid_fraction must be between 0 and 1")
    return params


def _classifier(data: dict[str, Any], encoder: AWDLSTMConfig, where: str) -> ClassifierParams:
    model = dict(data.get("model") or {})
    encoder_overrides = dict(model.pop("encoder", None) or {})
    fixed = sorted(set(encoder_overrides) & set(_ENCODER_SIZE_KEYS))
    if fixed:
        raise ValueError(
            f"key(s) {fixed} in section '{where}.model.encoder': the classifier's "
            "encoder sizes come from pretrain.model; only dropouts may be set here"
        )
    for key in ("num_classes",):
        if key in model:
            raise ValueError(f"key '{key}' in section '{where}.model' is set from the dataset")
    model["encoder"] = {**to_dict(encoder), **encoder_overrides}
    return from_dict(
        ClassifierParams, {**data, "model": model, "train": data.get("train") or {}}, where=where
    )


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
    entry: Mapping[str, Any],
    finetune: dict[str, Any],
    classifier: dict[str, Any],
    encoder: AWDLSTMConfig,
) -> DatasetParams:
    where = f"datasets.{name}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"section '{where}' must be a mapping")
    _split(dict(entry), where, ("source", "finetune", "classifier", "directions"))
    source = dict(entry.get("source") or {})
    source.setdefault("name", name)
    directions = tuple(entry.get("directions") or DIRECTIONS)
    if directions not in (("fwd",), ("fwd", "bwd")):
        raise ValueError(f"{where}.directions must be [fwd] or [fwd, bwd]")
    return DatasetParams(
        name=name,
        source=from_dict(DatasetSource, source, where=f"{where}.source"),
        finetune=_finetune(_merge(finetune, entry.get("finetune") or {}), f"{where}.finetune"),
        classifier=_classifier(
            _merge(classifier, entry.get("classifier") or {}), encoder, f"{where}.classifier"
        ),
        directions=directions,
    )


def _control(
    name: str,
    entry: Mapping[str, Any],
    datasets: Mapping[str, DatasetParams],
    data: Mapping[str, Any],
    encoder: AWDLSTMConfig,
) -> ControlParams:
    """A control: its dataset's finetune/classifier sections (global, then the dataset's
    overrides, then the control's own) and its options."""
    where = f"controls.{name}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"section '{where}' must be a mapping")
    keys = (
        "dataset",
        "encoder",
        "labels",
        "labels_seed",
        "pretrain_step",
        "direction",
        "description",
    )
    _split(dict(entry), where, (*keys, "finetune", "classifier"))
    dataset = entry.get("dataset")
    if dataset not in datasets:
        raise ValueError(f"{where}.dataset must be one of the datasets {sorted(datasets)}")
    if entry.get("encoder", "finetuned") not in ENCODERS:
        raise ValueError(f"{where}.encoder must be one of {list(ENCODERS)}")
    if entry.get("direction", "fwd") not in DIRECTIONS:
        raise ValueError(f"{where}.direction must be one of {list(DIRECTIONS)}")
    if entry.get("labels") is not None and int(entry["labels"]) < 2:
        raise ValueError(f"{where}.labels must be at least 2 (or null: the whole train split)")
    step = entry.get("pretrain_step")
    if step is not None:
        snapshots = (_section(data, "pretrain").get("train") or {}).get("snapshot_steps") or ()
        if entry.get("encoder", "finetuned") != "finetuned":
            raise ValueError(f"{where}.pretrain_step needs encoder: finetuned")
        if step not in snapshots:
            raise ValueError(
                f"{where}.pretrain_step {step} is not one of pretrain.train.snapshot_steps "
                f"{list(snapshots)}: add it there so that pretraining saves that snapshot"
            )
    dataset_entry = (data.get("datasets") or {}).get(dataset) or {}
    finetune = _merge(
        _merge(_section(data, "finetune"), dataset_entry.get("finetune") or {}),
        entry.get("finetune") or {},
    )
    classifier = _merge(_section(data, "classifier"), dataset_entry.get("classifier") or {})
    if entry.get("encoder") == "scratch":
        classifier = _merge(classifier, {"train": SCRATCH_TRAINING})
    classifier = _merge(classifier, entry.get("classifier") or {})
    options = {k: entry[k] for k in keys if k in entry}
    return ControlParams(
        name=name,
        classifier=_classifier(classifier, encoder, f"{where}.classifier"),
        finetune=_finetune(finetune, f"{where}.finetune"),
        **options,
    )
