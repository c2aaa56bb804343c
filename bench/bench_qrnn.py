"""Does a QRNN (MultiFiT's AWD-QRNN) buy a better LM than the AWD-LSTM for the same CPU time?

Issue 9 asks for the QRNN as an option if it trains faster per token on this CPU at equal
perplexity. Each row pretrains one LM with ``ulmfit.train.train_language_model`` on the same
Wikipedia token files, from the same seed, with the benchmark profile's settings (200-wide
embedding, dropouts, lr 0.01, STLR, 32 x 70 batches, bf16 autocast where the CPU has it), and
reports validation perplexity (fp32) and training throughput:

- ``equal tokens``: every model reads ``--steps`` batches;
- ``equal time``: each QRNN model again, for as many steps as the AWD-LSTM's measured wall time
  buys it at its own measured speed: the comparison a fixed CPU budget makes.

The token files come from a workspace that ran ``tokenize_wikipedia`` (for example the
benchmark profile's, ``ulmfit profile benchmark && ulmfit repro tokenize_wikipedia``):

    python bench/bench_qrnn.py --workspace ../bench --steps 400

Writes the table to stdout and to ``bench/results/qrnn.md``. The runs are sequential, so the
speed ratios carry the machine's noise (the load average is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from collect import publish  # noqa: E402

from tasks.params import load_params  # noqa: E402
from tasks.tokens import TOKENIZER_FILE  # noqa: E402
from tasks.workspace import Layout  # noqa: E402
from ulmfit.evaluate import evaluate_lm  # noqa: E402
from ulmfit.model import AWDLSTMConfig, LanguageModel  # noqa: E402
from ulmfit.schedule import ScheduleConfig  # noqa: E402
from ulmfit.storage import TokenDocs, read_tokens  # noqa: E402
from ulmfit.tokenizer import Tokenizer  # noqa: E402
from ulmfit.train import LMTrainConfig, native_cpu_bf16, train_language_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "qrnn.md"
# (name, hidden size, layers, qrnn): the benchmark profile's AWD-LSTM, a QRNN of the same
# shape, and a QRNN of MultiFiT's shape (4 layers, wider) scaled to this embedding size.
MODELS = (
    ("AWD-LSTM 200/512x3", 512, 3, False),
    ("AWD-QRNN 200/512x3", 512, 3, True),
    ("AWD-QRNN 200/1024x4", 1024, 4, True),
)


@functools.cache
def _profile_lm() -> tuple[AWDLSTMConfig, float]:
    """``pretrain.model`` and ``pretrain.dropout_multiplier`` of profiles/benchmark.yaml."""
    pretrain = load_params(ROOT / "profiles" / "benchmark.yaml", check_paths=False).pretrain
    return pretrain.model, pretrain.dropout_multiplier


def pretrain(
    steps: int,
    data: tuple[TokenDocs, TokenDocs],
    vocab: int,
    amp: str,
    *,
    hidden: int | None = None,
    layers: int | None = None,
    qrnn: bool = False,
) -> dict:
    """The benchmark profile's LM (its sizes unless ``hidden``/``layers`` are given, and
    ``qrnn``) pretrained for ``steps`` from seed 0 on ``data`` = (train, valid); its size,
    validation perplexity (fp32), tokens and wall seconds. ``bench_amp_quality.py`` runs it
    too."""
    train, valid = data
    torch.manual_seed(0)
    model_config, dropout_multiplier = _profile_lm()
    config = dataclasses.replace(
        model_config,
        vocab_size=vocab,
        hidden_size=hidden or model_config.hidden_size,
        num_layers=layers or model_config.num_layers,
        qrnn=qrnn,
    ).scaled(dropout_multiplier)
    model = LanguageModel(config)
    cfg = LMTrainConfig(
        max_steps=steps,
        batch_size=32,
        bptt=70,
        lr=0.01,
        schedule=ScheduleConfig(discriminative=False),
        amp=amp,
        seed=42,
    )
    start = time.perf_counter()
    result = train_language_model(model, train, None, cfg)
    seconds = time.perf_counter() - start
    perplexity = evaluate_lm(model, valid, batch_size=32, bptt=70)["perplexity"]  # fp32
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "perplexity": perplexity,
        "tokens": result.tokens,
        "seconds": seconds,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--valid-docs", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.workspace.resolve()
    tokenizer = Tokenizer.load(root / Layout.tokenizer_dir / TOKENIZER_FILE)
    tokens = root / Layout.wikipedia_tokens
    train = read_tokens(tokens / "train.parquet", tokenizer)
    valid = read_tokens(tokens / "valid.parquet", tokenizer)
    valid = valid.subset(range(min(args.valid_docs, len(valid))))
    amp = "bf16_native"
    load_start = os.getloadavg()[0]
    rows = []
    data = (train, valid)
    for name, hidden, layers, qrnn in MODELS:
        row = pretrain(
            args.steps, data, tokenizer.vocab_size, amp, hidden=hidden, layers=layers, qrnn=qrnn
        )
        rows.append({"name": name, "budget": "equal tokens", **row})
        print(rows[-1], flush=True)
    reference = rows[0]
    for (name, hidden, layers, qrnn), row in zip(MODELS, rows[: len(MODELS)], strict=True):
        if not qrnn:
            continue
        steps = round(args.steps * reference["seconds"] / row["seconds"])
        again = pretrain(
            steps, data, tokenizer.vocab_size, amp, hidden=hidden, layers=layers, qrnn=qrnn
        )
        rows.append({"name": name, "budget": "equal time", **again})
        print(rows[-1], flush=True)
    load_end = os.getloadavg()[0]
    lines = [
        "# QRNN against LSTM layers for LM pretraining (CPU)",
        "",
        f"Reproduce: `python bench/bench_qrnn.py --workspace <workspace> --steps {args.steps} "
        f"--threads {args.threads}` (a workspace that ran `tokenize_wikipedia`).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, torch "
        f"{torch.__version__}, bf16 autocast: {native_cpu_bf16()}; load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end. Same data "
        f"({len(train):,} Wikipedia articles), seed, embedding (200, tied), dropouts (the "
        f"benchmark profile's, times 0.1) and schedule (STLR, lr 0.01, batches of 32 x 70); "
        f"validation perplexity on {len(valid)} held-out articles, in fp32. 'equal time' trains "
        "the QRNN for the steps that the AWD-LSTM's wall time buys at the QRNN's measured speed. "
        "The runs are sequential, so the speed ratios carry the machine's noise.",
        "",
        "| model | budget | parameters | steps | tokens | wall s | tokens/s | speed vs LSTM "
        "| valid perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = reference["tokens"] / reference["seconds"]
    for row in rows:
        rate = row["tokens"] / row["seconds"]
        lines.append(
            f"| {row['name']} | {row['budget']} | {row['params'] / 1e6:.1f}M | {row['steps']} "
            f"| {row['tokens']:,} | {row['seconds']:.0f} | {rate:,.0f} | {rate / base:.2f}x "
            f"| {row['perplexity']:.1f} |"
        )
    publish(RESULTS, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
