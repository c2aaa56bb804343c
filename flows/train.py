"""Flows of stages ``pretrain``, ``finetune_lm`` and ``train_classifier`` (paper sections
3.1-3.3), one direction per run: ``fwd`` reads text left to right, ``bwd`` right to left."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from tasks import tracking
from tasks.params import section_dict
from tasks.pipeline import stage_spec
from tasks.plots import note_figure, write_rows
from tasks.pretrained import (
    SOURCES_FILE,
    check_architecture,
    check_workspace_tokenizer,
    fetch_lm_task,
    lm_model_name,
    log_origin,
    place_lm_task,
    register_lm_task,
)
from tasks.recipes import (
    backward,
    finetune_language_model,
    finetuning_files,
    fit_classifier,
    label_names_of,
)
from tasks.stage import (
    StageContext,
    project_params,
    record_outputs,
    require,
    run_stage,
    skip_left_out,
    skip_stage,
)
from tasks.tokens import TOKENIZER_FILE
from tasks.training import MODEL_FILE, TrainingRun, train_lm_task
from tasks.workspace import Layout
from ulmfit.tokenizer import Tokenizer


@flow(name="pretrain", persist_result=False, flow_run_name="pretrain-{direction}")
def pretrain_flow(direction: str, root: str = ".") -> str:
    """General-domain LM on the Wikipedia token files -> ``data/pretrained/<direction>/``; or,
    with ``pretrain.reuse``, the LM pretrained elsewhere placed there (docs/pretrained.md)."""
    backward(direction)
    params = project_params(root)
    if params.pretrain.reuse and direction not in params.pretrain.reuse:
        spec = stage_spec("pretrain", direction=direction)
        skip_stage(Path(root).resolve(), spec, f"pretrain.reuse gives no {direction} LM")
        return ""
    with run_stage(root, "pretrain", params=params, direction=direction) as ctx:
        pretrain = ctx.params.pretrain
        out = ctx.path(Layout.pretrained(direction))
        tokenizer = ctx.require(f"{Layout.tokenizer_dir}/{TOKENIZER_FILE}")
        if pretrain.reuse:
            return _reuse_lm(ctx, direction, tokenizer, out)
        tokens = ctx.path(Layout.wikipedia_tokens)
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
            dataclasses.replace(pretrain.train, backward=backward(direction)),
            token_files=[tokens / "train.parquet"],
            valid_file=tokens / "valid.parquet",
            with_tokenizer=True,
        )
        record_outputs(
            ctx, result["metrics"], result["steps"], result["evals"], artifacts=(out / MODEL_FILE,)
        )
        if pretrain.register:
            registered = register_lm_task(
                root=ctx.root,
                run_id=ctx.run_id,
                experiment=ctx.params.mlflow.experiment,
                lm_dir=out,
                name=lm_model_name(ctx.params.mlflow.model_name_prefix, direction),
                direction=direction,
                metrics=result["metrics"],
                backbone=pretrain.backbone,
            )
            tracking.set_tags(
                ctx.root,
                ctx.run_id,
                {
                    "ulmfit.registered_model": registered["name"],
                    "ulmfit.registered_version": registered["version"],
                },
            )
    return result["model"]


def _reuse_lm(ctx: StageContext, direction: str, tokenizer: Path, out: Path) -> str:
    """``pretrain.reuse.<direction>`` checked against the workspace and placed as the stage's
    output, without training."""
    lm = fetch_lm_task(
        ctx.root, ctx.params.pretrain.reuse[direction], direction, ctx.path(Layout.cache_dir)
    )
    check_architecture(lm, ctx.params.pretrain.model, direction)
    check_workspace_tokenizer(lm, Tokenizer.load(tokenizer), direction)
    metrics = place_lm_task(lm, out)
    log_origin(ctx.root, ctx.run_id, lm, f"reused.{direction}")
    # The declared curve and figure say that nothing was trained here.
    write_rows(ctx.root / ctx.spec.curve, [], ["step", "loss"])
    note_figure(ctx.root / ctx.spec.figure, f"{ctx.spec.stage}: reused {lm.origin}, not trained")
    record_outputs(ctx, metrics, artifacts=(out / SOURCES_FILE,))
    return str(out / MODEL_FILE)


@flow(name="finetune_lm", persist_result=False, flow_run_name="finetune_lm-{dataset}-{direction}")
def finetune_lm_flow(dataset: str, direction: str, root: str = ".") -> str:
    """Target-task LM fine-tuning on the dataset's texts (every split, never a label)."""
    backward(direction)
    params = project_params(root)
    if skip_left_out(root, params, "finetune_lm", dataset, direction):
        return ""
    finetune = params.dataset(dataset).finetune
    files = finetuning_files(
        require(Path(root).resolve(), Layout.tokens(dataset)), finetune, dataset
    )
    extra = {
        "pretrain_model": section_dict(params, "pretrain")["pretrain"]["model"],
        "splits_used": [f.stem for f in files],
    }
    stage = run_stage(
        root, "finetune_lm", params=params, extra=extra, dataset=dataset, direction=direction
    )
    with stage as ctx:
        out = ctx.path(Layout.finetuned(dataset, direction))
        result = finetune_language_model(
            ctx,
            finetune,
            files,
            tokenizer=ctx.require(f"{Layout.tokenizer_dir}/{TOKENIZER_FILE}"),
            direction=direction,
            init_model=ctx.require(f"{Layout.pretrained(direction)}/{MODEL_FILE}"),
            out=out,
            checkpoint_dir=ctx.checkpoint_dir(),
            description=f"finetune {dataset} {direction}",
        )
        record_outputs(
            ctx, result["metrics"], result["steps"], result["evals"], artifacts=(out / MODEL_FILE,)
        )
    return result["model"]


@flow(
    name="train_classifier",
    persist_result=False,
    flow_run_name="train_classifier-{dataset}-{direction}",
)
def train_classifier_flow(dataset: str, direction: str, root: str = ".") -> str:
    """Classifier fine-tuning on the labelled train split, validated on the valid split."""
    backward(direction)
    params = project_params(root)
    if skip_left_out(root, params, "train_classifier", dataset, direction):
        return ""
    stage = run_stage(root, "train_classifier", params=params, dataset=dataset, direction=direction)
    with stage as ctx:
        out = ctx.path(Layout.classifier(dataset, direction))
        result = fit_classifier(
            ctx,
            params.dataset(dataset).classifier,
            ctx.path(Layout.tokens(dataset)),
            tokenizer=ctx.require(f"{Layout.tokenizer_dir}/{TOKENIZER_FILE}"),
            label_names=label_names_of(ctx.root, dataset),
            direction=direction,
            lm_file=ctx.require(f"{Layout.finetuned(dataset, direction)}/{MODEL_FILE}"),
            out=out,
            checkpoint_dir=ctx.checkpoint_dir(),
            description=f"classifier {dataset} {direction}",
        )
        record_outputs(
            ctx, result["metrics"], result["steps"], result["evals"], artifacts=(out / MODEL_FILE,)
        )
    return result["model"]
