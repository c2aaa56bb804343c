"""Assemble BENCHMARKS.md from the tables the benchmark scripts wrote to bench/results/.

Every figure comes from a results file that a bench script generated; nothing is typed here.
Run: python bench/collect.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ulmfit.io import atomic_write  # noqa: E402

ORDER = [
    "bars_profile",
    "stage_time_profile",
    "bars_current",
    "bars_boundary",
    "imdb_one_rate",
    "imdb_regularisers",
    "imdb_lamb",
    "stage_time_current",
    "stage_time_bars",
    "stage_time_more",
    "bars",
    "trec6_boundary",
    "trec6_seed",
    "trec6_one_rate_lr03",
    "ag_news_boundary",
    "ag_news_seed",
    "imdb_boundary",
    "imdb_finetune_tokens",
    "imdb_pool_embeddings",
    "imdb_seeds",
    "seed_ensemble_imdb",
    "imdb_bidirectional_100",
    "imdb_bidirectional_1000",
    "imdb_bidirectional_5000",
    "accuracy",
    "arms",
    "arms_imdb",
    "arms_imdb_bert_elmo",
    "imdb_recipes",
    "pretraining_budget_trec6",
    "pretraining_budget_imdb",
    "pretraining_budget_imdb_one_rate",
    "trec6_scratch",
    "trec6_recipe_grid",
    "demo_recipes",
    "demo_profile",
    "demo_boundary",
    "demo_levers",
    "demo_seeds",
    "seed_ensemble_bbc_news",
    "demo_vocab",
    "probe_imdb",
    "probe_imdb_finetune",
    "probe_bbc_news",
    "boundary",
    "lm_throughput",
    "threads",
    "amp_quality",
    "qrnn",
    "tokenize",
    "predict",
    "ingest",
]

HEADER = """# Benchmarks

Each section below is the output of one script in `bench/`, with the command that reproduces
it. They were measured on this project's development machine (2 CPU cores, no GPU); absolute
times on this CPU say little, so each script measures our code and fastai side by side in one
run and reports medians and ratios. Where a section says the machine was under load, other jobs
shared its two cores; the ratios were still taken interleaved. Regenerate this file with
`python bench/collect.py` after running the scripts.
"""


def publish(path: Path, text: str) -> None:
    """Print a bench script's table and write it atomically to ``path`` (under
    ``bench/results/``, where :func:`main` reads it)."""
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as handle:
        handle.write(text)


def main() -> None:
    parts = [HEADER]
    for name in ORDER:
        path = ROOT / "bench" / "results" / f"{name}.md"
        if path.exists():
            text = path.read_text().strip()
            # Demote the file's headings one level so they nest under this page's title.
            lines = [("#" + line) if line.startswith("#") else line for line in text.splitlines()]
            parts.append("\n".join(lines))
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
