"""Pretrain once, reuse everywhere (docs/pretrained.md): the pretrain stage registers its LM in
MLflow, and another project starts from that LM (a local folder, a URL with its sha256, or a
``models:/`` URI of the first project's store) with its tokenizer, refusing mismatches.

A "source" project pretrains a micro LM per direction once (module fixture: the Wikipedia and
pretrain flows, in process under one Prefect test server, with real MLflow on SQLite); each
test then runs the stages of a fresh "target" project that matter for its case.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from fixtures.corpora.builders import CorpusServer
from test_pipeline import micro_params

from tasks.workspace import Layout
from ulmfit.errors import InputError

pytestmark = pytest.mark.timeout(1500)


def write_project(path: Path, params: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def tiny_params(reuse: dict | None = None) -> dict:
    params = micro_params()
    params["pretrain"]["train"].update(max_steps=4)
    params["controls"] = {}
    params["pretrain"]["reuse"] = reuse
    return params


def store(root: Path) -> str:
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def client_of(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store(root), registry_uri=store(root))


def read(root: Path, relative: str) -> dict:
    return json.loads((root / relative).read_text())


@pytest.fixture(scope="module")
def prefect():
    from prefect.testing.utilities import prefect_test_harness

    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["ULMFIT_PIPELINE_ID"] = "test-pretrained"
    with prefect_test_harness(server_startup_timeout=300):
        yield
    os.environ.pop("ULMFIT_PIPELINE_ID", None)
    os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="module")
def source(tmp_path_factory, prefect) -> Path:
    """A project that pretrained (and registered) a micro LM per direction."""
    from flows.prepare import prepare_wikipedia_flow
    from flows.tokenize import tokenize_wikipedia_flow, train_tokenizer_flow
    from flows.train import pretrain_flow

    root = write_project(tmp_path_factory.mktemp("source") / "ws", tiny_params())
    prepare_wikipedia_flow(root=str(root))
    train_tokenizer_flow(root=str(root))
    tokenize_wikipedia_flow(root=str(root))
    for direction in ("fwd", "bwd"):
        pretrain_flow(direction, root=str(root))
    return root


def reuse_stages(root: Path, *directions: str) -> None:
    """The stages a reused LM changes: the Wikipedia ones do nothing, the tokenizer and the
    LMs come from the reused LMs."""
    from flows.prepare import prepare_wikipedia_flow
    from flows.tokenize import tokenize_wikipedia_flow, train_tokenizer_flow
    from flows.train import pretrain_flow

    prepare_wikipedia_flow(root=str(root))
    train_tokenizer_flow(root=str(root))
    tokenize_wikipedia_flow(root=str(root))
    for direction in directions:
        pretrain_flow(direction, root=str(root))


def assert_same_lm(target: Path, source: Path, direction: str) -> dict:
    """The target's tokenizer and LM are the source's, byte for byte; returns its metrics."""
    lm = Layout.pretrained(direction)
    tokenizer = f"{Layout.tokenizer_dir}/tokenizer.model"
    assert (target / tokenizer).read_bytes() == (source / tokenizer).read_bytes()
    assert (target / lm / "model.pt").read_bytes() == (source / lm / "model.pt").read_bytes()
    metrics = read(target, f"metrics/wikipedia/pretrain_{direction}.json")
    assert (
        metrics["reused"]["model_sha256"]
        == hashlib.sha256((source / lm / "model.pt").read_bytes()).hexdigest()
    )
    assert metrics["valid_perplexity"] > 1  # what the source's training recorded
    assert read(target, f"{lm}/sources.json")[0]["origin"] == metrics["reused"]["origin"]
    return metrics


# ------------------------------------------------------------------------------ registration


def test_the_pretrain_stage_tracks_every_key_but_register():
    """Turning registration on or off never reruns hours of pretraining; any other key does."""
    import dataclasses

    from tasks.params import PretrainParams
    from tasks.pipeline import BY_GROUP

    keys = {f"pretrain.{f.name}" for f in dataclasses.fields(PretrainParams)}
    assert set(BY_GROUP["pretrain"].params) == keys - {"pretrain.register"}
    for profile in sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.yaml")):
        section = yaml.safe_load(profile.read_text())["pretrain"]
        assert {f"pretrain.{k}" for k in section} >= keys - {"pretrain.register"}, profile.name


@pytest.mark.slow
def test_pretrain_registers_its_lm_with_its_tokenizer(source, tmp_path):
    import mlflow.artifacts

    from tasks.training import load_for
    from ulmfit.tokenizer import Tokenizer

    client = client_of(source)
    tokenizer = Tokenizer.load(source / Layout.tokenizer_dir / "tokenizer.model")
    for direction in ("fwd", "bwd"):
        version = client.get_model_version(f"ulmfit-lm-{direction}", "1")
        metrics = read(source, f"metrics/wikipedia/pretrain_{direction}.json")
        assert version.tags["ulmfit.direction"] == direction
        assert version.tags["ulmfit.vocab_size"] == str(tokenizer.vocab_size)
        assert version.tags["ulmfit.tokenizer_sha256"] == tokenizer.identity
        assert int(version.tags["ulmfit.tokens_seen"]) == metrics["tokens_trained"] > 0
        assert float(version.tags["ulmfit.valid_perplexity"]) == metrics["valid_perplexity"]
        assert version.tags["ulmfit.pipeline_id"] == "test-pretrained"
        run = client.get_run(version.run_id)
        assert run.data.tags["ulmfit.stage"] == f"pretrain@{direction}"
        assert run.data.tags["ulmfit.registered_version"] == "1"

    folder = Path(
        mlflow.artifacts.download_artifacts(
            "models:/ulmfit-lm-fwd/1",
            dst_path=str(tmp_path / "fetched"),
            tracking_uri=store(source),
            registry_uri=store(source),
        )
    )
    lm = source / Layout.pretrained("fwd")
    assert (folder / "model.pt").read_bytes() == (lm / "model.pt").read_bytes()
    assert (folder / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    model = load_for(folder / "model.pt", Tokenizer.load(folder / "tokenizer.model"), "the LM")
    assert model.cfg.vocab_size == tokenizer.vocab_size


# ------------------------------------------------------------------------------------- reuse


@pytest.mark.slow
def test_reuse_a_local_checkpoint_and_tokenize_and_finetune_with_its_tokenizer(source, tmp_path):
    from flows.prepare import prepare_dataset_flow
    from flows.tokenize import tokenize_dataset_flow
    from flows.train import finetune_lm_flow
    from ulmfit.storage import read_tokens
    from ulmfit.tokenizer import Tokenizer

    reuse = {d: {"path": str(source / Layout.pretrained(d))} for d in ("fwd", "bwd")}
    target = write_project(tmp_path / "target", tiny_params(reuse))
    reuse_stages(target, "fwd", "bwd")

    # No Wikipedia: the two stages recorded that they did not run.
    assert read(target, "metrics/wikipedia/prepare.json")["skipped"]
    assert read(target, "metrics/wikipedia/tokenize.json")["skipped"]
    assert not (target / Layout.wikipedia / "train.parquet").exists()
    for direction in ("fwd", "bwd"):
        metrics = assert_same_lm(target, source, direction)
        assert metrics["reused"]["origin"] == reuse[direction]["path"]
    tokenizer_metrics = read(target, "metrics/wikipedia/tokenizer.json")
    assert set(tokenizer_metrics["reused"]) == {"fwd", "bwd"}

    client = client_of(target)
    run_id = read(target, "metrics/runs/wikipedia/pretrain_fwd.json")["mlflow_run_id"]
    params = client.get_run(run_id).data.params
    assert params["pretrain.reuse.fwd.path"] == reuse["fwd"]["path"]
    fwd = read(target, "metrics/wikipedia/pretrain_fwd.json")["reused"]
    assert params["reused.fwd.sha256"] == fwd["sha256"] == fwd["model_sha256"]
    assert not client.search_registered_models()  # only LMs trained here are registered

    # The dataset is tokenized with the reused LM's tokenizer, and fine-tuning starts from it.
    prepare_dataset_flow("bbc_news", root=str(target))
    tokenize_dataset_flow("bbc_news", root=str(target))
    tokenizer = Tokenizer.load(source / Layout.tokenizer_dir / "tokenizer.model")
    read_tokens(target / Layout.tokens("bbc_news") / "train.parquet", tokenizer)  # checks it
    finetune_lm_flow("bbc_news", "fwd", root=str(target))
    finetuned = read(target, "metrics/bbc_news/finetune_lm_fwd.json")
    assert finetuned["valid_perplexity"] > 1


@pytest.mark.slow
def test_reuse_from_a_url_needs_the_right_sha256(source, tmp_path):
    archive = tmp_path / "lm-fwd.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / Layout.pretrained("fwd"), arcname="lm-fwd")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    server = CorpusServer().start()
    server.files["lm-fwd.tar.gz"] = archive.read_bytes()
    try:
        url = server.url("lm-fwd.tar.gz")
        reuse = {"fwd": {"url": url, "sha256": "0" * 64}}
        params = tiny_params(reuse)
        params["datasets"]["bbc_news"]["directions"] = ["fwd"]
        wrong = write_project(tmp_path / "wrong", params)
        with pytest.raises(InputError, match="checksum mismatch") as refused:
            reuse_stages(wrong, "fwd")
        assert "\n" not in str(refused.value)
        assert not (wrong / Layout.tokenizer_dir).exists()

        params = copy.deepcopy(params)
        params["pretrain"]["reuse"]["fwd"]["sha256"] = digest
        target = write_project(tmp_path / "target", params)
        reuse_stages(target, "fwd", "bwd")
    finally:
        server.stop()
    metrics = assert_same_lm(target, source, "fwd")
    assert metrics["reused"]["origin"] == url and metrics["reused"]["sha256"] == digest
    # No bwd LM is reused and no dataset trains one: its pretrain item records that.
    assert read(target, "metrics/wikipedia/pretrain_bwd.json")["skipped"]


@pytest.mark.slow
def test_reuse_from_another_projects_mlflow_store(source, tmp_path):
    import mlflow

    reuse = {
        "fwd": {"model_uri": "models:/ulmfit-lm-fwd/1", "tracking_uri": store(source)},
        "bwd": {"model_uri": "models:/ulmfit-lm-bwd@latest", "tracking_uri": store(source)},
    }
    target = write_project(tmp_path / "target", tiny_params(reuse))
    # MLflow's process-wide store is the target's own, as in a stage of the target project.
    mlflow.set_tracking_uri(store(target))
    mlflow.set_registry_uri(store(target))
    reuse_stages(target, "fwd", "bwd")
    for direction in ("fwd", "bwd"):
        metrics = assert_same_lm(target, source, direction)
        assert metrics["reused"]["model_version"] == "1"
        assert metrics["reused"]["tracking_uri"] == store(source)
    assert not client_of(target).search_registered_models()


# -------------------------------------------------------------------------------- mismatches


def lm_folder(path: Path, tokenizer: Path, *, identity: str, vocab_size: int) -> Path:
    """An LM folder with a random LM of ``vocab_size`` rows saved for tokenizer ``identity``
    (the micro sizes of :func:`tiny_params`)."""
    from ulmfit.checkpoint import save_model
    from ulmfit.config import to_dict
    from ulmfit.model import AWDLSTMConfig, LanguageModel

    config = AWDLSTMConfig(vocab_size=vocab_size, embed_size=16, hidden_size=32, num_layers=3)
    path.mkdir(parents=True)
    save_model(
        path / "model.pt",
        LanguageModel(config),
        kind="lm",
        config=to_dict(config),
        tokenizer_identity=identity,
    )
    shutil.copy2(tokenizer, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def other_tokenizer(source, tmp_path_factory) -> Path:
    """A second tokenizer (a smaller vocabulary on the same text)."""
    from tasks.tokens import parquet_column
    from ulmfit.tokenizer import TokenizerConfig, train_tokenizer

    path = tmp_path_factory.mktemp("other") / "tokenizer.model"
    texts = parquet_column(source / Layout.wikipedia / "train.parquet", "text")
    train_tokenizer(texts, path, TokenizerConfig(vocab_size=500, seed=1))
    return path


@pytest.mark.slow
def test_tokenizer_mismatches_are_refused(source, other_tokenizer, tmp_path):
    from flows.prepare import prepare_wikipedia_flow
    from flows.tokenize import train_tokenizer_flow
    from flows.train import pretrain_flow
    from tasks.params import PretrainedSource, load_params
    from tasks.pretrained import check_architecture, fetch_lm_task
    from ulmfit.tokenizer import Tokenizer

    other = Tokenizer.load(other_tokenizer)
    fwd = source / Layout.pretrained("fwd")

    def fetch(folder: Path):
        return fetch_lm_task.fn(tmp_path, PretrainedSource(path=str(folder)), "bwd", tmp_path)

    # An LM beside a tokenizer it was not trained with.
    foreign = tmp_path / "foreign"
    shutil.copytree(fwd, foreign)
    shutil.copy2(other_tokenizer, foreign / "tokenizer.model")
    with pytest.raises(InputError, match="trained with another tokenizer"):
        fetch(foreign)
    # An LM whose embedding does not match its tokenizer's vocabulary.
    wide = lm_folder(
        tmp_path / "wide", other_tokenizer, identity=other.identity, vocab_size=other.vocab_size + 5
    )
    with pytest.raises(InputError, match=f"embedding has {other.vocab_size + 5} rows"):
        fetch(wide)
    # An LM of other sizes than pretrain.model's.
    lm = fetch(fwd)
    params = tiny_params()
    params["pretrain"]["model"]["hidden_size"] = 64
    sizes = load_params(write_project(tmp_path / "sizes", params) / "params.yaml")
    with pytest.raises(InputError, match="hidden_size 32 .params: 64."):
        check_architecture(lm, sizes.pretrain.model, "fwd")

    # fwd and bwd of different tokenizers: train_tokenizer refuses them, in one line.
    bwd = lm_folder(
        tmp_path / "bwd", other_tokenizer, identity=other.identity, vocab_size=other.vocab_size
    )
    reuse = {"fwd": {"path": str(fwd)}, "bwd": {"path": str(bwd)}}
    target = write_project(tmp_path / "target", tiny_params(reuse))
    prepare_wikipedia_flow(root=str(target))  # does nothing, as the LMs are reused
    with pytest.raises(InputError, match="different tokenizers") as refused:
        train_tokenizer_flow(root=str(target))
    assert "\n" not in str(refused.value)
    # A reused LM whose tokenizer is not the workspace's (train_tokenizer not re-run).
    shutil.copytree(source / Layout.tokenizer_dir, target / Layout.tokenizer_dir)
    (target / Layout.wikipedia_tokens).mkdir(parents=True)
    with pytest.raises(InputError, match="is not the workspace's"):
        pretrain_flow("bwd", root=str(target))
    assert not (target / Layout.pretrained("bwd")).exists()
