"""The AWD-QRNN (MultiFiT's QRNN layers in the AWD-LSTM, ``pretrain.model.backbone: awd_qrnn``):
the fo-pooling recurrence, state carried across BPTT windows and BPT3C chunks, causality,
DropConnect on the gate weights, bf16 autocast, learning, and the backbone in params.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tasks.params import describe_model, load_params
from ulmfit.config import to_dict
from ulmfit.errors import InputError
from ulmfit.model import (
    AWDLSTMConfig,
    ClassifierConfig,
    LanguageModel,
    SequenceClassifier,
    build_model,
    layer_groups,
)
from ulmfit.qrnn import QRNNLayer, forget_mult
from ulmfit.transformer import backbone_name

ROOT = Path(__file__).resolve().parents[1]
TINY = AWDLSTMConfig(vocab_size=50, embed_size=8, hidden_size=12, num_layers=3, qrnn=True)


def test_forget_mult_is_the_fo_pooling_recurrence():
    forget = torch.tensor([[[0.5], [0.25], [1.0]]])  # (B=1, T=3, H=1)
    candidate = torch.tensor([[[2.0], [-4.0], [8.0]]])
    cells = forget_mult(forget, candidate, torch.tensor([[1.0]]))
    # c1 = .5 * 1 + .5 * 2 = 1.5; c2 = .25 * 1.5 + .75 * -4 = -2.625; c3 = 1 * c2 + 0 * 8
    assert cells.flatten().tolist() == [1.5, -2.625, -2.625]


def test_the_first_layer_sees_two_steps_and_the_state_carries_both():
    lm = LanguageModel(TINY)
    assert [layer.window for layer in lm.encoder.layers] == [2, 1, 1]
    assert all(isinstance(layer, QRNNLayer) for layer in lm.encoder.layers)
    state = lm.encoder.init_state(4)
    # (c, previous input) per layer: the first layer's input is the embedding
    assert [tuple(t.shape) for t in state[0]] == [(1, 4, 12), (1, 4, 8)]
    assert [tuple(t.shape) for t in state[2]] == [(1, 4, 8), (1, 4, 12)]


def test_two_windows_with_the_carried_state_equal_one_pass_and_the_future_never_leaks():
    torch.manual_seed(0)
    lm = LanguageModel(TINY).eval()
    tokens = torch.randint(2, 50, (3, 12))
    whole = lm(tokens).logits
    first = lm(tokens[:, :5])
    second = lm(tokens[:, 5:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), whole)
    changed = tokens.clone()
    changed[:, 8] = 1
    torch.testing.assert_close(lm(changed).logits[:, :8], whole[:, :8])
    assert not torch.allclose(lm(changed).logits[:, 8:], whole[:, 8:])


def test_bpt3c_chunks_do_not_change_the_classifier():
    torch.manual_seed(0)
    tokens = torch.randint(2, 50, (4, 23))
    lengths = torch.tensor([23, 17, 5, 1])
    small = SequenceClassifier(ClassifierConfig(TINY, num_classes=3, bptt=4)).eval()
    large = SequenceClassifier(ClassifierConfig(TINY, num_classes=3, bptt=100)).eval()
    large.load_state_dict(small.state_dict())
    torch.testing.assert_close(
        small.pooled_features(tokens, lengths), large.pooled_features(tokens, lengths)
    )
    # embedding, three QRNN layers, head: gradual unfreezing and discriminative LRs apply
    assert len(layer_groups(small)) == 5


def test_weight_dropout_drops_gate_weights_in_training_only():
    layer = QRNNLayer(6, 5, weight_dropout=0.5)
    x = torch.randn(2, 4, 6)
    state = layer.zero_state(2, x.device, x.dtype)
    layer.train()
    torch.manual_seed(1)
    first, _ = layer(x, state)
    second, _ = layer(x, state)
    assert not torch.allclose(first, second)
    layer.eval()
    torch.testing.assert_close(layer(x, state)[0], layer(x, state)[0])


def test_it_learns_a_batch_in_fp32_and_under_bf16_autocast():
    torch.manual_seed(0)
    lm = LanguageModel(TINY.scaled(0.0))  # no dropout: memorise the batch
    tokens = torch.randint(2, 50, (4, 16))
    optimizer = torch.optim.Adam(lm.parameters(), lr=0.03)
    first = None
    for step in range(150):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step % 2 == 1):
            loss = lm.forward_loss(tokens[:, :-1], tokens[:, 1:]).loss
        assert torch.isfinite(loss)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.3 * first


def test_a_checkpoint_config_rebuilds_the_qrnn():
    lm = LanguageModel(TINY)
    rebuilt = build_model("lm", to_dict(TINY))
    rebuilt.load_state_dict(lm.state_dict())
    assert isinstance(rebuilt.encoder.layers[0], QRNNLayer)
    assert backbone_name(TINY) == "awd_qrnn"
    assert backbone_name(ClassifierConfig(TINY, num_classes=2)) == "awd_qrnn"


def _profile(tmp_path: Path, **model) -> Path:
    data = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    data["pretrain"]["model"].update(model)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_backbone_awd_qrnn_reaches_the_classifier(tmp_path):
    params = load_params(_profile(tmp_path, backbone="awd_qrnn"), check_paths=False)
    assert params.pretrain.model.qrnn and params.pretrain.backbone == "awd_qrnn"
    assert describe_model(params.pretrain.model).startswith("AWD-QRNN ")
    built = params.dataset("bbc_news").classifier.build(600, 5, 0.5)
    assert built.encoder.qrnn and backbone_name(built) == "awd_qrnn"


def test_the_layer_type_is_the_backbones_not_a_key(tmp_path):
    with pytest.raises(InputError) as info:
        load_params(_profile(tmp_path, qrnn=True), check_paths=False)
    assert "pretrain.model.qrnn: " in "\n".join(info.value.details)
    assert "backbone: awd_qrnn" in "\n".join(info.value.details)


def test_the_hand_written_backward_is_the_recurrences_gradient():
    torch.manual_seed(0)
    inputs = (
        torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True),  # forget gates
        torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True),  # candidates
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),  # initial cell
    )
    assert torch.autograd.gradcheck(forget_mult, inputs)
