"""The two phases of ULMFiT training, the parts that :func:`ulmfit.loop.fit` runs.

* :class:`LMPhase`: pretraining (paper section 3.1) and LM fine-tuning (section 3.2).
  Documents joined into contiguous streams, next-token cross entropy plus AR/TAR, the recurrent
  state carried from batch to batch, the learning rate rescaled by ``seq_len / bptt``
  (AWD-LSTM paper, section 4.1), perplexity for validation and NT-ASGD.
* :class:`ClassifierPhase`: classifier fine-tuning (section 3.3). Length-bucketed batches, cross
  entropy plus AR/TAR over the steps BPT3C backpropagates through, gradual unfreezing (one
  :class:`Stage` per unfrozen layer group), precise batch-norm statistics before
  each validation, the error rate, and early stopping on it.

Each phase (the base class :class:`Phase` lists what the loop asks) holds its data (``data``,
``valid``), says how the run is staged (``plan``), computes a step's loss (``forward``),
validates (``evaluate``), and saves what is its own in the checkpoint (``state_dict``); the
loop does everything else.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulmfit import distributed
from ulmfit.batches import ClassifierBatches, LMStream, bptt_lr_scale
from ulmfit.evaluate import evaluate_classifier, evaluate_lm, recalibrate_batchnorm
from ulmfit.model import State, detach_state, pad_id, unwrap_model
from ulmfit.optim import swap_in_averaged
from ulmfit.regularization import ar_tar_penalty
from ulmfit.runtime import autocast
from ulmfit.schedule import gradual_unfreezing_stages
from ulmfit.storage import TokenDocs

if TYPE_CHECKING:
    from ulmfit.loop import TrainResult, TrainState
    from ulmfit.train import ClassifierTrainConfig, LMTrainConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Stage:
    """A run of epochs with the same trainable layer groups and one STLR cycle of
    ``schedule_steps`` steps."""

    groups: list[int]
    epochs: int
    schedule_steps: int


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What a phase's ``forward`` gives the loop: the loss (fp32) and the AR/TAR penalty to
    minimise, the number of targets the loss averages over, the factor on the scheduled
    learning rate, and extra step metrics."""

    loss: Tensor
    penalty: Tensor
    count: int
    lr_scale: float
    metrics: dict[str, float]


class Phase(abc.ABC):
    """What the loop asks of the language model or the classifier.

    A phase is built with ``(model, train, valid, cfg, device, precision)``. ``kind`` names the
    run in checkpoints; ``monitor`` is the validation metric NT-ASGD watches (lower is better);
    ``data`` holds the resumable training batches; ``valid`` the validation documents (or
    None); ``device`` where the model runs; checkpoints at ``keep_steps`` are never pruned.
    """

    kind: str
    monitor: str
    data: Any
    valid: TokenDocs | None
    device: torch.device
    keep_steps: tuple[int, ...] = ()

    @abc.abstractmethod
    def plan(self, n_groups: int, steps_per_epoch: int) -> list[Stage]:
        """The stages of the run, in order."""

    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The training forward as a module, for ``DistributedDataParallel`` to wrap."""

    @abc.abstractmethod
    def forward(self, module: nn.Module, batch: Any) -> StepOutput:
        """One batch's loss, under this phase's precision."""

    @abc.abstractmethod
    def evaluate(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Validation metrics (with NT-ASGD's averaged weights swapped in)."""

    def begin_stage(self, index: int, stage: Stage) -> dict[str, float] | None:
        """Metrics of the ``"stage"`` event announcing stage ``index``, or None for none."""
        return None

    def end_epoch(self) -> None:
        """Called after each epoch's last step."""
        return None

    def should_stop(
        self, state: TrainState, metrics: dict[str, float], stage_of_epoch: list[int]
    ) -> bool:
        """After an epoch's validation: whether to stop early (and record the best so far)."""
        return False

    def wrap_up(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called once after the last step, before the final checkpoint."""
        return None

    def finish(self, state: TrainState, result: TrainResult) -> None:
        """Complete ``result`` (and the model) after the run."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the phase adds to a checkpoint."""
        return {}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        return None


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


class LMPhase(Phase):
    """Language model: contiguous streams, next-token loss with AR/TAR, the recurrent state
    carried across batches, the ``seq_len / bptt`` LR rescaling, perplexity."""

    kind, monitor = "lm", "perplexity"

    def __init__(self, model, train, valid, cfg: LMTrainConfig, device, resolved) -> None:
        self.model, self.valid, self.cfg = model, valid, cfg
        self.device, self.precision = device, resolved
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


class ClassifierPhase(Phase):
    """Classifier: length-bucketed batches, cross entropy plus AR/TAR, gradual unfreezing,
    precise batch-norm statistics, error rate, and early stopping on it."""

    kind, monitor = "classifier", "error_rate"

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
        result.kept_epoch = state.epoch
        result.stopped_early = state.stopped_early
        if self.cfg.keep_best and best["state"] is not None and best["epoch"] != state.epoch:
            result.kept_epoch = best["epoch"]
            unwrap_model(self.model).load_state_dict(best["state"])
            result.metrics = next(
                (m for m in state.history if m.get("epoch") == best["epoch"]), result.metrics
            )
