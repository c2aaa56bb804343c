"""Every backbone on CUDA (the device checks; skipped without a GPU): the tiny models of the CPU
tests give the CPU's outputs on the GPU in fp32, and the real training loop trains each LM
under bf16 autocast there and resumes it from its checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_transformer import AWD, CAUSAL, MLM, all_models, lm_docs, tokens

from ulmfit.checkpoint import load_checkpoint
from ulmfit.model import AWDLSTMConfig, ClassifierConfig, LanguageModel, SequenceClassifier
from ulmfit.train import LMTrainConfig, train_language_model
from ulmfit.transformer import TransformerLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

QRNN = dataclasses.replace(AWD, qrnn=True)
DROPPED = AWDLSTMConfig(AWD.vocab_size, AWD.embed_size, AWD.hidden_size, AWD.num_layers)
# ^ the AWD-LSTM paper's dropouts, weight dropout 0.5 included: cuDNN gets a dropped weight_hh


def models() -> dict[str, torch.nn.Module]:
    return {
        **all_models(),
        "awd_lstm_lm": LanguageModel(AWD),
        "awd_qrnn_lm": LanguageModel(QRNN),
        "awd_lstm_classifier": SequenceClassifier(ClassifierConfig(AWD, num_classes=2, bptt=4)),
    }


@pytest.fixture
def exact_fp32():
    """No TF32 in matrix products or cuDNN (on by default for cuDNN): fp32 on both sides."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _outputs(model: torch.nn.Module, batch: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    if isinstance(model, LanguageModel | TransformerLM):
        return model(batch).logits
    return model(batch, lengths)


@pytest.mark.parametrize("name", sorted(models()))
def test_cuda_outputs_equal_the_cpu_outputs(name: str, exact_fp32) -> None:
    torch.manual_seed(0)
    model = models()[name].eval()
    batch, lengths = tokens(batch=4, seq=11), torch.tensor([11, 7, 3, 9])
    for row, length in enumerate(lengths.tolist()):
        batch[row, length:] = 1  # right padding, as the classifier batches pad
    with torch.no_grad():
        cpu = _outputs(model, batch, lengths)
        gpu = _outputs(model.cuda(), batch.cuda(), lengths.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "config",
    [DROPPED, QRNN, dataclasses.replace(CAUSAL, dropout=0.1), MLM],
    ids=["awd_lstm", "awd_qrnn", "transformer_causal", "transformer_mlm"],
)
def test_every_lm_trains_under_bf16_on_cuda_and_resumes(tmp_path: Path, config) -> None:
    torch.manual_seed(0)
    model = LanguageModel(config) if isinstance(config, AWDLSTMConfig) else TransformerLM(config)
    cfg = LMTrainConfig(
        epochs=2, batch_size=2, bptt=8, lr=1e-3, amp="bf16", checkpoint_every=3,
        ar_alpha=0.0, tar_beta=0.0,
    )  # fmt: skip
    result = train_language_model(
        model, lm_docs(), lm_docs(), cfg, checkpoint_dir=tmp_path, device="cuda"
    )
    assert result.steps > 3 and np.isfinite(result.metrics["perplexity"])
    assert next(model.parameters()).is_cuda
    again = train_language_model(
        model, lm_docs(), lm_docs(), cfg, checkpoint_dir=tmp_path, device="cuda"
    )
    assert again.resumed_from is not None and again.steps == result.steps
    assert load_checkpoint(again.resumed_from)["scaler"] is None  # bf16 needs no loss scaling
