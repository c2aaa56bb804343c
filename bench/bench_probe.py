"""How much does each language model know about the labels? A linear probe on frozen features.

For every LM a workspace holds in each direction asked for (the random encoder, each
pretraining snapshot, the pretrained LM, the dataset's fine-tuned LM), the encoder's
concat-pooled features ``[h_last, max, mean]`` of each document are computed in eval mode,
standardised, and a logistic regression (C tuned on the validation split) is fitted on a
class-balanced label subset and scored on the test split.
No weight of the encoder changes: the error measures what the LM's features carry, apart from
what classifier fine-tuning adds. It separates "the LM is too weak" from "the classifier
training fails" when ULMFiT loses to TF-IDF.

    python bench/bench_probe.py --workspace ../bench --dataset imdb --labels 1000
    python bench/bench_probe.py --workspace ../demo --dataset bbc_news --labels 300 \
        --directions fwd,bwd

Writes the table to stdout and to ``bench/results/probe_<dataset>.md`` (or ``--out``).
``--compare WORKSPACE`` adds that workspace's fine-tuned LM as one more row: another LM
fine-tuning of the very same pretrained LM (checked), e.g. on more of the dataset's text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import publish  # noqa: E402

from tasks.baseline import label_subset  # noqa: E402
from tasks.tokens import TOKENIZER_FILE  # noqa: E402
from tasks.training import MODEL_FILE  # noqa: E402
from tasks.workspace import Layout  # noqa: E402
from ulmfit.batches import ClassifierBatches  # noqa: E402
from ulmfit.checkpoint import load_model  # noqa: E402
from ulmfit.model import ClassifierConfig, LanguageModel, SequenceClassifier  # noqa: E402
from ulmfit.storage import TokenDocs, read_tokens  # noqa: E402
from ulmfit.tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TITLE = "Linear probe: what the LM's features carry about {dataset}"
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def features(lm: LanguageModel, docs: TokenDocs, backward: bool) -> np.ndarray:
    """(N, 3E) eval-mode concat-pooled features of the LM's encoder, in input order; a
    backward LM reads each document reversed, as its classifier does."""
    model = SequenceClassifier(ClassifierConfig(encoder=lm.cfg, num_classes=2)).eval()
    model.encoder.load_state_dict(lm.encoder.state_dict())
    out = np.zeros((len(docs), 3 * lm.cfg.embed_size), np.float32)
    batches = ClassifierBatches(docs, 128, shuffle=False, backward=backward, pad_id=lm.cfg.pad_id)
    for batch in batches:
        out[batch.index.numpy()] = model.pooled_features(batch.tokens, batch.lengths).numpy()
    return out


def probe(
    lm: LanguageModel, train: TokenDocs, valid: TokenDocs, test: TokenDocs, backward: bool
) -> dict:
    x_train, x_valid, x_test = (features(lm, d, backward) for d in (train, valid, test))
    scaler = StandardScaler().fit(x_train)
    best = None
    for c in C_GRID:
        fitted = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x_train), train.labels)
        valid_error = 1 - fitted.score(scaler.transform(x_valid), valid.labels)
        if best is None or valid_error < best[0]:
            test_error = 1 - fitted.score(scaler.transform(x_test), test.labels)
            best = (valid_error, c, test_error)
    return {"valid_error": best[0], "C": best[1], "test_error": best[2]}


def language_models(root: Path, dataset: str, direction: str, compare: tuple[Path, ...] = ()):
    """Yield ``(name, tokens seen, LM)`` for the random encoder, each pretraining snapshot, the
    pretrained LM and ``dataset``'s fine-tuned LM of one direction, then the fine-tuned LM of
    each ``compare`` workspace (named by its folder)."""
    pretrained = root / Layout.pretrained(direction)
    reference, reference_meta = load_model(pretrained / MODEL_FILE)
    torch.manual_seed(0)
    yield "random encoder (no LM)", "0", LanguageModel(dataclasses.replace(reference.cfg))
    snapshots = sorted(
        (pretrained / "snapshots").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])
    )
    pretraining_tokens = f"{reference_meta['extra'].get('tokens', 0):,}"
    for path in snapshots:
        lm, meta = load_model(path)
        yield f"pretraining snapshot {path.stem}", f"{meta['extra'].get('tokens', 0):,}", lm
    yield "pretrained LM", pretraining_tokens, reference
    for workspace in (root, *compare):
        lm, meta = load_model(workspace / Layout.finetuned(dataset, direction) / MODEL_FILE)
        # fine-tuned: pretraining + its own tokens
        yield (
            f"{dataset} fine-tuned LM" + (f" ({workspace.name})" if compare else ""),
            f"{pretraining_tokens} + {meta['extra'].get('tokens', 0):,}",
            lm,
        )


def same_start(root: Path, other: Path, direction: str) -> None:
    """Refuse, in one line, a ``--compare`` workspace whose pretrained LM or tokenizer is not
    byte for byte ``root``'s: its fine-tuned LM would differ by more than its fine-tuning."""
    for relative in (
        Path(Layout.pretrained(direction), MODEL_FILE),
        Path(Layout.tokenizer_dir, TOKENIZER_FILE),
    ):
        ours, theirs = root / relative, other / relative
        if not theirs.is_file() or theirs.read_bytes() != ours.read_bytes():
            raise SystemExit(
                f"{theirs}: missing or not the file of {root}. Fix: --compare a copy of that "
                "workspace whose LM fine-tuning alone differs"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--dataset", default="imdb")
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--test-docs", type=int, default=2000, help="seeded test sample")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--directions", default="fwd", help="fwd, bwd or fwd,bwd")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another workspace's fine-tuned LM, from the same pretrained LM, as one more row",
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/probe_<dataset>.md")
    parser.add_argument("--title", default=TITLE, help="the section's heading ({dataset}: its)")
    args = parser.parse_args(argv)
    root = args.workspace.resolve()
    compare = tuple(path.resolve() for path in args.compare)
    out = args.out or RESULTS / f"probe_{args.dataset}.md"
    directions = args.directions.split(",")
    for direction in directions:
        for other in compare:
            same_start(root, other, direction)
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.load(root / Layout.tokenizer_dir / TOKENIZER_FILE)
    tokens = root / Layout.tokens(args.dataset)
    train, valid, test = (
        read_tokens(tokens / f"{split}.parquet", tokenizer) for split in ("train", "valid", "test")
    )
    train = train.subset(label_subset(train.labels, args.labels, 42))
    if len(test) > args.test_docs:
        picked = np.random.default_rng(0).permutation(len(test))[: args.test_docs]
        test = test.subset(np.sort(picked))
    rows = []
    for direction in directions:
        for name, tokens_seen, lm in language_models(root, args.dataset, direction, compare):
            result = probe(lm.eval(), train, valid, test, backward=direction == "bwd")
            rows.append((direction, name, tokens_seen, result))
            print(direction, name, result, flush=True)
    options = "".join(f" --compare {path}" for path in args.compare)
    if args.out:
        options += f" --out bench/results/{out.name}"
    if args.title != TITLE:
        options += f' --title "{args.title}"'
    lines = [
        "# " + args.title.format(dataset=args.dataset),
        "",
        f"Reproduce: `python bench/bench_probe.py --workspace {args.workspace} --dataset "
        f"{args.dataset} --labels {args.labels} --directions {args.directions}{options}` "
        f"(workspace paths as on the machine that ran it; a workspace whose pipeline ran on "
        f"{args.dataset}).",
        "",
        f"Logistic regression (C tuned on the {len(valid):,} validation documents) on the "
        f"standardised, frozen, eval-mode concat-pooled features of each LM's encoder, fitted on "
        f"{len(train):,} class-balanced labelled documents, scored on {len(test):,} test "
        f"documents (a seeded sample where the test split is larger). A backward LM reads each "
        f"document reversed, as its classifier does. Machine: {os.cpu_count()} CPUs. "
        f"Test error in %.",
        "",
        "| direction | LM | tokens trained on (pretraining + fine-tuning) | probe test error "
        "| valid error | C |",
        "|---|---|---|---|---|---|",
    ]
    for direction, name, tokens_seen, result in rows:
        lines.append(
            f"| {direction} | {name} | {tokens_seen} | {100 * result['test_error']:.2f} "
            f"| {100 * result['valid_error']:.2f} | {result['C']:g} |"
        )
    publish(out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
