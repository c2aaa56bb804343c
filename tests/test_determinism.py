"""Outputs whose content is deterministic are byte-identical across runs: DVC hashes files, so
any varying byte (a temporary file name, a timestamp, dict order) reruns every downstream stage.

Each writer saves the same content to two folders and twice to the same path; the md5s must
agree and no temporary file may be left beside the output.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ulmfit.checkpoint import save_checkpoint, save_model
from ulmfit.config import to_dict
from ulmfit.corpora.output import write_json, write_labelled
from ulmfit.corpora.sources import InputLog
from ulmfit.model import AWDLSTMConfig, LanguageModel
from ulmfit.storage import TokenDocs, write_tokens
from ulmfit.tokenizer import TokenizerConfig, train_tokenizer
from ulmfit.train import LMTrainConfig, train_language_model

TINY = AWDLSTMConfig(vocab_size=30, embed_size=16, hidden_size=24, num_layers=2)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def md5s_of_three_saves(tmp_path: Path, name: str, write: Callable[[Path], object]) -> list[str]:
    """md5 after saving to ``a/name``, ``b/name`` and ``a/name`` again (over the first)."""
    sums = []
    for folder in ("a", "b", "a"):
        path = tmp_path / name.replace(".", "_") / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        sums.append(md5(path))
        assert [p.name for p in path.parent.iterdir()] == [name], "a temporary file was left"
    return sums


def assert_stable(tmp_path: Path, name: str, write: Callable[[Path], object]) -> None:
    sums = md5s_of_three_saves(tmp_path, name, write)
    assert sums[0] == sums[1] == sums[2], sums


def test_model_file_bytes_do_not_depend_on_the_temporary_name(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(TINY)
    assert_stable(
        tmp_path,
        "model.pt",
        lambda p: save_model(p, model, kind="lm", config=to_dict(TINY), tokenizer_identity="t"),
    )


def test_checkpoint_bytes_do_not_depend_on_the_temporary_name(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "step": 3, "position": np.arange(4)}
    assert_stable(tmp_path, "step-000000003.pt", lambda p: save_checkpoint(p, state))


def test_token_file_bytes_are_stable(tmp_path):
    docs = TokenDocs.from_lists([[2, 5, 6, 7], [2, 9, 9]], labels=[0, 1])
    assert_stable(tmp_path, "train.parquet", lambda p: write_tokens(p, docs, "identity", 30))


def test_prepared_parquet_and_json_bytes_are_stable(tmp_path):
    texts, labels = ["a first text", "a second"], np.array([1, 0])
    assert_stable(
        tmp_path, "train.parquet", lambda p: write_labelled(p, texts, labels, ["neg", "pos"])
    )
    assert_stable(tmp_path, "summary.json", lambda p: write_json(p, {"b": 0.1, "a": [1, 2]}))


def test_tokenizer_model_bytes_are_stable(tmp_path):
    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(100)]
    cfg = TokenizerConfig(vocab_size=400, threads=1)
    assert_stable(tmp_path, "tokenizer.model", lambda p: train_tokenizer(texts, p, cfg))


def test_stage_metrics_curves_and_figures_are_stable(tmp_path):
    pytest.importorskip("matplotlib")
    from tasks.plots import training_figure, write_rows
    from tasks.stage import write_json as write_metrics

    steps = [{"step": i, "loss": 3.0 / (i + 1), "lr": 0.01} for i in range(5)]
    evals = [{"step": 4, "loss": 0.7}]
    assert_stable(tmp_path, "metrics.json", lambda p: write_metrics(p, {"b": 0.1, "a": 1.0}))
    assert_stable(tmp_path, "curve.csv", lambda p: write_rows(p, steps, ["step", "loss", "lr"]))
    assert_stable(tmp_path, "figure.png", lambda p: training_figure(p, steps, evals, "stage"))


def test_a_seeded_tiny_lm_training_gives_the_same_model_file_twice(tmp_path):
    rng = np.random.default_rng(0)
    docs = TokenDocs.from_lists(
        [[2, *rng.integers(4, 30, size=int(rng.integers(6, 20))).tolist()] for _ in range(12)]
    )
    cfg = LMTrainConfig(epochs=1, batch_size=3, bptt=5, lr=0.01, seed=7, max_steps=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sums = []
        for run in ("first", "second"):
            torch.manual_seed(0)
            model = LanguageModel(TINY)
            train_language_model(model, docs, None, cfg, checkpoint_dir=tmp_path / run / "ckpt")
            path = save_model(
                tmp_path / run / "model.pt",
                model,
                kind="lm",
                config=to_dict(TINY),
                tokenizer_identity="t",
            )
            sums.append(md5(path))
    finally:
        torch.set_num_threads(threads)
    assert sums[0] == sums[1], sums


def test_a_prepared_dataset_and_its_token_file_are_the_same_bytes_twice(tmp_path):
    from fixtures.corpora.builders import imdb_members, tar_gz

    from ulmfit.corpora import DatasetSource, prepare_dataset
    from ulmfit.storage import encode_corpus

    archive = tar_gz(tmp_path / "aclImdb_v1.tar.gz", imdb_members(per_class=6, unsup=4))
    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(100)]
    tokenizer = train_tokenizer(
        texts, tmp_path / "tokenizer.model", TokenizerConfig(400, threads=1)
    )
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run
        prepare_dataset(
            DatasetSource(name="imdb", path=str(archive), valid_fraction=0.25),
            out / "prepared",
            cache_dir=tmp_path / "cache",
            progress=lambda *a: None,
        )
        encode_corpus(texts * 3, tokenizer.path, out / "tokens.parquet", workers=2, chunk_docs=50)
        outputs.append(
            {p.relative_to(out).as_posix(): md5(p) for p in out.rglob("*") if p.is_file()}
        )
    assert len(outputs[0]) > 4 and outputs[0] == outputs[1]


def test_the_served_classifier_folder_is_the_same_bytes_twice(tmp_path):
    from ulmfit.model import ClassifierConfig, SequenceClassifier
    from ulmfit.predict import TextClassifier

    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(100)]
    tokenizer = train_tokenizer(
        texts, tmp_path / "tokenizer.model", TokenizerConfig(400, threads=1)
    )
    torch.manual_seed(0)
    classifier = TextClassifier(
        tokenizer,
        SequenceClassifier(ClassifierConfig(encoder=TINY, num_classes=2)),
        SequenceClassifier(ClassifierConfig(encoder=TINY, num_classes=2)),
        label_names=["neg", "pos"],
    )
    folders = [classifier.save(tmp_path / run / "model") for run in ("first", "second")]
    classifier.save(folders[0])  # over itself
    first, second = ({p.name: md5(p) for p in f.iterdir()} for f in folders)
    assert sorted(first) == ["backward.pt", "classifier.json", "forward.pt", "tokenizer.model"]
    assert first == second


def test_a_resumed_training_writes_the_same_stage_folder_as_an_uninterrupted_one(tmp_path):
    from tasks.training import _write_model_dir

    torch.manual_seed(0)
    model = LanguageModel(TINY)
    sums = []
    for run, resumed_from in (("whole", None), ("resumed", "/ws/runs/checkpoints/step-4.pt")):
        out = tmp_path / run
        summary = {"steps": 8, "resumed_from": resumed_from, "metrics": {"loss": 2.5}}
        _write_model_dir(
            out, model, kind="lm", config=TINY, identity="t", extra={}, summary=summary
        )
        sums.append({p.name: md5(p) for p in out.iterdir()})
    assert sums[0] == sums[1] and "training.json" in sums[0]


def test_the_default_tokenizer_does_not_depend_on_the_core_count(tmp_path, monkeypatch):
    """SentencePiece's piece scores depend on its thread count: the default is a fixed one, so
    a 2-core laptop and a 64-core server train the same tokenizer."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=int(n))) for n in rng.integers(2, 9, 800)]
    texts = [" ".join(rng.choice(words, size=60)) for _ in range(400)]
    for cores in (1, 8):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        train_tokenizer(texts, tmp_path / f"{cores}.model", TokenizerConfig(vocab_size=500))
    assert md5(tmp_path / "1.model") == md5(tmp_path / "8.model")


def test_sources_json_is_the_same_in_two_clones(tmp_path):
    """``sources.json`` names inputs relative to the workspace: clones in different folders,
    each with its data beside it, write the same bytes."""
    written = []
    for clone in ("a", "b/deeper"):
        root, data = tmp_path / clone / "ws", tmp_path / clone / "shared" / "train.csv"
        data.parent.mkdir(parents=True)
        root.mkdir()
        data.write_text("text,label\nfine,pos\n")
        log = InputLog(base=root)
        log.add("train", str(data), data)
        log.add("package", "package:bbc/news.csv", data)
        write_json(root / "sources.json", {"inputs": log.entries})
        written.append(md5(root / "sources.json"))
    assert written[0] == written[1]
    assert log.entries[0]["path"] == log.entries[0]["origin"] == "../shared/train.csv"
