"""Flow of stage ``control``: one classifier trained another way than the pipeline's, on the
same data and with the same tuning, for the paper's ablations (section 5, "Impact of
pretraining", "Impact of LM quality/fine-tuning", "Impact of classifier fine-tuning") and its
sample-efficiency curve (Figure 3).

The tuning is the pipeline's own: the dataset's learning-rate grid (``classifier.lrs``) and
early stopping on the validation error (``classifier.train.patience`` / ``keep_best``), so a
control is never handicapped by settings tuned for ULMFiT alone.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.controls import test_classifier_task, train_subset
from tasks.params import section_dict
from tasks.recipes import finetune_language_model, finetuning_files, fit_classifier, label_names_of
from tasks.stage import project_params, record_outputs, run_stage, runtime
from tasks.tokens import TOKENIZER_FILE
from tasks.training import MODEL_FILE, snapshot_file
from tasks.workspace import Layout
from ulmfit.checkpoint import load_model
from ulmfit.errors import InputError


@flow(name="control", persist_result=False, flow_run_name="control-{name}")
def control_flow(name: str, root: str = ".") -> str:
    """Train and test control ``name`` (an entry of ``controls``)."""
    params = project_params(root)
    control = params.control(name)
    of, direction = control.dataset, control.direction
    own_lm = control.encoder == "finetuned" and control.pretrain_step is None
    # The ELMo-style control reads both directions' fine-tuned LMs (params checks they exist).
    frozen = control.encoder == "frozen_features"
    if own_lm and direction not in params.dataset(of).directions:
        raise InputError(
            Path(root).resolve() / "params.yaml",
            f"control {name} needs the {direction} LM of {of}, which "
            f"datasets.{of}.directions leaves out",
            fix=f"add {direction} to datasets.{of}.directions or change the control's direction",
        )
    extra = {"pretrain_model": section_dict(params, "pretrain")["pretrain"]["model"]}
    device = runtime(control.classifier.device, control.classifier.threads)
    with run_stage(root, "control", params=params, extra=extra, name=name) as ctx:
        tokens = ctx.path(Layout.tokens(of))
        tokenizer_path = ctx.require(f"{Layout.tokenizer_dir}/{TOKENIZER_FILE}")
        indices = train_subset(ctx.root, of, control.labels, control.labels_seed)
        out = ctx.path(Layout.control(name))
        out.mkdir(parents=True, exist_ok=True)
        metrics: dict = {}
        lm_file: Path | None = None
        pretrained = Layout.pretrained(direction)
        frozen_lms = None
        if frozen:
            frozen_lms = tuple(
                ctx.require(f"{Layout.finetuned(of, d)}/{MODEL_FILE}") for d in ("fwd", "bwd")
            )
        elif own_lm:
            lm_file = ctx.require(f"{Layout.finetuned(of, direction)}/{MODEL_FILE}")
        elif control.encoder == "pretrained":
            lm_file = ctx.require(f"{pretrained}/{MODEL_FILE}")
        elif control.encoder in ("lm_from_scratch", "finetuned"):
            # The dataset's own LM fine-tuning from random weights (the "no pretraining"
            # ablation) or from a pretraining snapshot (the pretraining-budget curve).
            init = None
            if control.pretrain_step is not None:
                init = ctx.require(f"{pretrained}/{snapshot_file(control.pretrain_step)}")
                snapshot = load_model(init)[1]["extra"]
                metrics.update(pretrain_step=snapshot["step"], pretrain_tokens=snapshot["tokens"])
            lm = finetune_language_model(
                ctx,
                control.finetune,
                finetuning_files(tokens, control.finetune, of),
                tokenizer=tokenizer_path,
                direction=direction,
                init_model=init,
                out=out / "lm",
                checkpoint_dir=ctx.checkpoint_dir("lm"),
                description=f"control {name}: LM fine-tuning from "
                + ("random weights" if init is None else f"step {control.pretrain_step}"),
                metric_prefix="lm_",
            )
            lm_file = Path(lm["model"])
            wanted = ("valid_perplexity", "valid_loss", "steps", "epochs", "train_tokens")
            metrics.update({f"lm_{k}": lm["metrics"][k] for k in wanted if k in lm["metrics"]})
        result = fit_classifier(
            ctx,
            control.classifier,
            tokens,
            tokenizer=tokenizer_path,
            label_names=label_names_of(ctx.root, of),
            direction=direction,
            lm_file=lm_file,
            out=out / "classifier",
            checkpoint_dir=ctx.checkpoint_dir("classifier"),
            description=f"control {name}",
            train_indices=indices,
            frozen_lms=frozen_lms,
        )
        test = test_classifier_task(
            Path(result["model"]),
            tokens / "test.parquet",
            tokenizer_path,
            batch_size=params.evaluate.batch_size,
            direction=direction,
            device=device,
            description=f"control {name} test",
        )
        metrics.update(result["metrics"])
        metrics.update(
            dataset=of,
            encoder=control.encoder,
            labels=control.labels,
            direction=direction,
            description=control.description,
            **test,
            valid_error=result["metrics"].get("valid_error_rate"),
        )
        record_outputs(
            ctx,
            metrics,
            result["steps"],
            result["evals"],
            artifacts=(Path(result["model"]),),
        )
    return result["model"]
