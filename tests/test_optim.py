"""Optimisers (Adam groups, NT-ASGD), gradient clipping and AR/TAR."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ulmfit.optim import (
    NTASGD,
    AdamWToStart,
    Lamb,
    OptimizerConfig,
    clip_gradients,
    make_optimizer,
    swap_in_averaged,
)
from ulmfit.regularization import (
    activation_regularization,
    ar_tar_penalty,
    temporal_activation_regularization,
)

# ------------------------------------------------------------------------------ AR / TAR


def test_activation_regularization_on_a_hand_tensor() -> None:
    dropped = torch.tensor([[[1.0, 0.0], [2.0, -1.0]]])  # (B=1, T=2, E=2)
    # mean of squares = (1 + 0 + 4 + 1) / 4 = 1.5
    assert float(activation_regularization(dropped, alpha=2.0)) == pytest.approx(3.0)
    assert float(activation_regularization(dropped, alpha=0.0)) == 0.0


def test_temporal_activation_regularization_on_a_hand_tensor() -> None:
    raw = torch.tensor(
        [[[0.0, 1.0], [1.0, 1.0], [3.0, 0.0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]]
    )  # (B=2, T=3, E=2)
    # differences over time: row 0: (1,0), (2,-1) -> squares 1,0,4,1; row 1: all zero
    # mean over B*(T-1)*E = 8 values = 6 / 8
    assert float(temporal_activation_regularization(raw, beta=1.0)) == pytest.approx(0.75)
    assert float(temporal_activation_regularization(raw[:, :1], beta=1.0)) == 0.0
    assert float(ar_tar_penalty(raw, raw, alpha=2.0, beta=1.0)) == pytest.approx(
        2.0 * raw.pow(2).mean().item() + 0.75
    )


def test_ar_tar_are_differentiable() -> None:
    raw = torch.randn(2, 5, 3, requires_grad=True)
    ar_tar_penalty(raw, raw * 0.5, alpha=2.0, beta=1.0).backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ Adam


def _two_groups() -> tuple[nn.Module, list]:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return model, [(model[0].parameters(), 0.001), (model[1].parameters(), 0.01)]


def test_make_optimizer_builds_one_group_per_layer_group() -> None:
    _, groups = _two_groups()
    optimizer = make_optimizer(groups, OptimizerConfig(betas=(0.7, 0.99), weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)  # decoupled weight decay by default
    assert [g["lr"] for g in optimizer.param_groups] == [0.001, 0.01]
    assert optimizer.param_groups[0]["betas"] == (0.7, 0.99)
    _, groups = _two_groups()
    l2 = make_optimizer(groups, OptimizerConfig(decoupled_weight_decay=False))
    assert type(l2) is torch.optim.Adam
    _, groups = _two_groups()
    assert isinstance(make_optimizer(groups, OptimizerConfig(name="ntasgd")), NTASGD)
    with pytest.raises(ValueError):
        OptimizerConfig(name="sgd")


def test_exempt_biases_and_norms_takes_weight_decay_off_the_1d_parameters_only() -> None:
    """GPT's and BERT's rule: each layer group splits into its decayed matrices and its
    undecayed biases and norm gains, both at the layer group's rate."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    lower = [*model[0].parameters(), *model[1].parameters()]
    cfg = OptimizerConfig(weight_decay=0.5, exempt_biases_and_norms=True)
    optimizer = make_optimizer([(lower, 0.1), (model[2].parameters(), 0.2)], cfg)
    groups = optimizer.param_groups
    assert [(g["lr"], g["peak_lr"], g["weight_decay"]) for g in groups] == [
        (0.1, 0.1, 0.5), (0.1, 0.1, 0.0), (0.2, 0.2, 0.5), (0.2, 0.2, 0.0),
    ]  # fmt: skip
    assert [len(g["params"]) for g in groups] == [1, 3, 1, 1]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    optimizer.step()
    for name, p in model.named_parameters():
        if p.ndim > 1:  # AdamW: w <- w * (1 - lr * decay)
            lr = 0.1 if name.startswith("0.") else 0.2
            assert torch.allclose(p, before[name] * (1 - lr * 0.5)), name
        else:
            assert torch.equal(p, before[name]), name
    default = make_optimizer([(lower, 0.1)], OptimizerConfig(weight_decay=0.5))
    assert [g["weight_decay"] for g in default.param_groups] == [0.5]  # every parameter


def test_decay_toward_start_is_adamw_pulling_each_weight_to_its_starting_value() -> None:
    """L2-SP: one step equals AdamW's step plus lr * decay * w_start, so a weight that never
    gets a gradient signal returns to where training began instead of shrinking to zero."""
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    pulled, plain = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    cfg = OptimizerConfig(weight_decay=0.5, decay_toward="start")
    to_start = make_optimizer([([pulled], 0.1)], cfg)
    adamw = make_optimizer([([plain], 0.1)], OptimizerConfig(weight_decay=0.5))
    assert isinstance(to_start, AdamWToStart)
    grad = torch.randn(4, 3)
    for param, optimizer in ((pulled, to_start), (plain, adamw)):
        param.grad = grad.clone()
        optimizer.step()
    assert torch.allclose(pulled, plain + 0.1 * 0.5 * start)
    with torch.no_grad():  # displaced by hand; zero gradients from now on
        pulled.add_(1.0)
        plain.add_(1.0)
    for _ in range(200):
        for param, optimizer in ((pulled, to_start), (plain, adamw)):
            param.grad = torch.zeros_like(param)
            optimizer.step()
    assert torch.allclose(pulled, start, atol=1e-3)  # Adam's moments have long decayed
    assert plain.abs().max() < 1e-3  # AdamW: toward zero


def test_decay_toward_start_resumes_toward_the_first_runs_start() -> None:
    """The starting weights travel with state_dict: an optimiser built on the later weights
    and loaded from the checkpoint pulls toward the original ones."""
    start = torch.ones(3)
    weight = nn.Parameter(start.clone())
    cfg = OptimizerConfig(weight_decay=1.0, decay_toward="start")
    optimizer = make_optimizer([([weight], 0.1)], cfg)
    weight.grad = torch.ones(3)
    optimizer.step()
    saved = optimizer.state_dict()
    resumed = make_optimizer([([weight], 0.1)], cfg)  # built on the moved weights
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.start[0], start)
    with pytest.raises(ValueError, match="starting weights do not match"):
        make_optimizer([([nn.Parameter(torch.ones(2))], 0.1)], cfg).load_state_dict(saved)


def test_decay_toward_start_needs_adamw() -> None:
    for cfg in ({"name": "ntasgd"}, {"name": "lamb"}, {"decoupled_weight_decay": False}):
        with pytest.raises(ValueError, match="decay_toward 'start' is decoupled weight decay"):
            OptimizerConfig(decay_toward="start", **cfg)
    with pytest.raises(ValueError, match="decay_toward must be 'zero' or 'start'"):
        OptimizerConfig(decay_toward="pretrained")


def test_lamb_moves_every_tensor_by_the_rate_times_its_own_norm() -> None:
    """A weight ten times larger moves ten times further; a tensor of norm zero (a fresh bias)
    takes Adam's first step, lr * g / |g|; decoupled decay joins the direction."""
    torch.manual_seed(0)
    small, large = nn.Parameter(0.05 * torch.randn(8, 4)), nn.Parameter(0.5 * torch.randn(8, 4))
    bias = nn.Parameter(torch.zeros(4))
    optimizer = make_optimizer(
        [([small, large, bias], 0.01)], OptimizerConfig(name="lamb", weight_decay=0.0)
    )
    assert isinstance(optimizer, Lamb)
    before = [p.detach().clone() for p in (small, large, bias)]
    for p in (small, large, bias):
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in (small, large, bias)]
    optimizer.step()
    for p, start in zip((small, large), before[:2], strict=True):
        assert torch.isclose((p - start).norm(), 0.01 * start.norm(), rtol=1e-4)
    assert torch.allclose(bias - before[2], -0.01 * grads[2].sign(), atol=1e-5)

    decayed = nn.Parameter(torch.ones(3))
    lamb = make_optimizer([([decayed], 0.1)], OptimizerConfig(name="lamb", weight_decay=1.0))
    decayed.grad = torch.zeros(3)  # no gradient: only the decay gives the direction
    lamb.step()
    assert torch.allclose(decayed, torch.full((3,), 0.9))  # -0.1 * ||w|| * w / ||w||


def test_clip_gradients_limits_the_global_norm() -> None:
    layer = nn.Linear(4, 4)
    layer.weight.grad = torch.full_like(layer.weight, 3.0)
    layer.bias.grad = torch.full_like(layer.bias, 4.0)
    before = (16 * 9 + 4 * 16) ** 0.5
    assert clip_gradients(layer.parameters(), 0.3) == pytest.approx(before, rel=1e-6)
    after = torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()
    assert float(after) == pytest.approx(0.3, rel=1e-5)
    assert clip_gradients(layer.parameters(), 0) == pytest.approx(0.3, rel=1e-5)


# ------------------------------------------------------------------------------ NT-ASGD


def test_ntasgd_triggers_only_after_n_non_improving_checks() -> None:
    weight = nn.Parameter(torch.zeros(2))
    optimizer = NTASGD([weight], lr=0.1, nonmono=3)
    # improving checks never trigger
    for value in [10.0, 9.0, 8.0, 7.0, 6.0]:
        assert optimizer.check(value) is False
    # worse than the last one but still better than the best of the checks > 3 ago: no trigger
    assert optimizer.check(6.5) is False
    # history[:-3] = [10, 9, 8]: 7.5 is worse than recent checks but beats 8, no trigger
    assert optimizer.check(7.5) is False
    # history [10, 9, 8, 7, 6, 6.5, 7.5]; history[:-3] = [10, 9, 8, 7] -> min 7; 7.2 > 7
    assert optimizer.check(7.2) is True
    assert optimizer.triggered


def test_ntasgd_needs_more_than_n_checks_before_it_can_trigger() -> None:
    optimizer = NTASGD([nn.Parameter(torch.zeros(1))], lr=0.1, nonmono=5)
    for value in [1.0, 2.0, 3.0, 4.0, 5.0]:
        assert optimizer.check(value) is False  # only 0..4 earlier checks: too few
    assert optimizer.check(6.0) is False  # 5 earlier checks: none is more than 5 checks ago
    assert optimizer.check(7.0) is True  # 6 earlier checks: min(history[:-5]) = 1.0 < 7


def test_ntasgd_is_plain_sgd_then_averages_every_later_step() -> None:
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = NTASGD([weight], lr=0.5, nonmono=1)
    gradients = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])]

    weight.grad = gradients[0].clone()
    optimizer.step()  # plain SGD: w -= lr * g
    assert torch.equal(weight.detach(), torch.tensor([0.5, -2.0]))
    assert "average" not in optimizer.state[weight]

    optimizer.check(1.0)
    optimizer.check(0.5)
    assert optimizer.check(2.0) is True  # 2.0 > min([1.0])

    after = []
    for gradient in gradients[1:]:
        weight.grad = gradient.clone()
        optimizer.step()
        after.append(weight.detach().clone())
    expected_average = torch.stack(after).mean(0)  # 1/(K-T+1) * sum_{i=T..K} w_i
    assert torch.allclose(optimizer.state[weight]["average"], expected_average)

    raw = weight.detach().clone()
    with swap_in_averaged(optimizer):
        assert torch.allclose(weight.detach(), expected_average)
    assert torch.equal(weight.detach(), raw)


def test_ntasgd_state_dict_round_trip_keeps_history_and_average() -> None:
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = NTASGD([weight], lr=0.1, nonmono=1, weight_decay=0.01)
    for value in [3.0, 2.0, 4.0]:
        optimizer.check(value)
    weight.grad = torch.ones(2)
    optimizer.step()
    state = optimizer.state_dict()

    other_weight = nn.Parameter(weight.detach().clone())
    restored = NTASGD([other_weight], lr=0.1, nonmono=5)
    restored.load_state_dict(state)
    assert restored.triggered and restored.history == [3.0, 2.0, 4.0]
    assert restored.nonmono == 1 and restored.averaged_steps == 1
    assert torch.equal(restored.state[other_weight]["average"], optimizer.state[weight]["average"])


def test_swap_in_averaged_is_a_no_op_for_adam() -> None:
    model, groups = _two_groups()
    optimizer = make_optimizer(groups, OptimizerConfig())
    before = [p.detach().clone() for p in model.parameters()]
    with swap_in_averaged(optimizer):
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
