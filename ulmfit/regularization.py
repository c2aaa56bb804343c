"""Activation regularisation (AR) and temporal activation regularisation (TAR).

Merity, Keskar & Socher 2017 ("Regularizing and Optimizing LSTM Language Models", section 4.6),
used unchanged by ULMFiT (Howard & Ruder 2018, section 3.1: "the same regularization ... as
AWD-LSTM"). Both act on the last LSTM layer's output:

* AR penalises large activations: ``alpha * mean(dropped ** 2)`` on the output *after* locked
  dropout (zeroed units contribute nothing, as in the AWD-LSTM code).
* TAR penalises fast change between consecutive time steps:
  ``beta * mean((raw[:, t] - raw[:, t-1]) ** 2)`` on the output *before* dropout.

fastai computes these in a callback that reads outputs its model no longer returns, so they are
silently zero there (fastai issue 3605). Here they are pure functions the training loop adds to
the loss explicitly, and tests check their values on hand-made tensors.
"""

from __future__ import annotations

from torch import Tensor


def activation_regularization(dropped: Tensor, alpha: float) -> Tensor:
    """``alpha * mean(dropped ** 2)`` for the last layer's dropped-out output ``dropped`` (B, T, E)."""
    if alpha == 0.0:
        return dropped.new_zeros(())
    return alpha * dropped.float().pow(2).mean()


def temporal_activation_regularization(raw: Tensor, beta: float) -> Tensor:
    """``beta * mean((raw_t - raw_{t-1}) ** 2)`` over time for the raw last-layer output (B, T, E).

    Batch-first: time is dimension 1. A sequence of length 1 has no differences and gives 0.
    """
    if beta == 0.0 or raw.shape[1] < 2:
        return raw.new_zeros(())
    difference = raw[:, 1:].float() - raw[:, :-1].float()  # (B, T-1, E)
    return beta * difference.pow(2).mean()


def ar_tar_penalty(raw: Tensor, dropped: Tensor, *, alpha: float, beta: float) -> Tensor:
    """AR plus TAR, the term added to the language-model loss each step."""
    return activation_regularization(dropped, alpha) + temporal_activation_regularization(raw, beta)
