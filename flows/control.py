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

import numpy as np
from prefect import flow

from flows.train import finetune_language_model, finetuning_files, fit_classifier, label_names_of
from tasks.baseline import label_subset
from tasks.params import load_params, section_dict
from tasks.stage import record_outputs, require, runtime, stage_run
from tasks.tokens import TOKENIZER_FILE, parquet_column
from tasks.training import MODEL_FILE, snapshot_file
from tasks.workspace import Layout
from ulmfit.checkpoint import load_model
from ulmfit.errors import InputError
from ulmfit.storage import read_tokens
from ulmfit.tokenizer import Tokenizer
from ulmfit.train import evaluate_classifier


def train_subset(root: Path, dataset: str, labels: int | None, seed: int) -> np.ndarray | None:
    """Indices of the control's training documents (None: all), checked to be the same
    documents in the prepared Parquet (what the TF-IDF baseline reads) and the token file."""
    if labels is None:
        return None
    prepared = root / Layout.prepared(dataset) / "train.parquet"
    tokens = root / Layout.tokens(dataset) / "train.parquet"
    text_labels = np.asarray(list(parquet_column(prepared, "label")), dtype=np.int64)
    token_labels = np.asarray(read_tokens(tokens).labels, dtype=np.int64)
    if not np.array_equal(text_labels, token_labels):
        raise InputError(
            tokens,
            "its documents are not in the order of the prepared train split",
            fix=f"re-run the tokenizer for this dataset: dvc repro -f tokenize_dataset@{dataset}",
        )
    return label_subset(text_labels, labels, seed)


@flow(name="control", persist_result=False, flow_run_name="control-{name}")
def control_flow(name: str, root: str = ".") -> str:
    """Train and test control ``name`` (an entry of ``controls``)."""
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    control = params.control(name)
    of, direction = control.dataset, control.direction
    spec = Layout.stage("control", name, of)
    tokens = require(root_path / Layout.tokens(of), f"tokenize_dataset@{of}")
    tokenizer_path = require(root_path / Layout.tokenizer_dir / TOKENIZER_FILE, "train_tokenizer")
    label_names = label_names_of(root_path, of)
    own_lm = control.encoder == "finetuned" and control.pretrain_step is None
    if own_lm and direction not in params.dataset(of).directions:
        raise InputError(
            root_path / "params.yaml",
            f"control {name} needs the {direction} LM of {of}, which "
            f"datasets.{of}.directions leaves out",
            fix=f"add {direction} to datasets.{of}.directions or change the control's direction",
        )
    indices = train_subset(root_path, of, control.labels, control.labels_seed)
    section = section_dict(params, "controls", dataset=name)
    section["pretrain_model"] = section_dict(params, "pretrain")["pretrain"]["model"]
    device = runtime(control.classifier.device, control.classifier.threads)
    with stage_run(root_path, spec, params, section) as ctx:
        out = ctx.path(Layout.control(name))
        out.mkdir(parents=True, exist_ok=True)
        metrics: dict = {}
        lm_file: Path | None = None
        pretrained = root_path / Layout.pretrained(direction)
        if control.encoder == "finetuned" and control.pretrain_step is None:
            lm_file = require(
                root_path / Layout.finetuned(of, direction) / MODEL_FILE,
                f"finetune_lm@{of}-{direction}",
            )
        elif control.encoder == "pretrained":
            lm_file = require(pretrained / MODEL_FILE, f"pretrain@{direction}")
        elif control.encoder in ("lm_from_scratch", "finetuned"):
            # The dataset's own LM fine-tuning from random weights (the "no pretraining"
            # ablation) or from a pretraining snapshot (the pretraining-budget curve).
            init = None
            if control.pretrain_step is not None:
                init = require(
                    pretrained / snapshot_file(control.pretrain_step), f"pretrain@{direction}"
                )
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
            label_names=label_names,
            direction=direction,
            lm_file=lm_file,
            out=out / "classifier",
            checkpoint_dir=ctx.checkpoint_dir("classifier"),
            description=f"control {name}",
            train_indices=indices,
        )
        test = read_tokens(tokens / "test.parquet", Tokenizer.load(tokenizer_path))
        model, _ = load_model(result["model"], device=device)
        test_metrics, _ = evaluate_classifier(
            model,
            test,
            batch_size=params.evaluate.batch_size,
            backward=direction == "bwd",
            device=device,
        )
        metrics.update(result["metrics"])
        metrics.update(
            dataset=of,
            encoder=control.encoder,
            labels=control.labels,
            direction=direction,
            description=control.description,
            test_error=test_metrics["error_rate"],
            test_accuracy=test_metrics["accuracy"],
            test_loss=test_metrics["loss"],
            test_documents=len(test),
            valid_error=result["metrics"].get("valid_error_rate"),
        )
        record_outputs(
            root_path,
            ctx.run_id,
            spec,
            metrics,
            result["steps"],
            result["evals"],
            artifacts=(Path(result["model"]),),
        )
    return result["model"]
