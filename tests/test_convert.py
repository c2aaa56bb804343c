"""fastai AWD-LSTM weights, converted, give the same outputs in our modules (eval mode)."""

from __future__ import annotations

import re

import pytest
import torch

from ulmfit.convert import load_fastai_checkpoint, load_fastai_state_dict
from ulmfit.errors import InputError
from ulmfit.model import ClassifierConfig, LanguageModel, SequenceClassifier

fastai_text = pytest.importorskip("fastai.text.all")
pytestmark = pytest.mark.fastai

VOCAB, EMBED, HIDDEN, BPTT = 99, 16, 24, 6
FASTAI_CONFIG = dict(
    emb_sz=EMBED, n_hid=HIDDEN, n_layers=3, pad_token=1, output_p=0.1, hidden_p=0.15,
    input_p=0.25, embed_p=0.02, weight_p=0.2,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread_and_seed")


def fastai_language_model():
    model = fastai_text.get_language_model(
        fastai_text.AWD_LSTM, VOCAB, config=dict(FASTAI_CONFIG, tie_weights=True, out_bias=True)
    )
    with torch.no_grad():
        model[1].decoder.bias.normal_()  # fastai starts it at zero; make the check meaningful
    return model.eval()


def fastai_classifier():
    model = fastai_text.get_text_classifier(
        fastai_text.AWD_LSTM, VOCAB, 3, seq_len=BPTT, config=FASTAI_CONFIG, lin_ftrs=[50]
    )
    with torch.no_grad():  # random batch-norm statistics and affine parameters
        for name, tensor in model[1].state_dict().items():
            if name.endswith(("running_mean", "weight", "bias")):
                tensor.normal_()
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    return model.eval()


def test_language_model_matches_fastai():
    reference = fastai_language_model()
    state_dict, cfg = load_fastai_state_dict(reference.state_dict(), "lm")
    assert (cfg.vocab_size, cfg.embed_size, cfg.hidden_size, cfg.num_layers) == (
        VOCAB, EMBED, HIDDEN, 3,
    )  # fmt: skip
    assert cfg.tie_weights and cfg.out_bias
    ours = LanguageModel(cfg).eval()
    ours.load_state_dict(state_dict)
    tokens = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        reference[0].reset()
        fastai_logits, _, _ = reference(tokens)
        reference[0].reset()
        fastai_encoded = reference[0](tokens)
        out = ours(tokens)
    torch.testing.assert_close(out.raw, fastai_encoded, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, fastai_logits, atol=1e-5, rtol=0)


def test_classifier_matches_fastai():
    reference = fastai_classifier()
    state_dict, cfg = load_fastai_state_dict(
        reference.state_dict(), "classifier", bptt=BPTT, max_len=1000
    )
    assert isinstance(cfg, ClassifierConfig)
    assert (cfg.num_classes, cfg.head_hidden, cfg.encoder.hidden_size) == (3, 50, HIDDEN)
    ours = SequenceClassifier(cfg).eval()
    ours.load_state_dict(state_dict)
    tokens = torch.randint(2, VOCAB, (3, 3 * BPTT + 2))  # four chunks, no padding
    with torch.no_grad():
        reference[0].reset()
        fastai_logits = reference(tokens)[0]
        reference[0].reset()
        fastai_encoded = reference[0].module(tokens)
        ours_encoded, _ = ours.encoder(tokens)
        ours_logits = ours(tokens, torch.full((3,), tokens.size(1)))
    torch.testing.assert_close(ours_encoded, fastai_encoded, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_logits, fastai_logits, atol=1e-5, rtol=0)


def test_fastai_hidden_size_1152_converts():
    model = fastai_text.get_language_model(fastai_text.AWD_LSTM, 20)  # 400 / 1152 x 3
    _, cfg = load_fastai_state_dict(model.state_dict(), "lm")
    assert (cfg.embed_size, cfg.hidden_size) == (400, 1152)


def test_checkpoint_file_and_clear_errors(tmp_path):
    reference = fastai_language_model()
    path = tmp_path / "lm.pth"
    torch.save({"model": reference.state_dict(), "opt": {}}, path)  # as learn.save writes it
    model, cfg = load_fastai_checkpoint(path, "lm", embed_dropout=0.0)
    assert isinstance(model, LanguageModel) and cfg.embed_dropout == 0.0

    state_dict = dict(reference.state_dict())
    state_dict["0.rnns.0.extra_thing"] = torch.zeros(1)
    with pytest.raises(InputError, match="unknown fastai encoder key"):
        load_fastai_state_dict(state_dict, "lm")
    state_dict = dict(reference.state_dict())
    del state_dict["0.rnns.1.weight_hh_l0_raw"]
    with pytest.raises(InputError, match="missing weight_hh of LSTM layer 1"):
        load_fastai_state_dict(state_dict, "lm")
    with pytest.raises(InputError, match="classifier head key .decoder.weight"):
        load_fastai_state_dict(reference.state_dict(), "classifier")


def test_older_fastai_key_layouts_convert_to_the_same_weights():
    reference = fastai_classifier()
    current, _ = load_fastai_state_dict(reference.state_dict(), "classifier")
    older = {}
    for key, tensor in reference.state_dict().items():
        key = re.sub(
            r"rnns\.(\d)\.weight_hh_l0_raw", r"rnns.\1.module.weight_hh_l0_raw", key
        )  # 0.7
        block = re.fullmatch(r"1\.layers\.(\d)\.(\d)\.(.+)", key)  # 1.x: one flat Sequential
        older[f"1.layers.{4 * int(block[1]) + int(block[2])}.{block[3]}" if block else key] = tensor
    converted, _ = load_fastai_state_dict(older, "classifier")
    assert converted.keys() == current.keys()
    assert all(torch.equal(converted[k], current[k]) for k in current)
