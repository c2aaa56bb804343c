"""The arms of issue 13 end to end: ``ulmfit repro`` on the micro config of
``tests/test_pipeline.py`` with a tiny GPT-style, then BERT-style, transformer as
``pretrain.model.backbone``. It checks
what the stages wrote: the models of its backbone, the tokens and wall time of each training,
the registered model's backbone tag and prediction from the served model. The ELMo-style
``frozen_features`` control reads the AWD-LSTM LMs, so it runs in test_pipeline.py's
workspace."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipeline import BIN, make_workspace, micro_params, run  # noqa: E402

from tasks.pipeline import stage_spec  # noqa: E402
from tasks.workspace import Layout  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
TEXTS = ["The team won the match in the final minute.", "Shares fell after the bank's report."]
TINY_TRANSFORMER = {"dim": 16, "num_layers": 2, "heads": 2, "ff_mult": 2, "max_len": 64}


def _repro(workspace: Path, *targets: str) -> None:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        run(
            [str(BIN / "ulmfit"), "repro", *targets],
            workspace,
            PREFECT_API_URL=PREFECT_API_URL.value(),
        )


def _json(workspace: Path, path: str) -> dict:
    return json.loads((workspace / path).read_text(encoding="utf-8"))


def _model(workspace: Path, folder: str):
    from ulmfit.checkpoint import load_model

    return load_model(workspace / folder / "model.pt")


def _registry_tags(workspace: Path, name: str, version: str = "1") -> dict:
    from mlflow import MlflowClient

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client.get_model_version(name, version).tags


def test_the_gpt_and_then_the_bert_style_backbone_run_every_stage_to_a_served_model(tmp_path):
    from ulmfit.predict import TextClassifier
    from ulmfit.transformer import TransformerClassifier, TransformerLM

    params = micro_params()
    params["pretrain"]["model"] = {"backbone": "transformer_causal", **TINY_TRANSFORMER}
    params["classifier"]["model"] = {"head_hidden": 8}
    params["controls"] = {"gpt-20": {"dataset": "bbc_news", "labels": 20}}
    workspace = make_workspace(tmp_path / "ws", params)
    _repro(workspace, "evaluate@bbc_news", "control@gpt-20", "baseline@bbc_news")

    for direction in ("fwd", "bwd"):
        for folder in (Layout.pretrained(direction), Layout.finetuned("bbc_news", direction)):
            model, meta = _model(workspace, folder)
            assert isinstance(model, TransformerLM) and model.cfg.objective == "causal", folder
            assert meta["extra"]["backward"] == (direction == "bwd")
        classifier, _ = _model(workspace, Layout.classifier("bbc_news", direction))
        assert isinstance(classifier, TransformerClassifier)
        assert classifier.cfg.pooling == "last"
    # Equal compute is stated per arm: tokens seen and wall time of each training.
    spec = stage_spec("pretrain", direction="fwd")
    metrics = _json(workspace, spec.metrics)
    assert metrics["tokens_trained"] > 0 and metrics["valid_perplexity"] > 1
    assert _json(workspace, spec.run_record)["wall_seconds"] > 0
    # The served ensemble and the registered models say which backbone they hold.
    served = TextClassifier.load(workspace / Layout.model("bbc_news"))
    assert served.backbone == "transformer_causal" and served.backward_model is not None
    labels, probs = served.predict(TEXTS)
    assert len(labels) == 2 and abs(probs.sum(axis=1) - 1).max() < 1e-5
    assert _registry_tags(workspace, "ulmfit-bbc_news")["ulmfit.backbone"] == "transformer_causal"
    assert _registry_tags(workspace, "ulmfit-lm-fwd")["ulmfit.backbone"] == "transformer_causal"
    control, _ = _model(workspace, f"{Layout.control('gpt-20')}/classifier")
    assert isinstance(control, TransformerClassifier)
    assert (
        0
        <= _json(workspace, stage_spec("control", name="gpt-20", dataset="bbc_news").metrics)[
            "test_error"
        ]
        <= 1
    )
    # bench/arms.py tabulates an arm and a control of its workspace from these files.
    table = tmp_path / "arms.md"
    arms = [f"GPT-style={workspace}", f"GPT-style, 20 labels={workspace}:gpt-20"]
    run(
        [sys.executable, str(ROOT / "bench" / "arms.py"), "--dataset", "bbc_news"]
        + [f"--arm={arm}" for arm in arms]
        + ["--out", str(table)],
        workspace,
    )
    rows = [line for line in table.read_text().splitlines() if line.startswith("| GPT-style")]
    error = _json(workspace, stage_spec("evaluate", dataset="bbc_news").metrics)["test_error_fwd"]
    assert len(rows) == 2 and f"| {100 * error:.2f} |" in rows[0], rows
    assert rows[0].split("|")[2].strip() == "transformer_causal"
    baseline = _json(workspace, stage_spec("baseline", dataset="bbc_news").metrics)["test_error"]
    assert "| TF-IDF + logistic regression | bag of n-grams, no pretraining " in table.read_text()
    assert f"| {100 * baseline:.2f} |" in table.read_text().split("| TF-IDF")[1]

    # Switching the workspace to the BERT-style backbone re-runs the model stages only: the
    # Wikipedia, tokenizer and dataset stages are the same and DVC keeps them.
    data_stage = _json(workspace, stage_spec("tokenize_dataset", dataset="bbc_news").run_record)
    params["pretrain"]["model"] = {"backbone": "transformer_mlm", **TINY_TRANSFORMER}
    params["classifier"]["model"] = {"head_hidden": 8, "pooling": "mean"}
    params["datasets"]["bbc_news"]["directions"] = ["fwd"]  # an MLM reads both sides already
    params["controls"] = {}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _repro(workspace, "evaluate@bbc_news")

    again = _json(workspace, stage_spec("tokenize_dataset", dataset="bbc_news").run_record)
    assert again["mlflow_run_id"] == data_stage["mlflow_run_id"]
    for folder in (Layout.pretrained("fwd"), Layout.finetuned("bbc_news", "fwd")):
        model, _ = _model(workspace, folder)
        assert isinstance(model, TransformerLM) and model.cfg.objective == "mlm", folder
    classifier, _ = _model(workspace, Layout.classifier("bbc_news", "fwd"))
    assert isinstance(classifier, TransformerClassifier) and classifier.cfg.pooling == "mean"
    assert "valid_masked_accuracy" in _json(workspace, spec.metrics)
    served = TextClassifier.load(workspace / Layout.model("bbc_news"))
    assert served.backbone == "transformer_mlm" and served.backward_model is None
    labels, probs = served.predict(TEXTS)
    assert len(labels) == 2 and abs(probs.sum(axis=1) - 1).max() < 1e-5
    tags = _registry_tags(workspace, "ulmfit-bbc_news", version="2")
    assert tags["ulmfit.backbone"] == "transformer_mlm"
    assert _registry_tags(workspace, "ulmfit-lm-fwd", version="2")["ulmfit.backbone"] == (
        "transformer_mlm"
    )
