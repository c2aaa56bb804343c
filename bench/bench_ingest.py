"""Ingest and tokenisation throughput: a WikiExtractor corpus to token files, end to end.

The pretraining corpus of ULMFiT (Howard & Ruder 2018, Section 3.1) must go from a compressed
Wikipedia extract to token files before any training. This measures the three stages on a real
2015 English Wikipedia extract (6,514 articles, 103 MB of text):

1. ``prepare_wikipedia``: stream the .gz, parse the ``<doc>`` blocks, write train/valid Parquet;
2. ``train_tokenizer``: SentencePiece unigram on a reservoir sample of the articles;
3. ``encode_corpus``: normalise and encode train + valid into token files, on every core.

Each stage runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own; the
workers of ``encode_corpus`` are reported separately (``children``). Throughput is MB of
article text (UTF-8) per second, the same MB for every stage.

    python bench/bench_ingest.py                       # the whole 103 MB corpus
    python bench/bench_ingest.py --max-words 2000000   # a quick run (~12 MB of text)

Writes the table to stdout and to ``bench/results/ingest.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_INPUT = (
    ROOT.parent / "shared" / "data" / "wikipedia" / "enwiki_2015_wikiextractor_AA_100MB.txt.gz"
)
RESULTS = ROOT / "bench" / "results" / "ingest.md"


class TreeRSS:
    """Peak of the summed RSS of this process and all its descendants, sampled every 0.1 s
    (the encode workers live under a fork server, out of reach of ``RUSAGE_CHILDREN``)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            total = 0
            for proc in [self._process, *self._process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1e6


def _peaks(tree: TreeRSS) -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "tree_peak_rss_mb": round(tree.stop(), 1)}


def _texts(out: Path, split: str):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(out / "corpus" / f"{split}.parquet")
    for group in range(parquet.num_row_groups):
        yield from parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()


def stage_prepare(args: argparse.Namespace, out: Path) -> dict:
    from ulmfit.corpora import WikipediaSource, prepare_wikipedia

    source = WikipediaSource(
        kind="wikiextractor", path=str(args.input), max_words=args.max_words, valid_fraction=0.01
    )
    tree = TreeRSS()
    started = time.perf_counter()
    summary = prepare_wikipedia(
        source, out / "corpus", cache_dir=out / "cache", progress=lambda *a: None
    )
    seconds = time.perf_counter() - started
    text_bytes = sum(
        len(t.encode("utf-8")) for split in summary["splits"] for t in _texts(out, split)
    )
    docs = sum(s["count"] for s in summary["splits"].values())
    words = sum(s["words_total"] for s in summary["splits"].values())
    skipped = summary["skipped"].get("skipped_short", 0)
    counts = {"docs": docs, "words": words, "skipped_short": skipped}
    return {"seconds": seconds, "text_bytes": text_bytes} | counts | _peaks(tree)


def stage_tokenizer(args: argparse.Namespace, out: Path) -> dict:
    from ulmfit.tokenizer import TokenizerConfig, train_tokenizer

    config = TokenizerConfig(
        vocab_size=args.vocab_size, sample_docs=args.sample_docs, threads=args.workers or 0
    )
    tree = TreeRSS()
    started = time.perf_counter()
    tokenizer = train_tokenizer(_texts(out, "train"), out / "tokenizer.model", config)
    return {
        "seconds": time.perf_counter() - started,
        "vocab_size": tokenizer.vocab_size,
        "sample_docs": args.sample_docs,
    } | _peaks(tree)


def stage_encode(args: argparse.Namespace, out: Path) -> dict:
    from ulmfit.storage import encode_corpus

    tree = TreeRSS()
    started = time.perf_counter()
    tokens = docs = 0
    for split in ("train", "valid"):
        stats = encode_corpus(
            _texts(out, split),
            out / "tokenizer.model",
            out / f"{split}.tokens.parquet",
            workers=args.workers,
        )
        tokens += stats.tokens
        docs += stats.docs
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "docs": docs} | _peaks(tree)


STAGES = {"prepare": stage_prepare, "tokenizer": stage_tokenizer, "encode": stage_encode}


def _run_stage(name: str, argv: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--stage", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(results: dict[str, dict], text_mb: float) -> str:
    lines = [
        "| stage | seconds | MB text / s | docs | tokens | peak RSS (MB) | peak RSS with workers (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    for name, r in results.items():
        total += r["seconds"]
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {text_mb / r['seconds']:.2f} | {r.get('docs', '')} | {r.get('tokens', '')} "
            f"| {r['peak_rss_mb']:.0f} | {r['tree_peak_rss_mb']:.0f} |"
        )
    peak = max(r["peak_rss_mb"] for r in results.values())
    tree_peak = max(r["tree_peak_rss_mb"] for r in results.values())
    lines.append(
        f"| **end to end** | {total:.1f} | {text_mb / total:.2f} | | | {peak:.0f} | {tree_peak:.0f} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "ingest")
    parser.add_argument(
        "--max-words", type=int, default=None, help="stop after this many words (a quick run)"
    )
    parser.add_argument("--vocab-size", type=int, default=15000)
    parser.add_argument(
        "--sample-docs", type=int, default=2000, help="reservoir sample for the tokenizer"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="encode workers (default: all cores)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not write bench/results/ingest.md"
    )
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.input.exists():
        raise SystemExit(f"{args.input} not found (the real corpora live in ../shared/data)")
    if args.stage:
        print(json.dumps(STAGES[args.stage](args, args.out)))
        return

    argv = [a for a in sys.argv[1:] if a != "--no-write"]
    results = {name: _run_stage(name, argv) for name in STAGES}
    text_mb = results["prepare"]["text_bytes"] / 1e6
    input_mb = args.input.stat().st_size / 1e6
    command = "python bench/bench_ingest.py" + ("" if not argv else " " + " ".join(argv))
    header = (
        f"Input: `{args.input.name}` ({input_mb:.1f} MB gzip); {results['prepare']['docs']} articles kept "
        f"({results['prepare']['skipped_short']} shorter than 200 characters skipped), "
        f"{results['prepare']['words']:,} words, {text_mb:.1f} MB of article text (UTF-8) after ingest. "
        f"Tokenizer: SentencePiece unigram, vocab {results['tokenizer']['vocab_size']}, trained on a "
        f"{args.sample_docs}-article reservoir sample. Encoding workers: {args.workers or os.cpu_count()}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
        "shared with other jobs while measured (figures are under load)."
    )
    notes = (
        "MB text / s is the same MB of article text divided by each stage's seconds. The tokenizer "
        "reads every article once (reservoir sample), then trains on the sample only, so its figure "
        "is the rate at which it serves this corpus, not a scan rate. Peak RSS is the stage's own "
        "process (`ru_maxrss`); the last column samples the whole process tree every 0.1 s, "
        "including the encode workers."
    )
    report = (
        f"# Ingest and tokenisation throughput\n\n{header}\n\n{_table(results, text_mb)}\n\n"
        f"{notes}\n\nReproduce: `{command}`\n"
    )
    print(report)
    if not args.no_write:
        from ulmfit.io import atomic_write

        with atomic_write(RESULTS, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
