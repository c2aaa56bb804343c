"""The classifier's last step: with and without the boundary token that closes each document.

Concat pooling reads ``h_last``, the state at a document's last step. A backward classifier
reads a document reversed, so its last token used to be ``xxbos`` (the document's first), the
boundary that the LMs' token stream puts between documents; the forward one ended on the
document's last word. This trains a workspace's classifier recipe (its dataset's
``classifier`` section, first grid point, the fine-tuned LMs) on the same documents framed
four ways and reports validation and test error:

* the forward classifier on ``xxbos doc`` and on ``xxbos doc xxbos``;
* the backward one on ``cod xxbos``, on ``cod`` (its ``xxbos`` taken away) and on
  ``xxbos cod xxbos``.

The library now closes every document itself (``ulmfit.batches.classifier_input``), so these
variants are only meaningful on the code before that change: run this script with a checkout
of commit 35ff224 first on ``PYTHONPATH`` (its ``ClassifierBatches`` feeds the documents as
given), as the table's reproduce line says.

    PYTHONPATH=<checkout of 35ff224> python bench/boundary.py --workspace ../demo --dataset bbc_news
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import ulmfit.batches
from tasks.params import parse_params
from tasks.recipes import label_names_of
from tasks.tokens import TOKENIZER_FILE
from tasks.training import MODEL_FILE
from tasks.workspace import Layout
from ulmfit.checkpoint import load_model
from ulmfit.evaluate import evaluate_classifier
from ulmfit.model import SequenceClassifier
from ulmfit.runtime import seed_everything
from ulmfit.storage import TokenDocs, read_tokens
from ulmfit.tokenizer import Tokenizer
from ulmfit.train import train_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect import publish  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "boundary.md"
VARIANTS = (  # (direction, framing, what the classifier reads)
    ("fwd", "as_is", "`xxbos doc` (the forward classifier before)"),
    ("fwd", "close", "`xxbos doc xxbos`"),
    ("bwd", "as_is", "`cod xxbos` (the backward classifier before)"),
    ("bwd", "open", "`cod` (its `xxbos` taken away)"),
    ("bwd", "close", "`xxbos cod xxbos`"),
)


def framed(docs: TokenDocs, framing: str, bos: int) -> TokenDocs:
    """``docs`` with the boundary appended (``close``), the leading one dropped (``open``), or
    as they are."""
    rows = list(docs)
    if framing == "close":
        rows = [np.append(row, bos) for row in rows]
    elif framing == "open":
        rows = [row[1:] if len(row) > 1 and row[0] == bos else row for row in rows]
    return TokenDocs.from_lists(rows, labels=docs.labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--dataset", default="bbc_news")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if hasattr(ulmfit.batches, "classifier_input"):
        parser.error(
            f"{ulmfit.batches.__file__} already closes every document; put a checkout of "
            "commit 35ff224 first on PYTHONPATH (see this script's docstring)"
        )
    torch.set_num_threads(args.threads)
    root = args.workspace.resolve()
    params = parse_params(yaml.safe_load((root / "params.yaml").read_text()))
    classifier = params.datasets[args.dataset].classifier
    tokenizer = Tokenizer.load(root / Layout.tokenizer_dir / TOKENIZER_FILE)
    tokens = root / Layout.tokens(args.dataset)
    splits = {
        s: read_tokens(tokens / f"{s}.parquet", tokenizer) for s in ("train", "valid", "test")
    }
    num_classes = len(label_names_of(root, args.dataset))
    point = classifier.grid()[0]
    rows = []
    for direction, framing, reads in VARIANTS:
        train, valid, test = (framed(d, framing, tokenizer.bos_id) for d in splits.values())
        cfg = classifier.train_for(point, backward=direction == "bwd")
        seed_everything(cfg.seed)
        model = SequenceClassifier(
            classifier.build(tokenizer.vocab_size, num_classes, point.dropout_multiplier)
        )
        lm, _ = load_model(root / Layout.finetuned(args.dataset, direction) / MODEL_FILE)
        model.encoder.load_state_dict(lm.encoder.state_dict())
        start = time.perf_counter()
        result = train_classifier(model, train, valid, cfg)
        metrics, _ = evaluate_classifier(model.eval(), test, batch_size=64, backward=cfg.backward)
        valid_errors = [h["error_rate"] for h in result.history]
        rows.append((direction, reads, valid_errors, metrics["error_rate"]))
        print(direction, framing, valid_errors, metrics["error_rate"], flush=True)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    lines = [
        "# The classifier's last step: the boundary token (issue 9)",
        "",
        f"Reproduce: `PYTHONPATH=<checkout of 35ff224> python bench/boundary.py --workspace "
        f"<workspace> --dataset {args.dataset}` (a workspace whose pipeline ran on "
        f"{args.dataset} with that code).",
        "",
        f"The workspace's own classifier recipe for {args.dataset} (lr {point.lr:g}, encoder "
        f"dropout x{point.dropout_multiplier:g}, {classifier.train.epochs} epochs, seed "
        f"{classifier.train.seed}), on its fine-tuned LMs, trained on the same "
        f"{len(splits['train']):,} documents framed as shown; validation error at each epoch "
        f"({len(splits['valid']):,} documents; the model is the last epoch's) and test error "
        f"({len(splits['test']):,} documents) in %. The library now reads every document as "
        f"`xxbos doc xxbos`, reversed for the backward classifier. Machine: "
        f"{os.cpu_count()} CPUs.",
        "",
        "| direction | the classifier reads | validation error by epoch | test error |",
        "|---|---|---|---|",
    ]
    for direction, reads, valid_errors, test_error in rows:
        by_epoch = ", ".join(f"{100 * e:.1f}" for e in valid_errors)
        lines.append(f"| {direction} | {reads} | {by_epoch} | **{100 * test_error:.2f}** |")
    publish(RESULTS, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
