"""Flows of stages ``train_tokenizer``, ``tokenize_wikipedia`` and ``tokenize_dataset``."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.params import load_params, section_dict
from tasks.stage import record_outputs, require, stage_run
from tasks.tokens import TOKENIZER_FILE, encode_splits_task, train_tokenizer_task
from tasks.workspace import Layout


def _flat(stats: dict) -> dict:
    return {
        f"{split}_{k}": v
        for split, values in stats.items()
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


@flow(name="train_tokenizer", persist_result=False)
def train_tokenizer_flow(root: str = ".") -> str:
    """SentencePiece on the Wikipedia training split -> ``data/tokenizer/tokenizer.model``."""
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    spec = Layout.stage("train_tokenizer")
    corpus = require(root_path / Layout.wikipedia / "train.parquet", "prepare_wikipedia")
    with stage_run(root_path, spec, params, section_dict(params, "tokenizer")) as ctx:
        out = ctx.path(Layout.tokenizer_dir)
        info = train_tokenizer_task(corpus, out, params.tokenizer)
        record_outputs(
            root_path,
            ctx.run_id,
            spec,
            {"vocab_size": info["vocab_size"]},
            artifacts=(out / TOKENIZER_FILE,),
        )
    return str(out / TOKENIZER_FILE)


@flow(name="tokenize_wikipedia", persist_result=False)
def tokenize_wikipedia_flow(root: str = ".") -> str:
    """Wikipedia splits -> token files ``data/wikipedia_tokens/{train,valid}.parquet``."""
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    spec = Layout.stage("tokenize_wikipedia")
    tokenizer = require(root_path / Layout.tokenizer_dir / TOKENIZER_FILE, "train_tokenizer")
    source = require(root_path / Layout.wikipedia, "prepare_wikipedia")
    with stage_run(root_path, spec, params, section_dict(params, "tokenize")) as ctx:
        out = ctx.path(Layout.wikipedia_tokens)
        stats = encode_splits_task(
            source,
            tokenizer,
            out,
            labelled=False,
            workers=params.tokenize.workers,
            chunk_docs=params.tokenize.chunk_docs,
        )
        record_outputs(root_path, ctx.run_id, spec, _flat(stats))
    return str(out)


@flow(name="tokenize_dataset", persist_result=False, flow_run_name="tokenize_dataset-{dataset}")
def tokenize_dataset_flow(dataset: str, root: str = ".") -> str:
    """A prepared dataset's splits (labels kept) -> ``data/datasets/<dataset>/tokens/``."""
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    params.dataset(dataset)
    spec = Layout.stage("tokenize_dataset", dataset)
    tokenizer = require(root_path / Layout.tokenizer_dir / TOKENIZER_FILE, "train_tokenizer")
    source = require(root_path / Layout.prepared(dataset), f"prepare_dataset@{dataset}")
    with stage_run(root_path, spec, params, section_dict(params, "tokenize")) as ctx:
        out = ctx.path(Layout.tokens(dataset))
        stats = encode_splits_task(
            source,
            tokenizer,
            out,
            labelled=True,
            workers=params.tokenize.workers,
            chunk_docs=params.tokenize.chunk_docs,
        )
        record_outputs(root_path, ctx.run_id, spec, _flat(stats))
    return str(out)
