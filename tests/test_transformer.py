"""The GPT-, BERT- and ELMo-style arms of ``ulmfit.transformer`` (tiny configs, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ulmfit.checkpoint import latest_checkpoint, load_model, save_model
from ulmfit.config import ConfigError, from_dict, to_dict
from ulmfit.model import (
    AWDLSTMConfig,
    LanguageModel,
    SequenceClassifier,
    build_model,
    detach_state,
    layer_groups,
)
from ulmfit.optim import OptimizerConfig
from ulmfit.schedule import ScheduleConfig
from ulmfit.storage import TokenDocs
from ulmfit.train import (
    ClassifierTrainConfig,
    LMTrainConfig,
    TrainEvent,
    train_classifier,
    train_language_model,
)
from ulmfit.transformer import (
    IGNORE,
    FrozenFeatureClassifier,
    FrozenFeatureConfig,
    ScalarMix,
    TransformerClassifier,
    TransformerClassifierConfig,
    TransformerConfig,
    TransformerLM,
    mlm_mask,
)

VOCAB, DIM, BATCH, SEQ = 30, 32, 3, 9
PAD, BOS, MASK = 1, 2, 3
CAUSAL = TransformerConfig(
    vocab_size=VOCAB, dim=DIM, num_layers=2, heads=2, ff_mult=2, max_len=48, dropout=0.0
)
MLM = dataclasses.replace(CAUSAL, objective="mlm", mask_id=MASK, special_ids=(BOS,))
AWD = AWDLSTMConfig(vocab_size=VOCAB, embed_size=8, hidden_size=12, num_layers=2).scaled(0.0)


pytestmark = pytest.mark.usefixtures("one_thread_and_seed")


def tokens(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, seq))  # no pad, bos or mask


def classifier(encoder: TransformerConfig = CAUSAL, **changes) -> TransformerClassifier:
    cfg = TransformerClassifierConfig(encoder, num_classes=2, head_hidden=8, **changes)
    return TransformerClassifier(cfg)


def frozen(num_classes: int = 2) -> FrozenFeatureClassifier:
    cfg = FrozenFeatureConfig(AWD, num_classes=num_classes, head_hidden=8)
    return FrozenFeatureClassifier(cfg)


def all_models() -> dict[str, torch.nn.Module]:
    return {
        "causal_lm": TransformerLM(CAUSAL),
        "mlm_lm": TransformerLM(MLM),
        "causal_classifier": classifier(),
        "mlm_classifier": classifier(MLM, pooling="first"),
        "frozen_features": frozen(),
    }


# ------------------------------------------------------------------------------ shapes


def test_lm_shapes_tied_decoder_and_loss_equals_cross_entropy():
    model = TransformerLM(CAUSAL)
    x = tokens()
    out = model(x)
    assert out.logits.shape == (BATCH, SEQ, VOCAB)
    assert out.raw.shape == out.dropped.shape == (BATCH, SEQ, DIM)
    assert out.state is None
    assert model.decoder.weight is model.encoder.embedding.weight
    targets = tokens()
    loss = model.forward_loss(x, targets)
    expected = F.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert loss.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.state is None
    loss.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(seq=CAUSAL.max_len + 1))


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_classifier_shapes_and_backward(pooling: str):
    encoder = CAUSAL if pooling != "first" else MLM
    model = classifier(encoder, pooling=pooling)
    lengths = torch.tensor([SEQ, 5, 2])
    out = model.forward_with_activations(tokens(), lengths)
    assert out.logits.shape == (BATCH, 2)
    assert out.activation.shape == out.temporal.shape == ()
    assert model.pooled_features(tokens(), lengths).shape == (BATCH, DIM)
    (out.logits.sum() + out.activation + out.temporal).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_frozen_feature_shapes_and_only_the_mix_and_head_get_gradients():
    model = frozen(num_classes=3)
    lengths = torch.tensor([SEQ, 5, 2])
    width = max(AWD.embed_size, AWD.hidden_size)
    assert model.pooled_features(tokens(), lengths).shape == (BATCH, 4 * width)
    out = model.forward_with_activations(tokens(), lengths)
    assert out.logits.shape == (BATCH, 3)
    out.logits.sum().backward()
    for name, param in model.named_parameters():
        trained = name.startswith(("mix.", "head."))
        assert param.requires_grad == trained, name
        assert (param.grad is not None) == trained, name


def test_classifier_takes_the_lm_encoder_weights_and_cuts_long_documents():
    lm = TransformerLM(CAUSAL).eval()
    model = classifier().eval()
    model.encoder.load_state_dict(lm.encoder.state_dict())
    x = tokens(seq=CAUSAL.max_len + 5)
    lengths = torch.tensor([x.size(1), 4, 2])
    with torch.no_grad():
        raw = lm(x[:, : CAUSAL.max_len]).raw
        pooled = model.pooled_features(x, lengths)  # cut to max_len, not an error
    assert torch.equal(pooled[0], raw[0, -1])
    assert torch.equal(pooled[1], raw[1, 3])


# ------------------------------------------------------------------------------ masking


def test_causal_attention_never_looks_ahead_and_mlm_does():
    x = tokens()
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] - 4 + 1) % (VOCAB - 4) + 4  # another ordinary token
    for cfg, sees_future in ((CAUSAL, False), (MLM, True)):
        model = TransformerLM(cfg).eval()
        with torch.no_grad():
            before, after = model(x).logits, model(changed).logits
        assert not torch.equal(before[:, 5], after[:, 5])
        assert torch.equal(before[:, :5], after[:, :5]) != sees_future
        if sees_future:  # every earlier position changes
            assert all(not torch.equal(before[:, t], after[:, t]) for t in range(5))


@pytest.mark.parametrize("arm", ["causal_classifier", "mlm_classifier", "mean", "frozen"])
def test_padding_never_changes_a_documents_output(arm: str):
    model = {
        "causal_classifier": lambda: classifier(),
        "mlm_classifier": lambda: classifier(MLM, pooling="first"),
        "mean": lambda: classifier(MLM, pooling="mean"),
        "frozen": frozen,
    }[arm]().eval()
    docs = [tokens(1, n)[0] for n in (SEQ, 6, 3)]
    lengths = torch.tensor([len(d) for d in docs])
    padded = torch.full((3, SEQ), PAD)
    for row, doc in enumerate(docs):
        padded[row, : len(doc)] = doc
    noise = torch.where(padded == PAD, tokens(3, SEQ), padded)  # other tokens in the padding
    with torch.no_grad():
        batch = model(padded, lengths)
        assert torch.equal(model(noise, lengths), batch)
        for row, doc in enumerate(docs):
            alone = model(doc[None], lengths[row : row + 1])
            torch.testing.assert_close(batch[row], alone[0], rtol=0, atol=1e-5)


def _whole_document_pool(model: FrozenFeatureClassifier, doc: torch.Tensor) -> torch.Tensor:
    """The reference: every layer of both LMs over the whole (T,) document at once, the backward
    one on the reversed document and re-aligned, concatenated, mixed, then [max, mean]."""
    width = max(AWD.embed_size, AWD.hidden_size)

    def layers(lm: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:  # -> (L, T, width)
        x = lm.encoder.embedding(tokens[None])
        out = [x]
        for layer, state in zip(lm.encoder.layers, lm.encoder.init_state(1), strict=True):
            x, _ = layer(x, state)
            out.append(x)
        return torch.stack([F.pad(h[0], (0, width - h.size(-1))) for h in out])

    with torch.no_grad():
        backward = layers(model.backward_lm, doc.flip(0)).flip(1)  # at the document's positions
        features = torch.cat([layers(model.forward_lm, doc), backward], dim=-1)  # (L, T, 2W)
    mixed = model.mix(features[:, None])[0]  # (T, 2 * width)
    return torch.cat([mixed.amax(dim=0), mixed.mean(dim=0)])


def chunked(bptt: int = 4) -> FrozenFeatureClassifier:
    cfg = FrozenFeatureConfig(AWD, num_classes=2, head_hidden=8, bptt=bptt)
    model = FrozenFeatureClassifier(cfg)
    with torch.no_grad():  # an uneven mix and a scale, so that every layer counts
        model.mix.weights.copy_(torch.tensor([0.5, -1.0, 1.5]))
        model.mix.gamma.fill_(1.3)
    return model


def test_frozen_features_read_in_chunks_equal_whole_documents_and_their_gradients():
    model = chunked(bptt=4)
    lengths = torch.tensor([19, 13, 4, 3, 1])  # several chunks of 4, one, less than one
    x = tokens(5, 19)  # the padding holds ordinary tokens: only the mask keeps them out
    weights = torch.randn(5, 4 * max(AWD.embed_size, AWD.hidden_size))
    pooled = model.pooled_features(x, lengths)
    (pooled * weights).sum().backward()
    grads = [p.grad.clone() for p in model.mix.parameters()]
    model.zero_grad()
    expected = torch.stack([_whole_document_pool(model, x[b, :n]) for b, n in enumerate(lengths)])
    (expected * weights).sum().backward()
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    for grad, param in zip(grads, model.mix.parameters(), strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-6)


def test_frozen_lms_read_at_most_bptt_steps_at_a_time():
    model = chunked(bptt=4).eval()
    steps = []  # the steps of every input the LSTM layers and the mix see
    for module in [*model.forward_lm.encoder.layers, *model.backward_lm.encoder.layers]:
        module.register_forward_pre_hook(lambda _, args: steps.append(args[0].size(1)))
    model.mix.register_forward_pre_hook(lambda _, args: steps.append(args[0].size(2)))
    with torch.no_grad():
        model(tokens(3, 41), torch.tensor([41, 9, 2]))
    chunks = 11  # ceil(41 / 4), each through both directions' 2 layers and the mix
    assert len(steps) == 2 * chunks * (AWD.num_layers + 1)
    assert max(steps) == 4 and min(steps) == 1


# ------------------------------------------------------------------------------ MLM rule


def test_mlm_mask_follows_the_80_10_10_rule_and_never_selects_specials():
    vocab, specials = 60, (0, PAD, BOS)
    x = torch.randint(0, vocab, (400, 500), generator=torch.Generator().manual_seed(1))
    x[x == MASK] = 10  # the input holds no mask tokens

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return mlm_mask(
            x, mask_id=MASK, vocab_size=vocab, special_ids=specials, generator=generator
        )

    inputs, targets = draw(2)
    again = draw(2)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)  # seeded
    assert not torch.equal(draw(3)[1], targets)
    special = torch.isin(x, torch.tensor(specials))
    selected = targets != IGNORE
    assert not (selected & special).any()
    assert torch.equal(inputs[~selected], x[~selected])  # unselected tokens stay as they are
    assert torch.equal(targets[selected], x[selected])
    assert selected.sum() / (~special).sum() == pytest.approx(0.15, abs=0.003)
    picked, original = inputs[selected], x[selected]
    others = vocab - len(specials) - 1  # ids a random replacement can take
    masked = (picked == MASK).float().mean()
    kept = (picked == original).float().mean()
    replaced = ((picked != MASK) & (picked != original)).float().mean()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / others, abs=0.01)
    assert replaced == pytest.approx(0.1 * (1 - 1 / others), abs=0.01)
    assert not torch.isin(picked, torch.tensor(specials)).any()  # replacements are not special


# ------------------------------------------------------------------------------ overfitting


def overfit(model: torch.nn.Module, loss_fn, steps: int, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_causal_lm_overfits_one_batch():
    model = TransformerLM(CAUSAL)
    x = tokens(4, 17)
    losses = overfit(model, lambda: model.forward_loss(x[:, :-1], x[:, 1:]).loss, 40, lr=1e-2)
    assert losses[0] > 3.0 and losses[-1] < 0.1


def test_mlm_overfits_one_batch():
    model = TransformerLM(MLM)
    x = tokens(4, 16)

    def loss():  # the same masks every step: one batch
        return model.forward_mlm_loss(x, torch.Generator().manual_seed(0)).loss

    losses = overfit(model, loss, 40, lr=1e-2)
    assert losses[0] > 3.0 and losses[-1] < 0.1


def test_classifier_overfits_one_batch():
    model = classifier(CAUSAL, head_dropouts=(0.0, 0.0))
    x, lengths = tokens(8, 10), torch.tensor([10, 9, 8, 7, 6, 5, 4, 3])
    labels = torch.tensor([0, 1] * 4)
    losses = overfit(model, lambda: F.cross_entropy(model(x, lengths), labels), 30, lr=1e-2)
    assert losses[-1] < 0.05


# ------------------------------------------------------------------------------ layer groups


@pytest.mark.parametrize("name", list(all_models()))
def test_layer_groups_hold_every_trainable_parameter_once_in_order(name: str):
    model = all_models()[name]
    groups = layer_groups(model)
    flat = [p for group in groups for p in group]
    assert all(group for group in groups)
    assert len({id(p) for p in flat}) == len(flat)
    assert [id(p) for p in flat] == [id(p) for p in model.parameters() if p.requires_grad]
    if name == "frozen_features":
        assert groups == [list(model.mix.parameters()), list(model.head.parameters())]
    else:
        assert len(groups) == CAUSAL.num_layers + 2
        assert groups[0][0] is model.encoder.embedding.weight
        assert groups[1] == list(model.encoder.blocks[0].parameters())


# ------------------------------------------------------------------------------ frozen arm


def test_frozen_language_models_never_change_while_mix_and_head_train():
    model = frozen()
    lms = {
        "forward": {k: v.clone() for k, v in model.forward_lm.state_dict().items()},
        "backward": {k: v.clone() for k, v in model.backward_lm.state_dict().items()},
    }
    trained = {k: v.clone() for k, v in [*model.mix.state_dict().items()]}
    head = [p.detach().clone() for p in model.head.parameters()]
    # Every parameter handed over, with weight decay: the frozen ones must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, lengths, labels = tokens(4, 8), torch.tensor([8, 6, 5, 3]), torch.tensor([0, 1, 0, 1])
    model.train()
    assert not model.forward_lm.training and not model.backward_lm.training
    for _ in range(5):
        F.cross_entropy(model(x, lengths), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    for direction, lm in (("forward", model.forward_lm), ("backward", model.backward_lm)):
        after = lm.state_dict()
        assert all(torch.equal(after[k], v) for k, v in lms[direction].items()), direction
    assert all(not torch.equal(v, model.mix.state_dict()[k]) for k, v in trained.items())
    assert all(not torch.equal(p, q) for p, q in zip(head, model.head.parameters(), strict=True))


def test_scalar_mix_is_a_softmax_weighted_sum_times_gamma():
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.0, 1.0, 2.0]))
        mix.gamma.fill_(2.0)
    layers = torch.randn(3, 2, 4, 5)
    weights = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    expected = 2.0 * sum(w * layer for w, layer in zip(weights, layers, strict=True))
    torch.testing.assert_close(mix(layers), expected)


def test_from_language_models_copies_both_directions():
    forward, backward = LanguageModel(AWD), LanguageModel(AWD)
    model = FrozenFeatureClassifier.from_language_models(forward, backward, num_classes=2)
    state = model.backward_lm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backward.state_dict().items())
    assert not all(torch.equal(state[k], v) for k, v in forward.state_dict().items())


# ------------------------------------------------------------------------------ configs, files


def test_configs_are_validated_from_dicts():
    good = to_dict(MLM)
    assert from_dict(TransformerConfig, good) == MLM
    for bad, message in (
        ({"heads": 5}, "divisible"),
        ({"mask_id": None}, "mask_id"),
        ({"objective": "prefix"}, "one of causal, mlm"),
        ({"mask_id": VOCAB}, "below vocab_size"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(TransformerConfig, {**good, **bad})
    with pytest.raises(ConfigError, match="causal encoder"):
        from_dict(
            TransformerClassifierConfig,
            {"encoder": to_dict(CAUSAL), "num_classes": 2, "pooling": "first"},
        )
    with pytest.raises(ValueError, match="no 'lm' model with backbone 'frozen_features'"):
        build_model("lm", to_dict(frozen().cfg))
    before_bptt = {k: v for k, v in to_dict(frozen().cfg).items() if k != "bptt"}
    assert build_model("classifier", before_bptt).cfg.bptt == 70  # older model files load


def test_the_awd_lstm_paths_are_unchanged():
    lm = build_model("lm", to_dict(AWD))  # no backbone key: an AWD-LSTM, as before
    assert type(lm) is LanguageModel
    assert len(layer_groups(lm)) == AWD.num_layers + 1
    assert layer_groups(lm)[-1][0] is lm.encoder.embedding.weight  # embedding + decoder on top
    clf_cfg = {"encoder": to_dict(AWD), "num_classes": 2}
    assert type(build_model("classifier", clf_cfg)) is SequenceClassifier
    state = lm(tokens()).state
    assert all(not h.requires_grad for pair in detach_state(state) for h in pair)
    assert detach_state(None) is None


@pytest.mark.parametrize("name", list(all_models()))
def test_model_file_round_trip_gives_identical_outputs(tmp_path: Path, name: str):
    model = all_models()[name].eval()
    kind = "lm" if name.endswith("_lm") else "classifier"
    path = save_model(
        tmp_path / "model.pt", model, kind=kind, config=to_dict(model.cfg), tokenizer_identity="t"
    )
    loaded, meta = load_model(path)
    assert type(loaded) is type(model) and meta["config"] == to_dict(model.cfg)
    x, lengths = tokens(), torch.tensor([SEQ, 4, 2])
    with torch.no_grad():
        if kind == "lm":
            assert torch.equal(loaded(x).logits, model(x).logits)
        else:
            assert torch.equal(loaded(x, lengths), model(x, lengths))


# ------------------------------------------------------------------------------ training API


def lm_docs() -> TokenDocs:
    rng = np.random.default_rng(0)
    return TokenDocs.from_lists(
        [[BOS, *rng.integers(4, VOCAB, int(rng.integers(8, 20))).tolist()] for _ in range(12)]
    )


def classifier_docs() -> TokenDocs:
    """Class 1 documents hold token 5 often, class 0 documents token 6."""
    rng = np.random.default_rng(0)
    lists = []
    for label in [0, 1] * 4:
        doc = rng.integers(7, VOCAB, int(rng.integers(4, 12)))
        doc[rng.random(len(doc)) < 0.4] = 5 if label else 6
        lists.append([BOS, *doc.tolist()])
    return TokenDocs.from_lists(lists, labels=[0, 1] * 4)


def test_train_language_model_runs_causal_and_mlm_transformers(tmp_path: Path):
    cfg = LMTrainConfig(epochs=2, batch_size=2, bptt=8, lr=1e-3, ar_alpha=0.0, tar_beta=0.0)
    events: list[TrainEvent] = []
    model = TransformerLM(dataclasses.replace(CAUSAL, dropout=0.1))
    result = train_language_model(
        model, lm_docs(), lm_docs(), cfg, checkpoint_dir=tmp_path, callback=events.append
    )
    steps = [e for e in events if e.kind == "step"]
    assert result.steps == len(steps) > 4 and result.tokens > 0
    assert np.isfinite(result.metrics["perplexity"])
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None
    again = train_language_model(model, lm_docs(), lm_docs(), cfg, checkpoint_dir=tmp_path)
    assert again.resumed_from == str(checkpoint) and again.steps == result.steps

    mlm = TransformerLM(MLM)
    before = mlm.encoder.embedding.weight.detach().clone()
    result = train_language_model(mlm, lm_docs(), None, dataclasses.replace(cfg, max_steps=3))
    assert result.steps == 3 and np.isfinite(result.train_loss)
    assert not torch.equal(before, mlm.encoder.embedding.weight.detach())


def test_train_classifier_unfreezes_transformer_groups_and_keeps_frozen_lms_fixed():
    cfg = ClassifierTrainConfig(
        epochs=4,
        batch_size=4,
        lr=1e-3,
        schedule=ScheduleConfig(discriminative=True),
        optim=OptimizerConfig(weight_decay=0.01),
        bn_recalibration_docs=8,
    )
    events: list[TrainEvent] = []
    model = classifier(dataclasses.replace(CAUSAL, dropout=0.1))
    result = train_classifier(
        model, classifier_docs(), classifier_docs(), cfg, callback=events.append
    )
    stages = [e.metrics["trainable_groups"] for e in events if e.kind == "stage"]
    assert stages == [1.0, 2.0, 3.0, 4.0]  # embeddings, 2 blocks, norm + head
    assert 0.0 <= result.metrics["error_rate"] <= 1.0

    arm = frozen()
    lm_state = {k: v.clone() for k, v in arm.forward_lm.state_dict().items()}
    result = train_classifier(arm, classifier_docs(), classifier_docs(), cfg)
    assert all(torch.equal(arm.forward_lm.state_dict()[k], v) for k, v in lm_state.items())
    assert all(not p.requires_grad for p in arm.backward_lm.parameters())
    assert np.isfinite(result.train_loss)
