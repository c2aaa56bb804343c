"""ULMFiT training (Howard & Ruder 2018, section 3): the configs and the two entry points.

* :func:`train_language_model` serves general-domain pretraining (section 3.1) and target-task
  LM fine-tuning (section 3.2): variable-length BPTT with the learning rate rescaled by
  ``seq_len / bptt`` (AWD-LSTM paper, section 4.1), STLR, discriminative learning rates, AR/TAR,
  gradient clipping, and Adam or NT-ASGD. Validation reports perplexity and next-token accuracy.
* :func:`train_classifier` is target-task classifier fine-tuning (section 3.3): gradual
  unfreezing (top layer group for one epoch, then one more group per epoch, then all groups for
  the remaining epochs), discriminative learning rates, STLR restarted for each stage, BPT3C
  inside the model, AR/TAR, precise batch-norm statistics, and early stopping on the
  validation error rate.

Both run the one loop of :mod:`ulmfit.loop`, each with its phase (:mod:`ulmfit.phases`):
batches, loss, evaluation and what else differs. Progress goes to an
injected ``callback`` as :class:`TrainEvent` values, never to stdout. Under ``torchrun`` the
model is wrapped in ``DistributedDataParallel``, each rank reads its rows of the batch streams,
and metrics are combined across ranks; only rank 0 writes checkpoints and calls the callback.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch
from torch import nn

from ulmfit.config import NonNegativeFloat, NonNegativeInt, OneOf, PositiveFloat, PositiveInt
from ulmfit.evaluate import evaluate_classifier, evaluate_lm, recalibrate_batchnorm
from ulmfit.loop import Callback, TrainEvent, TrainResult, fit
from ulmfit.optim import OptimizerConfig
from ulmfit.phases import ClassifierPhase, LMPhase
from ulmfit.runtime import (
    AMP_SETTINGS,
    native_cpu_bf16,
    seed_everything,
)
from ulmfit.schedule import ScheduleConfig
from ulmfit.storage import TokenDocs

__all__ = [
    "ClassifierTrainConfig",
    "LMTrainConfig",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "evaluate_classifier",
    "evaluate_lm",
    "native_cpu_bf16",
    "recalibrate_batchnorm",
    "seed_everything",
    "train_classifier",
    "train_language_model",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What both loops read. Defaults: ULMFiT LM fine-tuning.

    epochs, batch_size: passes over the data; the global batch under data parallelism.
    lr: peak learning rate of the top layer group (0.004 for LM fine-tuning in the paper).
    schedule: discriminative learning rates and STLR (:class:`~ulmfit.schedule.ScheduleConfig`).
    optim: Adam (AdamW by default) or NT-ASGD and their settings
        (:class:`~ulmfit.optim.OptimizerConfig`).
    clip: gradient-norm clipping (0.3 in the paper's LM scripts); 0 disables it.
    ar_alpha, tar_beta: activation / temporal activation regularisation (2 and 1).
    backward: train on reversed text (the backward model of the bidirectional ensemble).
    eval_every: validate every that many steps as well as at each epoch end (0: epoch ends).
    eval_batch_size: batch size of validation (0: ``batch_size``).
    checkpoint_every: checkpoint every that many steps as well as at epoch ends (0: epoch ends).
    keep_checkpoints: how many newest checkpoints to keep (0: all).
    amp: ``"auto"`` (bf16 on CUDA if supported, else fp16; off on CPU), ``"bf16_native"``
        (bf16 wherever the hardware has it natively, CPUs included, see
        :func:`native_cpu_bf16`; evaluation on a CPU stays fp32), ``"none"``, ``"bf16"``,
        ``"fp16"`` (CUDA only, with a gradient scaler).
    seed: seeds Python, NumPy and torch (plus the rank) and the batch streams.
    deterministic: use deterministic kernels (bit-identical reruns on CPU).
    max_steps: stop after that many optimiser steps (0: no limit).
    """

    epochs: PositiveInt = 1
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 4e-3
    schedule: ScheduleConfig = ScheduleConfig()
    optim: OptimizerConfig = OptimizerConfig()
    clip: NonNegativeFloat = 0.3
    ar_alpha: NonNegativeFloat = 2.0
    tar_beta: NonNegativeFloat = 1.0
    backward: bool = False
    eval_every: NonNegativeInt = 0
    eval_batch_size: NonNegativeInt = 0
    checkpoint_every: NonNegativeInt = 0
    keep_checkpoints: NonNegativeInt = 2
    amp: Annotated[str, OneOf(AMP_SETTINGS)] = "auto"
    seed: NonNegativeInt = 42
    deterministic: bool = True
    max_steps: NonNegativeInt = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.amp not in AMP_SETTINGS:
            raise ValueError(f"amp must be one of {list(AMP_SETTINGS)}, got {self.amp!r}")
        if min(self.eval_every, self.checkpoint_every, self.max_steps, self.keep_checkpoints) < 0:
            raise ValueError(
                "eval_every, checkpoint_every, max_steps and keep_checkpoints are >= 0"
            )


@dataclasses.dataclass(frozen=True)
class LMTrainConfig(TrainConfig):
    """Language-model training (pretraining or fine-tuning); the fields of :class:`TrainConfig`
    and:

    bptt: mean BPTT length; variable_bptt: draw the sequence length around ``bptt`` (AWD-LSTM)
        and rescale the LR. The schedule spans ``min(max_steps, epochs * steps_per_epoch)``.
    snapshot_steps: also checkpoint at these steps and never prune those checkpoints:
        snapshots of the model along the way (the pretraining-budget curve reads them).
    """

    bptt: PositiveInt = 70
    variable_bptt: bool = True
    snapshot_steps: tuple[PositiveInt, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(step < 1 for step in self.snapshot_steps):
            raise ValueError("snapshot_steps must be positive step numbers")


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig(TrainConfig):
    """Classifier fine-tuning. Defaults: the paper's classifier settings (lr 0.01, Adam betas
    (0.7, 0.99), clip 25 as in its scripts, 6 epochs); the other fields of :class:`TrainConfig`
    and:

    epochs: total epochs, gradual unfreezing included: with ``n`` layer groups the first
        ``n - 1`` epochs unfreeze one more group each and the remaining ``epochs - (n - 1)``
        (at least 1) train every group. STLR restarts for each stage.
    gradual_unfreezing: off trains every group from the start (the ablation).
    patience: early stopping. Once every group is trainable, stop after this many epochs
        without a lower validation error than the best so far, counted from the later of the
        best epoch and the first fully unfrozen epoch (0: run all ``epochs``). The
        paper trains a fixed number of epochs; stopping on the validation error gives every
        arm of a comparison (ULMFiT and its controls) the same, automatic, epoch tuning.
    keep_best: end with the weights of the epoch with the lowest validation error (ties: the
        earlier epoch) instead of the last epoch's.
    ar_alpha, tar_beta: AR / TAR on the encoder's last-layer output over the steps BPT3C
        backpropagates through (2 and 1, as in fastai's ULMFiT classifier scripts).
    bn_recalibration_docs: before each validation and at the end of training, the head's
        batch-norm statistics are recomputed exactly from the eval-mode features of (a seeded
        sample of at most) this many training documents; 0 keeps PyTorch's running averages.
        See :func:`recalibrate_batchnorm` for why the running averages are wrong here.
    """

    epochs: PositiveInt = 6
    lr: PositiveFloat = 0.01
    optim: OptimizerConfig = OptimizerConfig(betas=(0.7, 0.99))
    clip: NonNegativeFloat = 25.0
    gradual_unfreezing: bool = True
    patience: NonNegativeInt = 0
    keep_best: bool = False
    bn_recalibration_docs: NonNegativeInt = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn_recalibration_docs < 0:
            raise ValueError("bn_recalibration_docs must be >= 0")


# ============================================================================================
# Entry points


def train_language_model(
    model: nn.Module,
    train: TokenDocs,
    valid: TokenDocs | None,
    cfg: LMTrainConfig,
    *,
    checkpoint_dir: Any = None,
    callback: Callback | None = None,
    device: str | torch.device = "cpu",
    tokenizer_identity: str | None = None,
) -> TrainResult:
    """Train (pretrain or fine-tune) a ``LanguageModel`` in place; see the module docstring.

    Resumes from the newest checkpoint in ``checkpoint_dir`` if there is one. With NT-ASGD the
    model holds the averaged weights when this returns.
    """
    return fit(
        LMPhase, model, train, valid, cfg, checkpoint_dir, callback, device, tokenizer_identity
    )


def train_classifier(
    model: nn.Module,
    train: TokenDocs,
    valid: TokenDocs | None,
    cfg: ClassifierTrainConfig,
    *,
    checkpoint_dir: Any = None,
    callback: Callback | None = None,
    device: str | torch.device = "cpu",
    tokenizer_identity: str | None = None,
) -> TrainResult:
    """Fine-tune a ``SequenceClassifier`` in place with gradual unfreezing; see the module doc.

    Resumes from the newest checkpoint in ``checkpoint_dir`` if there is one. Every parameter
    is trainable again when this returns.
    """
    if train.labels is None:
        raise ValueError("train_classifier needs labelled training documents")
    return fit(
        ClassifierPhase,
        model,
        train,
        valid,
        cfg,
        checkpoint_dir,
        callback,
        device,
        tokenizer_identity,
    )
