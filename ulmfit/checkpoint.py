"""Checkpoints and model files: plain data, written atomically, loaded with ``weights_only=True``.

Two kinds of file:

* A *training checkpoint* (``save_checkpoint``/``load_checkpoint``) holds everything a killed
  run needs to continue to the same result as an uninterrupted one: model and optimiser state
  dicts, configs as plain dicts, tokenizer identity, step/epoch, schedule position, data
  position (``LMStream``/``ClassifierBatches.state_dict()``) and the RNG states of Python,
  NumPy, torch CPU and CUDA.
* A *model file* (``save_model``/``load_model``) holds a model's ``state_dict``, its kind
  (``"lm"`` or ``"classifier"``), its config as a dict and the tokenizer identity, so it can
  be rebuilt on its own with ``ulmfit.model.build_model``.

Nothing is pickled as an object: NumPy arrays and RNG states are turned into tensors and
plain Python values, so ``torch.load(weights_only=True)`` can read every file (no code runs
on load). Files are written through :func:`ulmfit.io.atomic_path` (temp file, fsync,
``os.replace``): a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ulmfit.errors import InputError
from ulmfit.io import atomic_path
from ulmfit.model import build_model, unwrap_model

CHECKPOINT_FORMAT = "ulmfit-checkpoint"
MODEL_FORMAT = "ulmfit-model"
FORMAT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")


# --------------------------------------------------------------------------------------------
# Plain-data encoding (so that weights_only=True can load everything)


def to_plain(value: Any) -> Any:
    """Recursively turn NumPy arrays/scalars into tensors/Python values ``weights_only`` accepts.

    Arrays are tagged so that :func:`from_plain` gives back NumPy arrays of the same dtype.
    """
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype in (np.uint16, np.uint32, np.uint64):
            # torch has no full support for these; int64 round-trips them bit for bit
            array = array.astype(np.int64)
        return {"__numpy__": torch.from_numpy(array.copy()), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(to_plain(item) for item in value)
    return value


def from_plain(value: Any) -> Any:
    """The inverse of :func:`to_plain`."""
    if isinstance(value, dict):
        if set(value) == {"__numpy__", "dtype"}:
            return value["__numpy__"].numpy().astype(np.dtype(value["dtype"]))
        return {key: from_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(from_plain(item) for item in value)
    return value


# --------------------------------------------------------------------------------------------
# RNG states


def get_rng_states() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch CPU and (when present) every CUDA device."""
    python_state = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        # (version, tuple of 625 ints, gauss_next): tuples of ints load with weights_only.
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": to_plain(numpy_state),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the states saved by :func:`get_rng_states`."""
    version, internal, gauss_next = states["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    np.random.set_state(from_plain(states["numpy"]))
    torch.set_rng_state(states["torch"].cpu())
    cuda_states = states.get("cuda")
    if cuda_states and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the devices it has.
        count = min(len(cuda_states), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(cuda_states[device].cpu(), device)


# --------------------------------------------------------------------------------------------
# Training checkpoints


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``<directory>/step-000000123.pt``."""
    return Path(directory) / f"step-{step:09d}.pt"


def _save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` into memory, then one Python write and an fsync of ``path``.

    torch's zip writer reports a failed write (a full disk) as a bare ``RuntimeError``
    ("unexpected pos ..."), losing the errno; Python's write raises the ``OSError(ENOSPC)``
    it is, so the stage's error says what happened. The fsync flushes the bytes before
    ``atomic_path`` renames the file: a crash after the rename cannot leave a truncated file
    under the final name. (In memory, the zip archive's root folder is always ``archive``.)"""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        with open(path, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error  # name the file


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (temp file, fsync, ``os.replace``).

    ``state`` is a dict of plain data and tensors (model/optimiser state dicts, configs as
    dicts, step, epoch, data position, RNG states...). NumPy values inside are converted.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **to_plain(state)}
    with atomic_path(path) as tmp:
        _save(payload, tmp)
    return path


def _load(path: Path, expected_format: str, what: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(path, f"{what} not found", fix=fix)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated/corrupt zip files
        raise InputError(
            path, f"{what} is unreadable or corrupt ({type(error).__name__}: {error})", fix=fix
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InputError(
            path, f"not a {what} (format {found!r}, expected {expected_format!r})", fix=fix
        )
    if payload.get("version") != FORMAT_VERSION:
        raise InputError(
            path,
            f"{what} has format version {payload.get('version')}, this library reads "
            f"version {FORMAT_VERSION}",
            fix="re-create it with this version of ulmfit",
        )
    return payload


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, on CPU).

    A missing, truncated or foreign file raises :class:`~ulmfit.errors.InputError`.
    """
    payload = _load(
        Path(path),
        CHECKPOINT_FORMAT,
        "training checkpoint",
        fix="delete the file so training resumes from the previous checkpoint (or starts over)",
    )
    return from_plain({k: v for k, v in payload.items() if k not in ("format", "version")})


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in ``directory``, oldest step first (temp files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | Path, keep: int, protected: Iterable[int] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps everything), and
    never those of the ``protected`` steps."""
    if keep <= 0:
        return
    spared = {checkpoint_path(directory, step) for step in protected}
    for old in list_checkpoints(directory)[:-keep]:
        if old not in spared:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Model files


def save_model(
    path: str | Path,
    model: nn.Module,
    *,
    kind: str,
    config: dict[str, Any],
    tokenizer_identity: str | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a model file: ``state_dict`` + kind + config dict + tokenizer identity (atomic).

    ``config`` is the model config as a plain dict (``ulmfit.config.to_dict(cfg)``), enough for
    ``ulmfit.model.build_model(kind, config)`` to rebuild the module.
    """
    if kind not in ("lm", "classifier"):
        raise ValueError(f"kind must be 'lm' or 'classifier', got {kind!r}")
    state_dict = {
        name: tensor.detach().cpu() for name, tensor in unwrap_model(model).state_dict().items()
    }
    payload = {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "config": to_plain(dict(config)),
        "tokenizer_identity": tokenizer_identity,
        "state_dict": state_dict,
        "extra": to_plain(dict(extra or {})),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        _save(payload, tmp)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; returns ``(model in eval mode, meta)``.

    ``meta`` holds ``kind``, ``config``, ``tokenizer_identity`` and ``extra``.
    """
    path = Path(path)
    payload = _load(
        path,
        MODEL_FORMAT,
        "model file",
        fix="point to a model file written by ulmfit.checkpoint.save_model (re-run the "
        "training stage that produces it)",
    )
    meta = {
        "kind": payload["kind"],
        "config": from_plain(payload["config"]),
        "tokenizer_identity": payload["tokenizer_identity"],
        "extra": from_plain(payload.get("extra", {})),
    }
    try:
        model = build_model(meta["kind"], meta["config"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise InputError(
            path,
            f"model file does not match its own config ({error})",
            fix="re-create the model file with this version of ulmfit",
        ) from error
    return model.to(device).eval(), meta
