"""The one training loop of ULMFiT, shared by the language model and the classifier.

:func:`fit` runs epochs of optimiser steps over a list of :class:`Stage` values (gradual
unfreezing, paper section 3.3; a language model has one stage): slanted triangular learning
rates restarted for each stage (section 3.2, eq. 3), discriminative learning rates over the
layer groups (eq. 2), mixed precision, gradient clipping, validation, early stopping and
checkpoints. What differs between the LM and the classifier (batches, loss, evaluation,
unfreezing, AR/TAR, batch-norm recalibration) comes in as a *phase*: one of the two small
classes in :mod:`ulmfit.phases` (the base class :class:`~ulmfit.phases.Phase` says what the loop asks
of them).

Everything a resumed run needs is :class:`TrainState`, saved with ``state_dict`` every
``checkpoint_every`` steps and at each epoch end (with the RNG states of every rank) and loaded
from the newest checkpoint in ``checkpoint_dir``, so a killed run continues to the same result
as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ulmfit import distributed
from ulmfit.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_states,
)
from ulmfit.config import to_dict
from ulmfit.errors import InputError
from ulmfit.model import layer_groups, unwrap_model
from ulmfit.optim import NTASGD, clip_gradients, make_optimizer
from ulmfit.runtime import deterministic, precision, seed_everything
from ulmfit.storage import TokenDocs

if TYPE_CHECKING:
    from ulmfit.phases import Phase


@dataclasses.dataclass(frozen=True)
class TrainEvent:
    """What the training loop tells its callback.

    kind: ``"step"`` (metrics: loss, penalty, lr, grad_norm, and seq_len for the LM or stage
        for the classifier), ``"eval"`` (validation metrics), ``"epoch"`` (train_loss and the
        last validation metrics), ``"stage"`` (gradual unfreezing: stage, trainable_groups,
        epochs) or ``"resume"`` (once, before any step of a run continued from ``checkpoint``).
    step: optimiser steps done so far; epoch: epochs completed (for ``"step"``: the current one).
    checkpoint: the checkpoint file a ``"resume"`` event continues from.
    """

    kind: str
    step: int
    epoch: int
    metrics: dict[str, float]
    checkpoint: str | None = None


Callback = Callable[[TrainEvent], None]


@dataclasses.dataclass
class TrainResult:
    """The outcome of a training call.

    steps, epochs: optimiser steps and epochs completed in total (resumed runs included).
    metrics: the last validation metrics, or with ``keep_best`` the kept epoch's (empty
        without validation data).
    history: every validation's metrics with ``step`` and ``epoch``, oldest first.
    train_loss: mean training loss of the last epoch.
    resumed_from: the checkpoint this call continued from, if any.
    best_epoch: the epoch with the lowest validation error (classifier only; 0: not tracked).
    kept_epoch: the epoch whose weights the model ends with: ``best_epoch`` with ``keep_best``,
        else the last (classifier only; 0: not tracked).
    stopped_early: the classifier stopped before ``epochs`` because of ``patience``.
    tokens: tokens trained on over the whole run, every rank together (LM only; 0 otherwise).
    """

    steps: int
    epochs: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    train_loss: float
    resumed_from: str | None = None
    best_epoch: int = 0
    kept_epoch: int = 0
    stopped_early: bool = False
    tokens: int = 0


# Training-config fields that may change between a run and its resumption without changing
# the result.
RESUME_MAY_DIFFER = {"checkpoint_every", "keep_checkpoints", "snapshot_steps"}


class TrainState:
    """Model, optimiser, gradient scaler, schedule position, data position, loss sums,
    validation history and best-so-far of a run: what a checkpoint holds."""

    def __init__(self, model: nn.Module, optimizer, scaler, data) -> None:
        self.model, self.optimizer, self.scaler, self.data = model, optimizer, scaler, data
        self.step = self.epoch = 0
        self.epoch_steps = 0  # steps done in the current epoch
        self.stage_start_step = 0  # where the current stage's STLR cycle began
        self.schedule_steps = 0  # the current stage's STLR length
        self.loss_sum = self.seen = 0.0  # this epoch's training loss, weighted by targets
        self.last_epoch_loss = math.nan
        self.history: list[dict[str, float]] = []
        # The lowest validation error so far, its epoch and (keep_best) its weights.
        self.best: dict[str, Any] = {"error": math.inf, "epoch": 0, "state": None}
        self.stopped_early = False

    def state_dict(self) -> dict[str, Any]:
        """The run's state; collective under ``torch.distributed`` (every rank calls it)."""
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "schedule": {
                "step": self.step,
                "stage_start_step": self.stage_start_step,
                "total_steps": self.schedule_steps,
            },
            "data": self.data.state_dict(),
            "history": self.history,
            "loss_sum": self.loss_sum,
            "seen": self.seen,
            "epoch_steps": self.epoch_steps,
            "last_epoch_loss": self.last_epoch_loss,
            "best": self.best,
            "stopped_early": self.stopped_early,
            "world_size": distributed.world_size(),
            "rng": distributed.gather_rng_states(),
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.data.load_state_dict(payload["data"])
        self.step, self.epoch = payload["step"], payload["epoch"]
        self.stage_start_step = payload["schedule"]["stage_start_step"]
        self.history = list(payload["history"])
        self.loss_sum, self.seen = payload["loss_sum"], payload["seen"]
        self.epoch_steps = payload["epoch_steps"]
        self.last_epoch_loss = payload["last_epoch_loss"]
        self.best = dict(payload["best"])
        self.stopped_early = bool(payload["stopped_early"])
        set_rng_states(payload["rng"][distributed.rank()])


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler, loss: Tensor, clip: float
) -> float:
    """Backward, clip the trainable parameters' gradients to ``clip`` (0: off), step, zero the
    gradients; returns the gradient norm before clipping. With a scaler (fp16) the gradients
    are unscaled before clipping."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = clip_gradients((p for p in model.parameters() if p.requires_grad), clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _check_resumable(payload: dict, kind: str, cfg: Any, path: str) -> None:
    if payload.get("kind") != kind:
        raise InputError(
            path,
            f"checkpoint is of a {payload.get('kind')} run, not a {kind} run",
            fix="use a separate checkpoint_dir for each training run",
        )
    saved, current = payload.get("train_config", {}), to_dict(cfg)
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in RESUME_MAY_DIFFER and saved.get(key) != current.get(key)
    )
    if changed:
        raise InputError(
            path,
            f"the run in this checkpoint used a different training config ({', '.join(changed)})"
            ", so resuming could not continue to the same result",
            fix="resume with the same config, or use a fresh checkpoint_dir to start over",
        )
    if payload.get("world_size", 1) != distributed.world_size():
        raise InputError(
            path,
            f"checkpoint was written by {payload.get('world_size')} processes, this run has "
            f"{distributed.world_size()}",
            fix="resume with the same number of processes (torchrun --nproc_per_node)",
        )


def _adopt_averaged(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The AWD-LSTM paper evaluates and saves NT-ASGD's averaged weights: make them the model's.

    Called after the last checkpoint, which keeps the raw weights and the average separately
    so that a resumed run can go on averaging.
    """
    if not (isinstance(optimizer, NTASGD) and optimizer.triggered):
        return
    with torch.no_grad():
        for param in model.parameters():
            average = optimizer.state.get(param, {}).get("average")
            if average is not None:
                param.copy_(average)


def _emit(callback: Callback | None, event: TrainEvent) -> None:
    if callback is not None and distributed.is_main_process():
        callback(event)


def fit(
    phase_type: type[Phase],
    model: nn.Module,
    train: TokenDocs,
    valid: TokenDocs | None,
    cfg,
    checkpoint_dir: Any = None,
    callback: Callback | None = None,
    device: str | torch.device = "cpu",
    tokenizer_identity: str | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train`` with a phase of ``phase_type`` (see the module
    docstring), validating on ``valid``. Every parameter is trainable again when this returns."""
    device = torch.device(device)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.optim.name == "ntasgd" and valid is None:
        raise ValueError("NT-ASGD switches on a validation metric: pass validation documents")
    groups = layer_groups(model)
    try:
        with deterministic(cfg.deterministic and device.type == "cpu"):
            model.to(device)
            seed_everything(cfg.seed + distributed.rank())
            resolved = precision(cfg.amp, device)
            phase = phase_type(model, train, valid, cfg, device, resolved)
            # each layer group with its peak learning rate (discriminative fine-tuning)
            lr_groups = list(zip(groups, cfg.schedule.group_lrs(cfg.lr, len(groups)), strict=True))
            optimizer = make_optimizer(lr_groups, cfg.optim)
            scaler = torch.amp.GradScaler(device.type) if resolved.use_scaler else None
            state = TrainState(model, optimizer, scaler, phase.data)
            return _run(phase, state, lr_groups, cfg, checkpoint_dir, callback, tokenizer_identity)
    finally:
        for group in groups:  # gradual unfreezing leaves every parameter trainable
            for param in group:
                param.requires_grad_(True)


def _run(phase: Phase, state: TrainState, lr_groups, cfg, checkpoint_dir, callback, identity):
    """The epochs of :func:`fit`, from a fresh or resumed :class:`TrainState`."""
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    peaks = [group["peak_lr"] for group in optimizer.param_groups]  # before a resume replaces them
    steps_per_epoch = max(1, len(phase.data))
    plan = phase.plan(len(lr_groups), steps_per_epoch)
    stage_of_epoch = [index for index, stage in enumerate(plan) for _ in range(stage.epochs)]
    resumed_from = last_checkpoint_step = None
    phase.data.set_epoch(0)
    if checkpoint_dir is not None and (path := latest_checkpoint(checkpoint_dir)) is not None:
        payload = load_checkpoint(path)
        _check_resumable(payload, phase.kind, cfg, str(path))
        state.load_state_dict(payload)
        phase.load_state_dict(payload)
        resumed_from, last_checkpoint_step = str(path), state.step
        _emit(callback, TrainEvent("resume", state.step, state.epoch, {}, checkpoint=str(path)))

    def validate() -> dict[str, float]:
        distributed.sync_buffers(model)
        metrics = phase.evaluate(optimizer, state.step)
        if isinstance(optimizer, NTASGD):
            metrics["averaging"] = float(optimizer.check(metrics[phase.monitor]))
        metrics.update(step=float(state.step), epoch=float(state.epoch))
        state.history.append(metrics)
        _emit(callback, TrainEvent("eval", state.step, state.epoch, metrics))
        return metrics

    def checkpoint() -> None:
        nonlocal last_checkpoint_step
        if checkpoint_dir is None:
            return
        last_checkpoint_step = state.step
        payload = {
            "kind": phase.kind,
            "train_config": to_dict(cfg),
            "model_config": to_dict(unwrap_model(model).cfg),
            "tokenizer_identity": identity,
            **state.state_dict(),
            **phase.state_dict(),
        }
        if distributed.is_main_process():  # rank 0 writes; the others wait for the file
            save_checkpoint(checkpoint_path(checkpoint_dir, state.step), payload)
            prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints, protected=phase.keep_steps)
        distributed.barrier()

    current_stage = None
    train_module: nn.Module = model
    model.train()
    while (
        not state.stopped_early
        and state.epoch < len(stage_of_epoch)
        and state.step < (cfg.max_steps or math.inf)
    ):
        index = stage_of_epoch[state.epoch]
        stage = plan[index]
        state.schedule_steps = stage.schedule_steps
        if index != current_stage:
            for number, (params, _) in enumerate(lr_groups):
                for param in params:
                    param.requires_grad_(number in stage.groups)
            # DDP records which parameters need gradients when it is built: rebuild per stage.
            train_module = distributed.wrap_ddp(phase.module(), phase.device)
            current_stage = index
            announced = phase.begin_stage(index, stage)
            if announced is not None:
                _emit(callback, TrainEvent("stage", state.step, state.epoch, announced))
        finished_epoch = True
        # A checkpoint taken after an epoch's last batch resumes with nothing left to read.
        for batch in phase.data if state.epoch_steps < len(phase.data) else ():
            out = phase.forward(train_module, batch)
            t = state.step - state.stage_start_step
            lr = cfg.schedule.lr_at(cfg.lr, t, stage.schedule_steps) * out.lr_scale
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak * (lr / cfg.lr)  # each group's discriminative share
            grad_norm = optimizer_step(model, optimizer, scaler, out.loss + out.penalty, cfg.clip)
            state.step += 1
            state.epoch_steps += 1
            loss_value = float(out.loss.detach())
            state.loss_sum += loss_value * out.count
            state.seen += out.count
            metrics = {"loss": loss_value, "penalty": float(out.penalty.detach()), "lr": lr}
            metrics.update(grad_norm=grad_norm, **out.metrics)
            _emit(callback, TrainEvent("step", state.step, state.epoch, metrics))
            if phase.valid is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                validate()
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or (
                state.step in phase.keep_steps
            ):
                checkpoint()
            if cfg.max_steps and state.step >= cfg.max_steps:
                finished_epoch = False
                break
        if not finished_epoch:
            break
        state.epoch += 1
        phase.data.set_epoch(state.epoch)
        phase.end_epoch()
        if state.epoch < len(stage_of_epoch) and stage_of_epoch[state.epoch] != index:
            state.stage_start_step = state.step  # the next stage's STLR starts from here
        reduced = distributed.all_reduce_sum({"loss": state.loss_sum, "seen": state.seen})
        state.last_epoch_loss = reduced["loss"] / max(reduced["seen"], 1.0)
        state.loss_sum = state.seen = 0.0
        state.epoch_steps = 0
        metrics = validate() if phase.valid is not None else {}
        state.stopped_early = bool(metrics) and phase.should_stop(state, metrics, stage_of_epoch)
        epoch_metrics = {"train_loss": state.last_epoch_loss, **metrics}
        _emit(callback, TrainEvent("epoch", state.step, state.epoch, epoch_metrics))
        checkpoint()

    phase.wrap_up(optimizer, state.step)
    if last_checkpoint_step != state.step:
        checkpoint()  # the end of a max_steps run, mid-epoch
    distributed.sync_buffers(model)
    _adopt_averaged(model, optimizer)
    if state.seen and math.isnan(state.last_epoch_loss):  # a max_steps run ended mid-epoch
        state.last_epoch_loss = state.loss_sum / state.seen
    result = TrainResult(
        steps=state.step,
        epochs=state.epoch,
        metrics=state.history[-1] if state.history else {},
        history=state.history,
        train_loss=state.last_epoch_loss,
        resumed_from=resumed_from,
    )
    phase.finish(state, result)
    return result
