"""Batched prediction with trained classifiers (ULMFiT section 3.3, and the bidirectional
ensemble of section 3.3 "BPT3C" / 4 "Bidirectional language model").

* :func:`predict_proba` never runs one document at a time. Documents are sorted by length
  (longest first, so that an out-of-memory error shows up on the first batch), cut into batches
  of at most ``batch_size`` documents and, optionally, at most ``max_tokens`` padded tokens, and
  right-padded. The softmax probabilities come back **in input order**. Sorting keeps padding
  near zero, so almost every multiply-add is spent on real tokens.
* :func:`ensemble` averages the forward and backward classifiers' probabilities, as the paper
  does for its bidirectional results.
* The eval-only classifier copy and its int8 versions live in :mod:`ulmfit.quantize`;
  :meth:`TextClassifier.quantized` uses them.
* :class:`TextClassifier` bundles a tokenizer, a forward (and optionally a backward) classifier
  and the label names: ``predict(texts) -> (labels, probs)``, ``save(dir)``, ``load(dir)``. It is
  what the pipeline's MLflow model and the ``ulmfit predict`` command wrap.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ulmfit.batches import CLOSING_TOKENS, classifier_input
from ulmfit.checkpoint import load_model, save_model, unwrap_model
from ulmfit.config import to_dict
from ulmfit.errors import InputError
from ulmfit.io import atomic_path, atomic_write, sha256_file
from ulmfit.model import SequenceClassifier
from ulmfit.model import pad_id as classifier_pad_id
from ulmfit.quantize import (
    InferenceClassifier,
    has_lstm_encoder,
    model_device,
    quantize_dynamic_int8,
)
from ulmfit.storage import TokenDocs
from ulmfit.transformer import FrozenFeatureClassifier, TransformerClassifier, backbone_name

CLASSIFIER_FORMAT = "ulmfit-text-classifier"
# 2: every classifier reads its document closed by the boundary token (batches.classifier_input).
# Version 1 was written by the code before it (and, with the token, for a few hours after):
# loading one is refused, since this library would feed most of them other input.
FORMAT_VERSION = 2
MANIFEST_NAME = "classifier.json"
TOKENIZER_NAME = "tokenizer.model"
FORWARD_NAME = "forward.pt"
BACKWARD_NAME = "backward.pt"
# The classifiers a TextClassifier saves and loads: the AWD-LSTM's and the other arms'.
SAVED_TYPES = (SequenceClassifier, TransformerClassifier, FrozenFeatureClassifier)
_log = logging.getLogger("ulmfit.predict")


# --------------------------------------------------------------------------------------------
# Batching


def _as_arrays(docs: TokenDocs | Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Each document as an int64 array (views into the flat buffer for ``TokenDocs``)."""
    if isinstance(docs, TokenDocs):
        offsets = docs.offsets
        return [docs.ids[offsets[i] : offsets[i + 1]] for i in range(len(docs))]
    return [np.asarray(doc, dtype=np.int64).reshape(-1) for doc in docs]


def length_sorted_batches(
    lengths: np.ndarray | Sequence[int], *, batch_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Indices of the documents in each prediction batch, longest documents first.

    A batch holds at most ``batch_size`` documents and, when ``max_tokens`` is given, at most
    ``max_tokens`` padded tokens (``batch rows * longest document``), but always at least one
    document, so that a single very long review still runs (alone).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    # stable, so that equal lengths keep input order and the batching is deterministic
    order = np.argsort(-lengths, kind="stable")
    batches, start, n = [], 0, len(order)
    while start < n:
        rows = batch_size
        if max_tokens is not None:
            # sorted longest first: the first document of the batch sets its padded width
            rows = max(1, min(batch_size, max_tokens // max(int(lengths[order[start]]), 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad_batch(
    arrays: Sequence[np.ndarray], pad_id: int, *, backward: bool = False
) -> tuple[Tensor, Tensor]:
    """Right-padded ``tokens (B, T)`` and ``lengths (B,)`` of :func:`classifier_input` of each
    document (closed by the boundary token; ``backward`` reverses it), as in training."""
    framed = [classifier_input(doc, backward) for doc in arrays]
    lengths = np.fromiter((len(a) for a in framed), dtype=np.int64, count=len(framed))
    tokens = np.full((len(framed), int(lengths.max())), pad_id, dtype=np.int64)  # (B, T)
    for row, doc in enumerate(framed):
        tokens[row, : len(doc)] = doc
    return torch.from_numpy(tokens), torch.from_numpy(lengths)


def predict_proba(
    model: nn.Module,
    docs: TokenDocs | Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    backward: bool = False,
    device: str | torch.device = "cpu",
    max_tokens: int | None = None,
    pad_id: int | None = None,
) -> np.ndarray:
    """Class probabilities ``(N, C)`` float32 of ``docs``, in input order.

    ``model`` is a :class:`~ulmfit.model.SequenceClassifier` (with LSTM layers, run through an
    :class:`InferenceClassifier` copy: same probabilities, no work spent on padding) or any module
    ``model(tokens (B, T), lengths (B,)) -> logits (B, C)``, such as the one returned by
    :func:`quantize_dynamic_int8`. It runs in eval mode under ``torch.inference_mode()`` and is put
    back in the mode it was in. Each document must hold at least one token (a tokenised empty
    text still holds the ``xxbos`` token). ``backward=True`` reverses every document, for a
    classifier fine-tuned from the backward language model. ``max_tokens`` caps the padded
    tokens of a batch, bounding memory on long documents.
    """
    arrays = _as_arrays(docs)
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise ValueError(
            f"document {int(empty[0])} has no tokens; encode texts with the tokenizer, which "
            "starts every document with the xxbos token"
        )
    if pad_id is None:
        pad_id = classifier_pad_id(model)
    device = torch.device(device)
    if model_device(model) != device:
        raise ValueError(
            f"the model is on {model_device(model)} but device={device}; move it with "
            f"model.to({str(device)!r}) first"
        )
    if has_lstm_encoder(model):
        # same probabilities (see InferenceClassifier) without computing the padding
        model = InferenceClassifier(model)
    was_training = model.training
    model.eval()
    probs: np.ndarray | None = None
    try:
        with torch.inference_mode():
            for index in length_sorted_batches(
                lengths + CLOSING_TOKENS,  # the rows pad_batch makes
                batch_size=batch_size,
                max_tokens=max_tokens,
            ):
                tokens, batch_lengths = pad_batch(
                    [arrays[i] for i in index], pad_id, backward=backward
                )
                logits = model(tokens.to(device), batch_lengths.to(device))  # (B, C)
                batch_probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
                if probs is None:
                    probs = np.empty((len(arrays), batch_probs.shape[1]), dtype=np.float32)
                probs[index] = batch_probs  # back to input order
    finally:
        model.train(was_training)
    if probs is None:  # no documents at all
        probs = np.empty((0, _num_classes(model)), dtype=np.float32)
    return probs


def ensemble(prob_forward: np.ndarray, prob_backward: np.ndarray) -> np.ndarray:
    """Mean of the forward and backward classifiers' probabilities (bidirectional ULMFiT)."""
    prob_forward, prob_backward = np.asarray(prob_forward), np.asarray(prob_backward)
    if prob_forward.shape != prob_backward.shape:
        raise ValueError(
            f"forward probabilities {prob_forward.shape} and backward probabilities "
            f"{prob_backward.shape} differ in shape"
        )
    return (prob_forward + prob_backward) / 2


def _classifier_config(model: nn.Module):
    cfg = getattr(unwrap_model(model), "cfg", None)
    if cfg is None:
        raise TypeError(f"expected a SequenceClassifier, got {type(model).__name__}")
    return cfg


def _num_classes(model: nn.Module) -> int:
    return int(_classifier_config(model).num_classes)


# --------------------------------------------------------------------------------------------
# Text in, labels out


class TextClassifier:
    """Tokenizer + forward classifier (+ optional backward classifier) + label names.

    ``predict(texts)`` tokenises the raw texts, runs :func:`predict_proba` for each direction
    and averages them (:func:`ensemble`) when there is a backward model.
    """

    def __init__(
        self,
        tokenizer: Any,
        forward_model: nn.Module,
        backward_model: nn.Module | None = None,
        *,
        label_names: Sequence[str],
        device: str | torch.device = "cpu",
    ) -> None:
        self.tokenizer = tokenizer
        self.forward_model = forward_model
        self.backward_model = backward_model
        self.label_names = [str(name) for name in label_names]
        self.device = torch.device(device)
        # built once: the eval-only copies predict_proba would otherwise rebuild at every call
        self._runners = [
            InferenceClassifier(model) if has_lstm_encoder(model) else model
            for model in (forward_model, backward_model)
        ]
        for model in (forward_model, backward_model):
            if model is not None and _num_classes(model) != len(self.label_names):
                raise ValueError(
                    f"the model predicts {_num_classes(model)} classes but "
                    f"{len(self.label_names)} label names were given"
                )

    def predict_proba(
        self, texts: Sequence[str], *, batch_size: int = 64, max_tokens: int | None = None
    ) -> np.ndarray:
        """Probabilities ``(N, C)`` of the raw ``texts``, in input order."""
        if isinstance(texts, str):
            raise TypeError("predict takes a sequence of texts, not a single string")
        docs = self.tokenizer.encode(list(texts))
        options = dict(batch_size=batch_size, device=self.device, max_tokens=max_tokens)
        forward, backward = self._runners
        probs = predict_proba(forward, docs, **options)
        if backward is not None:
            probs = ensemble(probs, predict_proba(backward, docs, backward=True, **options))
        return probs

    def predict(
        self, texts: Sequence[str], *, batch_size: int = 64, max_tokens: int | None = None
    ) -> tuple[list[str], np.ndarray]:
        """``(labels, probs)``: the most probable label name per text and probabilities (N, C)."""
        probs = self.predict_proba(texts, batch_size=batch_size, max_tokens=max_tokens)
        labels = [self.label_names[i] for i in probs.argmax(axis=1)] if len(probs) else []
        return labels, probs

    @property
    def backbone(self) -> str:
        """The backbone of the forward model (:func:`backbone_name`)."""
        return backbone_name(getattr(unwrap_model(self.forward_model), "cfg", None))

    def quantized(self) -> TextClassifier:
        """The same classifier with int8 dynamically quantised models (CPU only). Only the
        AWD-LSTM has an int8 version (:mod:`ulmfit.quantize`); the other backbones stay fp32,
        with a log line saying so."""

        def int8(model: nn.Module) -> nn.Module:
            if has_lstm_encoder(model):
                return quantize_dynamic_int8(model)
            _log.warning(
                "int8 quantisation skipped: it exists for the AWD-LSTM only, and this model's "
                "backbone is %s; predicting in fp32",
                backbone_name(getattr(unwrap_model(model), "cfg", None)),
            )
            return model.cpu()

        backward = self.backward_model
        return TextClassifier(
            self.tokenizer,
            int8(self.forward_model),
            None if backward is None else int8(backward),
            label_names=self.label_names,
            device="cpu",
        )

    # ---------------------------------------------------------------------------- files

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.model``, ``forward.pt`` (+ ``backward.pt``) and ``classifier.json``.

        Each file is written atomically; the manifest goes last, so a directory with a manifest
        is complete. Quantised models are not saved: save the fp32 classifier and pass
        ``quantize=True`` to :meth:`load`.
        """
        directory = Path(directory)
        identity = self.tokenizer.identity
        models = {FORWARD_NAME: self.forward_model, BACKWARD_NAME: self.backward_model}
        for model in models.values():
            if model is not None and not isinstance(unwrap_model(model), SAVED_TYPES):
                raise TypeError(
                    "only SequenceClassifier, TransformerClassifier or FrozenFeatureClassifier "
                    "models can be saved (quantised or inference copies are rebuilt at load time)"
                )
        with atomic_path(directory / TOKENIZER_NAME) as tmp:
            shutil.copyfile(self.tokenizer.path, tmp)
        for name, model in models.items():
            if model is None:
                (directory / name).unlink(missing_ok=True)
                continue
            save_model(
                directory / name,
                model,
                kind="classifier",
                config=to_dict(_classifier_config(model)),
                tokenizer_identity=identity,
            )
        manifest = {
            "format": CLASSIFIER_FORMAT,
            "version": FORMAT_VERSION,
            "label_names": self.label_names,
            "tokenizer_identity": identity,
            "tokenizer": TOKENIZER_NAME,
            "forward": FORWARD_NAME,
            "backward": BACKWARD_NAME if self.backward_model is not None else None,
        }
        with atomic_write(directory / MANIFEST_NAME, "w") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
        return directory

    @classmethod
    def load(
        cls, directory: str | Path, *, device: str | torch.device = "cpu", quantize: bool = False
    ) -> TextClassifier:
        """Read a directory written by :meth:`save`, checking that every file belongs together.

        ``quantize=True`` returns int8 models for CPU prediction. A missing or foreign file, or a
        tokenizer or model made with another tokenizer, raises :class:`InputError`.
        """
        from ulmfit.tokenizer import Tokenizer  # sentencepiece loads only when a model does

        directory = Path(directory)
        manifest_path = directory / MANIFEST_NAME
        fix = "point to a directory written by TextClassifier.save (re-run the stage that makes it)"
        if not manifest_path.is_file():
            raise InputError(manifest_path, "classifier manifest not found", fix=fix)
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(manifest_path, f"unreadable manifest ({error})", fix=fix) from error
        if not isinstance(manifest, dict) or manifest.get("format") != CLASSIFIER_FORMAT:
            raise InputError(manifest_path, f"not a {CLASSIFIER_FORMAT} manifest", fix=fix)
        if manifest.get("version") == 1:
            raise InputError(
                manifest_path,
                "format version 1: saved by an earlier ulmfit, whose classifiers mostly read "
                "documents without the closing boundary token that this version adds, so it "
                "would be fed input it was not trained on",
                fix="retrain it with this version of ulmfit (`ulmfit repro evaluate@<dataset>` "
                "saves and registers a new one); until then `mlflow models serve` its registered "
                "version, which runs the ulmfit code saved with it (docs/predict.md: keeping one "
                "that already reads the token)",
            )
        if manifest.get("version") != FORMAT_VERSION:
            raise InputError(
                manifest_path,
                f"format version {manifest.get('version')}, this library reads {FORMAT_VERSION}",
                fix="re-create it with this version of ulmfit",
            )
        identity = manifest["tokenizer_identity"]
        tokenizer_path = directory / manifest["tokenizer"]
        if not tokenizer_path.is_file():
            raise InputError(tokenizer_path, "tokenizer model not found", fix=fix)
        if sha256_file(tokenizer_path) != identity:
            raise InputError(
                tokenizer_path,
                "this tokenizer is not the one the classifier was trained with (sha256 differs "
                "from the manifest's tokenizer_identity)",
                fix="restore the tokenizer.model saved with the classifier, or save it again",
            )
        tokenizer = Tokenizer.load(tokenizer_path)
        models = []
        for key in ("forward", "backward"):
            name = manifest.get(key)
            if name is None:
                models.append(None)
                continue
            model, meta = load_model(directory / name, device=device)
            if meta["tokenizer_identity"] != identity:
                raise InputError(
                    directory / name,
                    f"the {key} model was trained with another tokenizer "
                    f"({meta['tokenizer_identity']}, expected {identity})",
                    fix="save the classifier again from models trained with one tokenizer",
                )
            if meta["kind"] != "classifier":
                raise InputError(
                    directory / name,
                    f"expected a classifier model, found {meta['kind']!r}",
                    fix=fix,
                )
            models.append(model)
        classifier = cls(
            tokenizer, models[0], models[1], label_names=manifest["label_names"], device=device
        )
        return classifier.quantized() if quantize else classifier
