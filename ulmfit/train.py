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

Both run the one loop of :mod:`ulmfit.loop`, each with its small part (:class:`LMPart`,
:class:`ClassifierPart`): batches, loss, evaluation and what else differs. Progress goes to an
injected ``callback`` as :class:`TrainEvent` values, never to stdout. Under ``torchrun`` the
model is wrapped in ``DistributedDataParallel``, each rank reads its rows of the batch streams,
and metrics are combined across ranks; only rank 0 writes checkpoints and calls the callback.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulmfit import distributed
from ulmfit.batches import ClassifierBatches, LMStream, bptt_lr_scale
from ulmfit.evaluate import evaluate_classifier, evaluate_lm, recalibrate_batchnorm
from ulmfit.loop import Callback, Stage, StepOutput, TrainEvent, TrainResult, fit
from ulmfit.model import State, detach_state, layer_groups, pad_id, unwrap_model
from ulmfit.optim import swap_in_averaged
from ulmfit.regularization import ar_tar_penalty
from ulmfit.runtime import (
    AMP_SETTINGS,
    autocast,
    deterministic,
    native_cpu_bf16,
    precision,
    seed_everything,
)
from ulmfit.schedule import gradual_unfreezing_stages
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
    discriminative, discriminative_factor: per-group LRs ``eta_{l-1} = eta_l / factor``.
    stlr, cut_frac, stlr_ratio: slanted triangular schedule; ``stlr=False`` keeps ``lr`` constant.
    optimizer: ``"adam"`` or ``"ntasgd"`` (AWD-LSTM pretraining: SGD, then averaged SGD).
    betas, eps, weight_decay, decoupled_weight_decay: Adam settings (decoupled = AdamW).
    momentum, nonmono: NT-ASGD's SGD momentum and patience (in validation checks).
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

    epochs: int = 1
    batch_size: int = 64
    lr: float = 4e-3
    discriminative: bool = True
    discriminative_factor: float = 2.6
    stlr: bool = True
    cut_frac: float = 0.1
    stlr_ratio: float = 32.0
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.8, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decoupled_weight_decay: bool = True
    momentum: float = 0.0
    nonmono: int = 5
    clip: float = 0.3
    ar_alpha: float = 2.0
    tar_beta: float = 1.0
    backward: bool = False
    eval_every: int = 0
    eval_batch_size: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    amp: str = "auto"
    seed: int = 42
    deterministic: bool = True
    max_steps: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.amp not in AMP_SETTINGS:
            raise ValueError(f"amp must be one of {list(AMP_SETTINGS)}, got {self.amp!r}")
        if self.optimizer not in ("adam", "ntasgd"):
            raise ValueError(f"optimizer must be 'adam' or 'ntasgd', got {self.optimizer!r}")
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

    bptt: int = 70
    variable_bptt: bool = True
    snapshot_steps: tuple[int, ...] = ()

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

    epochs: int = 6
    lr: float = 0.01
    betas: tuple[float, float] = (0.7, 0.99)
    clip: float = 25.0
    gradual_unfreezing: bool = True
    patience: int = 0
    keep_best: bool = False
    bn_recalibration_docs: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn_recalibration_docs < 0:
            raise ValueError("bn_recalibration_docs must be >= 0")


# ============================================================================================
# The parts: what the LM and the classifier add to the loop


class _LMLossModule(nn.Module):
    """``model.forward_loss`` as a forward, so ``DistributedDataParallel`` can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, targets: Tensor, state: State | None):
        return self.model.forward_loss(tokens, targets, state)


class _ClassifierActivations(nn.Module):
    """``model.forward_with_activations`` as a forward, so DDP can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, lengths: Tensor):
        return self.model.forward_with_activations(tokens, lengths)


def _eval_options(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """How validation runs: its batch size, direction, device and precision."""
    return {
        "batch_size": cfg.eval_batch_size or cfg.batch_size,
        "backward": cfg.backward,
        "device": device,
        "amp": cfg.amp,
    }


class LMPart:
    """Language model: contiguous streams, next-token loss with AR/TAR, the recurrent state
    carried across batches, the ``seq_len / bptt`` LR rescaling, perplexity."""

    kind, monitor = "lm", "perplexity"

    def __init__(self, model, train, valid, cfg: LMTrainConfig, device, resolved) -> None:
        self.model, self.valid, self.cfg, self.device, self.precision = (
            model,
            valid,
            cfg,
            device,
            resolved,
        )
        self.data = LMStream(
            train,
            cfg.batch_size,
            cfg.bptt,
            backward=cfg.backward,
            variable_bptt=cfg.variable_bptt,
            seed=cfg.seed,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
        self.keep_steps = cfg.snapshot_steps
        self.recurrent: State | None = None
        self.tokens_trained = 0  # every epoch and rank

    def plan(self, n_groups: int, steps_per_epoch: int) -> list[Stage]:
        total = self.cfg.epochs * steps_per_epoch
        if self.cfg.max_steps:
            total = min(total, self.cfg.max_steps)
        return [Stage(list(range(n_groups)), self.cfg.epochs, total)]

    def module(self) -> nn.Module:
        return _LMLossModule(self.model)

    def begin_stage(self, index: int, stage: Stage) -> None:
        return None  # one stage, nothing to announce

    def forward(self, module: nn.Module, batch) -> StepOutput:
        cfg = self.cfg
        x, y = batch.x.to(self.device), batch.y.to(self.device)  # (B/W, T) each
        with autocast(self.precision, self.device):
            out = module(x, y, self.recurrent)
            penalty = ar_tar_penalty(out.raw, out.dropped, alpha=cfg.ar_alpha, beta=cfg.tar_beta)
            loss = out.loss.float()
        self.recurrent = detach_state(out.state)
        self.tokens_trained += y.numel() * distributed.world_size()
        scale = bptt_lr_scale(batch.seq_len, cfg.bptt) if cfg.variable_bptt else 1.0
        return StepOutput(loss, penalty, y.numel(), scale, {"seq_len": float(batch.seq_len)})

    def evaluate(self, optimizer, step: int) -> dict[str, float]:
        cfg = self.cfg
        with swap_in_averaged(optimizer):
            return evaluate_lm(
                self.model, self.valid, bptt=cfg.bptt, **_eval_options(cfg, self.device)
            )

    def end_epoch(self) -> None:
        self.recurrent = None  # each epoch's streams start afresh

    def should_stop(self, state, metrics, stage_of_epoch) -> bool:
        return False

    def wrap_up(self, optimizer, step: int) -> None:
        pass

    def finish(self, state, result: TrainResult) -> None:
        result.tokens = self.tokens_trained

    def state_dict(self) -> dict[str, Any]:
        return {
            "recurrent_state": distributed.gather_rows(self.recurrent, self.device),
            "tokens_trained": self.tokens_trained,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.recurrent = distributed.scatter_rows(payload["recurrent_state"], self.device)
        self.tokens_trained = payload["tokens_trained"]


class ClassifierPart:
    """Classifier: length-bucketed batches, cross entropy plus AR/TAR, gradual unfreezing,
    precise batch-norm statistics, error rate, and early stopping on it."""

    kind, monitor = "classifier", "error_rate"
    keep_steps: tuple[int, ...] = ()

    def __init__(self, model, train, valid, cfg: ClassifierTrainConfig, device, resolved) -> None:
        self.model, self.train, self.valid, self.cfg = model, train, valid, cfg
        self.device, self.precision = device, resolved
        self.data = ClassifierBatches(
            train,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            backward=cfg.backward,
            pad_id=pad_id(model),
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
        self.stage = 0
        self.last_recalibration_step: int | None = None

    def plan(self, n_groups: int, steps_per_epoch: int) -> list[Stage]:
        """(trainable groups, epochs) per stage, each with its own STLR cycle."""
        if not self.cfg.gradual_unfreezing:
            plan = [(list(range(n_groups)), self.cfg.epochs)]
        else:
            stages = gradual_unfreezing_stages(n_groups)
            last = max(1, self.cfg.epochs - (n_groups - 1))
            plan = [(stage, 1) for stage in stages[:-1]] + [(stages[-1], last)]
        return [Stage(groups, epochs, epochs * steps_per_epoch) for groups, epochs in plan]

    def module(self) -> nn.Module:
        return _ClassifierActivations(self.model)

    def begin_stage(self, index: int, stage: Stage) -> dict[str, float]:
        self.stage = index
        return {
            "stage": float(index),
            "trainable_groups": float(len(stage.groups)),
            "epochs": float(stage.epochs),
        }

    def forward(self, module: nn.Module, batch) -> StepOutput:
        cfg, device = self.cfg, self.device
        tokens, lengths = batch.tokens.to(device), batch.lengths.to(device)  # (B,T), (B,)
        labels = batch.labels.to(device)  # (B,)
        with autocast(self.precision, device):
            out = module(tokens, lengths)  # logits (B, C), AR and TAR terms
        loss = F.cross_entropy(out.logits.float(), labels)
        penalty = cfg.ar_alpha * out.activation + cfg.tar_beta * out.temporal
        return StepOutput(loss, penalty, labels.numel(), 1.0, {"stage": float(self.stage)})

    def recalibrate(self, optimizer, step: int) -> None:
        cfg = self.cfg
        if cfg.bn_recalibration_docs:
            with swap_in_averaged(optimizer):
                recalibrate_batchnorm(
                    self.model,
                    self.train,
                    max_docs=cfg.bn_recalibration_docs,
                    seed=cfg.seed,
                    **_eval_options(cfg, self.device),
                )
        self.last_recalibration_step = step

    def evaluate(self, optimizer, step: int) -> dict[str, float]:
        self.recalibrate(optimizer, step)
        with swap_in_averaged(optimizer):
            metrics, _ = evaluate_classifier(
                self.model, self.valid, **_eval_options(self.cfg, self.device)
            )
        return metrics

    def end_epoch(self) -> None:
        pass

    def should_stop(self, state, metrics: dict[str, float], stage_of_epoch: list[int]) -> bool:
        """Record a new best epoch; True when early stopping says stop."""
        best, epoch = state.best, state.epoch
        error = metrics.get("error_rate", math.nan)
        if error < best["error"]:
            best.update(error=float(error), epoch=epoch)
            if self.cfg.keep_best:
                best["state"] = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in unwrap_model(self.model).state_dict().items()
                }
        # Count patience from the later of the best epoch and the start of the last stage, so
        # the fully unfrozen model always gets `patience` epochs to beat a best found earlier.
        last = stage_of_epoch[-1]
        if not self.cfg.patience or stage_of_epoch[epoch - 1] != last:
            return False
        return epoch - max(best["epoch"], stage_of_epoch.index(last)) >= self.cfg.patience

    def wrap_up(self, optimizer, step: int) -> None:
        if self.last_recalibration_step != step:
            self.recalibrate(optimizer, step)  # no validation, or ended mid-epoch

    def finish(self, state, result: TrainResult) -> None:
        best = state.best
        result.best_epoch = best["epoch"] or state.epoch
        result.stopped_early = state.stopped_early
        if self.cfg.keep_best and best["state"] is not None and best["epoch"] != state.epoch:
            unwrap_model(self.model).load_state_dict(best["state"])
            result.metrics = next(
                (m for m in state.history if m.get("epoch") == best["epoch"]), result.metrics
            )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        pass


# ============================================================================================
# Entry points


def _train(part_type, model, train, valid, cfg, checkpoint_dir, callback, device, identity):
    device = torch.device(device)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.optimizer == "ntasgd" and valid is None:
        raise ValueError("NT-ASGD switches on a validation metric: pass validation documents")
    groups = layer_groups(model)
    try:
        with deterministic(cfg.deterministic and device.type == "cpu"):
            model.to(device)
            seed_everything(cfg.seed + distributed.rank())
            resolved = precision(cfg.amp, device)
            part = part_type(model, train, valid, cfg, device, resolved)
            return fit(
                part,
                model,
                cfg,
                resolved,
                checkpoint_dir=checkpoint_dir,
                callback=callback,
                device=device,
                tokenizer_identity=identity,
            )
    finally:
        for group in groups:  # gradual unfreezing leaves every parameter trainable
            for param in group:
                param.requires_grad_(True)


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
    args = (checkpoint_dir, callback, device, tokenizer_identity)
    return _train(LMPart, model, train, valid, cfg, *args)


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
    args = (checkpoint_dir, callback, device, tokenizer_identity)
    return _train(ClassifierPart, model, train, valid, cfg, *args)
