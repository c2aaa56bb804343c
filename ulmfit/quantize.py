"""The eval-only classifier and its int8 copies, for CPU prediction (ULMFiT section 3.3).

The training model calls the LSTM kernel functionally (so that weight dropout can hand it a
dropped ``weight_hh``). In eval mode there is no weight dropout, so :class:`InferenceClassifier`
rebuilds the encoder from plain ``nn.LSTM`` modules: the same probabilities, no work spent on
padding. :func:`quantize_dynamic_int8` turns that copy into int8 (weights int8, activations
quantised on the fly), with either of two LSTM paths: :class:`Int8LSTM`, which runs the input
projection of every step as one int8 GEMM, or ``torch.ao.quantization.quantize_dynamic``'s own
quantised LSTM.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import Tensor, nn

from ulmfit.checkpoint import unwrap_model
from ulmfit.model import SequenceClassifier, masked_concat_pool, masked_max_mean


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (CPU for a quantised module, which has none)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")  # quantised modules keep packed weights, not parameters


def has_lstm_encoder(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`~ulmfit.model.SequenceClassifier` with LSTM layers, the
    model that :class:`InferenceClassifier` and :func:`quantize_dynamic_int8` copy (a QRNN
    encoder, ``ulmfit.qrnn``, predicts as it is)."""
    bare = unwrap_model(model)
    return isinstance(bare, SequenceClassifier) and not bare.cfg.encoder.qrnn


class InferenceClassifier(nn.Module):
    """The eval-mode computation of a :class:`~ulmfit.model.SequenceClassifier`, for prediction.

    In eval mode weight dropout is the identity and BPT3C's chunks, with the state carried
    between them, compute exactly what one pass over the document computes, so the encoder is a
    plain embedding followed by ``nn.LSTM`` layers (what ``quantize_dynamic`` replaces by int8
    modules). It still runs in chunks of ``bptt`` steps, for one reason: the rows of a batch are
    sorted longest first and each chunk runs only the rows that still have real tokens (fastai's
    trick), so a batch of mixed lengths spends almost nothing on padding. The weights are copied:
    later changes to the source model do not reach this one.
    """

    def __init__(self, model: SequenceClassifier) -> None:
        super().__init__()
        if not has_lstm_encoder(model):
            raise TypeError(
                f"InferenceClassifier copies an AWD-LSTM SequenceClassifier, got a "
                f"{type(unwrap_model(model)).__name__} (a QRNN or transformer predicts as it is)"
            )
        model = unwrap_model(model)
        self.cfg = model.cfg
        encoder = model.encoder
        self.embedding = nn.Embedding.from_pretrained(
            encoder.embedding.weight.detach().clone(),
            freeze=True,
            padding_idx=self.cfg.encoder.pad_id,
        )
        self.lstms = nn.ModuleList()
        for layer in encoder.layers:
            lstm = nn.LSTM(layer.input_size, layer.hidden_size, batch_first=True)
            with torch.no_grad():  # eval mode: the raw weight_hh, no DropConnect
                lstm.weight_ih_l0.copy_(layer.weight_ih)
                lstm.weight_hh_l0.copy_(layer.weight_hh)
                lstm.bias_ih_l0.copy_(layer.bias_ih)
                lstm.bias_hh_l0.copy_(layer.bias_hh)
            self.lstms.append(lstm)
        self.head = copy.deepcopy(model.head)
        self.to(encoder.embedding.weight.device)
        self.eval()
        self.requires_grad_(False)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # (B, T), (B,) -> (B, C)
        lengths = lengths.to(tokens.device)
        order = torch.argsort(lengths, descending=True, stable=True)
        tokens, lengths = tokens[order], lengths[order]  # longest row first
        lengths_cpu = lengths.cpu()
        longest, chunk = int(lengths_cpu[0]), self.cfg.bptt
        embedded = self.embedding(tokens[:, :longest])  # (B, T, E)
        batch_size = tokens.size(0)
        output = embedded.new_zeros(batch_size, longest, self.lstms[-1].hidden_size)  # (B, T, E)
        states: list[tuple[Tensor, Tensor] | None] = [None] * len(self.lstms)
        for start in range(0, longest, chunk):
            active = int((lengths_cpu > start).sum())  # rows with real tokens in this chunk
            x = embedded[:active, start : start + chunk]  # (b, t, E)
            for index, lstm in enumerate(self.lstms):
                state = states[index]
                if state is not None:  # (1, B', H) -> the first `active` rows, still contiguous
                    state = (state[0][:, :active], state[1][:, :active])
                x, states[index] = lstm(x, state)  # (b, t, H_l)
            output[:active, start : start + chunk] = x
        pooled = masked_concat_pool(output, lengths)  # (B, 3E)
        if self.cfg.pool_embeddings:  # the word vectors' [max, mean]: (B, 5E)
            pooled = torch.cat([pooled, masked_max_mean(embedded, lengths)], dim=1)
        logits = self.head(pooled)  # -> (B, C)
        return logits[torch.argsort(order)]  # back to the caller's row order


@contextlib.contextmanager
def _quiet_quantization_warnings():
    # torch.ao.quantization announces its move to torchao; the eager API still works and needs
    # no extra dependency.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        yield


def _int8_linear(weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A dynamically quantised linear layer, int8 weights with one scale per output row."""
    linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    # per-channel: each gate row keeps its own scale, which matters for the LSTM's saturating
    # gates far more than for the head
    linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with _quiet_quantization_warnings():
        return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)


class Int8LSTM(nn.Module):
    """A single-layer, batch-first LSTM with int8 weights, for CPU prediction.

    ``W_ih x_t`` does not depend on the recurrence, so it runs for all time steps at once as one
    tall int8 GEMM (B*T rows: the shape where int8 kernels are efficient); only ``W_hh h_{t-1}``
    (B rows) is left inside the time loop. fbgemm's own quantised LSTM computes both products at
    every step, which on this project's reference CPU ran no faster than the fp32 oneDNN kernel.
    """

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first or lstm.proj_size:
            raise ValueError("Int8LSTM converts single-layer, one-way, batch-first LSTMs")
        self.hidden_size = lstm.hidden_size
        # both biases are added once, with the input projection
        self.input_projection = _int8_linear(lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
        self.recurrent = _int8_linear(lstm.weight_hh_l0, None)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x: (B, T, I); state: h, c each (1, B, H) as nn.LSTM -> output (B, T, H), new state
        batch_size, steps, _ = x.shape
        hidden = self.hidden_size
        gates_x = self.input_projection(x.reshape(batch_size * steps, -1))
        gates_x = gates_x.view(batch_size, steps, 4 * hidden)  # (B, T, 4H), gate order i f g o
        if state is None:
            h = x.new_zeros(batch_size, hidden)  # (B, H)
            c = x.new_zeros(batch_size, hidden)
        else:
            h, c = state[0][0], state[1][0]
        output = x.new_empty(batch_size, steps, hidden)
        for t in range(steps):
            gates = self.recurrent(h).add_(gates_x[:, t])  # (B, 4H)
            gates[:, : 2 * hidden].sigmoid_()
            gates[:, 2 * hidden : 3 * hidden].tanh_()
            gates[:, 3 * hidden :].sigmoid_()
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.addcmul(f * c, i, g)
            h = o * torch.tanh(c)
            output[:, t] = h
        return output, (h.unsqueeze(0), c.unsqueeze(0))


def quantize_dynamic_int8(model: nn.Module, *, lstm: str = "precomputed") -> nn.Module:
    """An int8 dynamically quantised copy of a classifier, for CPU prediction.

    Weights are stored as int8 and activations are quantised on the fly, per call, on fbgemm's
    int8 kernels (AVX-512 VNNI where the CPU has it). The embedding and batch norms stay fp32.
    ``lstm="precomputed"`` (default) uses :class:`Int8LSTM`; ``lstm="fbgemm"`` uses
    ``torch.ao.quantization.quantize_dynamic``'s own quantised LSTM. The head's linear layers
    go through ``quantize_dynamic``. ``model`` is left untouched; the bench reports how far the
    probabilities and the accuracy move.
    """
    if lstm not in ("precomputed", "fbgemm"):
        raise ValueError(f"lstm must be 'precomputed' or 'fbgemm', got {lstm!r}")
    fp32 = model if isinstance(model, InferenceClassifier) else InferenceClassifier(model)
    if model_device(fp32).type != "cpu":
        raise ValueError("int8 dynamic quantisation runs on CPU only; move the model to CPU")
    kinds = {nn.LSTM, nn.Linear} if lstm == "fbgemm" else {nn.Linear}
    with _quiet_quantization_warnings():
        quantized = torch.ao.quantization.quantize_dynamic(
            fp32, kinds, dtype=torch.qint8, inplace=False
        )
    if lstm == "precomputed":
        quantized.lstms = nn.ModuleList(Int8LSTM(layer) for layer in fp32.lstms)
    return quantized.eval()
