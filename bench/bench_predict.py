"""Prediction throughput, int8 accuracy change, padding overhead and the GEMM roofline (CPU).

Measured side by side in one run, repeats interleaved, medians reported:

* fastai 2.8: its ``learn.predict`` loop (one document at a time, on a smaller sample) and
  ``learn.get_preds`` on ``learn.dls.test_dl(texts)`` (fastai's tokenisation included), with a
  ``text_classifier_learner(dls, AWD_LSTM, config=..., pretrained=False)`` of the same sizes.
* ours: ``TextClassifier.predict`` (SentencePiece tokenisation included) in fp32 and with the
  int8 dynamically quantised models.

Throughput does not depend on the weights, but the int8 accuracy change does, so our classifier
is first trained briefly (``ulmfit.train.train_classifier``, no pretraining) on IMDb training
reviews cut to their first ``--train-tokens`` tokens, and both precisions are scored on the
sampled test reviews.

Run: ``python bench/bench_predict.py`` (see ``--help``; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ulmfit.batches import ClassifierBatches  # noqa: E402
from ulmfit.io import atomic_write  # noqa: E402
from ulmfit.model import AWDLSTMConfig, ClassifierConfig, SequenceClassifier  # noqa: E402
from ulmfit.predict import (  # noqa: E402
    TextClassifier,
    length_sorted_batches,
)
from ulmfit.storage import TokenDocs  # noqa: E402
from ulmfit.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer  # noqa: E402

IMDB = REPO.parent / "shared" / "data" / "imdb" / "aclImdb_labeled_50k.tar.gz"
REVIEW = re.compile(r"aclImdb/(train|test)/(pos|neg)/\d+_\d+\.txt$")
LABELS = ["neg", "pos"]


# ------------------------------------------------------------------------------------ data


def read_imdb(path: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{"train"|"test": (texts, labels)}`` from the canonical tarball, in archive order."""
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    with tarfile.open(path) as archive:
        for member in archive:
            match = REVIEW.match(member.name)
            if member.isfile() and match:
                texts, labels = splits[match.group(1)]
                texts.append(archive.extractfile(member).read().decode("utf-8"))
                labels.append(LABELS.index(match.group(2)))
    return {name: (texts, np.array(labels)) for name, (texts, labels) in splits.items()}


# ------------------------------------------------------------------------------------ helpers


def median_time(times: list[float]) -> float:
    return statistics.median(times)


def gemm_gflops(size: int = 4096, repeats: int = 5) -> float:
    """Median fp32 GFLOP/s of a large ``torch.mm`` (the roofline the issue refers to)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / median_time(times) / 1e9


def flops_per_token(cfg: AWDLSTMConfig) -> float:
    """Multiply-adds x 2 of the LSTM stack per token: 4 gates of (W_ih x + W_hh h)."""
    sizes = [cfg.embed_size] + [cfg.hidden_size] * (cfg.num_layers - 1) + [cfg.embed_size]
    return sum(2 * 4 * out * (inp + out) for inp, out in zip(sizes[:-1], sizes[1:], strict=True))


def head_flops(cfg: ClassifierConfig) -> float:
    """Per document: the two linear layers of the pooling head."""
    pooled = cfg.pooled_size
    return 2 * (pooled * cfg.head_hidden + cfg.head_hidden * cfg.num_classes)


def pad_fraction_of(batches_lengths: list[np.ndarray]) -> float:
    """Pad tokens / all tokens of right-padded batches given each batch's document lengths."""
    real = sum(int(lengths.sum()) for lengths in batches_lengths)
    padded = sum(len(lengths) * int(lengths.max()) for lengths in batches_lengths)
    return 1 - real / padded


def truncate(docs: TokenDocs, max_tokens: int) -> TokenDocs:
    return TokenDocs.from_lists([docs[i][:max_tokens] for i in range(len(docs))], docs.labels)


@contextlib.contextmanager
def quiet():
    """fastai prints progress bars and warnings; keep the table readable."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------ fastai


def build_fastai(train_texts, train_labels, cfg: ClassifierConfig, vocab_docs: int):
    """A fastai text classifier of our sizes (random weights: throughput only)."""
    import pandas as pd
    from fastai.text.all import (
        AWD_LSTM,
        TextDataLoaders,
        awd_lstm_clas_config,
        text_classifier_learner,
    )

    frame = pd.DataFrame(
        {"text": train_texts[:vocab_docs], "label": [LABELS[i] for i in train_labels[:vocab_docs]]}
    )
    with quiet():
        dls = TextDataLoaders.from_df(
            frame, text_col="text", label_col="label", valid_pct=0.2, bs=64
        )
        config = dict(awd_lstm_clas_config)
        config.update(
            emb_sz=cfg.encoder.embed_size,
            n_hid=cfg.encoder.hidden_size,
            n_layers=cfg.encoder.num_layers,
        )
        learn = text_classifier_learner(dls, AWD_LSTM, config=config, pretrained=False)
    learn.model.eval()
    return learn


def fastai_get_preds(learn, texts: list[str], batch_size: int) -> np.ndarray:
    import pandas as pd

    with quiet(), learn.no_bar():
        dl = learn.dls.test_dl(pd.DataFrame({"text": texts}), bs=batch_size)
        probs, _ = learn.get_preds(dl=dl)
    return probs.numpy()


def fastai_predict_loop(learn, texts: list[str]) -> None:
    with quiet(), learn.no_bar():
        for text in texts:
            learn.predict(text)


def fastai_token_count(learn, texts: list[str]) -> int:
    """Tokens fastai feeds its model for ``texts`` (its word tokens + special tokens)."""
    import pandas as pd

    with quiet():
        dl = learn.dls.test_dl(pd.DataFrame({"text": texts}), bs=64)
        return sum(int((batch[0] != 1).sum()) for batch in dl)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imdb", type=Path, default=IMDB)
    parser.add_argument("--docs", type=int, default=2000, help="test reviews to predict")
    parser.add_argument("--predict-docs", type=int, default=100, help="docs for fastai's loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vocab-size", type=int, default=15000)
    parser.add_argument("--tokenizer-docs", type=int, default=10000)
    parser.add_argument("--train-docs", type=int, default=2000)
    parser.add_argument("--train-tokens", type=int, default=96)
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--train-lr", type=float, default=1e-2)
    parser.add_argument("--drop-mult", type=float, default=0.3)
    parser.add_argument(
        "--accuracy-task",
        choices=["keyword", "sentiment"],
        default="keyword",
        help="labels for the int8 accuracy check: IMDb sentiment, or whether the review holds "
        "the word 'bad' (a task a from-scratch model learns in a few minutes)",
    )
    parser.add_argument("--fastai-vocab-docs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "ulmfit-bench-predict"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict.md")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not for reporting)")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.predict_docs, args.repeats = 60, 3, 1
        args.tokenizer_docs, args.train_docs, args.train_epochs = 2000, 64, 1
        args.train_tokens = 64
        args.vocab_size, args.fastai_vocab_docs = 4000, 200
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)  # noqa: E731

    log("reading IMDb")
    data = read_imdb(args.imdb)
    train_texts, train_labels = data["train"]
    test_texts, test_labels = data["test"]
    sample = rng.choice(len(test_texts), size=args.docs, replace=False)
    texts = [test_texts[i] for i in sample]
    labels = test_labels[sample]

    # ---- tokenizer and token files (cached in the work dir between runs)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = args.work_dir / f"imdb-{args.vocab_size}-{args.tokenizer_docs}.model"
    if tokenizer_path.exists():
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        log("training the tokenizer")
        tok_sample = rng.choice(len(train_texts), size=args.tokenizer_docs, replace=False)
        tokenizer = train_tokenizer(
            [train_texts[i] for i in tok_sample],
            tokenizer_path,
            TokenizerConfig(vocab_size=args.vocab_size),
        )
    log("encoding the training reviews")
    start = time.perf_counter()
    train_docs = TokenDocs.from_lists(
        tokenizer.encode(train_texts, num_threads=args.threads), train_labels
    )
    encode_seconds = time.perf_counter() - start

    # ---- the small classifier of the issue: 200/512 x 3
    encoder = AWDLSTMConfig(vocab_size=tokenizer.vocab_size, embed_size=200, hidden_size=512)
    cfg = ClassifierConfig(encoder=encoder.scaled(args.drop_mult), num_classes=2)
    model = SequenceClassifier(cfg)

    log("training the classifier briefly (for the int8 accuracy change)")
    from ulmfit.schedule import ScheduleConfig
    from ulmfit.train import ClassifierTrainConfig, train_classifier

    order = rng.permutation(len(train_docs))[: args.train_docs]
    short = truncate(train_docs.subset(order), args.train_tokens)
    test_docs = tokenizer.encode(texts)
    if args.accuracy_task == "keyword":
        # "xxbos bad" encodes to [xxbos, ▁bad]: the label is whether that piece occurs
        keyword = tokenizer.encode(["bad"])[0][-1]
        short.labels = np.array([int(keyword in short[i]) for i in range(len(short))])
        labels = np.array([int(keyword in doc) for doc in test_docs])
    start = time.perf_counter()
    train_classifier(
        model,
        short,
        None,
        ClassifierTrainConfig(
            epochs=args.train_epochs,
            batch_size=32,
            lr=args.train_lr,
            gradual_unfreezing=False,
            schedule=ScheduleConfig(discriminative=False),
            seed=args.seed,
        ),
    )
    train_seconds = time.perf_counter() - start
    model.eval()

    fp32 = TextClassifier(tokenizer, model, label_names=LABELS)
    int8 = fp32.quantized()
    test_tokens = sum(len(doc) for doc in test_docs)

    log("building the fastai learner")
    learn = build_fastai(train_texts, train_labels, cfg, args.fastai_vocab_docs)
    fastai_tokens = fastai_token_count(learn, texts)

    # ---- interleaved timing
    runs: dict[str, list[float]] = {
        name: [] for name in ("fastai_predict", "fastai_get_preds", "ours_fp32", "ours_int8")
    }
    options = dict(batch_size=args.batch_size, max_tokens=args.max_tokens)
    outputs: dict[str, np.ndarray] = {}
    roofline: list[float] = []
    for repeat in range(args.repeats):
        log(f"repeat {repeat + 1}/{args.repeats}")
        roofline.append(gemm_gflops())  # interleaved too: the load changes during the run
        timed = [
            ("fastai_get_preds", lambda: fastai_get_preds(learn, texts, args.batch_size)),
            ("ours_fp32", lambda: fp32.predict(texts, **options)[1]),
            ("ours_int8", lambda: int8.predict(texts, **options)[1]),
        ]
        if repeat < max(1, args.repeats - 1):  # the slow loop: one repeat fewer
            timed.insert(
                0,
                ("fastai_predict", lambda: fastai_predict_loop(learn, texts[: args.predict_docs])),
            )
        for name, run in timed:
            start = time.perf_counter()
            outputs[name] = run()
            runs[name].append(time.perf_counter() - start)
            log(f"  {name}: {runs[name][-1]:.1f} s")
    gflops_mm = statistics.median(roofline)

    # ---- accuracy: fp32 vs int8 on the sampled test reviews
    probs32, probs8 = outputs["ours_fp32"], outputs["ours_int8"]
    error32 = float((probs32.argmax(1) != labels).mean())
    error8 = float((probs8.argmax(1) != labels).mean())
    agreement = float((probs32.argmax(1) == probs8.argmax(1)).mean())
    baseline_error = float(min(labels.mean(), 1 - labels.mean()))
    max_diff = float(np.abs(probs32 - probs8).max())

    # ---- padding overhead on the IMDb training reviews
    train_batches = ClassifierBatches(train_docs, args.batch_size, shuffle=True, seed=args.seed)
    train_batches.set_epoch(0)
    pad_train = train_batches.padding_fraction()
    lengths = train_docs.lengths
    pad_predict = pad_fraction_of(
        [
            lengths[b]
            for b in length_sorted_batches(
                lengths, batch_size=args.batch_size, max_tokens=args.max_tokens
            )
        ]
    )
    fixed = [
        lengths[b]
        for b in np.array_split(np.arange(len(lengths)), max(1, len(lengths) // args.batch_size))
    ]
    pad_unsorted = pad_fraction_of(fixed)

    # ---- table
    n = args.docs
    docs_per_s = {
        "fastai_predict": args.predict_docs / median_time(runs["fastai_predict"]),
        **{
            name: n / median_time(times) for name, times in runs.items() if name != "fastai_predict"
        },
    }
    base_loop, base_get = docs_per_s["fastai_predict"], docs_per_s["fastai_get_preds"]
    per_token = flops_per_token(cfg.encoder)
    model_flops = test_tokens * per_token + n * head_flops(cfg)
    fastai_flops = fastai_tokens * per_token + n * head_flops(cfg)

    def achieved(name: str) -> float:
        flops = fastai_flops if name.startswith("fastai_get") else model_flops
        return flops / median_time(runs[name]) / 1e9

    rows = [
        (
            "fastai `learn.predict` loop (1 doc at a time)",
            "fastai_predict",
            f"{args.predict_docs} docs",
        ),
        ("fastai `get_preds` on `test_dl` (tokenisation incl.)", "fastai_get_preds", ""),
        ("ours fp32 `TextClassifier.predict` (tokenisation incl.)", "ours_fp32", ""),
        ("ours int8 `TextClassifier.predict` (tokenisation incl.)", "ours_int8", ""),
    ]
    lines = [
        "# Prediction benchmark (CPU)",
        "",
        f"Reproduce: `python bench/bench_predict.py --docs {args.docs} --predict-docs "
        f"{args.predict_docs} --repeats {args.repeats} --threads {args.threads}`"
        + (f" --max-tokens {args.max_tokens}" if args.max_tokens else ""),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {args.threads} threads, quantised engine "
        f"`{torch.backends.quantized.engine}`. **Taken on a machine shared with five other "
        "jobs (under load): absolute figures are noisy; the ratios were measured interleaved, "
        "in one run.**",
        "",
        f"Model: AWD-LSTM {cfg.encoder.embed_size}/{cfg.encoder.hidden_size} x "
        f"{cfg.encoder.num_layers} classifier, {cfg.num_classes} classes; {n} IMDb test reviews "
        f"(seeded sample, seed {args.seed}); batch size {args.batch_size}; median of "
        f"{args.repeats} interleaved repeats (fastai's loop: {len(runs['fastai_predict'])}).",
        f"Tokens: ours {test_tokens / n:.0f}/doc (SentencePiece unigram {tokenizer.vocab_size}), "
        f"fastai {fastai_tokens / n:.0f}/doc (word tokens). Model cost "
        f"{per_token / 1e6:.2f} MFLOP/token.",
        "",
        "| method | docs/s | x fastai predict | x fastai get_preds | GFLOP/s | % of torch.mm |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for title, name, note in rows:
        rate = docs_per_s[name]
        gflops = "" if name == "fastai_predict" else f"{achieved(name):.1f}"
        fraction = "" if name == "fastai_predict" else f"{100 * achieved(name) / gflops_mm:.0f}%"
        lines.append(
            f"| {title}{' (' + note + ')' if note else ''} | {rate:.1f} | {rate / base_loop:.1f} "
            f"| {rate / base_get:.2f} | {gflops} | {fraction} |"
        )
    lines += [
        "",
        f"fp32 GEMM roofline (`torch.mm` 4096x4096, median of 5 per repeat, median over repeats): "
        f"**{gflops_mm:.0f} GFLOP/s**. "
        "GFLOP/s counts the LSTM stack analytically (2 x 4 gates x (input + hidden) x hidden per "
        "token and layer) plus the head, over real tokens only, divided by the wall time "
        "(tokenisation included where stated). int8 rows count the same FLOPs. Rates above "
        "100% are possible: `torch.mm` goes to MKL, which on this AMD CPU takes its AVX2 path, "
        "while the LSTM kernels (oneDNN, both fastai's and ours) use AVX-512.",
        "",
        "## Goals",
        "",
        f"- fp32 vs fastai `predict` loop: **{docs_per_s['ours_fp32'] / base_loop:.1f}x** (goal >= 20x)",
        f"- fp32 vs fastai `get_preds`: **{docs_per_s['ours_fp32'] / base_get:.2f}x** (goal >= 1)",
        f"- int8 vs fastai `get_preds`: **{docs_per_s['ours_int8'] / base_get:.2f}x** (goal >= 1.5)",
        f"- int8 vs fp32 (ours): {docs_per_s['ours_int8'] / docs_per_s['ours_fp32']:.2f}x",
        "",
        "## int8 accuracy change",
        "",
        f"Classifier trained from scratch (no pretrained LM, dropouts x {args.drop_mult}) with "
        f"`train_classifier` (lr {args.train_lr}, no gradual unfreezing) for "
        f"{args.train_epochs} epochs on {args.train_docs} IMDb training reviews cut to "
        f"{args.train_tokens} tokens ({train_seconds:.0f} s), then scored on the {n} full test "
        "reviews. Task: "
        + (
            "IMDb sentiment."
            if args.accuracy_task == "sentiment"
            else "does the review contain the word 'bad' (the `▁bad` piece)? A synthetic label "
            "on the real reviews: a from-scratch model does not learn sentiment in a few minutes "
            f"on this shared CPU (it stayed at chance). {100 * labels.mean():.1f}% of the "
            "sampled test reviews hold the word, so always answering 'no' errs on that many."
        ),
        "",
        "| precision | test error |",
        "|---|---:|",
        f"| fp32 | {100 * error32:.2f}% |",
        f"| int8 dynamic | {100 * error8:.2f}% |",
        "",
        f"Change: {100 * (error8 - error32):+.2f} points; argmax agreement "
        f"{100 * agreement:.2f}%; max |p_int8 - p_fp32| = {max_diff:.4f}.",
        ""
        if error32 < baseline_error
        else f"**The trained model did not beat the majority-class baseline "
        f"({100 * baseline_error:.2f}% error), so the error change above says nothing about "
        "int8 on a useful model; only the probability differences and argmax agreement are "
        "informative. A real figure needs a fine-tuned classifier (the pipeline's).**",
        "",
        "## Padding overhead (pad tokens / all tokens, IMDb training reviews)",
        "",
        "| batches | pad fraction |",
        "|---|---:|",
        f"| `ClassifierBatches` (train mode, shuffled, batch {args.batch_size}) | {100 * pad_train:.2f}% |",
        f"| `predict_proba` (length-sorted, batch {args.batch_size}) | {100 * pad_predict:.3f}% |",
        f"| for reference: input order, no sorting | {100 * pad_unsorted:.1f}% |",
        "",
        f"Goal: under 10%. ({len(train_docs)} reviews; encoding them took {encode_seconds:.1f} s.)",
        "",
        "Raw medians (s): "
        + ", ".join(f"{name} {median_time(times):.2f}" for name, times in runs.items()),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.quick:
        with atomic_write(args.out, "w") as handle:
            handle.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
