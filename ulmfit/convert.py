"""Migration: load a fastai AWD-LSTM ``state_dict`` into this library's modules.

Covers the models of ULMFiT section 3 as fastai saves them: the language model
``SequentialRNN(AWD_LSTM, LinearDecoder)`` and the classifier
``SequentialRNN(SentenceEncoder(AWD_LSTM), PoolingLinearClassifier)``, in the key layouts of
fastai 2.x and 1.x (``0.rnns.0.weight_hh_l0_raw``; 1.x's head is one flat ``Sequential``), and
0.7's encoder keys (``0.rnns.0.module.weight_hh_l0_raw``, ``0.encoder_with_dropout``).
The sizes are read from the tensors, so fastai's hidden size 1152 converts as is; dropouts are
not stored by fastai and come from ``overrides`` (or our defaults).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ulmfit.errors import InputError
from ulmfit.model import AWDLSTMConfig, ClassifierConfig, LanguageModel, SequenceClassifier

_FIX = "pass the state_dict of a fastai AWD-LSTM language model (kind='lm') or text classifier (kind='classifier')"

# Encoder keys relative to the encoder prefix -> our key (None: a derived copy, skipped).
_ENCODER_RULES: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(r"encoder\.weight"), "embedding.weight"),
    (re.compile(r"(encoder_dp\.emb|encoder_with_dropout\.embed)\.weight"), None),  # same tensor
    (re.compile(r"rnns\.(\d+)\.(?:module\.)?weight_hh_l0_raw"), r"layers.\1.weight_hh"),
    (re.compile(r"rnns\.(\d+)\.module\.weight_hh_l0"), None),  # the last dropped copy
    (re.compile(r"rnns\.(\d+)\.module\.(weight_ih|bias_ih|bias_hh)_l0"), r"layers.\1.\2"),
]
# fastai 2.x head: layers.<block>.<BN 0 | Dropout 1 | Linear 2>; fastai 1.x: one flat Sequential.
_HEAD_NESTED = re.compile(r"layers\.(\d+)\.(\d+)\.(.+)")
_HEAD_FLAT = re.compile(r"layers\.(\d+)\.(.+)")


def _map_encoder(key: str, source: str) -> str | None:
    for pattern, target in _ENCODER_RULES:
        if pattern.fullmatch(key):
            return None if target is None else "encoder." + pattern.sub(target, key)
    raise InputError(source, f"unknown fastai encoder key {key!r}", fix=_FIX)


def _map_head(key: str, source: str) -> str:
    if match := _HEAD_NESTED.fullmatch(key):
        block, index, name = int(match[1]), int(match[2]), match[3]
        return f"head.layers.{4 * block + index}.{name}"  # 4 modules per block in ours
    if match := _HEAD_FLAT.fullmatch(key):
        return f"head.layers.{match[1]}.{match[2]}"
    raise InputError(source, f"unknown fastai classifier head key {key!r}", fix=_FIX)


def _encoder_prefix(state_dict: dict[str, Tensor], kind: str) -> str:
    if kind == "classifier" and any(k.startswith("0.module.") for k in state_dict):
        return "0.module."  # SentenceEncoder / MultiBatchEncoder wraps AWD_LSTM
    return "0."


def _encoder_config(
    ours: dict[str, Tensor], source: str, overrides: dict[str, Any]
) -> AWDLSTMConfig:
    if "encoder.embedding.weight" not in ours:
        raise InputError(source, "missing key for the embedding (encoder.weight)", fix=_FIX)
    vocab_size, embed_size = ours["encoder.embedding.weight"].shape
    num_layers = 0
    while f"encoder.layers.{num_layers}.weight_ih" in ours:
        num_layers += 1
    for i in range(num_layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            if f"encoder.layers.{i}.{name}" not in ours:
                raise InputError(source, f"missing {name} of LSTM layer {i}", fix=_FIX)
    if num_layers < 2:
        raise InputError(source, f"found {num_layers} LSTM layer(s), need at least 2", fix=_FIX)
    hidden_size = ours["encoder.layers.0.weight_hh"].shape[1]
    cfg = AWDLSTMConfig(
        vocab_size=vocab_size, embed_size=embed_size, hidden_size=hidden_size, num_layers=num_layers
    )
    return dataclasses.replace(cfg, **overrides)


def _check_shapes(model: nn.Module, ours: dict[str, Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise InputError(source, f"missing weights for {missing}", fix=_FIX)
    for key, tensor in ours.items():
        if key not in expected:
            raise InputError(source, f"weight {key!r} has no place in the model", fix=_FIX)
        if tensor.shape != expected[key].shape:
            raise InputError(
                source,
                f"{key} has shape {tuple(tensor.shape)}, the inferred config needs "
                f"{tuple(expected[key].shape)}",
                fix=_FIX,
            )


def load_fastai_state_dict(
    state_dict: dict[str, Tensor],
    kind: str = "lm",
    *,
    source: str = "<fastai state_dict>",
    **overrides: Any,
) -> tuple[dict[str, Tensor], AWDLSTMConfig | ClassifierConfig]:
    """Convert a fastai AWD-LSTM ``state_dict``; returns (our state dict, inferred config).

    ``overrides`` set config fields that fastai does not store: dropouts and ``pad_id`` of the
    encoder, and for classifiers ``bptt``, ``max_len``, ``head_dropouts``. Raises `InputError`
    (naming ``source``) on unknown or missing keys and on inconsistent shapes.
    """
    if kind not in ("lm", "classifier"):
        raise ValueError(f"kind must be 'lm' or 'classifier', got {kind!r}")
    classifier_fields = {"bptt", "max_len", "head_dropouts"}
    encoder_overrides = {k: v for k, v in overrides.items() if k not in classifier_fields}
    head_overrides = {k: v for k, v in overrides.items() if k in classifier_fields}
    prefix = _encoder_prefix(state_dict, kind)
    ours: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(prefix):
            target = _map_encoder(key[len(prefix) :], source)
        elif kind == "lm" and key in ("1.decoder.weight", "1.decoder.bias"):
            target = key[2:]
        elif kind == "classifier" and key.startswith("1."):
            target = _map_head(key[2:], source)
        else:
            raise InputError(source, f"unknown key {key!r} for a fastai {kind} model", fix=_FIX)
        if target is not None:
            ours[target] = tensor.detach().clone()
    encoder_cfg = _encoder_config(ours, source, encoder_overrides)

    if kind == "lm":
        decoder = ours.get("decoder.weight")
        tied = decoder is None or torch.equal(decoder, ours["encoder.embedding.weight"])
        cfg: AWDLSTMConfig | ClassifierConfig = dataclasses.replace(
            encoder_cfg, tie_weights=tied, out_bias="decoder.bias" in ours
        )
        if decoder is None:  # a tied decoder needs no copy of its own
            ours["decoder.weight"] = ours["encoder.embedding.weight"]
        model: nn.Module = LanguageModel(cfg)
    else:
        linears = sorted(
            k
            for k, v in ours.items()
            if k.startswith("head.") and k.endswith(".weight") and v.dim() == 2
        )
        if len(linears) != 2:
            raise InputError(
                source, f"expected 2 linear layers in the head, found {len(linears)}", fix=_FIX
            )
        hidden, num_classes = ours[linears[0]].shape[0], ours[linears[1]].shape[0]
        for weight_key in linears:  # fastai 2.x's linears after a batch norm have no bias
            bias_key = weight_key[: -len("weight")] + "bias"
            ours.setdefault(bias_key, ours[weight_key].new_zeros(ours[weight_key].shape[0]))
        cfg = ClassifierConfig(encoder_cfg, num_classes, head_hidden=hidden, **head_overrides)
        model = SequenceClassifier(cfg)
    _check_shapes(model, ours, source)
    return ours, cfg


def load_fastai_checkpoint(
    path: str | Path, kind: str = "lm", **overrides: Any
) -> tuple[nn.Module, AWDLSTMConfig | ClassifierConfig]:
    """Read a fastai ``learn.save``/``torch.save`` file and return our model with its weights."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise InputError(path, f"cannot read a PyTorch file ({err})", fix=_FIX) from err
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # learn.save(with_opt=True) writes {"model": ..., "opt": ...}
    if not isinstance(data, dict):
        raise InputError(path, "the file holds no state_dict", fix=_FIX)
    state_dict, cfg = load_fastai_state_dict(data, kind, source=str(path), **overrides)
    model = LanguageModel(cfg) if kind == "lm" else SequenceClassifier(cfg)
    model.load_state_dict(state_dict)
    return model, cfg
