"""Checkpoints and model files: atomic, plain data, weights_only loading, clear errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ulmfit.checkpoint import (
    checkpoint_path,
    get_rng_states,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
    save_model,
    set_rng_states,
)
from ulmfit.config import to_dict
from ulmfit.errors import InputError
from ulmfit.model import AWDLSTMConfig, ClassifierConfig, LanguageModel, SequenceClassifier
from ulmfit.optim import OptimizerConfig, make_optimizer

TINY = AWDLSTMConfig(vocab_size=40, embed_size=8, hidden_size=12, num_layers=2)


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LanguageModel(TINY)
    optimizer = make_optimizer([(model.parameters(), 0.01)], OptimizerConfig())
    model(torch.randint(0, 40, (2, 5))).logits.sum().backward()
    optimizer.step()
    data_state = {
        "epoch": 3,
        "position": np.int64(17),
        "order": np.arange(10, dtype=np.int64),
        "rng": np.random.default_rng(5).bit_generator.state,  # holds big Python ints
        "key": np.arange(4, dtype=np.uint32),
    }
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_config": {"lr": 0.01, "betas": [0.8, 0.99]},
        "step": 12,
        "data": data_state,
        "rng": [get_rng_states()],
    }
    path = save_checkpoint(checkpoint_path(tmp_path, 12), state)
    assert path.name == "step-000000012.pt"
    # the file must load with the safe unpickler, no allow-listing needed
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ulmfit-checkpoint"

    loaded = load_checkpoint(path)
    assert loaded["step"] == 12 and loaded["train_config"]["betas"] == [0.8, 0.99]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)
    assert loaded["data"]["position"] == 17 and loaded["data"]["epoch"] == 3
    assert isinstance(loaded["data"]["order"], np.ndarray)
    assert np.array_equal(loaded["data"]["order"], np.arange(10))
    assert loaded["data"]["key"].dtype == np.uint32
    assert loaded["data"]["rng"] == data_state["rng"]
    fresh = make_optimizer([(LanguageModel(TINY).parameters(), 0.01)], OptimizerConfig())
    fresh.load_state_dict(loaded["optimizer"])
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_rng_states_restore_every_generator() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = get_rng_states()
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_states(states)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_missing_and_corrupt_checkpoints_raise_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as missing:
        load_checkpoint(tmp_path / "step-000000001.pt")
    assert "step-000000001.pt" in str(missing.value) and "Fix:" in str(missing.value)

    path = save_checkpoint(tmp_path / "step-000000002.pt", {"step": 2, "w": torch.ones(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated file
    with pytest.raises(InputError, match="corrupt") as corrupt:
        load_checkpoint(path)
    assert str(path) in str(corrupt.value)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(InputError, match="not a training checkpoint"):
        load_checkpoint(foreign)


def test_latest_and_prune(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "absent") is None
    for step in (5, 40, 7):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    (tmp_path / ".step-000000099.pt.abc.tmp").write_bytes(b"partial")  # an interrupted write
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 40)
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-000000007.pt",
        "step-000000040.pt",
    ]


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_model_file_rebuilds_the_same_model(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "lm":
        model, config = LanguageModel(TINY), TINY
    else:
        config = ClassifierConfig(encoder=TINY, num_classes=3, head_hidden=6, bptt=4)
        model = SequenceClassifier(config)
    model.eval()
    path = save_model(
        tmp_path / "model.pt",
        model,
        kind=kind,
        config=to_dict(config),
        tokenizer_identity="abc123",
        extra={"label_names": ["a", "b", "c"]},
    )
    rebuilt, meta = load_model(path)
    assert meta["kind"] == kind and meta["tokenizer_identity"] == "abc123"
    assert meta["extra"]["label_names"] == ["a", "b", "c"]
    assert not rebuilt.training
    tokens = torch.randint(2, 40, (2, 9))
    with torch.no_grad():
        if kind == "lm":
            assert torch.equal(model(tokens).logits, rebuilt(tokens).logits)
        else:
            lengths = torch.tensor([9, 6])
            assert torch.equal(model(tokens, lengths), rebuilt(tokens, lengths))


def test_load_model_rejects_a_checkpoint_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="model file not found"):
        load_model(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path / "step-000000001.pt", {"step": 1})
    with pytest.raises(InputError, match="not a model file"):
        load_model(path)
