"""Stages ``pretrain``, ``finetune_lm`` and ``train_classifier``: the three phases of ULMFiT
(paper section 3: 3.1 general-domain LM pretraining, 3.2 target-task LM fine-tuning with
discriminative fine-tuning and STLR, 3.3 classifier fine-tuning with concat pooling, gradual
unfreezing and BPT3C), each for the forward and the backward direction.

Each task reads token files, builds and trains its model with ``ulmfit.train`` (which resumes
from ``checkpoint_dir`` if a killed run left a checkpoint there), writes the model file into a
staged output folder that replaces the DVC out only when complete, and returns plain values:
no tensor or model ever leaves a task.

The model follows ``pretrain.model.backbone`` (docs/model.md, "Choosing a backbone"): the
AWD-LSTM's ``LanguageModel``/``SequenceClassifier``, or ``ulmfit.transformer``'s
``TransformerLM``/``TransformerClassifier``, trained by the same loop; the ELMo-style control is
a ``FrozenFeatureClassifier`` over the dataset's two fine-tuned AWD-LSTM LMs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from tasks.params import ClassifierParams, GridPoint
from tasks.stage import StageContext, runtime
from tasks.tracking import TrainLogger
from ulmfit.checkpoint import checkpoint_path, load_checkpoint, load_model, save_model
from ulmfit.config import to_dict
from ulmfit.corpora.output import staged_directory
from ulmfit.errors import InputError
from ulmfit.evaluate import evaluate_lm, evaluate_mlm
from ulmfit.io import atomic_write
from ulmfit.model import AWDLSTMConfig, layer_groups, model_for
from ulmfit.runtime import seed_everything
from ulmfit.storage import TokenDocs, read_tokens
from ulmfit.tokenizer import Tokenizer
from ulmfit.train import LMTrainConfig, train_classifier, train_language_model
from ulmfit.transformer import FrozenFeatureClassifier, TransformerConfig

MODEL_FILE = "model.pt"
TRAINING_FILE = "training.json"
log = logging.getLogger("ulmfit")


def transformer_lm_training(cfg: LMTrainConfig, config) -> LMTrainConfig:
    """AR and TAR off for a transformer LM: on its final LayerNorm's output they only shrink
    the norm's gain (docs/model.md). The AWD-LSTM's ``cfg`` is returned as it is."""
    if not isinstance(config, TransformerConfig) or (cfg.ar_alpha, cfg.tar_beta) == (0, 0):
        return cfg
    log.info(
        "transformer LM: ar_alpha %g and tar_beta %g set to 0 (AR/TAR fit the AWD-LSTM only)",
        cfg.ar_alpha,
        cfg.tar_beta,
    )
    return dataclasses.replace(cfg, ar_alpha=0.0, tar_beta=0.0)


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """Where a training task runs and reports: the project ``root``, its MLflow ``run_id``, the
    tokenizer file, the stage's out folder and checkpoint folder, the torch device, one curve
    point per ``log_every`` steps, the progress bar's ``description`` and the metric names'
    ``metric_prefix``."""

    root: Path
    run_id: str
    tokenizer: Path
    out_dir: Path
    checkpoint_dir: Path
    device: str
    log_every: int
    description: str
    metric_prefix: str = ""

    @classmethod
    def in_stage(
        cls,
        ctx: StageContext,
        section,
        description: str,
        *,
        tokenizer: Path,
        out_dir: Path,
        checkpoint_dir: Path,
        metric_prefix: str = "",
    ) -> TrainingRun:
        """The run of a training in stage ``ctx``; ``section`` (the pretrain, finetune or
        classifier params) sets the device and threads."""
        return cls(
            root=ctx.root,
            run_id=ctx.run_id,
            tokenizer=tokenizer,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir,
            device=runtime(section.device, section.threads),
            log_every=ctx.params.mlflow.log_every_steps,
            description=description,
            metric_prefix=metric_prefix,
        )

    def logger(self, total_steps: int, *, name: str = "") -> TrainLogger:
        """The training callback; ``name``: one of several trainings in this run."""
        return TrainLogger(
            self.root,
            self.run_id,
            every=self.log_every,
            description=f"{self.description} {name}" if name else self.description,
            total_steps=total_steps,
            metric_prefix=f"{self.metric_prefix}{name}/" if name else self.metric_prefix,
        )


def concat_docs(parts: list[TokenDocs]) -> TokenDocs:
    """Documents of several token files as one :class:`TokenDocs` (labels dropped)."""
    ids = np.concatenate([p.ids for p in parts]).astype(np.int32, copy=False)
    offsets = [np.zeros(1, dtype=np.int64)]
    start = 0
    for part in parts:
        offsets.append(part.offsets[1:].astype(np.int64) + start)
        start += int(part.offsets[-1])
    return TokenDocs(ids=ids, offsets=np.concatenate(offsets), labels=None)


def split_holdout(
    docs: TokenDocs, fraction: float, seed: int, max_docs: int | None = None
) -> tuple[TokenDocs, TokenDocs]:
    """A seeded random ``fraction`` of the documents held out for validation (after an optional
    seeded cap of ``max_docs``)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    if max_docs is not None:
        order = order[:max_docs]
    n_valid = max(1, int(round(len(order) * fraction)))
    return docs.subset(np.sort(order[n_valid:])), docs.subset(np.sort(order[:n_valid]))


def load_for(
    path: Path,
    tokenizer: Tokenizer,
    what: str,
    *,
    fix: str = "re-run the stage that made it (dvc repro)",
    device: str = "cpu",
):
    """The model saved at ``path``, refused unless ``tokenizer`` is the one it was trained with
    (the same ids must mean the same pieces)."""
    model, meta = load_model(path, device=device)
    if meta["tokenizer_identity"] != tokenizer.identity:
        raise InputError(path, f"{what} was trained with another tokenizer", fix=fix)
    return model


def _lm_steps(docs: TokenDocs, cfg: LMTrainConfig) -> int:
    """Optimiser steps of an LM training, for its progress bar."""
    per_epoch = max(1, int(docs.offsets[-1]) // max(1, cfg.batch_size * cfg.bptt))
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def snapshot_file(step: int) -> str:
    """Where an LM stage's out holds its snapshot of ``step`` (``LMTrainConfig.snapshot_steps``)."""
    return f"snapshots/step-{step}.pt"


def _write_model_dir(
    out_dir: Path,
    model,
    *,
    kind: str,
    config,
    identity: str,
    extra: dict,
    summary: dict,
    snapshots: tuple[tuple[int, dict], ...] = (),
    files: tuple[Path, ...] = (),
) -> None:
    """The stage's out: the model file, its training summary, the snapshots ``(step,
    checkpoint)`` of an LM run as model files of their own and copies of ``files``, all
    replacing ``out_dir`` at once."""
    with staged_directory(out_dir) as staging:
        for file in files:
            shutil.copy2(file, staging / file.name)
        save_model(
            staging / MODEL_FILE,
            model,
            kind=kind,
            config=to_dict(config),
            tokenizer_identity=identity,
            extra=extra,
        )
        # Where a killed run resumed is no part of its result (the model is the same): left out,
        # the folder is byte-identical to an uninterrupted run's, so DVC reruns nothing
        # downstream. The log line and the run's MLflow tag (TrainLogger) keep it.
        kept = {k: v for k, v in summary.items() if k != "resumed_from"}
        (staging / TRAINING_FILE).write_text(json.dumps(kept, indent=2, default=str) + "\n")
        for step, payload in snapshots:
            snapshot = type(model)(config)
            snapshot.load_state_dict(payload["model"])
            path = staging / snapshot_file(step)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(
                path,
                snapshot,
                kind=kind,
                config=to_dict(config),
                tokenizer_identity=identity,
                extra={**extra, "step": step, "tokens": payload["tokens_trained"]},
            )


def _result_summary(result) -> dict:
    return {
        "steps": result.steps,
        "epochs": result.epochs,
        "train_loss": result.train_loss,
        "resumed_from": result.resumed_from,
        "metrics": result.metrics,
    }


@task(name="train-language-model", cache_policy=NONE, persist_result=False)
def train_lm_task(
    run: TrainingRun,
    model_cfg: AWDLSTMConfig | TransformerConfig,
    train_cfg: LMTrainConfig,
    *,
    token_files: list[Path],
    valid_file: Path | None = None,
    holdout: tuple[float, int, int | None] | None = None,
    init_model: Path | None = None,
    with_tokenizer: bool = False,
) -> dict:
    """Pretrain (``init_model=None``) or fine-tune (from ``init_model``) a language model.

    ``token_files`` are concatenated (labels never read). Validation is ``valid_file`` or, with
    ``holdout=(fraction, seed, max_docs)``, a seeded part of the documents. ``with_tokenizer``:
    the out folder also holds a copy of the tokenizer, so that it can be reused on its own
    (docs/pretrained.md). Returns the final validation metrics, the curves, and the model
    file's path.

    A masked LM (``TransformerConfig`` with objective ``"mlm"``) trains without next-token
    validation (its perplexity means nothing); after training, the held-out documents give its
    masked-token loss and accuracy instead (``valid_masked_*``, :func:`evaluate_mlm`).
    """
    tokenizer = Tokenizer.load(run.tokenizer)
    docs = concat_docs([read_tokens(path, tokenizer) for path in token_files])
    if holdout is not None:
        train_docs, valid_docs = split_holdout(docs, *holdout)
    else:
        train_docs = docs
        valid_docs = read_tokens(valid_file, tokenizer) if valid_file else None
    if len(train_docs) == 0:
        raise InputError(
            token_files[0],
            "no documents to train on",
            fix="check the source of this corpus in params.yaml",
        )
    config = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    train_cfg = transformer_lm_training(train_cfg, config)
    masked = isinstance(config, TransformerConfig) and config.objective == "mlm"
    seed_everything(train_cfg.seed)
    model = model_for(config)
    if init_model is not None:
        pretrained = load_for(
            init_model,
            tokenizer,
            "the pretrained model",
            fix="re-run pretrain with the current tokenizer (dvc repro pretrain)",
        )
        model.load_state_dict(pretrained.state_dict())
    logger = run.logger(_lm_steps(train_docs, train_cfg))
    try:
        result = train_language_model(
            model,
            train_docs,
            None if masked else valid_docs,
            train_cfg,
            checkpoint_dir=run.checkpoint_dir,
            callback=logger,
            device=run.device,
            tokenizer_identity=tokenizer.identity,
        )
    finally:
        logger.close()
    final = {k: v for k, v in result.metrics.items() if k not in ("step", "epoch")}
    # The loop validates at epoch ends: a run cut short by max_steps ends between them, and a
    # masked LM is validated on masked tokens, after training only.
    if valid_docs is not None and len(valid_docs) and (masked or "perplexity" not in final):
        options = {
            "batch_size": train_cfg.eval_batch_size or train_cfg.batch_size,
            "bptt": train_cfg.bptt,
            "backward": train_cfg.backward,
            "device": run.device,
        }
        if masked:
            final = evaluate_mlm(model, valid_docs, **options, seed=train_cfg.seed)
        else:
            final = evaluate_lm(model, valid_docs, **options, amp=train_cfg.amp)
        logger.evals.append({"step": result.steps, "epoch": result.epochs, **final})
    summary = _result_summary(result)
    summary["metrics"] = final
    summary.update(
        train_documents=len(train_docs),
        valid_documents=len(valid_docs or []),
        train_tokens=int(train_docs.offsets[-1]),
        tokens_trained=result.tokens,
    )
    # Snapshots past the end of a shorter run do not exist: the report says which ran.
    snapshots = tuple(
        (step, load_checkpoint(checkpoint_path(run.checkpoint_dir, step)))
        for step in sorted(train_cfg.snapshot_steps)
        if step <= result.steps
    )
    _write_model_dir(
        run.out_dir,
        model,
        kind="lm",
        config=config,
        identity=tokenizer.identity,
        extra={"backward": train_cfg.backward, "tokens": result.tokens},
        summary=summary,
        snapshots=snapshots,
        files=(run.tokenizer,) if with_tokenizer else (),
    )
    metrics = {f"valid_{k}": float(v) for k, v in final.items()}
    metrics.update(
        last_epoch_train_loss=float(result.train_loss),
        steps=result.steps,
        epochs=result.epochs,
        tokens_trained=result.tokens,
        train_tokens=int(train_docs.offsets[-1]),
        train_documents=len(train_docs),
    )
    return {
        "metrics": metrics,
        "steps": logger.steps,
        "evals": logger.evals,
        "model": str(run.out_dir / MODEL_FILE),
        "resumed_from": result.resumed_from,
    }


@task(name="train-classifier", cache_policy=NONE, persist_result=False)
def train_classifier_task(
    run: TrainingRun,
    classifier: ClassifierParams,
    *,
    backward: bool,
    train_file: Path,
    valid_file: Path,
    label_names: list[str],
    lm_file: Path | None,
    train_indices: np.ndarray | None = None,
    frozen_lms: tuple[Path, Path] | None = None,
) -> dict:
    """Classifier on the encoder of ``lm_file`` (random weights when None): gradual unfreezing,
    discriminative LRs, STLR and BPT3C inside ``ulmfit.train.train_classifier``. The encoder is
    the backbone's (``classifier.build``); ``frozen_lms`` (forward, backward LM files) makes
    it the ELMo-style ``FrozenFeatureClassifier`` instead, whose LMs never train.

    A search over ``classifier.grid()`` (recipe x learning rate x the encoder's dropouts
    scaled): one classifier per point, each resumable in its own checkpoint folder and kept
    once finished, so a killed search redoes nothing that was done; the lowest validation
    error wins (ties: the earlier point). ``train_indices``: train on these documents of the
    train split.
    """
    tokenizer = Tokenizer.load(run.tokenizer)
    train_docs = read_tokens(train_file, tokenizer)
    if train_indices is not None:
        train_docs = train_docs.subset(np.asarray(train_indices))
    valid_docs = read_tokens(valid_file, tokenizer)
    encoder_state = None
    if lm_file is not None:
        encoder_state = load_for(lm_file, tokenizer, "the language model").encoder.state_dict()
    frozen = None
    if frozen_lms is not None:
        frozen = [load_for(path, tokenizer, "the language model") for path in frozen_lms]
    grid = classifier.grid()
    search = []
    for point in grid:
        cfg = classifier.train_for(point, backward=backward)
        config = classifier.build(tokenizer.vocab_size, len(label_names), point.dropout_multiplier)
        name = f"lr-{point.lr:g}"
        if len(classifier.dropout_multipliers) > 1:
            name += f"_dropout-{point.dropout_multiplier:g}"
        if point.one_rate:
            name = f"one_rate_{name}"
        folder = run.checkpoint_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        done = folder / "done.json"
        if not done.is_file():
            seed_everything(cfg.seed)
            if frozen is not None:
                model = FrozenFeatureClassifier.from_language_models(
                    *frozen,
                    len(label_names),
                    head_hidden=classifier.model.head_hidden,
                    head_dropouts=classifier.model.head_dropouts,
                    bptt=classifier.model.bptt,
                )
                config = model.cfg
            else:
                model = model_for(config)
            if encoder_state is not None:
                model.encoder.load_state_dict(encoder_state)
            logger = run.logger(
                _classifier_steps(model, len(train_docs), cfg), name=name if len(grid) > 1 else ""
            )
            try:
                result = train_classifier(
                    model,
                    train_docs,
                    valid_docs,
                    cfg,
                    checkpoint_dir=folder,
                    callback=logger,
                    device=run.device,
                    tokenizer_identity=tokenizer.identity,
                )
            finally:
                logger.close()
            save_model(
                folder / MODEL_FILE,
                model,
                kind="classifier",
                config=to_dict(config),
                tokenizer_identity=tokenizer.identity,
                extra={"backward": backward, "label_names": label_names},
            )
            with atomic_write(done, "w") as handle:
                json.dump(_outcome(result, logger), handle, default=float)
        outcome = json.loads(done.read_text(encoding="utf-8"))
        search.append({**point._asdict(), "folder": name, **outcome})
    chosen = min(enumerate(search), key=lambda c: (c[1]["valid_error"], c[0]))[1]
    model, _ = load_model(run.checkpoint_dir / chosen["folder"] / MODEL_FILE)
    summary = dict(chosen["summary"])
    summary.update(
        label_names=label_names,
        train_documents=len(train_docs),
        lr=chosen["lr"],
        dropout_multiplier=chosen["dropout_multiplier"],
        one_rate=chosen["one_rate"],
    )
    _write_model_dir(
        run.out_dir,
        model,
        kind="classifier",
        config=model.cfg,
        identity=tokenizer.identity,
        extra={"backward": backward, "label_names": label_names},
        summary=summary,
    )
    metrics = {f"valid_{k}": float(v) for k, v in chosen["metrics"].items()}
    metrics.update(
        last_epoch_train_loss=float(chosen["summary"]["train_loss"]),
        steps=chosen["summary"]["steps"],
        epochs=chosen["summary"]["epochs"],
        best_epoch=chosen["best_epoch"],
        kept_epoch=chosen.get("kept_epoch", 0),  # 0: a done.json written before it was kept
        lr=chosen["lr"],
        dropout_multiplier=chosen["dropout_multiplier"],
        one_rate=chosen["one_rate"],
        train_documents=len(train_docs),
        grid_search=[
            {k: c[k] for k in (*GridPoint._fields, "valid_error", "best_epoch", "epochs")}
            | {"kept_epoch": c.get("kept_epoch", 0)}
            for c in search
        ],
    )
    return {
        "metrics": metrics,
        "steps": chosen["steps"],
        "evals": chosen["evals"],
        "model": str(run.out_dir / MODEL_FILE),
        "resumed_from": chosen["summary"].get("resumed_from"),
    }


def _classifier_steps(model, documents: int, cfg) -> int:
    """Optimiser steps of a classifier training, for its progress bar."""
    per_epoch = math.ceil(documents / cfg.batch_size)
    # Gradual unfreezing runs at least one epoch per layer group.
    groups = len(layer_groups(model))
    total = per_epoch * (max(cfg.epochs, groups) if cfg.gradual_unfreezing else cfg.epochs)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def _outcome(result, logger: TrainLogger) -> dict:
    """One training of the search, as plain values (what ``done.json`` keeps)."""
    metrics = {k: float(v) for k, v in result.metrics.items() if k not in ("step", "epoch")}
    return {
        "valid_error": metrics.get("error_rate", math.inf),
        "best_epoch": result.best_epoch,
        "kept_epoch": result.kept_epoch,
        "epochs": result.epochs,
        "metrics": metrics,
        "summary": _result_summary(result),
        "steps": logger.steps,
        "evals": logger.evals,
    }
