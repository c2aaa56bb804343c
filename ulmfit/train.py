"""The two training loops of ULMFiT (Howard & Ruder 2018, section 3) and their evaluation.

* :func:`train_language_model` serves general-domain pretraining (section 3.1) and target-task
  LM fine-tuning (section 3.2): variable-length BPTT with the learning rate rescaled by
  ``seq_len / bptt`` (AWD-LSTM paper, section 4.1), slanted triangular learning rates,
  discriminative learning rates over the layer groups, AR/TAR, gradient clipping, and Adam or
  NT-ASGD. Validation reports perplexity and next-token accuracy.
* :func:`train_classifier` is target-task classifier fine-tuning (section 3.3): gradual
  unfreezing as a short loop over stages (top layer group for one epoch, then one more group
  per epoch, then all groups for the remaining epochs), discriminative learning rates, STLR
  restarted for each stage, and BPT3C inside the model. Validation reports the error rate.

Both loops checkpoint every ``checkpoint_every`` steps and at each epoch end (model, optimiser,
gradient scaler, schedule position, data position, recurrent state and the RNG states of every
rank), and resume from the newest checkpoint in ``checkpoint_dir`` when called again, so a
killed run continues to the same result as an uninterrupted one (bit for bit on CPU).

Progress goes to an injected ``callback`` as :class:`TrainEvent` values, never to stdout.
Under ``torchrun`` (a ``torch.distributed`` process group is up) the model is wrapped in
``DistributedDataParallel``, each rank reads its rows of the batch streams, and metrics are
averaged across ranks; only rank 0 writes checkpoints and calls the callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ulmfit import distributed
from ulmfit.batches import ClassifierBatches, LMStream, bptt_lr_scale
from ulmfit.checkpoint import (
    checkpoint_path,
    get_rng_states,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_states,
    unwrap_model,
)
from ulmfit.config import to_dict
from ulmfit.errors import InputError
from ulmfit.model import State, detach_state, layer_groups
from ulmfit.optim import NTASGD, OptimizerConfig, clip_gradients, make_optimizer, swap_in_averaged
from ulmfit.regularization import ar_tar_penalty
from ulmfit.schedule import constant, discriminative_lrs, gradual_unfreezing_stages, stlr
from ulmfit.storage import TokenDocs

# ============================================================================================
# Configs, events, results


AMP_SETTINGS = ("auto", "bf16_native", "none", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """Language-model training (pretraining or fine-tuning). Defaults: ULMFiT LM fine-tuning.

    epochs, batch_size, bptt: passes over the data, number of parallel streams (the global
        batch under data parallelism), mean BPTT length.
    variable_bptt: draw the sequence length around ``bptt`` (AWD-LSTM) and rescale the LR.
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
    snapshot_steps: also checkpoint at these steps and never prune those checkpoints:
        snapshots of the model along the way (the pretraining-budget curve reads them).
    amp: ``"auto"`` (bf16 on CUDA if supported, else fp16; off on CPU), ``"bf16_native"``
        (bf16 wherever the hardware has it natively, CPUs included, see
        :func:`native_cpu_bf16`; evaluation on a CPU stays fp32), ``"none"``, ``"bf16"``,
        ``"fp16"`` (CUDA only, with a gradient scaler).
    seed: seeds Python, NumPy and torch (plus the rank) and the batch streams.
    deterministic: use deterministic kernels (bit-identical reruns on CPU).
    max_steps: stop after that many optimiser steps (0: no limit); the schedule spans
        ``min(max_steps, epochs * steps_per_epoch)`` steps.
    """

    epochs: int = 1
    batch_size: int = 64
    bptt: int = 70
    variable_bptt: bool = True
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
    snapshot_steps: tuple[int, ...] = ()
    amp: str = "auto"
    seed: int = 42
    deterministic: bool = True
    max_steps: int = 0

    def __post_init__(self) -> None:
        _validate_common(self)
        if any(step < 1 for step in self.snapshot_steps):
            raise ValueError("snapshot_steps must be positive step numbers")


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    """Classifier fine-tuning. Defaults: the paper's classifier settings.

    epochs: total epochs, gradual unfreezing included: with ``n`` layer groups the first
        ``n - 1`` epochs unfreeze one more group each and the remaining ``epochs - (n - 1)``
        (at least 1) train every group.
    gradual_unfreezing: off trains every group from the start (the ablation).
    lr: peak learning rate of the top group (0.01 in the paper).
    patience: early stopping. Once every group is trainable, stop after this many epochs
        without a lower validation error than the best so far, counted from the later of the
        best epoch and the first fully unfrozen epoch (0: run all ``epochs``). The
        paper trains a fixed number of epochs; stopping on the validation error gives every
        arm of a comparison (ULMFiT and its controls) the same, automatic, epoch tuning.
    keep_best: end with the weights of the epoch with the lowest validation error (ties: the
        earlier epoch) instead of the last epoch's.
    clip: gradient-norm clipping (25 in the paper's scripts).
    ar_alpha, tar_beta: AR / TAR on the encoder's last-layer output over the steps BPT3C
        backpropagates through (2 and 1, as in fastai's ULMFiT classifier scripts).
    bn_recalibration_docs: before each validation and at the end of training, the head's
        batch-norm statistics are recomputed exactly from the eval-mode features of (a seeded
        sample of at most) this many training documents; 0 keeps PyTorch's running averages.
        See :func:`recalibrate_batchnorm` for why the running averages are wrong here.
    The other fields mean what they mean in :class:`LMTrainConfig`; STLR restarts each stage.
    """

    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.01
    discriminative: bool = True
    discriminative_factor: float = 2.6
    stlr: bool = True
    cut_frac: float = 0.1
    stlr_ratio: float = 32.0
    gradual_unfreezing: bool = True
    patience: int = 0
    keep_best: bool = False
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.7, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decoupled_weight_decay: bool = True
    momentum: float = 0.0
    nonmono: int = 5
    clip: float = 25.0
    ar_alpha: float = 2.0
    tar_beta: float = 1.0
    bn_recalibration_docs: int = 1024
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
        _validate_common(self)
        if self.bn_recalibration_docs < 0:
            raise ValueError("bn_recalibration_docs must be >= 0")


def _validate_common(cfg: LMTrainConfig | ClassifierTrainConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    if cfg.amp not in AMP_SETTINGS:
        raise ValueError(f"amp must be one of {list(AMP_SETTINGS)}, got {cfg.amp!r}")
    if cfg.optimizer not in ("adam", "ntasgd"):
        raise ValueError(f"optimizer must be 'adam' or 'ntasgd', got {cfg.optimizer!r}")
    if min(cfg.eval_every, cfg.checkpoint_every, cfg.max_steps, cfg.keep_checkpoints) < 0:
        raise ValueError("eval_every, checkpoint_every, max_steps and keep_checkpoints are >= 0")


# Fields that may change between a run and its resumption without changing the result.
_RESUME_MAY_DIFFER = {"checkpoint_every", "keep_checkpoints", "snapshot_steps"}


@dataclasses.dataclass(frozen=True)
class TrainEvent:
    """What the training loop tells its callback.

    kind: ``"step"`` (metrics: loss, penalty, lr, seq_len, grad_norm), ``"eval"`` (validation
        metrics), ``"epoch"`` (train_loss and the last validation metrics) or ``"stage"``
        (gradual unfreezing: stage, trainable_groups, epochs).
    step: optimiser steps done so far; epoch: epochs completed (for ``"step"``: the current one).
    """

    kind: str
    step: int
    epoch: int
    metrics: dict[str, float]


Callback = Callable[[TrainEvent], None]


@dataclasses.dataclass
class TrainResult:
    """The outcome of a training call.

    steps, epochs: optimiser steps and epochs completed in total (resumed runs included).
    metrics: the last validation metrics (empty without validation data).
    history: every validation's metrics with ``step`` and ``epoch``, oldest first.
    train_loss: mean training loss of the last epoch.
    resumed_from: the checkpoint this call continued from, if any.
    best_epoch: the epoch with the lowest validation error (classifier only; 0: not tracked).
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
    stopped_early: bool = False
    tokens: int = 0


# ============================================================================================
# Shared machinery


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration of a run, restoring the caller's settings."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    if enabled:
        # warn_only: an op without a deterministic kernel (rare, CUDA only) warns instead of
        # failing a long run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty with NaN, a debugging aid that costs
        # a memory pass per allocation; no kernel here reads memory it has not written.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


@dataclasses.dataclass(frozen=True)
class _Precision:
    enabled: bool
    dtype: torch.dtype
    use_scaler: bool


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): there, bf16
    autocast trains the LM 1.6-2.6x faster (BENCHMARKS.md); elsewhere it is emulated, slower
    than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _precision(amp: str, device: torch.device, training: bool = True) -> _Precision:
    """Resolve the ``amp`` setting for ``device``.

    ``auto``: on CUDA, bf16 where supported, else fp16 with a gradient scaler; fp32 on a CPU.
    ``bf16_native``: bf16 where the hardware multiplies it natively (CUDA with bf16, or
    :func:`native_cpu_bf16`), else fp32; on a CPU only for training steps
    (``training=True``), so that validation and test figures are computed in fp32, as
    ``ulmfit.predict`` computes predictions.
    """
    if amp == "bf16_native":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = training and native_cpu_bf16()
        amp = "bf16" if native else "none"
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return _Precision(False, torch.float32, False)
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return _Precision(True, torch.float16, True)
        return _Precision(True, torch.bfloat16, False)
    if amp == "bf16":
        return _Precision(True, torch.bfloat16, False)
    raise ValueError(f"amp={amp!r} needs CUDA; use 'none' or 'bf16' on {device.type}")


def _autocast(precision: _Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if not precision.enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)


def _optimizer_config(cfg: LMTrainConfig | ClassifierTrainConfig) -> OptimizerConfig:
    return OptimizerConfig(
        name=cfg.optimizer,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        decoupled_weight_decay=cfg.decoupled_weight_decay,
        momentum=cfg.momentum,
        nonmono=cfg.nonmono,
    )


def _group_lrs(cfg: LMTrainConfig | ClassifierTrainConfig, n_groups: int) -> list[float]:
    factor = cfg.discriminative_factor if cfg.discriminative else 1.0
    return discriminative_lrs(cfg.lr, n_groups, factor)


def _schedule_lr(cfg: LMTrainConfig | ClassifierTrainConfig, t: int, total: int) -> float:
    """The top group's learning rate at step ``t`` of a schedule of ``total`` steps."""
    if cfg.stlr:
        return stlr(t, total, lr_max=cfg.lr, cut_frac=cfg.cut_frac, ratio=cfg.stlr_ratio)
    return constant(t, total, lr_max=cfg.lr)


def _set_lrs(optimizer: torch.optim.Optimizer, base_lrs: list[float], multiplier: float) -> None:
    """Each group's LR: its discriminative share of the scheduled rate (``base / lr`` ratio)."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * multiplier


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(unwrap_model(model), "cfg", None)
    return to_dict(cfg) if dataclasses.is_dataclass(cfg) else None


def _emit(callback: Callback | None, event: TrainEvent) -> None:
    if callback is not None and distributed.is_main_process():
        callback(event)


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (rank 0 saves them all)."""
    states = get_rng_states()
    if not distributed.is_initialized():
        return [states]
    gathered: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(gathered, states)
    return gathered


def _gather_rows(state: State | None, device: torch.device) -> list[Tensor] | None:
    """The recurrent state of the global batch: every rank's rows, concatenated (on CPU)."""
    if state is None:
        return None
    tensors = [tensor for pair in state for tensor in pair]  # h0, c0, h1, c1, ...
    if distributed.is_initialized():
        gathered_tensors = []
        for tensor in tensors:
            parts = [torch.empty_like(tensor) for _ in range(distributed.world_size())]
            dist.all_gather(parts, tensor.contiguous().to(device))
            gathered_tensors.append(torch.cat(parts, dim=1))
        tensors = gathered_tensors
    return [tensor.detach().cpu() for tensor in tensors]


def _scatter_rows(tensors: list[Tensor] | None, device: torch.device) -> State | None:
    """This rank's rows of a saved global recurrent state."""
    if tensors is None:
        return None
    rank, world = distributed.rank(), distributed.world_size()
    rows = tensors[0].size(1) // world
    local = [t[:, rank * rows : (rank + 1) * rows].to(device) for t in tensors]
    return tuple((local[i], local[i + 1]) for i in range(0, len(local), 2))


def _check_resumable(payload: dict, kind: str, cfg: Any, path: str) -> None:
    if payload.get("kind") != kind:
        raise InputError(
            path,
            f"checkpoint is of a {payload.get('kind')} run, not a {kind} run",
            fix="use a separate checkpoint_dir for each training run",
        )
    saved = payload.get("train_config", {})
    current = to_dict(cfg)
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in _RESUME_MAY_DIFFER and saved.get(key) != current.get(key)
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


def _restore_rng(payload: dict) -> None:
    states = payload["rng"]
    set_rng_states(states[distributed.rank()])


def _sync_buffers(model: nn.Module) -> None:
    """Make every rank's buffers equal (batch-norm running statistics) before evaluating.

    ``DistributedDataParallel`` copies rank 0's buffers into the others at the start of each
    forward pass, so after the last training step each rank holds statistics of its own rows.
    Averaging them gives every rank the same model, with statistics of the whole batch.
    """
    if not distributed.is_initialized():
        return
    world = distributed.world_size()
    for buffer in unwrap_model(model).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)


def _wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    if not distributed.is_initialized():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


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


class _ClassifierActivations(nn.Module):
    """``model.forward_with_activations`` as a forward, so DDP can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, lengths: Tensor):
        return self.model.forward_with_activations(tokens, lengths)


class _LMLossModule(nn.Module):
    """``model.forward_loss`` as a forward, so ``DistributedDataParallel`` can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, targets: Tensor, state: State | None):
        return self.model.forward_loss(tokens, targets, state)


def _finish(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int,
    history: list[dict[str, float]],
    last_epoch_loss: float,
    loss_sum: float,
    seen: float,
    resumed_from: str | None,
) -> TrainResult:
    """The end of either loop: consistent buffers, averaged weights adopted, the result."""
    _sync_buffers(model)
    _adopt_averaged(model, optimizer)
    if seen and math.isnan(last_epoch_loss):  # a max_steps run that ended mid-epoch
        last_epoch_loss = loss_sum / seen
    return TrainResult(
        steps=step,
        epochs=epoch,
        metrics=history[-1] if history else {},
        history=history,
        train_loss=last_epoch_loss,
        resumed_from=resumed_from,
    )


def _write_checkpoint(
    checkpoint_dir: Any, step: int, state: dict[str, Any], keep: int, protected: tuple = ()
) -> None:
    """Rank 0 writes; every rank waits so that no rank runs ahead of a half-written file."""
    if distributed.is_main_process():
        save_checkpoint(checkpoint_path(checkpoint_dir, step), state)
        prune_checkpoints(checkpoint_dir, keep, protected=protected)
    distributed.barrier()


# ============================================================================================
# Evaluation


@torch.no_grad()
def _evaluate_lm_stream(
    model: nn.Module,
    stream: LMStream,
    device: torch.device,
    precision: _Precision,
    chunk_rows: int = 4096,
) -> dict[str, float]:
    """Summed loss, correct predictions and token count over one pass of ``stream``."""
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    loss_sum = correct = tokens = 0.0
    state = None
    try:
        for batch in stream:
            x, y = batch.x.to(device), batch.y.to(device)  # (B, T)
            with _autocast(precision, device):
                raw, state = bare.encoder(x, state)  # (B, T, E)
            hidden = raw.reshape(-1, raw.size(-1))  # (B*T, E); output dropout is off in eval
            targets = y.reshape(-1)
            # Decode in row chunks: full (B*T, V) logits would cost B*T*V floats at once.
            for start in range(0, hidden.size(0), chunk_rows):
                with _autocast(precision, device):
                    logits = bare.decoder(hidden[start : start + chunk_rows])
                logits = logits.float()  # (n, V)
                chunk_targets = targets[start : start + chunk_rows]
                loss_sum += float(F.cross_entropy(logits, chunk_targets, reduction="sum"))
                correct += float((logits.argmax(dim=1) == chunk_targets).sum())
            tokens += targets.numel()
    finally:
        bare.train(was_training)
    return {"loss_sum": loss_sum, "correct": correct, "tokens": tokens}


def _lm_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Loss, perplexity and accuracy from the summed counts of every rank."""
    totals = _all_reduce_sum(sums)
    if totals["tokens"] == 0:
        nan = float("nan")
        return {"loss": nan, "perplexity": nan, "accuracy": nan, "tokens": 0.0}
    loss = totals["loss_sum"] / totals["tokens"]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows past ~709
        "accuracy": totals["correct"] / totals["tokens"],
        "tokens": totals["tokens"],
    }


def _all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum ``values`` over ranks (unchanged in a single process)."""
    if not distributed.is_initialized():
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor(
        [values[k] for k in keys], dtype=torch.float64, device=distributed.communication_device()
    )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: float(tensor[i]) for i, k in enumerate(keys)}


def evaluate_lm(
    model: nn.Module,
    docs: TokenDocs,
    *,
    batch_size: int,
    bptt: int,
    backward: bool = False,
    device: str | torch.device = "cpu",
    amp: str = "auto",
) -> dict[str, float]:
    """Validation loss, perplexity and next-token accuracy of a language model on ``docs``.

    Documents are joined into ``batch_size`` streams read in fixed ``bptt`` windows with the
    recurrent state carried over, as in training. Under ``torch.distributed`` each rank reads
    its rows and the sums are reduced across ranks.
    """
    device = torch.device(device)
    stream = LMStream(
        docs,
        batch_size,
        bptt,
        backward=backward,
        variable_bptt=False,
        seed=0,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    sums = _evaluate_lm_stream(model, stream, device, _precision(amp, device, training=False))
    return _lm_metrics(sums)


@torch.no_grad()
def _classifier_pass(
    model: nn.Module, batches: ClassifierBatches, device: torch.device, precision: _Precision
) -> tuple[np.ndarray, np.ndarray]:
    """(index (n,), probabilities (n, C)) of every document this rank reads."""
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    indices, probabilities = [], []
    try:
        for batch in batches:
            with _autocast(precision, device):
                logits = bare(batch.tokens.to(device), batch.lengths.to(device))  # (B, C)
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            indices.append(batch.index.cpu().numpy())
    finally:
        bare.train(was_training)
    if not indices:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(indices), np.concatenate(probabilities)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    docs: TokenDocs,
    *,
    max_docs: int = 1024,
    batch_size: int = 64,
    backward: bool = False,
    device: str | torch.device = "cpu",
    amp: str = "auto",
    seed: int = 0,
) -> int:
    """Set the head's batch-norm statistics to the exact mean and variance of eval-mode features.

    Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3). In training
    mode a ``BatchNorm1d`` normalises with the statistics of the batch and only tracks an
    exponential average (momentum 0.1, variance starting at 1) for evaluation. Concat-pooled
    features of long documents defeat that average three ways: their spread across documents
    is tiny next to their mean (mean and max pooling over hundreds of steps), so a lag of a
    small fraction of the mean is several standard deviations; a small label set gives only a
    few steps per epoch, so the start value dominates for many epochs; and training-mode
    features carry the encoder's dropout noise, which eval-mode features do not. The
    evaluated model then reads its features through statistics they do not have.

    Here the pooled features of up to ``max_docs`` documents (a seeded sample) are computed in
    eval mode, and the head is run once over all of them in one batch with its batch-norm
    layers in training mode and momentum 1, so each layer's running statistics become the
    exact population statistics of its input, layer after layer. Returns the number of
    documents used (0 when the model has no batch norm or there are fewer than 2 documents).
    Under ``torch.distributed`` each rank encodes its share and the features are gathered, so
    every rank ends with the same statistics.
    """
    bare = unwrap_model(model)
    norms = [m for m in bare.head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(docs) < 2:
        return 0
    if len(docs) > max_docs:
        picked = np.random.default_rng(seed).choice(len(docs), max_docs, replace=False)
        docs = docs.subset(np.sort(picked))
    device = torch.device(device)
    precision = _precision(amp, device, training=False)  # the features evaluation will see
    batches = ClassifierBatches(
        docs,
        batch_size,
        shuffle=False,
        backward=backward,
        pad_id=_pad_id(bare),
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    was_training = bare.training
    momenta = [norm.momentum for norm in norms]
    bare.eval()
    try:
        features = []
        for batch in batches:
            with _autocast(precision, device):
                pooled = bare.pooled_features(batch.tokens.to(device), batch.lengths.to(device))
            features.append(pooled.float())  # (b, 3E)
        pooled = torch.cat(features)  # (n, 3E)
        if distributed.is_initialized():
            gathered: list[Any] = [None] * distributed.world_size()
            dist.all_gather_object(gathered, pooled.cpu())
            pooled = torch.cat(gathered).to(device)
        for norm in norms:
            norm.momentum = 1.0  # running statistics := this one batch's, i.e. the population's
            norm.train()
        bare.head(pooled)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        bare.train(was_training)
    return len(pooled)


def evaluate_classifier(
    model: nn.Module,
    docs: TokenDocs,
    *,
    batch_size: int,
    backward: bool = False,
    device: str | torch.device = "cpu",
    amp: str = "auto",
) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy and error rate on labelled ``docs``, and probabilities (N, C) in input order.

    Batches are length-bucketed for speed; the ``index`` of each batch puts every row back in
    its input position. Under ``torch.distributed`` the ranks' rows are gathered everywhere.
    """
    if docs.labels is None:
        raise ValueError("evaluate_classifier needs labelled documents (docs.labels is None)")
    device = torch.device(device)
    batches = ClassifierBatches(
        docs,
        batch_size,
        shuffle=False,
        backward=backward,
        pad_id=_pad_id(model),
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    if len(docs) == 0:
        nan = float("nan")
        return {"loss": nan, "accuracy": nan, "error_rate": nan}, np.zeros((0, 0), np.float32)
    precision = _precision(amp, device, training=False)
    index, probs = _classifier_pass(model, batches, device, precision)
    if distributed.is_initialized():
        gathered: list[Any] = [None] * distributed.world_size()
        dist.all_gather_object(gathered, (index, probs))
        index = np.concatenate([part[0] for part in gathered])
        probs = np.concatenate([part[1] for part in gathered if len(part[0])])
        # The sharded batches leave out a last batch smaller than the number of ranks:
        # every rank scores those few documents itself.
        missing = np.setdiff1d(np.arange(len(docs)), index)
        if len(missing):
            leftover = ClassifierBatches(
                docs.subset(missing),
                batch_size,
                shuffle=False,
                backward=backward,
                pad_id=_pad_id(model),
            )
            sub_index, sub_probs = _classifier_pass(model, leftover, device, precision)
            index = np.concatenate([index, missing[sub_index]])
            probs = np.concatenate([probs, sub_probs]) if len(probs) else sub_probs
    ordered = np.zeros((len(docs), probs.shape[1]), dtype=np.float32)  # (N, C)
    ordered[index] = probs
    labels = np.asarray(docs.labels, dtype=np.int64)
    picked = np.clip(ordered[np.arange(len(docs)), labels], 1e-12, 1.0)
    accuracy = float((ordered.argmax(axis=1) == labels).mean())
    metrics = {
        "loss": float(-np.log(picked).mean()),
        "accuracy": accuracy,
        "error_rate": 1.0 - accuracy,
    }
    return metrics, ordered


def _pad_id(model: nn.Module) -> int:
    encoder_cfg = getattr(getattr(unwrap_model(model), "encoder", None), "cfg", None)
    return int(getattr(encoder_cfg, "pad_id", 1))


# ============================================================================================
# Language-model loop


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
    device = torch.device(device)
    with _deterministic(cfg.deterministic and device.type == "cpu"):
        return _train_lm(
            model, train, valid, cfg, checkpoint_dir, callback, device, tokenizer_identity
        )


def _train_lm(model, train, valid, cfg, checkpoint_dir, callback, device, tokenizer_identity):
    rank, world = distributed.rank(), distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.optimizer == "ntasgd" and valid is None:
        raise ValueError("NT-ASGD switches on validation perplexity: pass validation documents")
    model.to(device)
    seed_everything(cfg.seed + rank)
    precision = _precision(cfg.amp, device)
    stream = LMStream(
        train,
        cfg.batch_size,
        cfg.bptt,
        backward=cfg.backward,
        variable_bptt=cfg.variable_bptt,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
    )
    groups = layer_groups(model)
    base_lrs = _group_lrs(cfg, len(groups))
    optimizer = make_optimizer(list(zip(groups, base_lrs, strict=True)), _optimizer_config(cfg))
    scaler = torch.amp.GradScaler(device.type) if precision.use_scaler else None
    steps_per_epoch = max(1, len(stream))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    eval_batch_size = cfg.eval_batch_size or cfg.batch_size

    step = epoch = 0
    recurrent: State | None = None
    history: list[dict[str, float]] = []
    loss_sum = tokens_seen = 0.0  # this epoch's training loss, weighted by tokens
    tokens_trained = 0  # every epoch and rank
    epoch_steps = 0  # steps done in the current epoch
    last_epoch_loss = float("nan")
    resumed_from = None
    last_checkpoint_step = None
    stream.set_epoch(0)
    if checkpoint_dir is not None and (path := latest_checkpoint(checkpoint_dir)) is not None:
        payload = load_checkpoint(path)
        _check_resumable(payload, "lm", cfg, str(path))
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        stream.load_state_dict(payload["data"])
        step, epoch = payload["step"], payload["epoch"]
        recurrent = _scatter_rows(payload["recurrent_state"], device)
        history = list(payload["history"])
        loss_sum, tokens_seen = payload["loss_sum"], payload["tokens_seen"]
        tokens_trained = payload["tokens_trained"]
        epoch_steps = payload["epoch_steps"]
        last_epoch_loss = payload["last_epoch_loss"]
        _restore_rng(payload)
        resumed_from = str(path)
        last_checkpoint_step = step

    def evaluate() -> dict[str, float]:
        _sync_buffers(model)
        valid_stream = LMStream(
            valid,
            eval_batch_size,
            cfg.bptt,
            backward=cfg.backward,
            variable_bptt=False,
            seed=0,
            rank=rank,
            world_size=world,
        )
        with swap_in_averaged(optimizer):
            metrics = _lm_metrics(
                _evaluate_lm_stream(
                    model, valid_stream, device, _precision(cfg.amp, device, training=False)
                )
            )
        if isinstance(optimizer, NTASGD):
            metrics["averaging"] = float(optimizer.check(metrics["perplexity"]))
        metrics.update(step=float(step), epoch=float(epoch))
        history.append(metrics)
        _emit(callback, TrainEvent("eval", step, epoch, metrics))
        return metrics

    def checkpoint() -> None:
        nonlocal last_checkpoint_step
        if checkpoint_dir is None:
            return
        last_checkpoint_step = step
        state = {
            "kind": "lm",
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "train_config": to_dict(cfg),
            "model_config": _model_config(model),
            "tokenizer_identity": tokenizer_identity,
            "step": step,
            "epoch": epoch,
            "schedule": {"step": step, "total_steps": total_steps},
            "data": stream.state_dict(),
            "recurrent_state": _gather_rows(recurrent, device),
            "history": history,
            "loss_sum": loss_sum,
            "epoch_steps": epoch_steps,
            "tokens_seen": tokens_seen,
            "tokens_trained": tokens_trained,
            "last_epoch_loss": last_epoch_loss,
            "world_size": world,
            "rng": _gather_rng_states(),
        }
        _write_checkpoint(
            checkpoint_dir, step, state, cfg.keep_checkpoints, protected=cfg.snapshot_steps
        )

    loss_module = _wrap_ddp(_LMLossModule(model), device)
    model.train()
    while epoch < cfg.epochs and step < (cfg.max_steps or math.inf):
        finished_epoch = True
        # A checkpoint taken after an epoch's last batch resumes with nothing left to read.
        for batch in stream if epoch_steps < len(stream) else ():
            x, y = batch.x.to(device), batch.y.to(device)  # (B/W, T) each
            # STLR position, then the AWD-LSTM rescaling for this window's length
            lr_now = _schedule_lr(cfg, step, total_steps)
            if cfg.variable_bptt:
                lr_now *= bptt_lr_scale(batch.seq_len, cfg.bptt)
            _set_lrs(optimizer, base_lrs, lr_now / cfg.lr)
            with _autocast(precision, device):
                out = loss_module(x, y, recurrent)
                penalty = ar_tar_penalty(
                    out.raw, out.dropped, alpha=cfg.ar_alpha, beta=cfg.tar_beta
                )
                total = out.loss.float() + penalty
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.unscale_(optimizer)
            else:
                total.backward()
            grad_norm = clip_gradients(model.parameters(), cfg.clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recurrent = detach_state(out.state)
            step += 1
            epoch_steps += 1
            loss_value = float(out.loss.detach())
            loss_sum += loss_value * y.numel()
            tokens_seen += y.numel()
            tokens_trained += y.numel() * world
            _emit(
                callback,
                TrainEvent(
                    "step",
                    step,
                    epoch,
                    {
                        "loss": loss_value,
                        "penalty": float(penalty.detach()),
                        "lr": lr_now,
                        "seq_len": float(batch.seq_len),
                        "grad_norm": grad_norm,
                    },
                ),
            )
            if valid is not None and cfg.eval_every and step % cfg.eval_every == 0:
                evaluate()
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
                step in cfg.snapshot_steps
            ):
                checkpoint()
            if cfg.max_steps and step >= cfg.max_steps:
                finished_epoch = False
                break
        if not finished_epoch:
            break
        epoch += 1
        stream.set_epoch(epoch)
        recurrent = None  # each epoch's streams start afresh
        reduced = _all_reduce_sum({"loss": loss_sum, "tokens": tokens_seen})
        last_epoch_loss = reduced["loss"] / max(reduced["tokens"], 1.0)
        loss_sum = tokens_seen = 0.0
        epoch_steps = 0
        metrics = evaluate() if valid is not None else {}
        _emit(
            callback, TrainEvent("epoch", step, epoch, {"train_loss": last_epoch_loss, **metrics})
        )
        checkpoint()

    if last_checkpoint_step != step:
        checkpoint()  # the end of a max_steps run, mid-epoch
    result = _finish(
        model, optimizer, step, epoch, history, last_epoch_loss, loss_sum, tokens_seen, resumed_from
    )
    result.tokens = tokens_trained
    return result


# ============================================================================================
# Classifier loop


def _unfreezing_plan(n_groups: int, cfg: ClassifierTrainConfig) -> list[tuple[list[int], int]]:
    """(trainable groups, epochs) per stage."""
    if not cfg.gradual_unfreezing:
        return [(list(range(n_groups)), cfg.epochs)]
    stages = gradual_unfreezing_stages(n_groups)
    return [(stage, 1) for stage in stages[:-1]] + [
        (stages[-1], max(1, cfg.epochs - (n_groups - 1)))
    ]


def _set_trainable(groups: list[list[nn.Parameter]], trainable: list[int]) -> None:
    for index, group in enumerate(groups):
        for param in group:
            param.requires_grad_(index in trainable)


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
    device = torch.device(device)
    if train.labels is None:
        raise ValueError("train_classifier needs labelled training documents")
    groups = layer_groups(model)
    try:
        with _deterministic(cfg.deterministic and device.type == "cpu"):
            return _train_classifier(
                model,
                groups,
                train,
                valid,
                cfg,
                checkpoint_dir,
                callback,
                device,
                tokenizer_identity,
            )
    finally:
        _set_trainable(groups, list(range(len(groups))))


def _train_classifier(
    model, groups, train, valid, cfg, checkpoint_dir, callback, device, tokenizer_identity
):
    rank, world = distributed.rank(), distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.optimizer == "ntasgd" and valid is None:
        raise ValueError("NT-ASGD switches on a validation metric: pass validation documents")
    model.to(device)
    seed_everything(cfg.seed + rank)
    precision = _precision(cfg.amp, device)
    batches = ClassifierBatches(
        train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        backward=cfg.backward,
        pad_id=_pad_id(model),
        rank=rank,
        world_size=world,
    )
    base_lrs = _group_lrs(cfg, len(groups))
    optimizer = make_optimizer(list(zip(groups, base_lrs, strict=True)), _optimizer_config(cfg))
    scaler = torch.amp.GradScaler(device.type) if precision.use_scaler else None
    plan = _unfreezing_plan(len(groups), cfg)
    stage_of_epoch = [index for index, (_, n) in enumerate(plan) for _ in range(n)]
    total_epochs = len(stage_of_epoch)
    steps_per_epoch = max(1, len(batches))
    eval_batch_size = cfg.eval_batch_size or cfg.batch_size

    step = epoch = 0
    stage_start_step = 0
    history: list[dict[str, float]] = []
    loss_sum = seen = 0.0
    epoch_steps = 0  # steps done in the current epoch
    last_epoch_loss = float("nan")
    resumed_from = None
    last_checkpoint_step = None
    # Early stopping / keep_best: the lowest validation error so far, its epoch and weights.
    best: dict[str, Any] = {"error": math.inf, "epoch": 0, "state": None}
    stopped_early = False
    last_recalibration_step = None
    batches.set_epoch(0)
    if checkpoint_dir is not None and (path := latest_checkpoint(checkpoint_dir)) is not None:
        payload = load_checkpoint(path)
        _check_resumable(payload, "classifier", cfg, str(path))
        best = dict(payload.get("best") or best)
        stopped_early = bool(payload.get("stopped_early", False))
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        batches.load_state_dict(payload["data"])
        step, epoch = payload["step"], payload["epoch"]
        stage_start_step = payload["schedule"]["stage_start_step"]
        history = list(payload["history"])
        loss_sum, seen = payload["loss_sum"], payload["seen"]
        epoch_steps = payload["epoch_steps"]
        last_epoch_loss = payload["last_epoch_loss"]
        _restore_rng(payload)
        resumed_from = str(path)
        last_checkpoint_step = step

    def recalibrate() -> None:
        nonlocal last_recalibration_step
        if cfg.bn_recalibration_docs:
            with swap_in_averaged(optimizer):
                recalibrate_batchnorm(
                    model,
                    train,
                    max_docs=cfg.bn_recalibration_docs,
                    batch_size=eval_batch_size,
                    backward=cfg.backward,
                    device=device,
                    amp=cfg.amp,
                    seed=cfg.seed,
                )
        last_recalibration_step = step

    def evaluate() -> dict[str, float]:
        _sync_buffers(model)
        recalibrate()
        with swap_in_averaged(optimizer):
            metrics, _ = evaluate_classifier(
                model,
                valid,
                batch_size=eval_batch_size,
                backward=cfg.backward,
                device=device,
                amp=cfg.amp,
            )
        if isinstance(optimizer, NTASGD):
            metrics["averaging"] = float(optimizer.check(metrics["error_rate"]))
        metrics.update(step=float(step), epoch=float(epoch))
        history.append(metrics)
        _emit(callback, TrainEvent("eval", step, epoch, metrics))
        return metrics

    def checkpoint() -> None:
        nonlocal last_checkpoint_step
        if checkpoint_dir is None:
            return
        last_checkpoint_step = step
        state = {
            "kind": "classifier",
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "train_config": to_dict(cfg),
            "model_config": _model_config(model),
            "tokenizer_identity": tokenizer_identity,
            "step": step,
            "epoch": epoch,
            "schedule": {"step": step, "stage_start_step": stage_start_step},
            "data": batches.state_dict(),
            "history": history,
            "loss_sum": loss_sum,
            "epoch_steps": epoch_steps,
            "seen": seen,
            "last_epoch_loss": last_epoch_loss,
            "world_size": world,
            "rng": _gather_rng_states(),
            "best": best,
            "stopped_early": stopped_early,
        }
        _write_checkpoint(checkpoint_dir, step, state, cfg.keep_checkpoints)

    def track_best(metrics: dict[str, float]) -> bool:
        """Record a new best epoch; True when early stopping says stop."""
        error = metrics.get("error_rate", math.nan)
        if error < best["error"]:
            best.update(error=float(error), epoch=epoch)
            if cfg.keep_best:
                best["state"] = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in unwrap_model(model).state_dict().items()
                }
        # Count patience from the later of the best epoch and the start of the last stage, so
        # the fully unfrozen model always gets `patience` epochs to beat a best found earlier.
        last_stage_start = stage_of_epoch.index(len(plan) - 1)
        if not cfg.patience or stage_of_epoch[epoch - 1] != len(plan) - 1:
            return False
        return epoch - max(best["epoch"], last_stage_start) >= cfg.patience

    current_stage = None
    train_model: nn.Module = model
    model.train()
    while not stopped_early and epoch < total_epochs and step < (cfg.max_steps or math.inf):
        stage = stage_of_epoch[epoch]
        trainable, stage_epochs = plan[stage]
        if stage != current_stage:
            _set_trainable(groups, trainable)
            # DDP records which parameters need gradients when it is built: rebuild per stage.
            train_model = _wrap_ddp(_ClassifierActivations(model), device)
            current_stage = stage
            _emit(
                callback,
                TrainEvent(
                    "stage",
                    step,
                    epoch,
                    {
                        "stage": float(stage),
                        "trainable_groups": float(len(trainable)),
                        "epochs": float(stage_epochs),
                    },
                ),
            )
        stage_total = stage_epochs * steps_per_epoch
        finished_epoch = True
        for batch in batches if epoch_steps < len(batches) else ():
            tokens, lengths = batch.tokens.to(device), batch.lengths.to(device)  # (B,T), (B,)
            labels = batch.labels.to(device)  # (B,)
            scheduled = _schedule_lr(cfg, step - stage_start_step, stage_total)
            _set_lrs(optimizer, base_lrs, scheduled / cfg.lr)
            with _autocast(precision, device):
                out = train_model(tokens, lengths)  # logits (B, C), AR and TAR terms
            loss = F.cross_entropy(out.logits.float(), labels)
            penalty = cfg.ar_alpha * out.activation + cfg.tar_beta * out.temporal
            if scaler is not None:
                scaler.scale(loss + penalty).backward()
                scaler.unscale_(optimizer)
            else:
                (loss + penalty).backward()
            grad_norm = clip_gradients((p for p in model.parameters() if p.requires_grad), cfg.clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_steps += 1
            loss_value = float(loss.detach())
            loss_sum += loss_value * labels.numel()
            seen += labels.numel()
            _emit(
                callback,
                TrainEvent(
                    "step",
                    step,
                    epoch,
                    {
                        "loss": loss_value,
                        "penalty": float(penalty.detach()),
                        "lr": scheduled,
                        "grad_norm": grad_norm,
                        "stage": float(stage),
                    },
                ),
            )
            if valid is not None and cfg.eval_every and step % cfg.eval_every == 0:
                evaluate()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
            if cfg.max_steps and step >= cfg.max_steps:
                finished_epoch = False
                break
        if not finished_epoch:
            break
        epoch += 1
        batches.set_epoch(epoch)
        if epoch < total_epochs and stage_of_epoch[epoch] != stage:
            stage_start_step = step  # the next stage's STLR starts from here
        reduced = _all_reduce_sum({"loss": loss_sum, "seen": seen})
        last_epoch_loss = reduced["loss"] / max(reduced["seen"], 1.0)
        loss_sum = seen = 0.0
        epoch_steps = 0
        metrics = evaluate() if valid is not None else {}
        stopped_early = bool(metrics) and track_best(metrics)
        _emit(
            callback, TrainEvent("epoch", step, epoch, {"train_loss": last_epoch_loss, **metrics})
        )
        checkpoint()
        if stopped_early:
            break

    if last_recalibration_step != step:
        recalibrate()  # a run without validation, or one that ended mid-epoch
    if last_checkpoint_step != step:
        checkpoint()  # the end of a max_steps run, mid-epoch
    result = _finish(
        model, optimizer, step, epoch, history, last_epoch_loss, loss_sum, seen, resumed_from
    )
    result.best_epoch = best["epoch"] or epoch
    result.stopped_early = stopped_early
    if cfg.keep_best and best["state"] is not None and best["epoch"] != epoch:
        unwrap_model(model).load_state_dict(best["state"])
        result.metrics = next(
            (m for m in history if m.get("epoch") == best["epoch"]), result.metrics
        )
    return result
