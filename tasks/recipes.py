"""The paper's target-task recipe as the stages and the controls run it: LM fine-tuning
(section 3.2) and classifier fine-tuning (section 3.3) from a stage's context, and the test
error of a trained classifier.

``flows/train.py`` runs each step as its own stage; ``flows/control.py`` repeats them another
way (from random weights, a pretraining snapshot, a label subset) with the same tuning.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tasks.params import DIRECTIONS, ClassifierParams, FinetuneParams
from tasks.stage import StageContext, require
from tasks.training import TrainingRun, train_classifier_task, train_lm_task
from tasks.workspace import Layout
from ulmfit.errors import InputError


def backward(direction: str) -> bool:
    """True for ``bwd`` (text read right to left)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction == "bwd"


def label_names_of(root: Path, dataset: str) -> list[str]:
    """The dataset's class names, as ``prepare_dataset`` recorded them."""
    summary = require(root, f"{Layout.prepared(dataset)}/summary.json")
    return list(json.loads(summary.read_text(encoding="utf-8"))["label_names"])


def finetuning_files(tokens: Path, finetune: FinetuneParams, dataset: str) -> list[Path]:
    """The token files of ``finetune.splits`` that the dataset has (unlabelled is optional)."""
    files = [
        tokens / f"{s}.parquet" for s in finetune.splits if (tokens / f"{s}.parquet").is_file()
    ]
    if not files:
        raise InputError(
            tokens,
            f"none of the splits {list(finetune.splits)} was found",
            fix=f"check datasets.{dataset}.finetune.splits in params.yaml",
        )
    return files


def finetune_language_model(
    ctx: StageContext,
    finetune: FinetuneParams,
    files: list[Path],
    *,
    tokenizer: Path,
    direction: str,
    init_model: Path | None,
    out: Path,
    checkpoint_dir: Path,
    description: str,
    metric_prefix: str = "",
) -> dict:
    """Target-task LM fine-tuning (paper section 3.2) on ``files``, from ``init_model`` (None:
    random weights, the "no pretraining" ablation), with a seeded held-out part for perplexity."""
    return train_lm_task(
        TrainingRun.in_stage(
            ctx,
            finetune,
            description,
            metric_prefix=metric_prefix,
            tokenizer=tokenizer,
            out_dir=out,
            checkpoint_dir=checkpoint_dir,
        ),
        ctx.params.pretrain.model.scaled(finetune.dropout_multiplier),
        dataclasses.replace(finetune.train, backward=backward(direction)),
        token_files=files,
        holdout=(finetune.valid_fraction, finetune.train.seed, finetune.max_docs),
        init_model=init_model,
    )


def fit_classifier(
    ctx: StageContext,
    classifier: ClassifierParams,
    tokens: Path,
    *,
    tokenizer: Path,
    label_names: list[str],
    direction: str,
    lm_file: Path | None,
    out: Path,
    checkpoint_dir: Path,
    description: str,
    train_indices=None,
    frozen_lms: tuple[Path, Path] | None = None,
) -> dict:
    """Classifier fine-tuning (paper section 3.3) on the train split (or ``train_indices`` of
    it), tuned on the valid split with ``classifier.lrs``, ``classifier.dropout_multipliers``
    and early stopping; ``frozen_lms`` (forward, backward LM files): the ELMo-style classifier
    over those LMs, frozen."""
    return train_classifier_task(
        TrainingRun.in_stage(
            ctx,
            classifier,
            description,
            tokenizer=tokenizer,
            out_dir=out,
            checkpoint_dir=checkpoint_dir,
        ),
        classifier,
        backward=backward(direction),
        train_file=tokens / "train.parquet",
        valid_file=tokens / "valid.parquet",
        label_names=label_names,
        lm_file=lm_file,
        train_indices=train_indices,
        frozen_lms=frozen_lms,
    )
