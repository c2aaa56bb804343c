"""AWD-LSTM language model and BPT3C pooling classifier.

Implements the model of ULMFiT (Howard & Ruder, 2018): section 3.1 (the AWD-LSTM of Merity et
al., 2017, with its embedding dropout, locked dropout and DropConnect on the hidden-to-hidden
weights, and a decoder tied to the embedding) and section 3.3 (the classifier: concat pooling,
two batch-norm/dropout/linear blocks, and BPT3C, "backpropagation through time for text
classification").

State goes in and comes out: no module stores a hidden state. All tensors are batch-first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import torch
from torch import Tensor, nn

from ulmfit.config import Dropout, NonNegativeInt, PositiveInt, Range, from_dict
from ulmfit.cross_entropy import decoder_cross_entropy
from ulmfit.errors import InputError
from ulmfit.qrnn import QRNNLayer

State = tuple[tuple[Tensor, Tensor], ...]  # per layer: (h, c) of an LSTM, (c, x_prev) of a QRNN


@dataclass(frozen=True)
class AWDLSTMConfig:
    """Sizes and dropouts of the AWD-LSTM (defaults: the AWD-LSTM paper's word-level model)."""

    vocab_size: PositiveInt
    embed_size: PositiveInt = 400
    hidden_size: PositiveInt = 1150  # fastai uses 1152; any size works
    num_layers: PositiveInt = 3
    pad_id: NonNegativeInt = 1
    embed_dropout: Dropout = 0.1  # whole words dropped from the embedding matrix
    input_dropout: Dropout = 0.6  # locked dropout on the embedded input
    hidden_dropout: Dropout = 0.2  # locked dropout between LSTM layers
    weight_dropout: Dropout = 0.5  # DropConnect on each layer's weight_hh
    output_dropout: Dropout = 0.1  # locked dropout before the decoder
    tie_weights: bool = True
    out_bias: bool = True
    qrnn: bool = False  # QRNN layers instead of LSTMs (MultiFiT's AWD-QRNN, ulmfit.qrnn)

    def scaled(self, multiplier: float) -> AWDLSTMConfig:
        """All five dropouts times ``multiplier`` (the ULMFiT scripts' ``drop_mult``)."""
        names = ("embed_dropout", "input_dropout", "hidden_dropout", "weight_dropout")
        changes = {name: getattr(self, name) * multiplier for name in names}
        changes["output_dropout"] = self.output_dropout * multiplier
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ClassifierConfig:
    """An AWD-LSTM encoder with the pooling head of ULMFiT section 3.2, run with BPT3C."""

    encoder: AWDLSTMConfig
    num_classes: Annotated[int, Range(2)]
    head_hidden: PositiveInt = 50
    head_dropouts: tuple[Dropout, Dropout] = (0.4, 0.1)
    bptt: PositiveInt = 70  # BPT3C chunk length
    max_len: PositiveInt = (
        1400  # gradients flow through (at least) each document's last max_len tokens
    )
    # Also max- and mean-pool the word vectors (the embedding layer's output) beside the last
    # layer's: 5E features instead of 3E, a bag of fine-tuned word vectors next to ULMFiT's
    # concat pooling. Off: the paper's head.
    pool_embeddings: bool = False

    @property
    def pooled_size(self) -> int:
        """The head's input: ``[h_last, max, mean]`` (3E), then ``[max, mean]`` of the word
        vectors (2E more) with ``pool_embeddings``."""
        return (5 if self.pool_embeddings else 3) * self.encoder.embed_size


# ----------------------------------------------------------------------------- regularisers


class RNNDropout(nn.Module):
    """Locked (variational) dropout: one mask per sequence, the same at every time step."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, E)
        if not self.training or self.p == 0.0:
            return x
        mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p)  # (B, 1, E)
        return x * mask.div_(1 - self.p)


class EmbeddingDropout(nn.Module):
    """Drops whole words: rows of the embedding matrix are zeroed, the rest rescaled.

    Scaling the looked-up rows by ``mask[tokens]`` equals looking up in ``weight * mask`` but
    never materialises a (V, E) copy of the matrix, so a word that is dropped is dropped at every
    position of the batch, at the cost of only (B, T) mask look-ups.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, tokens: Tensor, embedding: nn.Embedding) -> Tensor:  # tokens: (B, T)
        embedded = embedding(tokens)  # (B, T, E)
        if not self.training or self.p == 0.0:
            return embedded
        weight = embedding.weight
        keep = weight.new_empty(weight.size(0)).bernoulli_(1 - self.p).div_(1 - self.p)  # (V,)
        return embedded * keep[tokens].unsqueeze(-1)


class WeightDropout(nn.Module):
    """DropConnect on a weight matrix: a fresh mask every call, the identity in eval mode.

    It returns a new tensor computed from the raw parameter, so the gradient reaches the raw
    weight and the caller can hand plain tensors to the fused LSTM kernel (see `LSTMLayer`).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return weight
        # Same Bernoulli(1 - p) mask as F.dropout; thresholding uniform noise is ~2x faster
        # than bernoulli_ on CPU, which matters for these (4H, H) matrices every step.
        keep = (torch.rand_like(weight) >= self.p).to(weight.dtype).mul_(1 / (1 - self.p))
        return weight * keep


# ----------------------------------------------------------------------------- encoder


class LSTMLayer(nn.Module):
    """A single-layer LSTM with weight dropout on ``weight_hh``, called functionally.

    fastai swaps a dropped weight into an ``nn.LSTM`` with ``setattr`` and silences the cuDNN
    warning that follows. Here the layer owns its raw parameters and calls the same fused kernel
    (``torch._VF.lstm``: cuDNN on GPU, oneDNN on CPU) with the dropped weight. On CUDA the four
    tensors are laid out in one contiguous buffer, the layout cuDNN expects, so it uses them
    without a copy or a warning.
    """

    def __init__(self, input_size: int, hidden_size: int, weight_dropout: float) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        self.weight_dropout = WeightDropout(weight_dropout)
        bound = hidden_size**-0.5  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flat_weights(self) -> list[Tensor]:
        """``[weight_ih, dropped weight_hh, bias_ih, bias_hh]`` as the LSTM kernel takes them."""
        weights = [self.weight_ih, self.weight_dropout(self.weight_hh), self.bias_ih, self.bias_hh]
        if self.weight_ih.is_cuda:  # one buffer, views in cuDNN's order: no per-call compaction
            flat = torch.cat([w.reshape(-1) for w in weights])
            weights = [
                v.view_as(w)
                for v, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)
            ]
        return weights

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x: (B, T, I); state: h, c each (1, B, H)
        output, h, c = torch._VF.lstm(
            x, state, self.flat_weights(), True, 1, 0.0, self.training, False, True
        )  # has_biases, num_layers, dropout, train, bidirectional, batch_first
        return output, (h, c)  # (B, T, H)

    def zero_state(
        self, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``(h, c)``: zeros of (1, B, H) each."""
        return (torch.zeros(1, batch_size, self.hidden_size, device=device, dtype=dtype),) * 2


class AWDLSTM(nn.Module):
    """Embedding and a stack of single-layer LSTMs (400 -> 1150 -> 1150 -> 400 by default).

    The last layer outputs ``embed_size`` so that the decoder can share the embedding matrix.
    With ``cfg.qrnn`` the layers are QRNNs (``ulmfit.qrnn``; the first with a window of two
    steps), everything else unchanged: MultiFiT's AWD-QRNN.
    """

    def __init__(self, cfg: AWDLSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_size, padding_idx=cfg.pad_id)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # as fastai and awd-lstm-lm
        self.embed_dropout = EmbeddingDropout(cfg.embed_dropout)
        self.input_dropout = RNNDropout(cfg.input_dropout)
        sizes = [cfg.embed_size] + [cfg.hidden_size] * (cfg.num_layers - 1) + [cfg.embed_size]
        self.layers = nn.ModuleList(
            QRNNLayer(sizes[i], sizes[i + 1], cfg.weight_dropout, window=2 if i == 0 else 1)
            if cfg.qrnn
            else LSTMLayer(sizes[i], sizes[i + 1], cfg.weight_dropout)
            for i in range(cfg.num_layers)
        )
        self.hidden_dropouts = nn.ModuleList(
            RNNDropout(cfg.hidden_dropout) for _ in range(cfg.num_layers - 1)
        )

    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State:
        """Zero state, one pair per layer: an LSTM's ``(h, c)``, each (1, B, H_layer), or a
        QRNN's ``(c, previous input)``."""
        weight = self.embedding.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        return tuple(layer.zero_state(batch_size, device, dtype) for layer in self.layers)

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, T) tokens -> (B, T, E) word vectors, with embedding (word) dropout in training."""
        return self.embed_dropout(tokens, self.embedding)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        # tokens: (B, T) -> raw last-layer output (B, T, E) and the new state
        return self.forward_embedded(self.embed(tokens), state)

    def forward_embedded(
        self, embedded: Tensor, state: State | None = None
    ) -> tuple[Tensor, State]:
        """:meth:`forward` from the output of :meth:`embed` (B, T, E)."""
        if state is None:
            state = self.init_state(embedded.size(0), embedded.device)
        x = self.input_dropout(embedded)  # (B, T, E)
        new_state = []
        for i, (layer, layer_state) in enumerate(zip(self.layers, state, strict=True)):
            x, layer_state = layer(x, layer_state)  # (B, T, H_i)
            new_state.append(layer_state)
            if i < len(self.hidden_dropouts):
                x = self.hidden_dropouts[i](x)
        return x, tuple(new_state)


def detach_state(state: State | None) -> State | None:
    """Cut the graph between two BPTT windows while keeping the values (None: a stateless model,
    such as ``ulmfit.transformer.TransformerLM``)."""
    if state is None:
        return None
    return tuple((h.detach(), c.detach()) for h, c in state)


# ----------------------------------------------------------------------------- language model


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    raw: Tensor  # (B, T, E) last-layer output before output dropout (for TAR)
    dropped: Tensor  # (B, T, E) the same after output dropout (for AR)
    state: State


class LMLoss(NamedTuple):
    loss: Tensor  # scalar mean cross entropy
    raw: Tensor  # (B, T, E)
    dropped: Tensor  # (B, T, E)
    state: State


class LanguageModel(nn.Module):
    """AWD-LSTM encoder, output locked dropout and a linear decoder tied to the embedding."""

    def __init__(self, cfg: AWDLSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = AWDLSTM(cfg)
        self.output_dropout = RNNDropout(cfg.output_dropout)
        self.decoder = nn.Linear(cfg.embed_size, cfg.vocab_size, bias=cfg.out_bias)
        if cfg.out_bias:
            nn.init.zeros_(self.decoder.bias)
        if cfg.tie_weights:  # the same Parameter, hence the same storage
            self.decoder.weight = self.encoder.embedding.weight

    def forward(self, tokens: Tensor, state: State | None = None) -> LMOutput:
        raw, state = self.encoder(tokens, state)  # (B, T, E)
        dropped = self.output_dropout(raw)
        return LMOutput(self.decoder(dropped), raw, dropped, state)  # logits (B, T, V)

    def forward_loss(self, tokens: Tensor, targets: Tensor, state: State | None = None) -> LMLoss:
        """Mean cross entropy of next-token prediction without materialising all the logits.

        Same value and gradients as ``F.cross_entropy(forward(...).logits, targets)``, computed
        in row chunks by `decoder_cross_entropy` (faster on CPU, far less memory).
        """
        raw, state = self.encoder(tokens, state)
        dropped = self.output_dropout(raw)
        loss = decoder_cross_entropy(
            dropped.reshape(-1, dropped.size(-1)),
            self.decoder.weight,
            self.decoder.bias,
            targets.reshape(-1),
        )
        return LMLoss(loss, raw, dropped, state)


# ----------------------------------------------------------------------------- classifier


def masked_max_sum(outputs: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Max and sum over the steps of (B, t, E) ``outputs`` where (B, t, 1) ``real`` is true:
    (B, E) each. Chunk by chunk, ``torch.maximum`` and ``+`` combine them exactly."""
    return (
        outputs.masked_fill(~real, float("-inf")).amax(dim=1),
        outputs.masked_fill(~real, 0.0).sum(dim=1),
    )


def masked_concat_pool(outputs: Tensor, lengths: Tensor) -> Tensor:
    """``[h_last, max over time, mean over time]`` of the real (unpadded) steps.

    outputs: (B, T, E) right-padded; lengths: (B,) >= 1 -> (B, 3E). Padding never enters.
    """
    last = outputs[torch.arange(outputs.size(0), device=outputs.device), lengths - 1]  # (B, E)
    return torch.cat([last, masked_max_mean(outputs, lengths)], dim=1)


def masked_max_mean(outputs: Tensor, lengths: Tensor) -> Tensor:
    """``[max over time, mean over time]`` of the real steps: (B, T, E), (B,) -> (B, 2E)."""
    steps = torch.arange(outputs.size(1), device=outputs.device)
    real = (steps[None, :] < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
    max_pool, sum_pool = masked_max_sum(outputs, real)
    return torch.cat([max_pool, sum_pool / lengths[:, None].to(outputs.dtype)], dim=1)


class PooledOutput(NamedTuple):
    features: Tensor  # (B, pooled_size): [h_last, max, mean] (+ the word vectors' [max, mean])
    activation: Tensor  # scalar: mean squared last-layer output in the gradient window (AR)
    temporal: Tensor  # scalar: mean squared step-to-step change of it (TAR)


class ClassifierOutput(NamedTuple):
    logits: Tensor  # (B, C)
    activation: Tensor  # scalar, as in PooledOutput
    temporal: Tensor  # scalar


class PoolingClassifierHead(nn.Module):
    """BatchNorm -> Dropout -> Linear -> ReLU -> BatchNorm -> Dropout -> Linear (section 3.2)."""

    def __init__(
        self, in_features: int, hidden: int, num_classes: int, dropouts: tuple[float, float]
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm1d(in_features),
            nn.Dropout(dropouts[0]),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropouts[1]),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, pooled: Tensor) -> Tensor:  # (B, 3E) -> logits (B, C)
        return self.layers(pooled)


class SequenceClassifier(nn.Module):
    """AWD-LSTM encoder run with BPT3C, masked concat pooling and the pooling head."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = AWDLSTM(cfg.encoder)
        self.head = PoolingClassifierHead(
            cfg.pooled_size, cfg.head_hidden, cfg.num_classes, cfg.head_dropouts
        )

    def pooled_features(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """BPT3C (section 3.3): (B, T) right-padded tokens, (B,) lengths -> (B, pooled_size).

        See :meth:`pooled_with_activations`, of which this is the features alone.
        """
        return self.pooled_with_activations(tokens, lengths, activations=False).features

    def pooled_with_activations(
        self, tokens: Tensor, lengths: Tensor, *, activations: bool = True
    ) -> PooledOutput:
        """BPT3C (section 3.3): (B, T) right-padded tokens, (B,) lengths -> features
        (B, ``cfg.pooled_size``).

        The batch runs in chunks of ``bptt`` with the state carried from chunk to chunk. Max,
        sum and the last real output are accumulated across chunks, masked per document, so
        padding never enters the pooled features. Chunks that lie entirely before every
        document's last ``max_len`` tokens run without a graph (their contributions enter as
        constants, bounding memory); from there on gradients flow through the chunks and the
        carried state. The window starts at the shortest document's window, so each document,
        short or long, gets gradients through at least its last ``max_len`` tokens; length-bucketed
        batches keep the extra span small.

        With ``activations``, the AR and TAR terms of the last layer's output are averaged over
        the real steps of the chunks inside the gradient window (the steps gradients reach):
        ``mean(h_t ** 2)`` and ``mean((h_t - h_{t-1}) ** 2)`` (see ``ulmfit.regularization``).
        """
        batch_size = tokens.size(0)
        lengths = lengths.to(tokens.device)
        if int(lengths.min()) < 1 or int(lengths.max()) > tokens.size(1):
            raise ValueError(f"lengths must lie in [1, {tokens.size(1)}], got {lengths.tolist()}")
        longest = int(lengths.max())
        window_start = max(0, int(lengths.min()) - self.cfg.max_len)
        state = self.encoder.init_state(batch_size, tokens.device)
        batch_index = torch.arange(batch_size, device=tokens.device)
        running_max = running_sum = last = word_max = word_sum = None
        entered_window = False
        squares = changes = counted = changed = tokens.new_zeros((), dtype=torch.float32)
        previous = None  # (B, 1, E) the last output of the previous chunk in the window
        for start in range(0, longest, self.cfg.bptt):
            chunk = tokens[:, start : start + self.cfg.bptt]  # (B, t)
            in_window = start + chunk.size(1) > window_start
            if in_window and not entered_window:
                state, entered_window = detach_state(state), True
            with torch.set_grad_enabled(in_window and torch.is_grad_enabled()):
                embedded = self.encoder.embed(chunk)  # (B, t, E)
                output, state = self.encoder.forward_embedded(embedded, state)  # (B, t, E)
                # Pool in fp32: under bf16 autocast the pooled features' spread across
                # documents can be smaller than bf16's resolution of their mean.
                output = output.float()
                steps = start + torch.arange(chunk.size(1), device=tokens.device)
                real = (steps[None, :] < lengths[:, None]).unsqueeze(-1)  # (B, t, 1)
                if self.cfg.pool_embeddings:
                    chunk_word_max, chunk_word_sum = masked_max_sum(embedded.float(), real)
                    if word_max is None:
                        word_max, word_sum = chunk_word_max, chunk_word_sum
                    else:
                        word_max = torch.maximum(word_max, chunk_word_max)
                        word_sum = word_sum + chunk_word_sum
                chunk_max, chunk_sum = masked_max_sum(output, real)  # (B, E) each
                offset = (lengths - 1 - start).clamp(0, chunk.size(1) - 1)  # (B,)
                ends_here = ((lengths - 1 - start) >= 0) & ((lengths - 1 - start) < chunk.size(1))
                chunk_last = output[batch_index, offset]  # (B, E)
                if running_max is None:
                    running_max, running_sum, last = chunk_max, chunk_sum, chunk_last
                else:
                    running_max = torch.maximum(running_max, chunk_max)
                    running_sum = running_sum + chunk_sum
                    last = torch.where(ends_here[:, None], chunk_last, last)
                if activations and in_window:
                    squares = squares + output.pow(2).masked_fill(~real, 0.0).sum()
                    counted = counted + real.sum() * output.size(-1)
                    # h_t - h_{t-1}, across the chunk boundary too: (B, t or t-1, E)
                    seq = output if previous is None else torch.cat([previous, output], dim=1)
                    change = seq[:, 1:] - seq[:, :-1]
                    has_previous = real[:, real.size(1) - change.size(1) :]  # right padding
                    changes = changes + change.pow(2).masked_fill(~has_previous, 0.0).sum()
                    changed = changed + has_previous.sum() * output.size(-1)
                    previous = output[:, -1:]
        count = lengths[:, None].to(running_sum.dtype)
        pooled = [last, running_max, running_sum / count]
        if self.cfg.pool_embeddings:
            pooled += [word_max, word_sum / count]
        features = torch.cat(pooled, dim=1)
        return PooledOutput(
            features, squares / counted.clamp(min=1), changes / changed.clamp(min=1)
        )

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # (B, T), (B,) -> (B, C)
        return self.head(self.pooled_features(tokens, lengths))

    def forward_with_activations(self, tokens: Tensor, lengths: Tensor) -> ClassifierOutput:
        """Logits (B, C) and the AR / TAR terms of :meth:`pooled_with_activations`."""
        pooled = self.pooled_with_activations(tokens, lengths)
        return ClassifierOutput(self.head(pooled.features), pooled.activation, pooled.temporal)


# ----------------------------------------------------------------------------- helpers


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups for discriminative learning rates, lowest first.

    LM: one group per LSTM layer, then embedding + decoder (fastai's ``awd_lstm_lm_split``).
    Classifier: embedding, one group per LSTM layer, then the head.
    The other arms (``ulmfit.transformer``) give their own groups with a ``layer_groups`` method.
    """
    if callable(getattr(model, "layer_groups", None)):
        return model.layer_groups()

    def unique(params) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for p in params:
            seen.setdefault(id(p), p)  # the tied decoder weight appears once
        return list(seen.values())

    if isinstance(model, LanguageModel):
        layers = [list(layer.parameters()) for layer in model.encoder.layers]
        return [
            *layers,
            unique([*model.encoder.embedding.parameters(), *model.decoder.parameters()]),
        ]
    if isinstance(model, SequenceClassifier):
        layers = [list(layer.parameters()) for layer in model.encoder.layers]
        return [list(model.encoder.embedding.parameters()), *layers, list(model.head.parameters())]
    raise TypeError(
        f"layer_groups: expected LanguageModel or SequenceClassifier, got {type(model).__name__}"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under ``DistributedDataParallel``/``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def pad_id(model: nn.Module) -> int:
    """The padding token id of a classifier (``SequenceClassifier`` or an eval-only copy)."""
    encoder_cfg = getattr(getattr(unwrap_model(model), "cfg", None), "encoder", None)
    if encoder_cfg is None:
        raise InputError(
            type(model).__name__,
            "this model has no classifier config, so its padding token id is unknown",
            fix="pass a SequenceClassifier, or give pad_id= explicitly",
        )
    return int(encoder_cfg.pad_id)


def model_for(config: Any) -> nn.Module:
    """The module of a parsed config, whatever its backbone: ``AWDLSTMConfig`` ->
    ``LanguageModel``, ``ClassifierConfig`` -> ``SequenceClassifier``, and the configs of
    ``ulmfit.transformer`` -> its ``TransformerLM``, ``TransformerClassifier`` and
    ``FrozenFeatureClassifier``."""
    from ulmfit import transformer  # imports this module, so not at the top

    modules = {
        AWDLSTMConfig: LanguageModel,
        ClassifierConfig: SequenceClassifier,
        transformer.TransformerConfig: transformer.TransformerLM,
        transformer.TransformerClassifierConfig: transformer.TransformerClassifier,
        transformer.FrozenFeatureConfig: transformer.FrozenFeatureClassifier,
    }
    if type(config) not in modules:
        raise TypeError(f"model_for: no model for a {type(config).__name__}")
    return modules[type(config)](config)


def build_model(kind: str, config_dict: dict[str, Any]) -> nn.Module:
    """Rebuild a model from the config dict stored in a checkpoint (``to_dict(cfg)``).

    A dict with a ``backbone`` key is one of the other arms of ``ulmfit.transformer``; without
    one it is an AWD-LSTM (every checkpoint written before those arms existed).
    """
    from ulmfit import transformer  # imports this module, so not at the top

    configs = {
        ("lm", None): AWDLSTMConfig,
        ("classifier", None): ClassifierConfig,
        ("lm", "transformer"): transformer.TransformerConfig,
        ("classifier", "transformer"): transformer.TransformerClassifierConfig,
        ("classifier", "frozen_features"): transformer.FrozenFeatureConfig,
    }
    if kind not in ("lm", "classifier"):
        raise ValueError(f"build_model: kind must be 'lm' or 'classifier', got {kind!r}")
    key = (kind, config_dict.get("backbone"))
    if key not in configs:
        raise ValueError(f"build_model: no {kind!r} model with backbone {key[1]!r}")
    return model_for(from_dict(configs[key], config_dict, where="model"))
