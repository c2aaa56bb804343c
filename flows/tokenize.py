"""Flows of stages ``train_tokenizer``, ``tokenize_wikipedia`` and ``tokenize_dataset``."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.pipeline import stage_spec
from tasks.stage import SKIPPED_FILE, StageContext, record_outputs, run_stage, skip_stage
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
    """SentencePiece on the Wikipedia training split -> ``data/tokenizer/tokenizer.model``; with
    ``pretrain.reuse``, the reused LMs' own tokenizer instead (docs/pretrained.md)."""
    with run_stage(root, "train_tokenizer") as ctx:
        out = ctx.path(Layout.tokenizer_dir)
        if ctx.params.pretrain.reuse:
            return _reused_tokenizer(ctx, out)
        corpus = ctx.require(f"{Layout.wikipedia}/train.parquet")
        info = train_tokenizer_task(corpus, out, ctx.params.tokenizer)
        record_outputs(ctx, {"vocab_size": info["vocab_size"]}, artifacts=(out / TOKENIZER_FILE,))
    return str(out / TOKENIZER_FILE)


def _reused_tokenizer(ctx: StageContext, out: Path) -> str:
    """The tokenizer that comes with the reused LMs (one for both directions, checked)."""
    # Imported here: the other tokenize stages do not depend on the model code.
    from tasks.pretrained import (
        SOURCES_FILE,
        check_architecture,
        fetch_lm_task,
        log_origin,
        one_tokenizer,
        place_tokenizer_task,
    )

    pretrain = ctx.params.pretrain
    lms = {
        direction: fetch_lm_task(ctx.root, source, direction, ctx.path(Layout.cache_dir))
        for direction, source in pretrain.reuse.items()
    }
    for direction, lm in lms.items():
        check_architecture(lm, pretrain.model, direction)
        log_origin(ctx.root, ctx.run_id, lm, f"reused.{direction}")
    lm = one_tokenizer(lms)
    info = place_tokenizer_task(lm, out)
    metrics = {"vocab_size": info["vocab_size"], "reused": {d: x.record() for d, x in lms.items()}}
    record_outputs(ctx, metrics, artifacts=(out / TOKENIZER_FILE, out / SOURCES_FILE))
    return str(out / TOKENIZER_FILE)


@flow(name="tokenize_wikipedia", persist_result=False)
def tokenize_wikipedia_flow(root: str = ".") -> str:
    """Wikipedia splits -> token files ``data/wikipedia_tokens/{train,valid}.parquet``; nothing
    when prepare_wikipedia did not run (``pretrain.reuse``)."""
    wikipedia = Path(root).resolve() / Layout.wikipedia
    if (wikipedia / SKIPPED_FILE).is_file():
        spec = stage_spec("tokenize_wikipedia")
        skip_stage(Path(root).resolve(), spec, "prepare_wikipedia did not run (pretrain.reuse)")
        return ""
    with run_stage(root, "tokenize_wikipedia") as ctx:
        out = ctx.path(Layout.wikipedia_tokens)
        _encode(ctx, ctx.path(Layout.wikipedia), out, labelled=False)
    return str(out)


@flow(name="tokenize_dataset", persist_result=False, flow_run_name="tokenize_dataset-{dataset}")
def tokenize_dataset_flow(dataset: str, root: str = ".") -> str:
    """A prepared dataset's splits (labels kept) -> ``data/datasets/<dataset>/tokens/``."""
    with run_stage(root, "tokenize_dataset", dataset=dataset) as ctx:
        out = ctx.path(Layout.tokens(dataset))
        _encode(ctx, ctx.path(Layout.prepared(dataset)), out, labelled=True)
    return str(out)


def _encode(ctx: StageContext, source: Path, out: Path, *, labelled: bool) -> None:
    """Encode every split of ``source`` with the pipeline's tokenizer into ``out``."""
    stats = encode_splits_task(
        source,
        ctx.require(f"{Layout.tokenizer_dir}/{TOKENIZER_FILE}"),
        out,
        labelled=labelled,
        workers=ctx.params.tokenize.workers,
        chunk_docs=ctx.params.tokenize.chunk_docs,
    )
    record_outputs(ctx, _flat(stats))
