"""GPT-style, BERT-style and ELMo-style arms, the controls beside the AWD-LSTM of ULMFiT.

* :class:`TransformerLM` and :class:`TransformerClassifier`: a pre-norm transformer (GPT-2,
  Radford et al. 2019, section 2.3: LayerNorm before attention and before the MLP, a final
  LayerNorm, learned positions, a decoder tied to the token embedding) trained either causally
  (GPT, Radford et al. 2018) or with masked tokens (BERT, Devlin et al. 2019, section 3.1: 15 %
  of the tokens, of which 80 % become the mask token, 10 % a random token, 10 % stay). They
  are drop-ins for ``LanguageModel`` and ``SequenceClassifier`` in ``ulmfit.train``.
* :class:`FrozenFeatureClassifier`: ELMo as features (Peters et al. 2018, section 3.2): a
  forward and a backward AWD-LSTM ``LanguageModel``, frozen, their layers mixed by a learned
  :class:`ScalarMix` (eq. 1) and read by a small pooling head.

Attention is always ``F.scaled_dot_product_attention``. All tensors are batch-first; no module
stores state (the transformers' ``state`` is always None).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulmfit.config import Dropout, Fraction, NonNegativeInt, OneOf, PositiveInt, Range
from ulmfit.cross_entropy import decoder_cross_entropy
from ulmfit.model import (
    AWDLSTMConfig,
    ClassifierConfig,
    ClassifierOutput,
    LanguageModel,
    LMLoss,
    LMOutput,
    PooledOutput,
    PoolingClassifierHead,
    State,
    masked_concat_pool,
    masked_max_sum,
)

IGNORE = -100  # target of a token the MLM loss skips (F.cross_entropy's ignore_index)
POOLINGS = ("last", "mean", "first")  # a transformer classifier's document summary


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes, dropout and training objective of the transformer encoder (and its LM).

    mask_id: the mask token (required for ``"mlm"``); special_ids: more ids MLM never selects
    (pad and mask never are). max_len bounds the sequence length: in ``LMPhase`` it must be at
    least ``bptt + 20`` (the longest variable-BPTT batch).
    """

    vocab_size: PositiveInt
    dim: PositiveInt = 256
    num_layers: PositiveInt = 4
    heads: PositiveInt = 4
    ff_mult: PositiveInt = 4
    max_len: PositiveInt = 512
    dropout: Dropout = 0.1
    objective: Annotated[str, OneOf(("causal", "mlm"))] = "causal"
    pad_id: NonNegativeInt = 1
    mask_id: NonNegativeInt | None = None
    mask_rate: Fraction = 0.15
    special_ids: tuple[NonNegativeInt, ...] = ()
    backbone: Annotated[str, OneOf(("transformer",))] = "transformer"

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.objective == "mlm" and self.mask_id is None:
            raise ValueError("objective 'mlm' needs a mask_id")
        ids = [self.pad_id, *self.special_ids] + (
            [self.mask_id] if self.mask_id is not None else []
        )
        if max(ids) >= self.vocab_size:
            raise ValueError(f"token ids {ids} must be below vocab_size {self.vocab_size}")

    def scaled(self, multiplier: float) -> TransformerConfig:
        """The dropout times ``multiplier``: each phase's ``dropout_multiplier``, as for the
        AWD-LSTM's five dropouts (:meth:`ulmfit.model.AWDLSTMConfig.scaled`)."""
        return dataclasses.replace(self, dropout=self.dropout * multiplier)


@dataclass(frozen=True)
class TransformerClassifierConfig:
    """A transformer encoder, a pooling of its last layer and the pooling head.

    pooling: ``"last"`` (the last real token; the summary of a causal encoder), ``"mean"``
    (masked mean) or ``"first"`` (the first token, ``xxbos``: BERT's ``[CLS]``; MLM only, since
    a causal encoder's first position sees nothing else). Documents longer than
    ``encoder.max_len`` are cut to their first ``max_len`` tokens.
    """

    encoder: TransformerConfig
    num_classes: Annotated[int, Range(2)]
    pooling: Annotated[str, OneOf(POOLINGS)] = "last"
    head_hidden: PositiveInt = ClassifierConfig.head_hidden
    head_dropouts: tuple[Dropout, Dropout] = ClassifierConfig.head_dropouts
    backbone: Annotated[str, OneOf(("transformer",))] = "transformer"

    def __post_init__(self) -> None:
        if self.pooling == "first" and self.encoder.objective == "causal":
            raise ValueError("pooling 'first' reads one token under a causal encoder: use 'last'")


# ----------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.causal, self.dropout = cfg.heads, cfg.objective == "causal", cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, real: Tensor | None = None) -> Tensor:
        # x: (B, T, D); real: (B, T) True at real tokens (keys), None: all real
        batch, steps, dim = x.shape
        q, k, v = (
            t.view(batch, steps, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, T, d)
            for t in self.qkv(x).split(dim, dim=2)
        )
        # Causal: right padding lies after every real query, so the causal mask hides it.
        mask = None if real is None or self.causal else real[:, None, None, :]  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
        )  # (B, H, T, d)
        return self.proj(y.transpose(1, 2).reshape(batch, steps, dim))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(cfg.dim), SelfAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ff_mult * cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.ff_mult * cfg.dim, cfg.dim),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, real: Tensor | None = None) -> Tensor:  # (B, T, D)
        x = x + self.dropout(self.attn(self.attn_norm(x), real))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TransformerEncoder(nn.Module):
    """Token and learned position embeddings, the blocks and a final LayerNorm."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.embedding.weight[cfg.pad_id].zero_()

    def forward(
        self, tokens: Tensor, state: None = None, *, real: Tensor | None = None
    ) -> tuple[Tensor, None]:
        """tokens (B, T), real (B, T) or None -> last-layer output (B, T, D) and no state.

        ``state`` exists so that the encoder can stand where ``AWDLSTM`` does; it must be None.
        """
        if state is not None:
            raise ValueError("a transformer carries no state between batches; pass None")
        if tokens.size(1) > self.cfg.max_len:
            raise ValueError(f"{tokens.size(1)} tokens exceed max_len {self.cfg.max_len}")
        steps = torch.arange(tokens.size(1), device=tokens.device)
        x = self.embed_dropout(self.embedding(tokens) + self.positions(steps))  # (B, T, D)
        for block in self.blocks:
            x = block(x, real)
        return self.norm(x), None


def _block_groups(encoder: TransformerEncoder) -> list[list[nn.Parameter]]:
    """Embeddings (tokens and positions), then one group per block."""
    embeddings = [*encoder.embedding.parameters(), *encoder.positions.parameters()]
    return [embeddings, *(list(block.parameters()) for block in encoder.blocks)]


# ----------------------------------------------------------------------------- language model


def mlm_mask(
    tokens: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...] | list[int],
    generator: torch.Generator | None = None,
    rate: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: tokens (B, T) -> (inputs (B, T), targets (B, T)).

    Each token not in ``special_ids`` (nor ``mask_id``) is selected with probability ``rate``;
    a selected token becomes ``mask_id`` (80 %), a random non-special token (10 %) or stays
    (10 %). Targets hold the original token where selected and ``-100`` (ignored) elsewhere.
    ``generator`` None draws from torch's global generator (seeded and checkpointed by the loop).
    """
    draw_on = generator.device if generator is not None else tokens.device
    special = torch.tensor(sorted({*special_ids, mask_id}), device=tokens.device)

    def uniform() -> Tensor:
        return torch.rand(tokens.shape, generator=generator, device=draw_on).to(tokens.device)

    selected = ~torch.isin(tokens, special) & (uniform() < rate)
    action = uniform()
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=tokens.device)
    allowed[special] = False
    candidates = allowed.nonzero().squeeze(1)
    pick = torch.randint(len(candidates), tokens.shape, generator=generator, device=draw_on)
    inputs = torch.where(selected & (action < 0.8), mask_id, tokens)
    replaced = selected & (action >= 0.8) & (action < 0.9)
    inputs = torch.where(replaced, candidates[pick.to(tokens.device)], inputs)
    return inputs, tokens.masked_fill(~selected, IGNORE)


class TransformerLM(nn.Module):
    """The encoder and a linear decoder tied to the token embedding; ``LanguageModel``'s API.

    There is no output dropout: ``dropped`` is ``raw`` (the final LayerNorm's output), kept so
    that ``LMPhase`` can compute AR/TAR as it does for the AWD-LSTM (set them to 0 for this arm).
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TransformerEncoder(cfg)
        self.decoder = nn.Linear(cfg.dim, cfg.vocab_size)
        nn.init.zeros_(self.decoder.bias)
        self.decoder.weight = self.encoder.embedding.weight  # the same Parameter

    def forward(self, tokens: Tensor, state: None = None) -> LMOutput:
        raw, _ = self.encoder(tokens, state)  # (B, T, D)
        return LMOutput(self.decoder(raw), raw, raw, None)  # logits (B, T, V)

    def forward_loss(self, tokens: Tensor, targets: Tensor, state: None = None) -> LMLoss:
        """Mean cross entropy: of the next tokens ``targets`` (causal), or, for ``"mlm"``, of
        :meth:`forward_mlm_loss` with the global generator (``targets`` is then unused)."""
        if self.cfg.objective == "mlm":
            return self.forward_mlm_loss(tokens)
        raw, _ = self.encoder(tokens, state)
        loss = decoder_cross_entropy(
            raw.reshape(-1, raw.size(-1)),
            self.decoder.weight,
            self.decoder.bias,
            targets.reshape(-1),
        )
        return LMLoss(loss, raw, raw, None)

    def forward_mlm_loss(self, tokens: Tensor, generator: torch.Generator | None = None) -> LMLoss:
        """Mask ``tokens`` (B, T) with :func:`mlm_mask`; mean cross entropy at the selected
        positions (0, with a graph, when none was selected)."""
        cfg = self.cfg
        inputs, targets = mlm_mask(
            tokens,
            mask_id=cfg.mask_id,
            vocab_size=cfg.vocab_size,
            special_ids=(cfg.pad_id, *cfg.special_ids),
            generator=generator,
            rate=cfg.mask_rate,
        )
        raw, _ = self.encoder(inputs)  # (B, T, D)
        selected = targets != IGNORE
        if not bool(selected.any()):
            return LMLoss(raw.sum() * 0.0, raw, raw, None)
        loss = decoder_cross_entropy(
            raw[selected], self.decoder.weight, self.decoder.bias, targets[selected]
        )
        return LMLoss(loss, raw, raw, None)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings (the tied decoder weight with them), each block, final norm + decoder bias."""
        return [*_block_groups(self.encoder), [*self.encoder.norm.parameters(), self.decoder.bias]]


# ----------------------------------------------------------------------------- classifier


def _real_steps(lengths: Tensor, steps: int) -> Tensor:
    """(B,) lengths -> (B, T) True at the real (unpadded) steps."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def _activation_terms(hidden: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """AR and TAR terms (``mean(h ** 2)``, ``mean((h_t - h_{t-1}) ** 2)``) over real steps."""
    real = real.unsqueeze(-1)  # (B, T, 1)
    squares = hidden.pow(2).masked_fill(~real, 0.0).sum() / (real.sum() * hidden.size(-1))
    both = real[:, 1:] & real[:, :-1]
    change = (hidden[:, 1:] - hidden[:, :-1]).pow(2).masked_fill(~both, 0.0).sum()
    return squares, change / (both.sum() * hidden.size(-1)).clamp(min=1)


class TransformerClassifier(nn.Module):
    """Transformer encoder, one pooled vector and ``PoolingClassifierHead``;
    ``SequenceClassifier``'s API. The encoder takes a ``TransformerLM``'s encoder weights."""

    def __init__(self, cfg: TransformerClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TransformerEncoder(cfg.encoder)
        self.head = PoolingClassifierHead(
            cfg.encoder.dim, cfg.head_hidden, cfg.num_classes, cfg.head_dropouts
        )

    def pooled_with_activations(self, tokens: Tensor, lengths: Tensor) -> PooledOutput:
        """(B, T) right-padded tokens, (B,) lengths -> features (B, D) and AR/TAR terms."""
        max_len = self.cfg.encoder.max_len
        tokens, lengths = tokens[:, :max_len], lengths.to(tokens.device).clamp(max=max_len)
        real = _real_steps(lengths, tokens.size(1))  # (B, T)
        hidden, _ = self.encoder(tokens, real=real)  # (B, T, D)
        if self.cfg.pooling == "first":
            features = hidden[:, 0]
        else:  # [last, max, mean] of the real steps
            last, _, mean = masked_concat_pool(hidden, lengths).chunk(3, dim=1)
            features = last if self.cfg.pooling == "last" else mean
        return PooledOutput(features, *_activation_terms(hidden, real))

    def pooled_features(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # -> (B, D)
        return self.pooled_with_activations(tokens, lengths).features

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # (B, T), (B,) -> (B, C)
        return self.head(self.pooled_features(tokens, lengths))

    def forward_with_activations(self, tokens: Tensor, lengths: Tensor) -> ClassifierOutput:
        pooled = self.pooled_with_activations(tokens, lengths)
        return ClassifierOutput(self.head(pooled.features), pooled.activation, pooled.temporal)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings, each block, then final norm + head."""
        return [
            *_block_groups(self.encoder),
            [*self.encoder.norm.parameters(), *self.head.parameters()],
        ]


# ----------------------------------------------------------------------------- frozen features


class ScalarMix(nn.Module):
    """ELMo's layer mix (eq. 1): ``gamma * sum_j softmax(s)_j * h_j``."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))  # s, before the softmax
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers: Tensor) -> Tensor:  # (L, B, T, F) -> (B, T, F)
        return self.gamma * torch.einsum("l,lbtf->btf", self.weights.softmax(0), layers)


@dataclass(frozen=True)
class FrozenFeatureConfig:
    """Two frozen AWD-LSTM LMs (forward and backward, both ``encoder``) and the trained head.

    bptt: the LMs read each batch in chunks of this many steps, the state carried over, so
    without a graph (evaluation, prediction) memory grows with the batch times ``bptt``, not
    times the longest document. It changes neither the features nor their gradients."""

    encoder: AWDLSTMConfig
    num_classes: Annotated[int, Range(2)]
    head_hidden: PositiveInt = ClassifierConfig.head_hidden
    head_dropouts: tuple[Dropout, Dropout] = ClassifierConfig.head_dropouts
    bptt: PositiveInt = ClassifierConfig.bptt
    backbone: Annotated[str, OneOf(("frozen_features",))] = "frozen_features"


def backbone_name(config: Any) -> str:
    """The backbone of a model config as ``params.yaml`` names it: ``awd_lstm`` (an
    ``AWDLSTMConfig`` or ``ClassifierConfig``, and any other object), ``awd_qrnn`` (the same
    with ``qrnn``), ``transformer_causal``,
    ``transformer_mlm`` (an LM's or classifier's config), or ``frozen_features`` (the
    ELMo-style control)."""
    if isinstance(config, TransformerClassifierConfig):
        config = config.encoder
    if isinstance(config, TransformerConfig):
        return f"transformer_{config.objective}"
    if isinstance(config, FrozenFeatureConfig):
        return "frozen_features"
    encoder = getattr(config, "encoder", config)  # a ClassifierConfig's AWDLSTMConfig
    return "awd_qrnn" if getattr(encoder, "qrnn", False) else "awd_lstm"


def _reverse_real(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Index (B, T) that reverses each row's real steps and leaves padding in place."""
    steps = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)  # (B, T)
    flipped = lengths[:, None] - 1 - steps
    return torch.where(flipped >= 0, flipped, steps)


class FrozenFeatureClassifier(nn.Module):
    """ELMo-style control: frozen bidirectional AWD-LSTM features, ScalarMix, masked max+mean
    pooling and ``PoolingClassifierHead``. Only the mix and the head train.

    Layers are the embedding and each LSTM layer's output, of each direction; one mix serves
    both, as if they were concatenated. They differ in width (400, 1150, 1150, 400 by
    default), so each is zero-padded to the widest before mixing: no parameters beyond ELMo's
    ``s`` and ``gamma``. The LMs read ``cfg.bptt`` steps at a time (see :meth:`_pool`).
    """

    def __init__(self, cfg: FrozenFeatureConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.forward_lm, self.backward_lm = LanguageModel(cfg.encoder), LanguageModel(cfg.encoder)
        for param in [*self.forward_lm.parameters(), *self.backward_lm.parameters()]:
            param.requires_grad_(False)
        self.width = max(cfg.encoder.embed_size, cfg.encoder.hidden_size)
        self.mix = ScalarMix(cfg.encoder.num_layers + 1)
        self.head = PoolingClassifierHead(
            4 * self.width, cfg.head_hidden, cfg.num_classes, cfg.head_dropouts
        )
        self.train()

    @classmethod
    def from_language_models(
        cls, forward_lm: LanguageModel, backward_lm: LanguageModel, num_classes: int, **options
    ) -> FrozenFeatureClassifier:
        """A classifier over copies of two trained LMs of the same config; ``options``: the
        other fields of :class:`FrozenFeatureConfig` (``head_hidden``, ``bptt``...)."""
        if forward_lm.cfg != backward_lm.cfg:
            raise ValueError("the forward and backward language models differ in config")
        model = cls(FrozenFeatureConfig(forward_lm.cfg, num_classes, **options))
        model.forward_lm.load_state_dict(forward_lm.state_dict())
        model.backward_lm.load_state_dict(backward_lm.state_dict())
        return model

    def train(self, mode: bool = True) -> FrozenFeatureClassifier:
        """The language models stay in eval mode (no dropout) whatever ``mode`` is."""
        super().train(mode)
        self.forward_lm.eval()
        self.backward_lm.eval()
        return self

    def _layers(self, lm: LanguageModel, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """(B, t) tokens -> the embedding and every LSTM layer's output, each zero-padded to
        width, (L, B, t, width), and the state after them."""
        encoder = lm.encoder  # eval mode: its dropouts are the identity
        x = encoder.embedding(tokens)
        layers, new_state = [x], []
        for layer, layer_state in zip(encoder.layers, state, strict=True):
            x, layer_state = layer(x, layer_state)
            layers.append(x)
            new_state.append(layer_state)
        padded = [F.pad(h, (0, self.width - h.size(-1))) for h in layers]
        return torch.stack(padded), tuple(new_state)

    def _pool(self, lm: LanguageModel, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Masked max and mean over the real steps of ``lm``'s mixed layers: (B, width) each.

        The LM reads ``cfg.bptt`` steps at a time under ``no_grad``, its state carried from
        chunk to chunk; each chunk is mixed and pooled at once (in fp32, as BPT3C pools), so
        evaluation holds one chunk's layers at a time (training keeps each chunk's for the
        mix's gradients). Padding enters neither the max nor the sum.
        """
        state = lm.encoder.init_state(tokens.size(0), tokens.device)
        maxima, sums = [], []
        for start in range(0, int(lengths.max()), self.cfg.bptt):
            chunk = tokens[:, start : start + self.cfg.bptt]  # (B, t)
            with torch.no_grad():
                layers, state = self._layers(lm, chunk, state)  # (L, B, t, width)
            mixed = self.mix(layers).float()  # (B, t, width)
            real = _real_steps(lengths - start, chunk.size(1)).unsqueeze(-1)  # (B, t, 1)
            chunk_max, chunk_sum = masked_max_sum(mixed, real)
            maxima.append(chunk_max)
            sums.append(chunk_sum)
        mean = torch.stack(sums).sum(0) / lengths[:, None].to(torch.float32)
        return torch.stack(maxima).amax(0), mean

    def pooled_features(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) right-padded tokens, (B,) lengths -> masked [max, mean] of the mixed
        features, each forward then backward: (B, 4 * width).

        The mix is linear per step and channel, and max and mean ignore the order of steps, so
        each direction is mixed and pooled on its own: the backward LM reads each document's
        real tokens reversed, and its outputs need no re-aligning.
        """
        lengths = lengths.to(tokens.device)
        forward_max, forward_mean = self._pool(self.forward_lm, tokens, lengths)
        reversed_tokens = tokens.gather(1, _reverse_real(tokens, lengths))
        backward_max, backward_mean = self._pool(self.backward_lm, reversed_tokens, lengths)
        return torch.cat([forward_max, backward_max, forward_mean, backward_mean], dim=1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # (B, T), (B,) -> (B, C)
        return self.head(self.pooled_features(tokens, lengths))

    def forward_with_activations(self, tokens: Tensor, lengths: Tensor) -> ClassifierOutput:
        """Logits and zero AR/TAR terms: the encoders are frozen, there is nothing to regularise."""
        logits = self.forward(tokens, lengths)
        zero = logits.new_zeros(())
        return ClassifierOutput(logits, zero, zero)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The trainable parameters only: the mix, then the head."""
        return [list(self.mix.parameters()), list(self.head.parameters())]
