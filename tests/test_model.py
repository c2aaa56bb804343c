"""Invariants of the AWD-LSTM, its regularisers, concat pooling and BPT3C (tiny configs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ulmfit.config import to_dict
from ulmfit.cross_entropy import decoder_cross_entropy
from ulmfit.model import (
    AWDLSTM,
    AWDLSTMConfig,
    ClassifierConfig,
    EmbeddingDropout,
    LanguageModel,
    LSTMLayer,
    RNNDropout,
    SequenceClassifier,
    WeightDropout,
    build_model,
    layer_groups,
    masked_concat_pool,
)

VOCAB, EMBED, HIDDEN, BATCH, SEQ = 99, 16, 24, 3, 7


pytestmark = pytest.mark.usefixtures("one_thread_and_seed")


def tiny_config(**changes) -> AWDLSTMConfig:
    return dataclasses.replace(
        AWDLSTMConfig(vocab_size=VOCAB, embed_size=EMBED, hidden_size=HIDDEN), **changes
    )


def tiny_classifier(
    bptt: int = 5, max_len: int = 1000, pool_embeddings: bool = False, **changes
) -> SequenceClassifier:
    return SequenceClassifier(
        ClassifierConfig(
            tiny_config(**changes), 4, bptt=bptt, max_len=max_len, pool_embeddings=pool_embeddings
        )
    )


def tokens(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq))  # never the pad id 1


def test_shapes_and_backward():
    model = LanguageModel(tiny_config())
    out = model(tokens())
    assert out.logits.shape == (BATCH, SEQ, VOCAB)
    assert out.raw.shape == out.dropped.shape == (BATCH, SEQ, EMBED)
    assert [tuple(h.shape) for h, _ in out.state] == [(1, BATCH, HIDDEN)] * 2 + [(1, BATCH, EMBED)]
    assert [tuple(c.shape) for _, c in out.state] == [(1, BATCH, HIDDEN)] * 2 + [(1, BATCH, EMBED)]
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    classifier = tiny_classifier()
    logits = classifier(tokens(seq=12), torch.tensor([12, 9, 3]))
    assert logits.shape == (BATCH, 4)
    logits.sum().backward()
    assert all(p.grad is not None for p in classifier.parameters())


def test_tied_weights_share_storage():
    model = LanguageModel(tiny_config())
    assert model.decoder.weight is model.encoder.embedding.weight
    assert model.decoder.weight.data_ptr() == model.encoder.embedding.weight.data_ptr()
    untied = LanguageModel(tiny_config(tie_weights=False))
    assert untied.decoder.weight.data_ptr() != untied.encoder.embedding.weight.data_ptr()


def test_locked_dropout_mask_is_constant_over_time():
    dropout = RNNDropout(0.5).train()
    out = dropout(torch.ones(BATCH, SEQ, EMBED))
    assert set(out.unique().tolist()) == {0.0, 2.0}  # dropped or rescaled by 1/(1-p)
    assert torch.equal(out, out[:, :1].expand_as(out))  # the same mask at every step
    assert not torch.equal(out[0], out[1])  # but one mask per sequence
    x = torch.randn(BATCH, SEQ, EMBED)
    assert torch.equal(dropout.eval()(x), x)


def test_weight_dropout_resampled_identity_in_eval_and_gradient_reaches_raw_weight():
    layer = LSTMLayer(EMBED, HIDDEN, weight_dropout=0.5).train()
    first, second = layer.flat_weights()[1], layer.flat_weights()[1]
    assert not torch.equal(first, second)  # a fresh mask every forward pass
    zero = first == 0
    assert 0.3 < zero.float().mean() < 0.7
    assert torch.allclose(first[~zero], layer.weight_hh[~zero] * 2)
    assert torch.equal(layer.flat_weights()[0], layer.weight_ih)  # only weight_hh is dropped

    x = torch.randn(BATCH, SEQ, EMBED)
    state = (torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, HIDDEN))
    out_a, _ = layer(x, state)
    out_b, _ = layer(x, state)
    assert not torch.allclose(out_a, out_b)
    out_a.sum().backward()
    assert layer.weight_hh.grad is not None and layer.weight_hh.grad.abs().sum() > 0

    layer.eval()
    assert layer.flat_weights()[1] is layer.weight_hh
    assert torch.equal(layer(x, state)[0], layer(x, state)[0])
    reference = torch.nn.LSTM(EMBED, HIDDEN, batch_first=True)
    reference.load_state_dict({f"{k}_l0": v for k, v in layer.state_dict().items()})
    assert torch.allclose(layer(x, state)[0], reference(x, state)[0], atol=1e-6)

    assert torch.equal(WeightDropout(0.5).eval()(layer.weight_hh), layer.weight_hh)


def test_embedding_dropout_drops_whole_words():
    embedding = torch.nn.Embedding(VOCAB, EMBED)
    dropout = EmbeddingDropout(0.5).train()
    words = torch.arange(10).repeat(BATCH, 2)  # (3, 20): each word at 6 positions
    out = dropout(words, embedding)  # (B, T, E)
    row_zero = (out == 0).all(dim=-1)  # (B, T)
    assert ((out == 0).any(dim=-1) == row_zero).all()  # all columns of a row, or none
    for word in range(10):
        at_word = row_zero[words == word]
        assert at_word.all() or not at_word.any()  # the same decision at every position
    assert 0 < row_zero.float().mean() < 1
    kept = ~row_zero
    assert torch.allclose(out[kept], embedding(words)[kept] * 2)
    assert torch.equal(dropout.eval()(words, embedding), embedding(words))


def test_concat_pool_ignores_padding():
    outputs = torch.randn(BATCH, SEQ, EMBED)
    lengths = torch.tensor([7, 4, 1])
    pooled = masked_concat_pool(outputs, lengths)
    assert pooled.shape == (BATCH, 3 * EMBED)
    padded = torch.cat([outputs, torch.randn(BATCH, 5, EMBED) * 100], dim=1)
    for b in range(BATCH):  # garbage where the padding is
        padded[b, lengths[b] :] = torch.randn(SEQ + 5 - lengths[b], EMBED) * 100
    assert torch.allclose(masked_concat_pool(padded, lengths), pooled, atol=1e-6, rtol=0)
    real = outputs[1, :4]
    assert torch.allclose(pooled[1], torch.cat([real[-1], real.max(0).values, real.mean(0)]))


@pytest.mark.parametrize("pool_embeddings", [False, True])
def test_classifier_output_independent_of_padding_and_of_chunking(pool_embeddings):
    classifier = tiny_classifier(bptt=4, pool_embeddings=pool_embeddings).eval()
    docs = tokens(seq=13)
    lengths = torch.tensor([13, 6, 2])
    with torch.no_grad():
        chunked = classifier.pooled_features(docs, lengths)
        padded = torch.cat([docs, torch.ones(BATCH, 9, dtype=torch.long)], dim=1)
        assert torch.allclose(classifier.pooled_features(padded, lengths), chunked, atol=1e-6)
        for b in range(BATCH):  # one document alone, no padding, one chunk: the same features
            classifier.cfg = dataclasses.replace(classifier.cfg, bptt=100)
            alone = classifier.pooled_features(docs[b : b + 1, : lengths[b]], lengths[b : b + 1])
            classifier.cfg = dataclasses.replace(classifier.cfg, bptt=4)
            assert torch.allclose(alone[0], chunked[b], atol=1e-6)


def test_pool_embeddings_adds_the_word_vectors_max_and_mean():
    plain = tiny_classifier(bptt=4).eval()
    pooling = tiny_classifier(bptt=4, pool_embeddings=True).eval()
    pooling.encoder.load_state_dict(plain.encoder.state_dict())
    docs, lengths = tokens(seq=13), torch.tensor([13, 6, 2])
    assert pooling.head.layers[0].num_features == 5 * EMBED == pooling.cfg.pooled_size
    with torch.no_grad():
        features = pooling.pooled_features(docs, lengths)
        assert torch.equal(features[:, : 3 * EMBED], plain.pooled_features(docs, lengths))
        for b, length in enumerate(lengths.tolist()):  # the real steps' word vectors only
            words = pooling.encoder.embedding(docs[b, :length])  # (length, E)
            expected = torch.cat([words.max(0).values, words.mean(0)])
            assert torch.allclose(features[b, 3 * EMBED :], expected, atol=1e-6)


def test_bpt3c_gradient_reaches_the_first_chunk():
    bptt = 5
    classifier = tiny_classifier(bptt=bptt, max_len=5 * bptt).train()
    doc = tokens(batch=1, seq=5 * bptt)
    doc[0, :bptt] = torch.arange(10, 10 + bptt)  # words that occur only in the first chunk
    doc[0, bptt:] = torch.randint(20, VOCAB, (4 * bptt,))
    pair = torch.cat([doc, doc])  # batch norm needs two rows in training mode
    classifier(pair, torch.tensor([5 * bptt] * 2)).sum().backward()
    grad = classifier.encoder.embedding.weight.grad
    assert grad[10 : 10 + bptt].abs().sum(dim=1).gt(0).all()
    with pytest.raises(ValueError, match="lengths"):
        classifier(pair, torch.tensor([5 * bptt, 0]))


def test_bpt3c_no_gradient_before_the_max_len_window():
    bptt = 5
    classifier = tiny_classifier(bptt=bptt, max_len=2 * bptt).train()
    doc = tokens(batch=2, seq=5 * bptt)
    doc[:, :bptt] = torch.arange(10, 10 + bptt)
    doc[:, bptt:] = torch.randint(20, VOCAB, (2, 4 * bptt))
    classifier(doc, torch.tensor([5 * bptt] * 2)).sum().backward()
    grad = classifier.encoder.embedding.weight.grad
    assert grad[10 : 10 + bptt].abs().sum() == 0  # first chunk: outside the window, constants
    assert grad[20:].abs().sum() > 0


def test_bpt3c_short_document_beside_a_long_one_gets_gradient():
    """The window is per document: a short review batched with a long one still trains."""
    bptt = 5
    classifier = tiny_classifier(bptt=bptt, max_len=2 * bptt).train()
    batch = tokens(batch=2, seq=6 * bptt)
    batch[0] = torch.randint(20, VOCAB, (6 * bptt,))  # long document
    batch[1, :bptt] = torch.arange(10, 10 + bptt)  # short document: one chunk of unique words
    batch[1, bptt:] = 1  # padding
    classifier(batch, torch.tensor([6 * bptt, bptt])).sum().backward()
    grad = classifier.encoder.embedding.weight.grad
    assert grad[10 : 10 + bptt].abs().sum(dim=1).gt(0).all()


def test_state_in_state_out_continues_a_sequence():
    model = AWDLSTM(tiny_config()).eval()
    sequence = tokens(seq=12)
    whole, whole_state = model(sequence)
    first, state = model(sequence[:, :5])
    second, state = model(sequence[:, 5:], state)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-6)
    for (h, c), (h_ref, c_ref) in zip(state, whole_state, strict=True):
        assert torch.allclose(h, h_ref, atol=1e-6) and torch.allclose(c, c_ref, atol=1e-6)
    assert not any(isinstance(v, torch.Tensor) for v in vars(model).values())  # no hidden state


def test_decoder_cross_entropy_matches_unfused():
    hidden = torch.randn(23, EMBED, requires_grad=True)
    weight = torch.randn(VOCAB, EMBED, requires_grad=True)
    bias = torch.randn(VOCAB, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    fused = decoder_cross_entropy(hidden, weight, bias, targets, chunk_rows=5)
    (2 * fused).backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    (2 * reference).backward()
    assert torch.allclose(fused, reference, atol=1e-6)
    for got, t in zip(grads, (hidden, weight, bias), strict=True):
        assert torch.allclose(got, t.grad, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(decoder_cross_entropy(hidden, weight, bias, targets), reference)


def test_language_model_overfits_one_batch():
    model = LanguageModel(tiny_config().scaled(0.0))
    sequence = tokens(seq=8)
    x, y = sequence[:, :-1], sequence[:, 1:]  # next-token prediction
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(500):
        optimizer.zero_grad()
        loss = model.forward_loss(x, y).loss
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # from ln(99) = 4.6


def test_classifier_overfits_one_batch():
    classifier = tiny_classifier(bptt=4).train()
    docs, lengths = tokens(batch=8, seq=10), torch.tensor([10, 9, 9, 8, 7, 7, 5, 3])
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(docs, lengths), labels)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    classifier.eval()
    assert torch.equal(classifier(docs, lengths).argmax(1), labels)


def test_layer_groups():
    model = LanguageModel(tiny_config())
    groups = layer_groups(model)
    assert len(groups) == 4
    assert [len(g) for g in groups] == [4, 4, 4, 2]  # embedding (= decoder weight) + decoder bias
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    classifier = tiny_classifier()
    groups = layer_groups(classifier)
    assert len(groups) == 5
    assert groups[0] == [classifier.encoder.embedding.weight]
    assert {id(p) for p in groups[-1]} == {id(p) for p in classifier.head.parameters()}
    assert sum(len(g) for g in groups) == len(list(classifier.parameters()))


def test_build_model_rebuilds_from_config_dict():
    lm = LanguageModel(tiny_config())
    rebuilt = build_model("lm", to_dict(lm.cfg))
    rebuilt.load_state_dict(lm.state_dict())
    sequence = tokens()
    assert torch.equal(rebuilt.eval()(sequence).logits, lm.eval()(sequence).logits)
    classifier = tiny_classifier()
    again = build_model("classifier", to_dict(classifier.cfg))
    assert again.cfg == classifier.cfg
    with pytest.raises(ValueError, match="kind"):
        build_model("gpt", {})


def test_scaled_config_multiplies_every_dropout():
    cfg = tiny_config().scaled(0.5)
    assert (cfg.embed_dropout, cfg.input_dropout, cfg.hidden_dropout) == (0.05, 0.3, 0.1)
    assert (cfg.weight_dropout, cfg.output_dropout) == (0.25, 0.05)
    assert cfg.hidden_size == HIDDEN


def test_no_warnings_at_run_time(recwarn):
    model = LanguageModel(tiny_config())
    model(tokens()).logits.sum().backward()
    tiny_classifier()(tokens(seq=11), torch.tensor([11, 4, 2])).sum().backward()
    assert len(recwarn) == 0, [str(w.message) for w in recwarn]


def test_decoder_cross_entropy_under_bf16_autocast_is_close_to_fp32():
    hidden = torch.randn(40, EMBED, requires_grad=True)
    weight = (torch.randn(VOCAB, EMBED) * 0.3).requires_grad_()
    targets = torch.randint(0, VOCAB, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = decoder_cross_entropy(hidden.to(torch.bfloat16), weight, None, targets, 16)
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    grads = [hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight), targets)
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-2)
    for got, want in zip(grads, (hidden.grad, weight.grad), strict=True):
        assert (got - want).abs().max() < 2e-2 * want.abs().max()
