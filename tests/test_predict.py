"""Prediction: input order, batching invariance, backward direction, int8, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ulmfit.batches import ClassifierBatches, classifier_input
from ulmfit.errors import InputError
from ulmfit.model import AWDLSTMConfig, ClassifierConfig, SequenceClassifier
from ulmfit.predict import (
    TextClassifier,
    ensemble,
    length_sorted_batches,
    pad_batch,
    predict_proba,
)
from ulmfit.quantize import InferenceClassifier, Int8LSTM, quantize_dynamic_int8
from ulmfit.storage import TokenDocs

VOCAB = 60


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_classifier(
    seed: int = 0, num_classes: int = 3, vocab: int = VOCAB, pool_embeddings: bool = False
) -> SequenceClassifier:
    torch.manual_seed(seed)
    encoder = AWDLSTMConfig(vocab_size=vocab, embed_size=8, hidden_size=16, num_layers=3)
    # bptt 5 so that most documents span several BPT3C chunks
    config = ClassifierConfig(
        encoder=encoder, num_classes=num_classes, bptt=5, pool_embeddings=pool_embeddings
    )
    model = SequenceClassifier(config)
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for module in model.head.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def random_docs(n: int, seed: int = 1, max_len: int = 23, vocab: int = VOCAB) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # every document starts with a bos-like token (2), as the tokenizer's output does; the
    # length-1 documents are what an empty text encodes to
    lengths = rng.integers(1, max_len, size=n)
    lengths[:2] = 1
    return [[2, *rng.integers(2, vocab, size=length - 1).tolist()] for length in lengths]


def one_by_one(model, docs, *, backward=False) -> np.ndarray:
    rows = []
    with torch.no_grad():
        for doc in docs:
            doc = classifier_input(np.asarray(doc), backward)  # as in training
            tokens = torch.tensor([doc])
            logits = model(tokens, torch.tensor([len(doc)]))
            rows.append(torch.softmax(logits, dim=-1)[0].numpy())
    return np.stack(rows)


def test_probabilities_come_back_in_input_order():
    model = tiny_classifier()
    docs = random_docs(40)
    permutation = np.random.default_rng(7).permutation(len(docs))
    shuffled = [docs[i] for i in permutation]
    probs = predict_proba(model, shuffled, batch_size=8)
    assert probs.shape == (40, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, one_by_one(model, shuffled), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # and the same documents in the original order give the same rows, permuted
    np.testing.assert_allclose(
        predict_proba(model, docs, batch_size=8)[permutation], probs, atol=1e-5
    )


def test_batch_size_and_token_budget_do_not_change_probabilities():
    model = tiny_classifier()
    docs = random_docs(30)
    reference = predict_proba(model, docs, batch_size=1)
    for options in ({"batch_size": 4}, {"batch_size": 64}, {"batch_size": 64, "max_tokens": 40}):
        np.testing.assert_allclose(predict_proba(model, docs, **options), reference, atol=1e-5)


def test_token_docs_and_lists_agree():
    model = tiny_classifier()
    docs = random_docs(12)
    token_docs = TokenDocs.from_lists(docs)
    np.testing.assert_array_equal(
        predict_proba(model, token_docs, batch_size=5), predict_proba(model, docs, batch_size=5)
    )


def test_backward_runs_each_document_reversed():
    model = tiny_classifier(seed=3)
    docs = random_docs(20, seed=4)
    probs = predict_proba(model, docs, batch_size=6, backward=True)
    np.testing.assert_allclose(probs, one_by_one(model, docs, backward=True), atol=1e-5)
    assert not np.allclose(probs, predict_proba(model, docs, batch_size=6))


def test_length_sorted_batches_cover_every_document_once_and_respect_the_budget():
    lengths = np.array([5, 50, 3, 50, 1, 20, 7, 400])
    batches = length_sorted_batches(lengths, batch_size=3, max_tokens=100)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert batches[0].tolist() == [7]  # too long for the budget: alone, and first
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 100
    widths = [lengths[batch].max() for batch in batches]
    assert widths == sorted(widths, reverse=True)


def test_pad_batch_right_pads_and_reverses():
    tokens, lengths = pad_batch([np.array([2, 5, 6]), np.array([2])], pad_id=1, backward=True)
    assert tokens.tolist() == [[2, 6, 5, 2], [2, 2, 1, 1]]  # each closed by the boundary
    assert lengths.tolist() == [4, 2]


def test_prediction_frames_documents_as_training_does():
    docs = random_docs(10, seed=2)
    for backward in (False, True):
        batch = next(iter(ClassifierBatches(TokenDocs.from_lists(docs), 16, backward=backward)))
        tokens, lengths = pad_batch([np.array(docs[i]) for i in batch.index], 1, backward=backward)
        assert torch.equal(tokens, batch.tokens) and torch.equal(lengths, batch.lengths)


def test_empty_token_lists_are_rejected_and_no_documents_give_no_rows():
    model = tiny_classifier()
    with pytest.raises(ValueError, match="document 1 has no tokens"):
        predict_proba(model, [[2, 3], []])
    assert predict_proba(model, []).shape == (0, 3)


def test_prediction_restores_the_training_mode():
    model = tiny_classifier().train()
    predict_proba(model, random_docs(4))
    assert model.training


def test_ensemble_is_the_mean():
    forward = np.array([[0.2, 0.8], [0.6, 0.4]])
    backward = np.array([[0.4, 0.6], [0.8, 0.2]])
    np.testing.assert_allclose(ensemble(forward, backward), [[0.3, 0.7], [0.7, 0.3]])
    with pytest.raises(ValueError):
        ensemble(forward, backward[:1])


@pytest.mark.parametrize("pool_embeddings", [False, True])
def test_inference_classifier_matches_the_bpt3c_classifier(pool_embeddings):
    model = tiny_classifier(seed=5, pool_embeddings=pool_embeddings)
    docs = random_docs(25, seed=6)
    fast = InferenceClassifier(model)
    # one batch of very mixed lengths: most chunks run only some of the rows
    with torch.no_grad():
        tokens, lengths = pad_batch([np.array(doc) for doc in docs], pad_id=1)
        np.testing.assert_allclose(fast(tokens, lengths), model(tokens, lengths), atol=1e-5)
    np.testing.assert_allclose(
        predict_proba(fast, docs, batch_size=7), one_by_one(model, docs), atol=1e-5
    )


@pytest.mark.parametrize(
    ("lstm", "lstm_kind"), [("precomputed", "Int8LSTM"), ("fbgemm", "DynamicQuantizedLSTM")]
)
def test_int8_quantised_model_stays_close_to_fp32(lstm, lstm_kind):
    torch.manual_seed(0)
    encoder = AWDLSTMConfig(vocab_size=200, embed_size=32, hidden_size=64, num_layers=3)
    model = SequenceClassifier(ClassifierConfig(encoder=encoder, num_classes=2, bptt=16)).eval()
    with torch.no_grad():  # decisive logits, as after training, so argmax is meaningful
        model.head.layers[-1].weight.mul_(20)
    docs = random_docs(64, seed=8, max_len=60, vocab=200)
    quantized = quantize_dynamic_int8(model, lstm=lstm)
    kinds = [module._get_name() for module in quantized.modules()]
    assert kinds.count(lstm_kind) == 3 and kinds.count("DynamicQuantizedLinear") >= 2, kinds
    fp32 = predict_proba(model, docs, batch_size=16)
    int8 = predict_proba(quantized, docs, batch_size=16)
    assert np.abs(fp32 - int8).max() < 0.05
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.95
    # the original is untouched: still its own trainable fp32 layers
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


def test_int8_lstm_follows_the_lstm_equations():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(12, 20, batch_first=True).eval()
    x = torch.randn(3, 9, 12)
    with torch.no_grad():
        expected, _ = lstm(x)
        output, _ = Int8LSTM(lstm)(x)
    assert output.shape == (3, 9, 20)
    assert (output - expected).abs().max() < 0.02


# ------------------------------------------------------------------------------ TextClassifier


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ulmfit.tokenizer import TokenizerConfig, train_tokenizer

    rng = np.random.default_rng(0)
    words = ["good", "bad", "movie", "Film", "great", "awful", "plot", "acting", "the", "was"]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) + "!" for _ in range(300)]
    out = tmp_path_factory.mktemp("tok") / "spm.model"
    return train_tokenizer(texts, out, TokenizerConfig(vocab_size=300))


TEXTS = ["A great film, good acting.", "", "Bad plot. AWFUL movie!!!", "the film was good"]


def test_text_classifier_predicts_labels_in_order(tokenizer):
    model = tiny_classifier(num_classes=2, vocab=tokenizer.vocab_size)
    classifier = TextClassifier(tokenizer, model, label_names=["neg", "pos"])
    labels, probs = classifier.predict(TEXTS, batch_size=2)
    assert probs.shape == (4, 2)
    expected = one_by_one(model, tokenizer.encode(TEXTS))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert labels == [["neg", "pos"][i] for i in expected.argmax(1)]
    with pytest.raises(TypeError):
        classifier.predict("one string")


def test_text_classifier_round_trip_with_backward_model(tokenizer, tmp_path):
    forward = tiny_classifier(seed=1, num_classes=2, vocab=tokenizer.vocab_size)
    backward = tiny_classifier(seed=2, num_classes=2, vocab=tokenizer.vocab_size)
    classifier = TextClassifier(tokenizer, forward, backward, label_names=["neg", "pos"])
    _, probs = classifier.predict(TEXTS)
    docs = tokenizer.encode(TEXTS)
    np.testing.assert_allclose(
        probs,
        ensemble(one_by_one(forward, docs), one_by_one(backward, docs, backward=True)),
        atol=1e-5,
    )
    classifier.save(tmp_path / "clf")
    manifest = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert manifest["tokenizer_identity"] == tokenizer.identity
    loaded = TextClassifier.load(tmp_path / "clf")
    labels, loaded_probs = loaded.predict(TEXTS)
    np.testing.assert_array_equal(loaded_probs, probs)
    assert loaded.label_names == ["neg", "pos"] and len(labels) == 4

    quantized = TextClassifier.load(tmp_path / "clf", quantize=True)
    assert np.abs(quantized.predict(TEXTS)[1] - probs).max() < 0.05


def test_loading_with_a_foreign_tokenizer_raises_input_error(tokenizer, tmp_path):
    model = tiny_classifier(num_classes=2, vocab=tokenizer.vocab_size)
    directory = TextClassifier(tokenizer, model, label_names=["neg", "pos"]).save(tmp_path / "clf")
    with open(directory / "tokenizer.model", "ab") as handle:  # another tokenizer file
        handle.write(b"\0")
    with pytest.raises(InputError, match="not the one the classifier was trained with"):
        TextClassifier.load(directory)


def test_loading_a_model_of_another_tokenizer_raises_input_error(tokenizer, tmp_path):
    from ulmfit.checkpoint import save_model
    from ulmfit.config import to_dict

    model = tiny_classifier(num_classes=2, vocab=tokenizer.vocab_size)
    directory = TextClassifier(tokenizer, model, label_names=["neg", "pos"]).save(tmp_path / "clf")
    save_model(
        directory / "forward.pt",
        model,
        kind="classifier",
        config=to_dict(model.cfg),
        tokenizer_identity="0" * 64,
    )
    with pytest.raises(InputError, match="another tokenizer"):
        TextClassifier.load(directory)


def test_a_classifier_saved_before_the_boundary_token_is_refused(tokenizer, tmp_path):
    # format 1 classifiers read documents without the closing boundary token: this version
    # would feed them other input, so loading one must say so instead of predicting wrongly
    model = tiny_classifier(num_classes=2, vocab=tokenizer.vocab_size)
    directory = TextClassifier(tokenizer, model, label_names=["neg", "pos"]).save(tmp_path / "clf")
    manifest_path = directory / "classifier.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(InputError, match="without the closing boundary token") as raised:
        TextClassifier.load(directory)
    assert "classifier.json" in str(raised.value) and "retrain" in str(raised.value)


def test_loading_a_missing_directory_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        TextClassifier.load(tmp_path / "nothing")


def test_a_model_without_a_classifier_config_needs_an_explicit_pad_id():
    class Logits(torch.nn.Module):
        def forward(self, tokens, lengths):  # (B, T), (B,) -> (B, 2)
            return torch.zeros(tokens.size(0), 2)

    docs = random_docs(3, seed=1)
    with pytest.raises(InputError, match="padding token id"):
        predict_proba(Logits(), docs)
    assert predict_proba(Logits(), docs, pad_id=1).shape == (3, 2)
