"""STLR, discriminative learning rates and gradual unfreezing (ULMFiT sections 3.2-3.3)."""

from __future__ import annotations

import math

import pytest

from ulmfit.schedule import (
    ScheduleConfig,
    constant,
    discriminative_lrs,
    gradual_unfreezing_stages,
    one_cycle,
    stlr,
)


def paper_stlr(t: int, total: int, lr_max: float, cut_frac: float, ratio: float) -> float:
    """Eq. 3 of the paper, written out independently of the implementation."""
    cut = math.floor(total * cut_frac)
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return lr_max * (1 + p * (ratio - 1)) / ratio


@pytest.mark.parametrize("total", [1000, 50, 20])
def test_stlr_matches_the_formula_at_every_step(total: int) -> None:
    lr_max, cut_frac, ratio = 0.01, 0.1, 32.0
    cut = math.floor(total * cut_frac)
    assert stlr(0, total, lr_max=lr_max) == pytest.approx(lr_max / ratio, rel=1e-12)
    assert stlr(cut, total, lr_max=lr_max) == pytest.approx(lr_max, rel=1e-12)
    assert stlr(total, total, lr_max=lr_max) == pytest.approx(lr_max / ratio, rel=1e-12)
    for t in range(total + 1):
        expected = paper_stlr(t, total, lr_max, cut_frac, ratio)
        assert stlr(t, total, lr_max=lr_max, cut_frac=cut_frac, ratio=ratio) == pytest.approx(
            expected, rel=1e-12
        )


@pytest.mark.parametrize("total", [1234, 19])
def test_stlr_decay_ends_at_total_when_cut_is_rounded_down(total: int) -> None:
    """The paper's decay length cut*(1/cut_frac - 1) would reach the floor early (step 10 of
    19); ours decays over total - cut steps, so the floor comes exactly at the last step."""
    lr_max, ratio = 0.01, 32.0
    cut = math.floor(total * 0.1)
    values = [stlr(t, total, lr_max=lr_max) for t in range(total + 1)]
    assert values[cut] == pytest.approx(lr_max, rel=1e-12)
    assert values[total] == pytest.approx(lr_max / ratio, rel=1e-12)
    assert all(a > b for a, b in zip(values[cut:-1], values[cut + 1 :], strict=True))


def test_stlr_rises_then_falls() -> None:
    values = [stlr(t, 200, lr_max=1.0) for t in range(201)]
    peak = values.index(max(values))
    assert peak == 20
    assert all(a < b for a, b in zip(values[:peak], values[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(values[peak:-1], values[peak + 1 :], strict=True))


def test_stlr_too_few_steps_for_a_warm_up_still_decays() -> None:
    values = [stlr(t, 5, lr_max=1.0) for t in range(6)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(1 / 32)
    assert values == sorted(values, reverse=True)


def test_stlr_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        stlr(0, 0, lr_max=1.0)
    with pytest.raises(ValueError):
        stlr(0, 10, lr_max=1.0, cut_frac=1.0)


def test_constant_and_one_cycle() -> None:
    assert constant(17, 100, lr_max=0.3) == 0.3
    assert one_cycle(0, 100, lr_max=1.0) == pytest.approx(1 / 25)
    assert one_cycle(25, 100, lr_max=1.0) == pytest.approx(1.0)
    assert one_cycle(100, 100, lr_max=1.0) == pytest.approx(1e-5)


def test_discriminative_lrs_are_in_ratio_2_6_lowest_first() -> None:
    lrs = discriminative_lrs(0.01, 5)
    assert lrs[-1] == 0.01
    for lower, upper in zip(lrs[:-1], lrs[1:], strict=True):
        assert upper / lower == pytest.approx(2.6, rel=1e-12)
    assert lrs[0] == pytest.approx(0.01 / 2.6**4, rel=1e-12)
    assert discriminative_lrs(0.01, 3, factor=1.0) == [0.01, 0.01, 0.01]


def test_gradual_unfreezing_stages_unfreeze_one_more_group_from_the_top() -> None:
    assert gradual_unfreezing_stages(5) == [
        [4],
        [3, 4],
        [2, 3, 4],
        [1, 2, 3, 4],
        [0, 1, 2, 3, 4],
    ]
    assert gradual_unfreezing_stages(1) == [[0]]


def test_schedule_config_gives_the_group_rates_and_the_rate_at_a_step():
    config = ScheduleConfig(cut_frac=0.25)
    assert config.group_lrs(0.01, 3) == pytest.approx([0.01 / 2.6**2, 0.01 / 2.6, 0.01])
    assert ScheduleConfig(discriminative=False).group_lrs(0.01, 3) == [0.01] * 3
    assert config.lr_at(0.01, 2, 8) == stlr(2, 8, lr_max=0.01, cut_frac=0.25)
    assert ScheduleConfig(stlr=False).lr_at(0.01, 5, 8) == 0.01
