"""The GPT-, BERT- and ELMo-style arms in ``params.yaml`` (issue 13): ``pretrain.model.backbone``
parses into the right model config for every stage, AWD-LSTM stays the default, and a value that
does not fit the backbone is refused with its key path."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.params import MASK_ID, TransformerClassifierModelParams, load_params
from ulmfit.errors import InputError
from ulmfit.model import AWDLSTMConfig, ClassifierConfig, LanguageModel, SequenceClassifier
from ulmfit.predict import TextClassifier
from ulmfit.tokenizer import UNK_ID
from ulmfit.transformer import (
    FrozenFeatureClassifier,
    TransformerClassifier,
    TransformerClassifierConfig,
    TransformerConfig,
    TransformerLM,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dim": 16, "num_layers": 2, "heads": 2, "ff_mult": 2, "max_len": 96, "dropout": 0.1}


def transformer_profile(backbone: str) -> dict:
    """The default profile with a tiny transformer and a classifier section of its own."""
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["pretrain"]["model"] = {"backbone": backbone, **TINY}
    data["classifier"]["model"] = {"head_hidden": 8, "encoder": {"dropout": 0.2}}
    return data


def _load(tmp_path: Path, data: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_params(path, check_paths=False)


def _refusal(tmp_path: Path, data: dict) -> str:
    with pytest.raises(InputError) as info:
        _load(tmp_path, data)
    return "\n".join(info.value.details)


def test_awd_lstm_is_the_default_and_builds_the_same_configs():
    params = load_params(ROOT / "profiles" / "default.yaml", check_paths=False)
    assert params.pretrain.backbone == "awd_lstm"
    assert isinstance(params.pretrain.model, AWDLSTMConfig)
    assert type(params.classifier.build(600, 5, 0.5)) is ClassifierConfig


@pytest.mark.parametrize(
    ("backbone", "objective", "pooling"),
    [("transformer_causal", "causal", "last"), ("transformer_mlm", "mlm", "mean")],
)
def test_a_transformer_backbone_reaches_every_stage(tmp_path, backbone, objective, pooling):
    params = _load(tmp_path, transformer_profile(backbone))
    model = params.pretrain.model
    assert isinstance(model, TransformerConfig)
    assert (params.pretrain.backbone, model.objective, model.dim) == (backbone, objective, 16)
    assert model.mask_id == (MASK_ID if objective == "mlm" else None)
    assert model.vocab_size == params.tokenizer.vocab_size
    classifier = params.dataset("bbc_news").classifier
    assert isinstance(classifier.model, TransformerClassifierModelParams)
    built = classifier.build(600, 5, 0.5)
    assert isinstance(built, TransformerClassifierConfig)
    assert (built.pooling, built.encoder.dropout, built.encoder.dim) == (pooling, 0.1, 16)
    assert built.encoder.vocab_size == 600
    assert model.scaled(0.5).dropout == 0.05


def test_the_mask_token_is_unk_which_byte_fallback_never_emits():
    assert MASK_ID == UNK_ID == 0


def test_first_token_pooling_for_mlm_only(tmp_path):
    data = transformer_profile("transformer_mlm")
    data["classifier"]["model"]["pooling"] = "first"
    assert _load(tmp_path, data).classifier.model.pooling == "first"
    data = transformer_profile("transformer_causal")
    data["classifier"]["model"]["pooling"] = "first"
    assert "classifier.model.pooling: got 'first' with a causal encoder" in _refusal(tmp_path, data)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["pretrain"]["model"].update(backbone="lstm"), "pretrain.model.backbone"),
        (lambda d: d["pretrain"]["model"].update(hidden_size=32), "pretrain.model.hidden_size"),
        (lambda d: d["pretrain"]["model"].update(heads=3), "pretrain.model"),
        (lambda d: d["classifier"]["model"].update(bptt=70), "classifier.model.bptt"),
        (
            lambda d: d["classifier"]["model"]["encoder"].update(input_dropout=0.4),
            "classifier.model.encoder.input_dropout",
        ),
        (lambda d: d["pretrain"]["train"].update(bptt=90), "pretrain.train.bptt"),
        (
            lambda d: d["pretrain"]["train"]["optim"].update(name="ntasgd"),
            "pretrain.train.optim.name",
        ),
    ],
)
def test_values_that_do_not_fit_a_transformer_name_their_key(tmp_path, change, key):
    data = transformer_profile("transformer_mlm")
    change(data)
    assert f"{key}: " in _refusal(tmp_path, data)


def test_pooling_is_refused_for_the_awd_lstm(tmp_path):
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["classifier"]["model"]["pooling"] = "mean"
    assert "classifier.model.pooling: is for the transformer backbones" in _refusal(tmp_path, data)


def test_frozen_features_control_needs_the_awd_lstm_lms_of_both_directions(tmp_path):
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["controls"] = {"elmo": {"dataset": "bbc_news", "encoder": "frozen_features"}}
    control = _load(tmp_path, data).control("elmo")
    assert control.encoder == "frozen_features"
    assert not control.classifier.train.gradual_unfreezing
    data["datasets"]["bbc_news"]["directions"] = ["fwd"]
    assert "controls.elmo.encoder: frozen_features needs the dataset's fwd and bwd" in (
        _refusal(tmp_path, data)
    )
    data = transformer_profile("transformer_causal")
    data["controls"] = {"elmo": {"dataset": "bbc_news", "encoder": "frozen_features"}}
    assert "controls.elmo.encoder: frozen_features reads the dataset's AWD-LSTM LMs" in (
        _refusal(tmp_path, data)
    )


# ------------------------------------------------------------------------ models of each backbone


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ulmfit.tokenizer import TokenizerConfig, train_tokenizer

    rng = np.random.default_rng(0)
    words = ["good", "bad", "movie", "Film", "great", "awful", "plot", "acting", "the", "was"]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) + "!" for _ in range(300)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "spm.model", TokenizerConfig())


@contextlib.contextmanager
def _captured(caplog, name: str):
    """caplog for logger ``name``, also when Prefect's logging set-up keeps ``ulmfit`` from
    propagating to the root logger."""
    logger = logging.getLogger(name)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=name):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def _classifiers(vocab_size: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    encoder = TransformerConfig(vocab_size, **TINY, objective="mlm", mask_id=MASK_ID)
    lm = AWDLSTMConfig(vocab_size, embed_size=8, hidden_size=12, num_layers=2)
    return {
        "awd_qrnn": SequenceClassifier(
            ClassifierConfig(dataclasses.replace(lm, qrnn=True), 2, head_hidden=4)
        ),
        "transformer_mlm": TransformerClassifier(
            TransformerClassifierConfig(encoder, 2, pooling="first", head_hidden=4)
        ),
        "frozen_features": FrozenFeatureClassifier.from_language_models(
            LanguageModel(lm), LanguageModel(lm), 2, head_hidden=4
        ),
    }


TEXTS = ["A great film, good acting.", "", "Bad plot. AWFUL movie!!!", "the film was good"]


@pytest.mark.parametrize("backbone", ["awd_qrnn", "transformer_mlm", "frozen_features"])
def test_text_classifier_saves_loads_and_names_each_backbone(tokenizer, tmp_path, caplog, backbone):
    model = _classifiers(tokenizer.vocab_size)[backbone]
    classifier = TextClassifier(tokenizer, model, label_names=["neg", "pos"])
    assert classifier.backbone == backbone
    probs = classifier.predict_proba(TEXTS)
    loaded = TextClassifier.load(classifier.save(tmp_path / "clf"))
    assert loaded.backbone == backbone
    np.testing.assert_allclose(loaded.predict_proba(TEXTS), probs, rtol=1e-5, atol=1e-6)
    with _captured(caplog, "ulmfit.predict"):
        quantized = TextClassifier.load(tmp_path / "clf", quantize=True)
    assert (
        f"int8 quantisation skipped: it exists for the AWD-LSTM only, and this model's "
        f"backbone is {backbone}" in caplog.text
    )
    np.testing.assert_allclose(quantized.predict_proba(TEXTS), probs, rtol=1e-5, atol=1e-6)


def test_masked_lm_evaluation_scores_the_same_masks_every_time():
    from ulmfit.evaluate import evaluate_mlm
    from ulmfit.storage import TokenDocs

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(50, **TINY, objective="mlm", mask_id=MASK_ID))
    ids = np.random.default_rng(0).integers(2, 50, size=400).astype(np.int32)
    docs = TokenDocs(ids=ids, offsets=np.array([0, 150, 400]), labels=None)
    first = evaluate_mlm(model, docs, batch_size=2, bptt=20, seed=3)
    assert first == evaluate_mlm(model, docs, batch_size=2, bptt=20, seed=3)
    assert 0 < first["masked_tokens"] < 0.3 * 400  # about 15 % of the tokens
    assert first["masked_loss"] == pytest.approx(math.log(50), rel=0.2)  # an untrained model
    assert set(first) == {"masked_loss", "masked_perplexity", "masked_accuracy", "masked_tokens"}


# ------------------------------------------------------------------ the training tasks, MLM arm


class _Logger:
    """What a training task needs of ``TrainLogger``, without an MLflow run."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.evals: list[dict] = []

    def __call__(self, event) -> None:
        pass

    def close(self) -> None:
        pass


def _token_file(path: Path, tokenizer, texts: list[str], labels: list[int]) -> Path:
    from ulmfit.storage import TokenDocs, write_tokens

    encoded = tokenizer.encode(texts)
    offsets = np.cumsum([0, *map(len, encoded)])
    ids = np.concatenate(encoded).astype(np.int32)
    docs = TokenDocs(ids=ids, offsets=offsets, labels=np.asarray(labels, dtype=np.int64))
    write_tokens(path, docs, tokenizer.identity, tokenizer.vocab_size)
    return path


def _sentiment(repeat: int) -> tuple[list[str], list[int]]:
    """Short review-like texts and alternating labels: labelled documents for the stages to
    read, not a task to learn."""
    texts = [f"{w} film was {v} and the plot {w}" for w in ("good", "bad") for v in TEXTS]
    return texts * repeat, [0, 1] * (len(texts) * repeat // 2)


def test_mlm_stages_validate_masked_tokens_and_the_classifier_starts_from_the_lm(
    tokenizer, tmp_path, monkeypatch, caplog
):
    from tasks.training import TrainingRun, train_classifier_task, train_lm_task
    from ulmfit.checkpoint import load_model
    from ulmfit.train import LMTrainConfig

    monkeypatch.setattr(TrainingRun, "logger", lambda self, total_steps, name="": _Logger())
    texts, labels = _sentiment(repeat=4)
    train = _token_file(tmp_path / "train.parquet", tokenizer, texts, labels)
    valid = _token_file(tmp_path / "valid.parquet", tokenizer, texts[:6], labels[:6])

    def run(name: str) -> TrainingRun:
        return TrainingRun(
            tmp_path,
            "run",
            tokenizer.path,
            tmp_path / name,
            tmp_path / f"{name}-ckpt",
            "cpu",
            1,
            name,
        )

    params = _load(tmp_path, transformer_profile("transformer_mlm"))
    lm_cfg = LMTrainConfig(batch_size=4, bptt=16, max_steps=3, ar_alpha=2.0, tar_beta=1.0)
    with _captured(caplog, "ulmfit"):
        lm = train_lm_task.fn(
            run("lm"), params.pretrain.model, lm_cfg, token_files=[train], holdout=(0.25, 0, None)
        )
    assert "ar_alpha 2 and tar_beta 1 set to 0" in caplog.text
    assert "valid_perplexity" not in lm["metrics"]
    assert lm["metrics"]["valid_masked_tokens"] > 0
    assert 0 <= lm["metrics"]["valid_masked_accuracy"] <= 1
    lm_model, _ = load_model(lm["model"])
    assert isinstance(lm_model, TransformerLM) and lm_model.cfg.objective == "mlm"

    classifier = params.classifier
    one_step = dataclasses.replace(
        classifier.train, max_steps=1, batch_size=4, gradual_unfreezing=True
    )
    classifier = dataclasses.replace(classifier, train=one_step, lrs=())
    result = train_classifier_task.fn(
        run("clf"),
        classifier,
        backward=False,
        train_file=train,
        valid_file=valid,
        label_names=["neg", "pos"],
        lm_file=Path(lm["model"]),
    )
    model, _ = load_model(result["model"])
    assert isinstance(model, TransformerClassifier) and model.cfg.pooling == "mean"
    # Gradual unfreezing: the first step trains the top group alone, the rest is the LM's.
    for key, value in lm_model.encoder.blocks.state_dict().items():
        assert torch.equal(model.encoder.blocks.state_dict()[key], value), key


def test_frozen_features_control_reads_in_the_classifiers_bptt_and_logs_its_test_progress(
    tokenizer, tmp_path, monkeypatch, caplog
):
    import functools

    from tasks import controls
    from tasks.progress import Progress
    from tasks.training import TrainingRun, train_classifier_task
    from ulmfit.checkpoint import load_model, save_model
    from ulmfit.config import to_dict

    monkeypatch.setattr(TrainingRun, "logger", lambda self, total_steps, name="": _Logger())
    docs = _token_file(tmp_path / "docs.parquet", tokenizer, *_sentiment(repeat=2))
    lm = AWDLSTMConfig(tokenizer.vocab_size, embed_size=8, hidden_size=12, num_layers=2)
    lms = tuple(
        save_model(
            tmp_path / f"{name}.pt",
            LanguageModel(lm),
            kind="lm",
            config=to_dict(lm),
            tokenizer_identity=tokenizer.identity,
        )
        for name in ("fwd", "bwd")
    )
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["controls"] = {"elmo": {"dataset": "bbc_news", "encoder": "frozen_features"}}
    data["classifier"]["model"]["bptt"] = 5
    classifier = _load(tmp_path, data).control("elmo").classifier
    one_step = dataclasses.replace(classifier.train, max_steps=1, batch_size=4)
    run = TrainingRun(
        tmp_path, "run", tokenizer.path, tmp_path / "clf", tmp_path / "ckpt", "cpu", 1, "clf"
    )
    result = train_classifier_task.fn(
        run,
        dataclasses.replace(classifier, train=one_step, lrs=()),
        backward=False,
        train_file=docs,
        valid_file=docs,
        label_names=["neg", "pos"],
        lm_file=None,
        frozen_lms=lms,
    )
    model, _ = load_model(result["model"])
    assert isinstance(model, FrozenFeatureClassifier) and model.cfg.bptt == 5

    # A progress line after every batch (interval 0), then the closing one.
    monkeypatch.setattr(controls, "Progress", functools.partial(Progress, interval=0))
    with _captured(caplog, "ulmfit"):
        test = controls.test_classifier_task.fn(
            Path(result["model"]),
            docs,
            tokenizer.path,
            batch_size=4,
            direction="fwd",
            device="cpu",
            description="control elmo test",
        )
    assert test["test_documents"] == 16
    records = dict.fromkeys(caplog.records)  # once each, also where it propagates to root
    lines = [r.getMessage() for r in records if r.getMessage().startswith("control elmo")]
    assert [line.split(" in ")[0] for line in lines] == [
        f"control elmo test: {n}/16 doc ({100 * n // 16}%)" for n in (4, 8, 12, 16, 16)
    ]
    assert "doc/s" in lines[0] and lines[-1].endswith("(done)")
