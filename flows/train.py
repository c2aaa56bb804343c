"""Flows of stages ``pretrain``, ``finetune_lm`` and ``train_classifier`` (paper sections
3.1-3.3), one direction per run: ``fwd`` reads text left to right, ``bwd`` right to left."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import flow

from tasks.params import DIRECTIONS, ClassifierParams, FinetuneParams, load_params, section_dict
from tasks.stage import StageContext, record_outputs, require, skip_stage, stage_run
from tasks.tokens import TOKENIZER_FILE
from tasks.training import MODEL_FILE, TrainingRun, train_classifier_task, train_lm_task
from tasks.workspace import Layout
from ulmfit.errors import InputError


def _check_direction(direction: str) -> bool:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction == "bwd"


def _left_out(root: Path, params, dataset: str, direction: str, spec) -> bool:
    """True (after recording it) when ``datasets.<dataset>.directions`` leaves ``direction``
    out: the stage item exists in dvc.yaml for every dataset but does no work."""
    if direction in params.dataset(dataset).directions:
        return False
    skip_stage(root, spec, f"datasets.{dataset}.directions leaves out {direction}")
    return True


def label_names_of(root: Path, dataset: str) -> list[str]:
    """The dataset's class names, as ``prepare_dataset`` recorded them."""
    summary = require(
        root / Layout.prepared(dataset) / "summary.json", f"prepare_dataset@{dataset}"
    )
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
        dataclasses.replace(finetune.train, backward=_check_direction(direction)),
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
) -> dict:
    """Classifier fine-tuning (paper section 3.3) on the train split (or ``train_indices`` of
    it), tuned on the valid split with ``classifier.lrs``, ``classifier.dropout_multipliers``
    and early stopping."""
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
        backward=_check_direction(direction),
        train_file=tokens / "train.parquet",
        valid_file=tokens / "valid.parquet",
        label_names=label_names,
        lm_file=lm_file,
        train_indices=train_indices,
    )


@flow(name="pretrain", persist_result=False, flow_run_name="pretrain-{direction}")
def pretrain_flow(direction: str, root: str = ".") -> str:
    """General-domain LM on the Wikipedia token files -> ``data/pretrained/<direction>/``."""
    backward = _check_direction(direction)
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    spec = Layout.stage("pretrain", direction=direction)
    tokens = require(root_path / Layout.wikipedia_tokens, "tokenize_wikipedia")
    tokenizer = require(root_path / Layout.tokenizer_dir / TOKENIZER_FILE, "train_tokenizer")
    section = section_dict(params, "pretrain")
    section["direction"] = direction
    with stage_run(root_path, spec, params, section) as ctx:
        pretrain = params.pretrain
        out = ctx.path(Layout.pretrained(direction))
        result = train_lm_task(
            TrainingRun.in_stage(
                ctx,
                pretrain,
                f"pretrain {direction}",
                tokenizer=tokenizer,
                out_dir=out,
                checkpoint_dir=ctx.checkpoint_dir(),
            ),
            pretrain.model.scaled(pretrain.dropout_multiplier),
            dataclasses.replace(pretrain.train, backward=backward),
            token_files=[tokens / "train.parquet"],
            valid_file=tokens / "valid.parquet",
        )
        record_outputs(
            root_path,
            ctx.run_id,
            spec,
            result["metrics"],
            result["steps"],
            result["evals"],
            artifacts=(out / MODEL_FILE,),
        )
    return result["model"]


@flow(name="finetune_lm", persist_result=False, flow_run_name="finetune_lm-{dataset}-{direction}")
def finetune_lm_flow(dataset: str, direction: str, root: str = ".") -> str:
    """Target-task LM fine-tuning on the dataset's texts (every split, never a label)."""
    _check_direction(direction)
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    finetune = params.dataset(dataset).finetune
    spec = Layout.stage("finetune_lm", dataset, direction)
    if _left_out(root_path, params, dataset, direction, spec):
        return ""
    tokens = require(root_path / Layout.tokens(dataset), f"tokenize_dataset@{dataset}")
    tokenizer = require(root_path / Layout.tokenizer_dir / TOKENIZER_FILE, "train_tokenizer")
    pretrained = require(
        root_path / Layout.pretrained(direction) / MODEL_FILE, f"pretrain@{direction}"
    )
    files = finetuning_files(tokens, finetune, dataset)
    section = section_dict(params, "finetune", dataset=dataset)
    section.update(
        pretrain_model=section_dict(params, "pretrain")["pretrain"]["model"],
        direction=direction,
        splits_used=[f.stem for f in files],
    )
    with stage_run(root_path, spec, params, section) as ctx:
        out = ctx.path(Layout.finetuned(dataset, direction))
        result = finetune_language_model(
            ctx,
            finetune,
            files,
            tokenizer=tokenizer,
            direction=direction,
            init_model=pretrained,
            out=out,
            checkpoint_dir=ctx.checkpoint_dir(),
            description=f"finetune {dataset} {direction}",
        )
        record_outputs(
            root_path,
            ctx.run_id,
            spec,
            result["metrics"],
            result["steps"],
            result["evals"],
            artifacts=(out / MODEL_FILE,),
        )
    return result["model"]


@flow(
    name="train_classifier",
    persist_result=False,
    flow_run_name="train_classifier-{dataset}-{direction}",
)
def train_classifier_flow(dataset: str, direction: str, root: str = ".") -> str:
    """Classifier fine-tuning on the labelled train split, validated on the valid split."""
    _check_direction(direction)
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    classifier = params.dataset(dataset).classifier
    spec = Layout.stage("train_classifier", dataset, direction)
    if _left_out(root_path, params, dataset, direction, spec):
        return ""
    tokens = require(root_path / Layout.tokens(dataset), f"tokenize_dataset@{dataset}")
    tokenizer = require(root_path / Layout.tokenizer_dir / TOKENIZER_FILE, "train_tokenizer")
    lm_file = require(
        root_path / Layout.finetuned(dataset, direction) / MODEL_FILE,
        f"finetune_lm@{dataset}-{direction}",
    )
    label_names = label_names_of(root_path, dataset)
    section = section_dict(params, "classifier", dataset=dataset)
    section["direction"] = direction
    with stage_run(root_path, spec, params, section) as ctx:
        out = ctx.path(Layout.classifier(dataset, direction))
        result = fit_classifier(
            ctx,
            classifier,
            tokens,
            tokenizer=tokenizer,
            label_names=label_names,
            direction=direction,
            lm_file=lm_file,
            out=out,
            checkpoint_dir=ctx.checkpoint_dir(),
            description=f"classifier {dataset} {direction}",
        )
        record_outputs(
            root_path,
            ctx.run_id,
            spec,
            result["metrics"],
            result["steps"],
            result["evals"],
            artifacts=(out / MODEL_FILE,),
        )
    return result["model"]
