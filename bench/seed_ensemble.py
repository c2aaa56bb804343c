"""What averaging more classifiers buys: the test error of ensembles of trained classifiers.

The paper averages a forward and a backward classifier's probabilities. Classifiers that differ
only in their seed (``classifier.train.seed``: batch order, dropout masks, head initialisation)
scatter by several points on a few hundred labels (BENCHMARKS.md, "how far the classifier's seed
alone moves ..."), so averaging them is the obvious way to a figure that does not hang on one
seed. This script measures it on classifiers already trained, nothing retrained: each member is
a workspace (its classifiers of every direction, averaged as the evaluate stage does) or a
control of one (that control's classifier). Every member must read the same tokenizer and the
same validation and test documents (checked).

    python bench/seed_ensemble.py --dataset bbc_news \\
        --member "seed 42=../demo" --member "seed 1=../demo-seed1" --member "seed 2=../demo-seed2"
    python bench/seed_ensemble.py --dataset imdb \\
        --member "seed 42=../bench:imdb-ulmfit-1000" --member "seed 1=../bench:imdb-ulmfit-1000-seed1"

Rows: each classifier alone; each member (its classifiers averaged); for every k from 2 to the
number of members, the mean, lowest and highest error over all choices of k members; every
member together. The TF-IDF row is the first workspace's baseline stage on the same labels.
Writes the table to stdout and to ``bench/results/seed_ensemble_<dataset>.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arms import read_json, tfidf_row  # noqa: E402
from collect import publish  # noqa: E402

from tasks.params import parse_params  # noqa: E402
from tasks.pipeline import stage_spec  # noqa: E402
from tasks.tokens import TOKENIZER_FILE  # noqa: E402
from tasks.training import MODEL_FILE, load_for  # noqa: E402
from tasks.workspace import Layout  # noqa: E402
from ulmfit.evaluate import evaluate_classifier  # noqa: E402
from ulmfit.storage import TokenDocs, read_tokens  # noqa: E402
from ulmfit.tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TITLE = "Ensembles of classifiers on {dataset}: what averaging more of them buys"
SPLITS = ("valid", "test")


def classifier_files(spec: str, dataset: str) -> tuple[Path, list[tuple[str, Path]], int | None]:
    """A member's workspace, its classifiers ``(direction, model file)`` and the labels it
    trained on (``None``: the whole train split)."""
    workspace, _, control = spec.partition(":")
    root = Path(workspace).resolve()
    if not control:
        params = parse_params(yaml.safe_load((root / "params.yaml").read_text()))
        directions = params.dataset(dataset).directions
        files = [(d, root / Layout.classifier(dataset, d) / MODEL_FILE) for d in directions]
        labels = None
    else:
        metrics = read_json(root, stage_spec("control", name=control, dataset=dataset).metrics)
        if metrics.get("dataset") != dataset:
            raise SystemExit(f"{spec}: control {control} is on {metrics.get('dataset')}")
        direction = metrics.get("direction", "fwd")
        files = [(direction, root / Layout.control(control) / "classifier" / MODEL_FILE)]
        labels = metrics.get("labels")
    for _, path in files:
        if not path.is_file():
            raise SystemExit(f"{path}: not found. Fix: run that classifier's stage in {root}")
    return root, files, labels


def split_docs(root: Path, dataset: str, tokenizer: Tokenizer) -> dict[str, TokenDocs]:
    return {
        s: read_tokens(root / Layout.tokens(dataset) / f"{s}.parquet", tokenizer) for s in SPLITS
    }


def same_docs(a: TokenDocs, b: TokenDocs) -> bool:
    return all(
        np.array_equal(x, y)
        for x, y in zip((a.ids, a.offsets, a.labels), (b.ids, b.offsets, b.labels), strict=True)
    )


def error(probs: list[np.ndarray], labels: np.ndarray) -> float:
    """Test error in % of the mean of ``probs``."""
    return 100 * float((np.mean(probs, axis=0).argmax(axis=1) != labels).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument(
        "--member", action="append", required=True, help="NAME=WORKSPACE or NAME=WORKSPACE:CONTROL"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--title", default=TITLE)
    parser.add_argument("--conditions", default="", help="how the members were trained")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [member.partition("=") for member in args.member]
    for member, (_, sep, _) in zip(args.member, specs, strict=True):
        if not sep:
            parser.error(f"--member {member!r}: expected NAME=WORKSPACE or NAME=WORKSPACE:CONTROL")
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        parser.error(f"--member names must differ: got {names}")
    members = [(name, *classifier_files(spec, args.dataset)) for name, _, spec in specs]
    first = members[0][1]
    tokenizer = Tokenizer.load(first / Layout.tokenizer_dir / TOKENIZER_FILE)
    docs = split_docs(first, args.dataset, tokenizer)
    labels = {s: np.asarray(d.labels, dtype=np.int64) for s, d in docs.items()}
    probs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, root, files, _ in members:
        theirs = split_docs(root, args.dataset, tokenizer)
        for split in SPLITS:
            if not same_docs(theirs[split], docs[split]):
                raise SystemExit(
                    f"{root}: its {split} documents of {args.dataset} differ from {first}'s. "
                    "Fix: compare classifiers of workspaces made from the same data"
                )
        for direction, path in files:
            model = load_for(path, tokenizer, f"{name}'s {direction} classifier")
            probs[(name, direction)] = {
                split: evaluate_classifier(
                    model, docs[split], batch_size=args.batch_size, backward=direction == "bwd"
                )[1]
                for split in SPLITS
            }
            print(f"{name} {direction}: scored", file=sys.stderr)

    def row(what: str, keys: list[tuple[str, str]]) -> str:
        cells = [f"{error([probs[k][s] for k in keys], labels[s]):.2f}" for s in SPLITS]
        return f"| {what} | {len(keys)} | {' | '.join(cells)} |"

    of = {name: [k for k in probs if k[0] == name] for name in names}
    lines = [
        "| classifiers averaged | classifiers | valid error % | test error % |",
        "|---|---|---|---|",
    ]
    lines += [row(f"{name}, {direction}", [(name, direction)]) for name, direction in probs]
    if any(len(keys) > 1 for keys in of.values()):
        lines += [row(f"{name} ({' + '.join(d for _, d in of[name])})", of[name]) for name in names]
    for k in range(2, len(names)):
        choices = list(itertools.combinations(names, k))
        per_split = {
            s: [error([probs[key][s] for n in c for key in of[n]], labels[s]) for c in choices]
            for s in SPLITS
        }
        cells = [f"{np.mean(e):.2f} ({min(e):.2f} to {max(e):.2f})" for e in per_split.values()]
        counts = sorted({sum(len(of[n]) for n in c) for c in choices})
        count = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        lines.append(
            f"| any {k} of the {len(names)} members: mean (lowest to highest) over "
            f"the {len(choices)} choices | {count} | {' | '.join(cells)} |"
        )
    lines.append(row(f"all {len(names)} members", list(probs)))
    baseline_labels = {m[3] for m in members}
    if (first / stage_spec("baseline", dataset=args.dataset).metrics).is_file():
        for n in sorted(baseline_labels, key=lambda x: x or 0):
            tfidf = tfidf_row(first, args.dataset, n)
            lines.append(
                f"| {tfidf['arm']} ({tfidf['chosen']}) | – | – | {100 * tfidf['test_error']:.2f} |"
            )
    out = args.out or RESULTS / f"seed_ensemble_{args.dataset}.md"
    title = args.title.format(dataset=args.dataset)
    command = f"python bench/seed_ensemble.py --dataset {args.dataset} " + " ".join(
        f'--member "{m}"' for m in args.member
    )
    if args.batch_size != parser.get_default("batch_size"):
        command += f" --batch-size {args.batch_size}"
    if args.out:
        command += f" --out bench/results/{out.name}"
    if args.title != TITLE:
        command += f' --title "{args.title}"'
    if args.conditions:
        command += f' --conditions "{args.conditions}"'
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Reproduce: `{command}` (workspace paths as on the machine that ran them), then "
            "`python bench/collect.py`.",
            "",
            "Each member's classifiers as trained (nothing retrained), scored on the validation "
            f"({len(labels['valid'])}) and test ({len(labels['test'])}) documents; an ensemble "
            "averages its classifiers' probabilities, as the evaluate stage averages the forward "
            "and backward ones. "
            + (f"{args.conditions} " if args.conditions else "")
            + "Error in %.",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    publish(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
