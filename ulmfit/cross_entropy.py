"""The language model's decoder and softmax cross entropy, fused and chunked over rows.

The LM's loss (ULMFiT section 3.1: next-token cross entropy over the tied decoder) is the
largest matrix product of a training step: (B*T, E) hidden states times the (V, E) decoder.
:func:`decoder_cross_entropy` computes it without ever holding the (B*T, V) logits, and on CPU
runs its products through oneDNN (see ``_linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _onednn_linear_op():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` (x (M, K), weight (N, K), either may be a strided view).

    On CPU this goes to oneDNN's matmul, which uses AVX-512 on any x86 CPU that has it, where
    ``torch.mm`` goes to MKL, which on AMD CPUs runs at about half that rate. This is the
    kernel family the LSTM layers already use (oneDNN RNN), so the decoder stops being the slow
    part of a CPU training step.
    """
    if (
        _ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
    ):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _DecoderCrossEntropy(torch.autograd.Function):
    """Linear decoder + softmax cross entropy, fused and chunked over rows.

    The (N, V) logits never exist in full: each chunk's logits become the gradient
    ``softmax - one_hot`` in place while they are still in cache, and the input and
    weight gradients are accumulated right away, so the backward pass only scales them. Same
    three matrix products as the unfused version (through oneDNN, see `_linear`), fewer passes
    over (N, V) memory (one exp instead of two) and no (N, V) allocation. Everything runs in the dtype of ``hidden`` (bf16 under autocast);
    logits, softmax and the loss in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):  # hidden (N, E), targets (N,)
        n, dtype = hidden.size(0), hidden.dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        # Gradients are kept unscaled by 1/N (and in fp32 for the input) until backward, so
        # that fp16 values of size softmax/N cannot underflow before GradScaler's factor.
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if need_hidden else None
        grad_weight_t = weight.new_zeros(weight.t().shape) if need_weight else None  # (E, V)
        grad_bias = torch.zeros_like(bias) if need_bias else None
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                h = hidden[start : start + chunk_rows]  # (n_c, E)
                y = targets[start : start + chunk_rows]  # (n_c,)
                logits = _linear(h, w, b).float()  # (n_c, V)
                target_logits = logits.gather(1, y[:, None]).squeeze(1)  # (n_c,)
                row_max = logits.amax(dim=1, keepdim=True)  # (n_c, 1)
                exp = logits.sub_(row_max).exp_()  # in place: one exp pass, no (n_c, V) copy
                row_sum = exp.sum(dim=1, keepdim=True)  # (n_c, 1)
                total += (row_max + row_sum.log()).squeeze(1).sub_(target_logits).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                grad = exp.mul_(row_sum.reciprocal_())  # softmax, in place
                grad[torch.arange(len(y), device=y.device), y] -= 1.0
                grad = grad.to(dtype)  # N * d(mean loss) / d(logits), (n_c, V)
                if need_hidden:
                    grad_hidden[start : start + chunk_rows] = _linear(grad, w.t())  # (n_c, E)
                if need_weight:  # (E, V): the fast orientation for oneDNN
                    grad_weight_t += _linear(h.t(), grad.t())
                if need_bias:
                    grad_bias += grad.sum(0)
        grad_weight = None if grad_weight_t is None else grad_weight_t.t().contiguous()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.n, ctx.hidden_dtype = n, dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output.float() / ctx.n
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g * scale.to(g.dtype) for g in ctx.saved_tensors
        )
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(ctx.hidden_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def decoder_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_rows: int | None = None,
    max_chunk_elements: int = 1 << 25,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` chunked (hidden (N, E)).

    By default the N rows are split into the fewest equal chunks whose logits stay under
    ``max_chunk_elements`` (128 MB in fp32): few chunks keep the kernels large, which matters
    with several threads, and the bound keeps memory flat for any batch and vocabulary.
    """
    if chunk_rows is None:
        n, vocab = hidden.size(0), weight.size(0)
        num_chunks = max(1, -(-n * vocab // max_chunk_elements))
        chunk_rows = max(1, -(-n // num_chunks))
    return _DecoderCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)
