"""Does bf16 autocast keep perplexity? The same LM pretraining in fp32 and in bf16, side by side.

Two runs of ``ulmfit.train.train_language_model`` from the same seed, on the same Wikipedia
token files, for the same number of steps and schedule, one with ``amp="none"`` and one with
``amp="bf16"``; validation perplexity (always computed in fp32) and training throughput are
compared. The token files come from a workspace that ran ``tokenize_wikipedia`` (for example
the benchmark profile's):

    python bench/bench_amp_quality.py --workspace ../bench --steps 400

Writes the table to stdout and to ``bench/results/amp_quality.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_qrnn import pretrain  # noqa: E402
from collect import publish  # noqa: E402

from tasks.tokens import TOKENIZER_FILE  # noqa: E402
from tasks.workspace import Layout  # noqa: E402
from ulmfit.storage import read_tokens  # noqa: E402
from ulmfit.tokenizer import Tokenizer  # noqa: E402
from ulmfit.train import native_cpu_bf16  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "amp_quality.md"


def run(amp: str, train, valid, vocab: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    return {"amp": amp, **pretrain(steps, (train, valid), vocab, amp)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--valid-docs", type=int, default=40)
    args = parser.parse_args(argv)
    root = args.workspace.resolve()
    tokenizer = Tokenizer.load(root / Layout.tokenizer_dir / TOKENIZER_FILE)
    tokens = root / Layout.wikipedia_tokens
    train = read_tokens(tokens / "train.parquet", tokenizer)
    valid = read_tokens(tokens / "valid.parquet", tokenizer)
    valid = valid.subset(range(min(args.valid_docs, len(valid))))
    rows = [
        run(amp, train, valid, tokenizer.vocab_size, args.steps, args.threads)
        for amp in ("none", "bf16")
    ]
    load = os.getloadavg()[0]
    lines = [
        "# bf16 autocast and LM quality (CPU)",
        "",
        f"Reproduce: `python bench/bench_amp_quality.py --workspace <workspace> --steps "
        f"{args.steps} --threads {args.threads}` (a workspace that ran `tokenize_wikipedia`).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"native bf16: {native_cpu_bf16()}; load average {load:.1f} at the end. The same "
        f"200/512x3 AWD-LSTM, seed, data ({len(train):,} Wikipedia articles) and schedule "
        f"({args.steps} steps of 32 x 70, STLR, lr 0.01); validation perplexity on "
        f"{len(valid)} held-out articles, computed in fp32 for both. The runs are sequential, "
        "so the speed ratio carries the machine's noise.",
        "",
        "| training precision | valid perplexity | tokens | wall s | tokens/s | speed vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0]["tokens"] / rows[0]["seconds"]
    for row in rows:
        rate = row["tokens"] / row["seconds"]
        lines.append(
            f"| {'fp32' if row['amp'] == 'none' else 'bf16 autocast'} | {row['perplexity']:.2f} "
            f"| {row['tokens']:,} | {row['seconds']:.0f} | {rate:,.0f} | {rate / base:.2f}x |"
        )
    publish(RESULTS, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
