"""Optimisers: Adam for fine-tuning (ULMFiT section 4) and NT-ASGD for pretraining.

* ULMFiT fine-tunes with Adam, betas (0.7, 0.99) in the paper (0.8 in its scripts), one
  parameter group per layer group so that discriminative learning rates (paper eq. 2) are just
  per-group ``lr`` values. Weight decay is *decoupled* by default (AdamW, Loshchilov & Hutter
  2019), as fastai applies it ("true weight decay"); ``decoupled_weight_decay=False`` gives the
  classic L2 penalty added to the gradient instead. ``decay_toward="start"`` pulls each
  weight toward its value when training began instead of toward zero: L2-SP (Li, Grandvalet &
  Davoine 2018, "Explicit inductive bias for transfer learning"), which lets few labels move a
  pretrained encoder without forgetting what pretraining put there (:class:`AdamWToStart`).
* NT-ASGD is the optimiser of the AWD-LSTM paper (Merity et al. 2017, section 3): plain SGD
  until the validation metric fails to improve on the best value seen more than ``nonmono``
  checks ago; from then on it keeps the running average of the weights after every step,
  ``w = 1/(K-T+1) * sum_{i=T..K} w_i``, and evaluation and saving use that average
  (:func:`swap_in_averaged`). Its weight decay is L2, as in the AWD-LSTM code.

Gradient clipping by global norm (0.3 for the LM, 25 for the classifier in the paper's scripts)
is :func:`clip_gradients`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Annotated, Any

import torch
from torch import nn

from ulmfit.config import Dropout, NonNegativeFloat, NonNegativeInt, OneOf, PositiveFloat

OPTIMIZERS = ("adam", "lamb", "ntasgd")
DECAY_TARGETS = ("zero", "start")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What :func:`make_optimizer` builds.

    name: ``"adam"`` (fine-tuning), ``"lamb"`` (:class:`Lamb`: Adam's step scaled, tensor by
        tensor, to the rate times the weight's own norm) or ``"ntasgd"`` (AWD-LSTM
        pretraining).
    betas, eps: Adam's moment decay rates and denominator term.
    weight_decay: decay strength; decoupled (AdamW) for Adam unless
        ``decoupled_weight_decay`` is false, always L2 for NT-ASGD.
    decay_toward: ``"zero"`` (the default: AdamW's decay) or ``"start"``: the decoupled decay
        pulls each weight toward its value when training began (L2-SP), so the decay's
        strength bounds how far fine-tuning moves the pretrained weights; Adam only.
    exempt_biases_and_norms: no weight decay on the 1-dimensional parameters (biases and the
        gains of LayerNorm/BatchNorm), as GPT, BERT and fastai's default (``wd_bn_bias=False``)
        do; false (the default) decays every parameter, as the AWD-LSTM code does.
    momentum: SGD momentum for NT-ASGD (0 in the AWD-LSTM paper).
    nonmono: NT-ASGD's patience ``n``, counted in validation checks.
    """

    name: Annotated[str, OneOf(OPTIMIZERS)] = "adam"
    betas: tuple[Dropout, Dropout] = (0.8, 0.99)  # each in [0, 1)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.01
    decoupled_weight_decay: bool = True
    decay_toward: Annotated[str, OneOf(DECAY_TARGETS)] = "zero"
    exempt_biases_and_norms: bool = False
    momentum: Dropout = 0.0
    nonmono: NonNegativeInt = 5

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'adam', 'lamb' or 'ntasgd', got {self.name!r}")
        if self.decay_toward not in DECAY_TARGETS:
            raise ValueError(f"decay_toward must be 'zero' or 'start', got {self.decay_toward!r}")
        if self.decay_toward == "start" and not (
            self.name == "adam" and self.decoupled_weight_decay
        ):
            raise ValueError(
                "decay_toward 'start' is decoupled weight decay (AdamW): it needs name 'adam' "
                "and decoupled_weight_decay true"
            )


def make_optimizer(
    groups: Sequence[tuple[Iterable[nn.Parameter], float]], cfg: OptimizerConfig
) -> torch.optim.Optimizer:
    """Build the optimiser with one parameter group per layer group (lowest first), or two
    (decayed, then the exempt 1-dimensional parameters) with ``exempt_biases_and_norms``.

    ``groups`` pairs each layer group's parameters with its learning rate, which each of its
    parameter groups keeps as ``peak_lr``: the training loop rewrites ``lr`` from it every step
    (STLR times the discriminative factor).
    """
    param_groups = []
    for params, lr in groups:
        params = list(params)
        parts = [(params, cfg.weight_decay)]
        if cfg.exempt_biases_and_norms:
            parts = [([p for p in params if p.ndim > 1], cfg.weight_decay),
                     ([p for p in params if p.ndim <= 1], 0.0)]  # fmt: skip
        param_groups += [
            {"params": part, "lr": float(lr), "peak_lr": float(lr), "weight_decay": decay}
            for part, decay in parts
            if part
        ]
    if cfg.name == "ntasgd":
        return NTASGD(
            param_groups,
            lr=param_groups[0]["lr"],
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nonmono=cfg.nonmono,
        )
    if cfg.name == "lamb":
        return Lamb(param_groups, betas=tuple(cfg.betas), eps=cfg.eps)
    adam = torch.optim.AdamW if cfg.decoupled_weight_decay else torch.optim.Adam
    if cfg.decay_toward == "start":
        adam = AdamWToStart
    return adam(
        param_groups,
        lr=param_groups[0]["lr"],
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def _loss_of(closure: Any) -> Any:
    """``step(closure)``'s contract: re-evaluate the loss with gradients on, if asked to."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, algorithm 2): Adam's direction with decoupled weight decay,
    ``u = m_hat / (sqrt(v_hat) + eps) + wd * w``, stepped by ``lr * ||w|| / ||u||`` for each
    tensor, so every weight moves by about ``lr`` times its own size whatever that size is
    (a tensor whose norm is zero, such as a fresh bias, steps by ``lr * u``, as Adam would).

    Why it is here: Adam moves each weight by about the rate whatever the weight's size, and a
    fine-tuned LM's weights are 5 to 10 times a fresh encoder's (docs/pipeline.md, "One rate
    on every layer, and why"), so the rate that suits one is wrong for the other. LAMB's rate
    is relative, the same for both in principle. In practice it is not (BENCHMARKS.md, "IMDb
    at 1,000 labels: LAMB"): no LAMB rate measured matched Adam's one rate on either encoder.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch's signature
        loss = _loss_of(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = float(state["step"])
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1**step)
                v_hat = state["exp_avg_sq"] / (1 - beta2**step)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(param, alpha=group["weight_decay"])
                weight_norm, update_norm = float(param.norm()), float(update.norm())
                trust = weight_norm / update_norm if weight_norm and update_norm else 1.0
                param.add_(update, alpha=-group["lr"] * trust)
        return loss


class AdamWToStart(torch.optim.AdamW):
    """AdamW whose decoupled weight decay pulls each weight toward its value at construction
    (the start of training) instead of toward zero: L2-SP's penalty
    ``wd / 2 * ||w - w_start||^2`` applied as AdamW applies its own, decoupled from Adam's
    moments. Each step is AdamW's, ``w <- w * (1 - lr * wd) - adam_update``, plus
    ``lr * wd * w_start``, so ``w <- w - lr * wd * (w - w_start) - adam_update``. The starting
    weights travel with ``state_dict`` so that a resumed run keeps pulling toward the same ones.
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.start = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch's signature
        loss = super().step(closure)
        params = (p for g in self.param_groups for p in g["params"])
        rates = (g["lr"] * g["weight_decay"] for g in self.param_groups for _ in g["params"])
        for param, start, rate in zip(params, self.start, rates, strict=True):
            if param.grad is not None and rate:  # AdamW decays exactly these
                param.add_(start, alpha=rate)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "start": [w.clone() for w in self.start]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        start = state_dict.pop("start")
        super().load_state_dict(state_dict)
        if [w.shape for w in start] != [w.shape for w in self.start]:
            raise ValueError("the checkpoint's starting weights do not match the parameters")
        for own, saved in zip(self.start, start, strict=True):
            own.copy_(saved)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm before.

    ``None`` or ``0`` disables clipping but still reports the norm (useful for logging).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if not max_norm:
        norms = torch.stack([p.grad.detach().float().norm() for p in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


class NTASGD(torch.optim.Optimizer):
    """Non-monotonically triggered averaged SGD (Merity et al. 2017, algorithm 1).

    Call :meth:`step` every training step and :meth:`check` with the validation metric
    (lower is better, e.g. perplexity) every evaluation. Once triggered, every later step adds
    the new weights to a running average kept in the optimiser state (so it is checkpointed
    with ``state_dict``). Use :meth:`swap_in_averaged` to evaluate or save the average.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nonmono: int = 5,
    ) -> None:
        if lr < 0:
            raise ValueError(f"learning rate must be non-negative, got {lr}")
        if nonmono < 1:
            raise ValueError(f"nonmono must be at least 1, got {nonmono}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.nonmono = nonmono
        self.history: list[float] = []  # validation metric of every check, oldest first
        self.triggered = False
        self.averaged_steps = 0  # K - T + 1 once triggered

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch's signature
        loss = _loss_of(closure)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])  # L2, as AWD-LSTM
                if group["momentum"]:
                    state = self.state[param]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = grad.clone()
                    else:
                        buffer.mul_(group["momentum"]).add_(grad)
                    grad = buffer
                param.add_(grad, alpha=-group["lr"])
        if self.triggered:
            self.averaged_steps += 1
            weight = 1.0 / self.averaged_steps
            for group in self.param_groups:
                for param in group["params"]:
                    state = self.state[param]
                    if "average" not in state:
                        state["average"] = param.detach().clone()
                    else:
                        # running mean: avg_k = avg_{k-1} + (w_k - avg_{k-1}) / k
                        state["average"].add_(param.detach() - state["average"], alpha=weight)
        return loss

    def check(self, metric: float) -> bool:
        """Record a validation metric; switch to averaging when it stops improving.

        Triggers when more than ``nonmono`` earlier checks exist and ``metric`` is worse than
        the best of the checks made more than ``nonmono`` checks ago (AWD-LSTM's
        ``val_loss > min(best_val_loss[:-nonmono])``). Returns whether averaging is on.
        """
        metric = float(metric)
        if (
            not self.triggered
            and len(self.history) > self.nonmono
            and metric > min(self.history[: -self.nonmono])
        ):
            self.triggered = True
        self.history.append(metric if math.isfinite(metric) else float("inf"))
        return self.triggered

    @contextlib.contextmanager
    def swap_in_averaged(self) -> Iterator[None]:
        """Temporarily replace the weights with their average (no-op before the trigger)."""
        swapped = []
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    average = self.state[param].get("average") if param in self.state else None
                    if average is not None:
                        current = param.detach().clone()
                        param.copy_(average)
                        swapped.append((param, current))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, current in swapped:
                    param.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ntasgd"] = {
            "history": list(self.history),
            "triggered": self.triggered,
            "averaged_steps": self.averaged_steps,
            "nonmono": self.nonmono,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("ntasgd")
        super().load_state_dict(state_dict)
        self.history = [float(x) for x in extra["history"]]
        self.triggered = bool(extra["triggered"])
        self.averaged_steps = int(extra["averaged_steps"])
        self.nonmono = int(extra["nonmono"])


@contextlib.contextmanager
def swap_in_averaged(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Evaluate or save with NT-ASGD's averaged weights; a no-op for every other optimiser."""
    if isinstance(optimizer, NTASGD):
        with optimizer.swap_in_averaged():
            yield
    else:
        yield
