"""Evaluation of language models and classifiers, and precise batch-norm statistics.

* :func:`evaluate_lm`: loss, perplexity and next-token accuracy, with the documents joined into
  streams read in fixed ``bptt`` windows and the recurrent state carried over, as in training.
* :func:`evaluate_mlm`: a masked LM's loss and accuracy at masked positions (BERT's masking
  with a fixed seed), in the same windows: next-token perplexity means nothing for it.
* :func:`evaluate_classifier`: loss, accuracy and error rate (the paper's figure, section 4),
  and the probabilities in input order.
* :func:`recalibrate_batchnorm`: the classifier head's batch-norm statistics set to the exact
  statistics of eval-mode features (precise BN), before each validation and at the end.

Under ``torch.distributed`` each rank reads its rows and the results are combined across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ulmfit import distributed
from ulmfit.batches import ClassifierBatches, LMStream
from ulmfit.model import pad_id, unwrap_model
from ulmfit.runtime import Precision, autocast, precision
from ulmfit.storage import TokenDocs


@torch.no_grad()
def _lm_sums(
    model: nn.Module,
    stream: LMStream,
    device: torch.device,
    resolved: Precision,
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
            with autocast(resolved, device):
                raw, state = bare.encoder(x, state)  # (B, T, E)
            hidden = raw.reshape(-1, raw.size(-1))  # (B*T, E); output dropout is off in eval
            targets = y.reshape(-1)
            # Decode in row chunks: full (B*T, V) logits would cost B*T*V floats at once.
            for start in range(0, hidden.size(0), chunk_rows):
                with autocast(resolved, device):
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
    totals = distributed.all_reduce_sum(sums)
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
    stream = _windows(docs, batch_size, bptt, backward)
    sums = _lm_sums(model, stream, device, precision(amp, device, training=False))
    return _lm_metrics(sums)


def _windows(docs: TokenDocs, batch_size: int, bptt: int, backward: bool) -> LMStream:
    """The fixed ``bptt`` windows an LM is evaluated on; under ``torch.distributed`` each rank
    reads its own rows."""
    return LMStream(
        docs,
        batch_size,
        bptt,
        backward=backward,
        variable_bptt=False,
        seed=0,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )


@torch.no_grad()
def evaluate_mlm(
    model: nn.Module,
    docs: TokenDocs,
    *,
    batch_size: int,
    bptt: int,
    backward: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Masked-token loss and accuracy of a masked LM (``TransformerLM`` with objective
    ``"mlm"``) on ``docs``: each fixed ``bptt`` window masked by ``mlm_mask`` with a generator
    seeded by ``seed`` (the same masks on every call), scored at the selected positions only.
    Keys: ``masked_loss``, ``masked_perplexity`` (``exp(masked_loss)``, not comparable with a
    next-token perplexity), ``masked_accuracy``, ``masked_tokens``. Runs in fp32; under
    ``torch.distributed`` each rank reads its rows and the sums are reduced, as in
    :func:`evaluate_lm`."""
    from ulmfit.transformer import IGNORE, mlm_mask  # imports ulmfit.model, like our users

    device = torch.device(device)
    bare = unwrap_model(model)
    cfg = bare.cfg
    generator = torch.Generator().manual_seed(seed)
    was_training = bare.training
    bare.eval()
    sums = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    try:
        for batch in _windows(docs, batch_size, bptt, backward):
            x = batch.x.to(device)  # (B, T)
            inputs, targets = mlm_mask(
                x,
                mask_id=cfg.mask_id,
                vocab_size=cfg.vocab_size,
                special_ids=(cfg.pad_id, *cfg.special_ids),
                generator=generator,
                rate=cfg.mask_rate,
            )
            selected = targets != IGNORE  # (B, T)
            if not bool(selected.any()):
                continue
            raw, _ = bare.encoder(inputs)  # (B, T, D)
            logits = bare.decoder(raw[selected]).float()  # (n, V)
            sums["loss_sum"] += float(F.cross_entropy(logits, targets[selected], reduction="sum"))
            sums["correct"] += float((logits.argmax(dim=1) == targets[selected]).sum())
            sums["tokens"] += float(selected.sum())
    finally:
        bare.train(was_training)
    return {f"masked_{key}": value for key, value in _lm_metrics(sums).items()}


def _in_order(
    docs: TokenDocs, batch_size: int, backward: bool, model: nn.Module, shard: bool = True
) -> ClassifierBatches:
    """Unshuffled classifier batches; ``shard``: this rank's share under torch.distributed."""
    return ClassifierBatches(
        docs,
        batch_size,
        shuffle=False,
        backward=backward,
        pad_id=pad_id(model),
        rank=distributed.rank() if shard else 0,
        world_size=distributed.world_size() if shard else 1,
    )


@torch.no_grad()
def _classifier_pass(
    model: nn.Module,
    batches: ClassifierBatches,
    device: torch.device,
    resolved: Precision,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(index (n,), probabilities (n, C)) of every document this rank reads; ``progress``
    receives the number of documents done after each batch."""
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    indices, probabilities = [], []
    done = 0
    try:
        for batch in batches:
            with autocast(resolved, device):
                logits = bare(batch.tokens.to(device), batch.lengths.to(device))  # (B, C)
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            indices.append(batch.index.cpu().numpy())
            done += len(indices[-1])
            if progress is not None:
                progress(done)
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
    resolved = precision(amp, device, training=False)  # the features evaluation will see
    batches = _in_order(docs, batch_size, backward, bare)
    was_training = bare.training
    momenta = [norm.momentum for norm in norms]
    bare.eval()
    try:
        features = []
        for batch in batches:
            with autocast(resolved, device):
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
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy and error rate on labelled ``docs``, and probabilities (N, C) in input order.

    Batches are length-bucketed for speed; the ``index`` of each batch puts every row back in
    its input position. Under ``torch.distributed`` the ranks' rows are gathered everywhere.
    ``progress`` receives the number of documents this process has scored, after each batch.
    """
    if docs.labels is None:
        raise ValueError("evaluate_classifier needs labelled documents (docs.labels is None)")
    device = torch.device(device)
    batches = _in_order(docs, batch_size, backward, model)
    if len(docs) == 0:
        nan = float("nan")
        return {"loss": nan, "accuracy": nan, "error_rate": nan}, np.zeros((0, 0), np.float32)
    resolved = precision(amp, device, training=False)
    index, probs = _classifier_pass(model, batches, device, resolved, progress)
    if distributed.is_initialized():
        gathered: list[Any] = [None] * distributed.world_size()
        dist.all_gather_object(gathered, (index, probs))
        index = np.concatenate([part[0] for part in gathered])
        probs = np.concatenate([part[1] for part in gathered if len(part[0])])
        # The sharded batches leave out a last batch smaller than the number of ranks:
        # every rank scores those few documents itself.
        missing = np.setdiff1d(np.arange(len(docs)), index)
        if len(missing):
            leftover = _in_order(docs.subset(missing), batch_size, backward, model, shard=False)
            sub_index, sub_probs = _classifier_pass(model, leftover, device, resolved)
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
