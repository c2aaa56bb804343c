"""Learning-rate schedules of ULMFiT (Howard & Ruder 2018, section 3.2 and 3.3).

* Slanted triangular learning rates (STLR, section 3.2, eq. 3): a short linear warm-up to
  ``lr_max`` during the first ``cut_frac`` of the steps, then a long linear decay to
  ``lr_max / ratio``.
* Discriminative fine-tuning (section 3.2, eq. 2): one learning rate per layer group,
  ``eta_{l-1} = eta_l / 2.6``, so the lowest (most general) layers change least.
* Gradual unfreezing (section 3.3): unfreeze the top layer group and train one epoch, then the
  next lower group, and so on, until every group trains.

Every function here is pure: the training loop passes the step in and gets a number out, so the
schedule's position is just the step counter that the checkpoint already stores.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated

from ulmfit.config import Fraction, Range


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """How the learning rate varies over the layer groups and over the steps.

    discriminative, discriminative_factor: per-group LRs ``eta_{l-1} = eta_l / factor``.
    stlr, cut_frac, stlr_ratio: slanted triangular schedule; ``stlr=False`` keeps the rate
        constant (the "no STLR" ablation).
    """

    discriminative: bool = True
    discriminative_factor: Annotated[float, Range(1)] = 2.6
    stlr: bool = True
    cut_frac: Fraction = 0.1
    stlr_ratio: Annotated[float, Range(1)] = 32.0

    def group_lrs(self, lr: float, n_groups: int) -> list[float]:
        """Each layer group's peak rate, lowest group first; the top group gets ``lr``."""
        factor = self.discriminative_factor if self.discriminative else 1.0
        return discriminative_lrs(lr, n_groups, factor)

    def lr_at(self, lr: float, t: int, total: int) -> float:
        """The top group's rate at step ``t`` of a cycle of ``total`` steps peaking at ``lr``."""
        if self.stlr:
            return stlr(t, total, lr_max=lr, cut_frac=self.cut_frac, ratio=self.stlr_ratio)
        return constant(t, total, lr_max=lr)


def stlr(t: int, total: int, *, lr_max: float, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """Slanted triangular learning rate at step ``t`` of ``total`` (paper eq. 3).

    ``cut = floor(total * cut_frac)``; ``p = t / cut`` while ``t < cut``, else
    ``1 - (t - cut) / (cut * (1 / cut_frac - 1))``; ``lr = lr_max * (1 + p * (ratio - 1)) / ratio``.

    So ``stlr(0) = lr_max / ratio``, ``stlr(cut) = lr_max`` and ``stlr(total) = lr_max / ratio``.
    The decay's length ``cut * (1 / cut_frac - 1)`` equals ``total - cut`` whenever
    ``total * cut_frac`` is a whole number, and then this is the paper's formula at every step.
    Otherwise the paper's expression would reach the floor early (for 19 steps, cut = 1, at
    step 10, leaving half the run at the floor: short gradual-unfreezing stages hit this), so
    the decay runs over ``total - cut`` steps instead and ends exactly at ``total``.
    """
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    if not 0.0 < cut_frac < 1.0:
        raise ValueError(f"cut_frac must lie in (0, 1), got {cut_frac}")
    if ratio < 1.0:
        raise ValueError(f"ratio must be at least 1, got {ratio}")
    cut = math.floor(total * cut_frac)
    if cut == 0:
        # Fewer than 1/cut_frac steps leave no room for a warm-up: the formula's decay branch
        # would divide by zero, so the run starts at the peak and decays linearly instead.
        p = 1.0 - t / total
    elif t < cut:
        p = t / cut
    else:
        p = 1.0 - (t - cut) / (total - cut)
    p = max(p, 0.0)  # past ``total`` the rate stays at its floor, lr_max / ratio
    return lr_max * (1.0 + p * (ratio - 1.0)) / ratio


def constant(t: int, total: int, *, lr_max: float) -> float:
    """A constant learning rate (the "no STLR" ablation)."""
    del t, total
    return lr_max


def one_cycle(
    t: int,
    total: int,
    *,
    lr_max: float,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
) -> float:
    """fastai's one-cycle schedule (cosine warm-up then cosine annealing), for comparison runs."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    warm = max(1, math.floor(total * pct_start))
    start, end = lr_max / div, lr_max / div_final
    if t < warm:
        fraction, low, high = t / warm, start, lr_max
    else:
        fraction, low, high = min(1.0, (t - warm) / max(1, total - warm)), lr_max, end
    return high + (low - high) * (1.0 + math.cos(math.pi * fraction)) / 2.0


def discriminative_lrs(lr: float, n_groups: int, factor: float = 2.6) -> list[float]:
    """One learning rate per layer group, lowest group first (paper eq. 2).

    The top group gets ``lr``; each group below gets the rate of the group above divided by
    ``factor`` (``eta_{l-1} = eta_l / factor``). ``factor=1`` turns discriminative
    fine-tuning off.
    """
    if n_groups <= 0:
        raise ValueError(f"n_groups must be positive, got {n_groups}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return [lr / factor ** (n_groups - 1 - group) for group in range(n_groups)]


def gradual_unfreezing_stages(n_groups: int) -> list[list[int]]:
    """The trainable layer groups of each stage of gradual unfreezing (paper section 3.3).

    Stage ``k`` (1-based) trains the top ``k`` groups: for 5 groups
    ``[[4], [3, 4], [2, 3, 4], [1, 2, 3, 4], [0, 1, 2, 3, 4]]``. The last stage trains all
    groups and is the one that runs for the remaining epochs.
    """
    if n_groups <= 0:
        raise ValueError(f"n_groups must be positive, got {n_groups}")
    return [list(range(n_groups - k, n_groups)) for k in range(1, n_groups + 1)]
