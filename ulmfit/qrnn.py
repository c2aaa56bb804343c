"""The QRNN layer of MultiFiT (Eisenschlos et al., 2019), a drop-in for the AWD-LSTM's LSTM.

A quasi-recurrent layer (Bradbury et al., 2017) computes its candidate and its forget and
output gates for every time step at once, with one matrix product over the input (and, with
``window=2``, the previous step's input): the only sequential part is elementwise,

    c_t = f_t * c_{t-1} + (1 - f_t) * z_t,        h_t = o_t * c_t        ("fo-pooling"),

so the work that an LSTM does step by step (its ``(4H, H)`` product with ``h_{t-1}``) is gone.
As in fastai's ``QRNN`` (the one MultiFiT used), the first layer looks at two steps
(``window=2``), the others at one, and DropConnect (weight dropout) applies to the gate
weights. The layer takes and returns the same ``(x, state)`` as ``ulmfit.model.LSTMLayer``;
its state is ``(c, previous input)``, each (1, B, ·), so BPTT windows and BPT3C chunks carry it
exactly like an LSTM's ``(h, c)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class _ForgetMult(torch.autograd.Function):
    """The fo-pooling recurrence, time-major, with a hand-written backward: one fused
    ``addcmul`` per step each way instead of autograd's graph of per-step slices and a stack
    (docs/model.md, "The AWD-QRNN": about 9x less time for 32 x 70 x 512 on this CPU)."""

    @staticmethod
    def forward(ctx, forget: Tensor, weighted: Tensor, cell: Tensor) -> Tensor:
        # forget, weighted: (T, B, H) contiguous, weighted = (1 - f) * z; cell: (B, H)
        cells = torch.empty_like(weighted)
        previous = cell
        for t in range(forget.size(0)):
            torch.addcmul(weighted[t], forget[t], previous, out=cells[t])
            previous = cells[t]
        ctx.save_for_backward(forget, cells, cell)
        return cells

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cells: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        forget, cells, cell = ctx.saved_tensors
        # d loss / d c_t: its own gradient plus what flows back from c_{t+1} through f_{t+1}
        grad = grad_cells.contiguous().clone()
        for t in range(forget.size(0) - 1, 0, -1):
            grad[t - 1].addcmul_(grad[t], forget[t])
        previous = torch.cat([cell[None], cells[:-1]])  # c_{t-1}
        return grad * previous, grad, grad[0] * forget[0]


def forget_mult(forget: Tensor, candidate: Tensor, cell: Tensor) -> Tensor:
    """``c_t = f_t * c_{t-1} + (1 - f_t) * z_t`` over time: (B, T, H) gates and candidates,
    (B, H) initial cell -> (B, T, H) cells."""
    weighted = (1 - forget) * candidate
    cells = _ForgetMult.apply(
        forget.transpose(0, 1).contiguous(), weighted.transpose(0, 1).contiguous(), cell
    )
    return cells.transpose(0, 1)


class QRNNLayer(nn.Module):
    """One fo-pooling QRNN layer with DropConnect on its gate weights (``weight_dropout``)."""

    def __init__(
        self, input_size: int, hidden_size: int, weight_dropout: float, window: int = 1
    ) -> None:
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"QRNNLayer: window must be 1 or 2, got {window}")
        from ulmfit.model import WeightDropout  # ulmfit.model imports this module

        self.input_size, self.hidden_size, self.window = input_size, hidden_size, window
        self.weight = nn.Parameter(torch.empty(3 * hidden_size, window * input_size))
        self.bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.weight_dropout = WeightDropout(weight_dropout)
        bound = (window * input_size) ** -0.5  # nn.Linear's initialisation
        nn.init.uniform_(self.weight, -bound, bound)

    def zero_state(self, batch_size: int, device: torch.device, dtype: torch.dtype):
        """``(c, previous input)``: zeros of (1, B, H) and (1, B, I)."""
        return (
            torch.zeros(1, batch_size, self.hidden_size, device=device, dtype=dtype),
            torch.zeros(1, batch_size, self.input_size, device=device, dtype=dtype),
        )

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x: (B, T, I); state: c (1, B, H), previous input (1, B, I)
        cell, previous = state
        if self.window == 2:  # [x_t, x_{t-1}], x_0's predecessor from the state
            shifted = torch.cat([previous.transpose(0, 1).to(x.dtype), x[:, :-1]], dim=1)
            inputs = torch.cat([x, shifted], dim=-1)  # (B, T, 2I)
        else:
            inputs = x
        gates = F.linear(inputs, self.weight_dropout(self.weight), self.bias)  # (B, T, 3H)
        # fo-pooling in fp32 (under bf16 autocast too): the cell sums T steps of small updates
        candidate, forget, output = gates.float().chunk(3, dim=-1)
        cells = forget_mult(torch.sigmoid(forget), torch.tanh(candidate), cell[0].float())
        hidden = torch.sigmoid(output) * cells
        return hidden, (cells[:, -1:].transpose(0, 1), x[:, -1:].transpose(0, 1))
