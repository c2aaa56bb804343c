"""General-domain text for LM pretraining (Howard & Ruder 2018, Section 3.1): Wikipedia dumps in
any language, WikiText-103 (the paper's corpus) and WikiExtractor output, or your own text
(plain text, JSON Lines, Parquet: read by :mod:`ulmfit.corpora.own_text`).

Dumps are tens of gigabytes of bz2 XML, so they are parsed as a stream: ``iterparse`` yields
one ``<page>`` at a time and the tree is cleared behind it, keeping memory flat. Only the
article namespace (0) is kept and redirects are skipped. Markup is stripped with
``mwparserfromhell``, a maintained parser of real wikicode (templates, nested links, tables,
tags), rather than regular expressions that break on nesting: templates, references, tables and
file/category links are removed, link text is kept.
"""

from __future__ import annotations

import collections
import contextlib
import html
import multiprocessing
import os
import random
import re
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import mwparserfromhell
from mwparserfromhell.nodes import Comment, Tag, Template, Wikilink

from ulmfit.config import to_dict
from ulmfit.corpora.archive import ExtractLimits, open_stream, sniff_format
from ulmfit.corpora.download import ConsoleProgress, Progress
from ulmfit.corpora.output import ArticleWriter, staged_directory, write_json
from ulmfit.corpora.own_text import (
    OWN_KINDS,
    data_files,
    iter_documents,
    kind_of_name,
    kinds_in_folder,
    natural_key,
    open_text,
)
from ulmfit.corpora.repairs import Repairs, decoded_lines
from ulmfit.corpora.sources import (
    CORPUS_KINDS,
    FASTAI_NLP,
    InputLog,
    WikipediaSource,
    fetch,
    unpack,
    wikipedia_dump_url,
)
from ulmfit.corpora.splits import LengthTally
from ulmfit.errors import InputError

WIKITEXT103_URL = f"{FASTAI_NLP}/wikitext-103.tgz"

#: Tags whose whole content is dropped (citations, tables, galleries, formulas).
_DROP_TAGS = {
    "ref",
    "references",
    "table",
    "gallery",
    "math",
    "timeline",
    "imagemap",
    "score",
    "syntaxhighlight",
    "source",
    "code",
    "pre",
}
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)*:")
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACE_RUNS = re.compile(r"[ \t]{2,}")  # where removed templates and refs leave gaps


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_dump_pages(path: Path, counts: Counter) -> Iterator[tuple[str, str, dict[int, str]]]:
    """``(title, wikitext, namespace names)`` for each article page of a MediaWiki XML dump.

    Non-article namespaces and redirects are counted in ``counts`` and skipped.
    """
    namespaces: dict[int, str] = {}
    with open_stream(path) as stream:
        events = ElementTree.iterparse(stream, events=("start", "end"))
        try:
            _, root = next(events)
            title, ns, redirect, text = "", "0", False, ""
            for event, elem in events:
                if event != "end":
                    continue
                tag = _local(elem.tag)
                if tag == "namespace":
                    namespaces[int(elem.get("key", "0"))] = elem.text or ""
                elif tag == "title":
                    title = elem.text or ""
                elif tag == "ns":
                    ns = (elem.text or "0").strip()
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = elem.text or ""
                elif tag == "page":
                    if ns != "0":
                        counts["skipped_namespace"] += 1
                    elif redirect or text.lstrip().lower().startswith("#redirect"):
                        counts["skipped_redirect"] += 1
                    else:
                        yield title, text, namespaces
                    title, ns, redirect, text = "", "0", False, ""
                    root.clear()  # drop the finished page: memory stays flat
        except ElementTree.ParseError as err:
            line = err.position[0] if err.position else None
            raise InputError(
                path,
                f"malformed XML ({err})",
                line=line,
                fix="the dump is truncated or damaged: download it again",
            ) from err


def strip_wikicode(text: str, namespaces: dict[int, str] | None = None) -> str:
    """Plain text of a wiki article: link text kept; templates, refs, tables, comments and
    file/category/interlanguage links removed."""
    namespaces = namespaces or {}
    drop_prefixes = {
        "file",
        "image",
        "category",
        namespaces.get(6, "").lower(),
        namespaces.get(14, "").lower(),
    } - {""}
    code = mwparserfromhell.parse(text)
    doomed = []
    for node in code.ifilter(recursive=True):
        if (
            isinstance(node, Template | Comment)
            or isinstance(node, Tag)
            and str(node.tag).lower() in _DROP_TAGS
        ):
            doomed.append(node)
        elif isinstance(node, Wikilink):
            target = str(node.title).strip()
            prefix = target.lstrip(":").split(":", 1)[0].strip().lower() if ":" in target else ""
            if prefix in drop_prefixes or _INTERWIKI.match(target):
                doomed.append(node)
    for node in doomed:
        with contextlib.suppress(ValueError):  # already gone with a removed ancestor
            code.remove(node)
    plain = code.strip_code(normalize=True, collapse=True)
    lines = [_SPACE_RUNS.sub(" ", line).strip() for line in plain.replace("\xa0", " ").splitlines()]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def _strip_chunk(pages: list[tuple[str, str, dict[int, str]]]) -> list[tuple[str, str]]:
    return [(title, strip_wikicode(text, namespaces)) for title, text, namespaces in pages]


def _page_chunks(
    pages: Iterator[tuple[str, str, dict[int, str]]], chunk_chars: int
) -> Iterator[list]:
    chunk, chars = [], 0
    for page in pages:
        chunk.append(page)
        chars += len(page[1])
        if chars >= chunk_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def stripped_articles(
    pages: Iterator[tuple[str, str, dict[int, str]]], workers: int, chunk_chars: int = 2 << 20
) -> Iterator[tuple[str, str]]:
    """``(title, plain text)`` in dump order, the markup stripped on ``workers`` processes.

    Stripping is the slow step (~0.3 MB/s per core), so it runs in a pool; at most
    ``2 * workers`` chunks of ``chunk_chars`` wikitext are in flight, which bounds memory
    however large the dump (``Pool.imap`` would read the whole input ahead).
    """
    if workers <= 1:
        for title, text, namespaces in pages:
            yield title, strip_wikicode(text, namespaces)
        return
    # forkserver/spawn, not fork: safe when the caller runs threads (Prefect, MLflow).
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _page_chunks(pages, chunk_chars):
            pending.append(pool.apply_async(_strip_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def dump_files(local: Path) -> list[Path]:
    """A dump file, or the ``*pages-articles*.xml*`` part files of a folder in order."""
    if local.is_file():
        return [local]
    files = sorted(
        (
            p
            for p in local.glob("*pages-articles*.xml*")
            if p.is_file() and not p.name.endswith(".part")
        ),
        key=lambda p: natural_key(p.name),  # pages-articles2 before pages-articles10
    )
    if not files:
        raise InputError(
            local,
            "no *pages-articles*.xml* dump files in this folder",
            fix="point path= at a {lang}wiki-*-pages-articles*.xml.bz2 file or a folder of them",
        )
    return files


_DOC_START = re.compile(r'^<doc id="[^"]*"(?: url="[^"]*")? title="(?P<title>[^"]*)"[^>]*>\s*$')


def iter_wikiextractor(path: Path, repairs: Repairs) -> Iterator[tuple[str, str]]:
    """``(title, text)`` per ``<doc ...>`` block of WikiExtractor output (plain, .gz or .bz2,
    a file or a folder of ``wiki_NN`` files). The title line WikiExtractor repeats is dropped."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        title, body, start = None, [], 0
        rows = 0
        for number, line in decoded_lines(_raw_lines(file), file, repairs):
            rows += 1
            if title is None:
                match = _DOC_START.match(line)
                if match:
                    title, body, start = html.unescape(match["title"]), [], number
                elif line.strip():
                    raise InputError(
                        file,
                        f"text outside a <doc> block: {line[:60]!r}",
                        line=number,
                        fix="point the source at WikiExtractor output (<doc id=.. url=.. title=..> ... </doc>)",
                    )
                continue
            if line.startswith("</doc>"):
                lines = [x.rstrip("\n") for x in body]
                while lines and not lines[0].strip():
                    lines.pop(0)
                if lines and lines[0].strip() == title:
                    lines.pop(0)
                yield title, "\n".join(lines).strip()
                title = None
            else:
                body.append(line)
        if title is not None:
            raise InputError(
                file,
                f"<doc> block '{title}' is not closed",
                line=start,
                fix="the file is truncated: recreate or download it again",
            )
        if rows == 0:
            raise InputError(
                file, "the file is empty", fix="point the source at complete WikiExtractor output"
            )
        repairs.check(file, rows)


def _raw_lines(path: Path) -> Iterator[bytes]:
    with open_stream(path) as stream:
        yield from stream


_WT_TITLE = re.compile(r"^ = (?!= )(.*) = $")
_WT_HEADING = re.compile(r"^ (?:= )+(.*?)(?: =)+ $")
_WT_SPLITS = (("@-@", "-"), ("@,@", ","), ("@.@", "."))


def iter_wikitext(path: Path, detokenize: bool, repairs: Repairs) -> Iterator[tuple[str, str]]:
    """``(title, text)`` per article of a WikiText-103 ``wiki.*.tokens`` file; articles start at
    `` = Title = `` lines, section headings `` = = Name = = `` become plain lines."""
    title, body = None, []

    def finish() -> tuple[str, str]:
        text = "\n".join(line for line in body if line)
        if detokenize:
            for token, char in _WT_SPLITS:
                text = text.replace(f" {token} ", char)
        return title or "", text.strip()

    for _, line in decoded_lines(_raw_lines(path), path, repairs):
        line = line.rstrip("\n")
        match = _WT_TITLE.match(line)
        if match:
            if title is not None:
                yield finish()
            title, body = match[1].strip(), []
            continue
        heading = _WT_HEADING.match(line)
        body.append(heading[1].strip() if heading else line.strip())
    if title is not None:
        yield finish()


def _find_wikitext_files(root: Path) -> dict[str, Path]:
    files = {}
    for split in ("train", "valid", "test"):
        hits = sorted(
            p for name in (f"wiki.{split}.tokens", f"wiki.{split}.raw") for p in root.rglob(name)
        )
        if hits:
            files[split] = hits[0]
    if "train" not in files:
        raise InputError(
            root,
            "no wiki.train.tokens found",
            fix="point path= at wikitext-103.tgz / wikitext-103-v1.zip or its extracted folder",
        )
    return files


def _guess_kind(local: Path) -> str:
    """The kind of a file or folder: by content for the Wikipedia formats, else by the names of
    the files (``.txt``, ``.jsonl``, ``.parquet``) when they point at one kind only."""
    if local.is_dir():
        if any(local.glob("*pages-articles*.xml*")):
            return "dump"
        if any(local.rglob("wiki.train.*")):
            return "wikitext103"
        found = kinds_in_folder(local)
        if len(found) > 1:
            raise InputError(
                local,
                f"the folder holds files of several kinds ({', '.join(sorted(found))})",
                fix="set kind to the one to read, or keep one format per folder",
            )
        if found == {"text"}:
            first, _ = data_files(local, "text")[0]
            return "wikiextractor" if _head(first).startswith(b"<doc") else "text"
        return found.pop() if found else "wikiextractor"
    if sniff_format(local) in ("zip", "tar") or ".tar" in local.name or local.name.endswith(".tgz"):
        return "wikitext103"
    with open(local, "rb") as raw:
        if raw.read(4) == b"PAR1":
            return "parquet"
    head = _head(local)
    if head.startswith(b"<mediawiki") or head.startswith(b"<?xml"):
        return "dump"
    if head.startswith(b"<doc"):
        return "wikiextractor"
    by_name = kind_of_name(local.name)
    if by_name is not None:
        return by_name
    raise InputError(
        local,
        "not a MediaWiki XML dump, WikiText-103 or WikiExtractor output, "
        "and not named .txt, .jsonl or .parquet",
        fix="set kind to one of " + ", ".join(CORPUS_KINDS),
    )


def _head(path: Path) -> bytes:
    with open_text(path) as stream:
        return stream.read(4096).lstrip()


def prepare_wikipedia(
    src: WikipediaSource,
    out_dir: str | Path,
    *,
    cache_dir: str | Path,
    progress: Progress | None = None,
) -> dict:
    """Stream ``src`` into ``out_dir/{train,valid}.parquet`` (``title``, ``text``; WikiText-103
    adds its ``test.parquet``), ``summary.json`` and ``sources.json``, atomically.

    Own text (``kind`` text, jsonl or parquet) has no titles: ``title`` holds the document's id,
    ``<file>:<line>``. Bad input raises ``InputError`` and leaves no output (docs/corpora.md).
    """
    cache_dir = Path(cache_dir)
    progress = progress or ConsoleProgress()
    log = InputLog()
    repairs = Repairs(strict=src.strict, max_fraction=src.max_repair_fraction)
    if src.path is not None:
        origin = src.path
    elif src.url is not None:
        origin = src.url
    else:
        origin = WIKITEXT103_URL if src.kind == "wikitext103" else wikipedia_dump_url(src.lang)
    local = fetch(origin, cache_dir, sha256=src.sha256, progress=progress, role="source", log=log)
    limits = ExtractLimits(max_total_bytes=src.max_extract_bytes, max_ratio=src.max_extract_ratio)
    if src.kind in (None, "wikitext103", *OWN_KINDS):
        # A tar/zip archive is extracted (into the cache) and its folder read; other files as is.
        local = unpack(local, cache_dir, limits)
    kind = src.kind or _guess_kind(local)
    counts: Counter = Counter()

    if kind == "wikitext103":
        files = _find_wikitext_files(local)
        articles = (
            (split, title, text)
            for split, file in files.items()
            for title, text in iter_wikitext(file, src.detokenize, repairs)
        )
    else:
        if kind == "dump":
            pages = (page for file in dump_files(local) for page in iter_dump_pages(file, counts))
            texts = stripped_articles(pages, src.workers or os.cpu_count() or 1)
        elif kind == "wikiextractor":
            texts = iter_wikiextractor(local, repairs)
        else:
            texts = iter_documents(
                local,
                kind,
                documents=src.documents,
                text_column=src.text_column,
                repairs=repairs,
                counts=counts,
            )
        # One seeded draw per document read, in stream order: nothing is held in memory, and a
        # document's split depends only on its position, not on min_chars or the limits.
        rng = random.Random(src.seed)
        articles = (
            ("valid" if rng.random() < src.valid_fraction else "train", t, x) for t, x in texts
        )

    lengths: dict[str, tuple[LengthTally, LengthTally]] = {}
    kept = words_total = 0
    with staged_directory(out_dir) as staging:
        writers: dict[str, ArticleWriter] = {}
        try:
            for split, title, text in articles:
                # WikiText-103 keeps every article, so its splits stay the published ones.
                if kind != "wikitext103" and len(text) < src.min_chars:
                    counts["skipped_short"] += 1
                    continue
                if split not in writers:
                    writers[split] = ArticleWriter(staging / f"{split}.parquet")
                    lengths[split] = (LengthTally(), LengthTally())
                words = len(text.split())
                writers[split].add(title, text)
                lengths[split][0].add(len(text))
                lengths[split][1].add(words)
                kept += 1
                words_total += words
                if kept % 100 == 0:
                    progress("parse articles", kept, src.max_articles)
                if (src.max_articles is not None and kept >= src.max_articles) or (
                    src.max_words is not None and words_total >= src.max_words
                ):
                    break
        finally:
            for writer in writers.values():
                writer.close()
        if "train" not in writers:
            skipped = ", ".join(f"{n} {why.removeprefix('skipped_')}" for why, n in counts.items())
            raise InputError(
                local,
                f"no {'document' if kind in OWN_KINDS else 'article'} of at least "
                f"{src.min_chars} characters went to the train split"
                + (f" (skipped: {skipped})" if skipped else ""),
                fix="check the source, or lower min_chars",
            )
        if "valid" not in writers:  # tiny inputs: an empty but well-formed valid split
            writers["valid"] = ArticleWriter(staging / "valid.parquet")
            writers["valid"].close()
            lengths["valid"] = (LengthTally(), LengthTally())
        progress("parse articles", kept, kept)
        notes = []
        if kind in OWN_KINDS and counts["skipped_short"]:
            notes.append(
                f"{counts['skipped_short']} documents shorter than min_chars={src.min_chars} "
                "were skipped; lower min_chars to keep short documents such as single sentences"
            )
        summary = {
            "kind": kind,
            "lang": src.lang,
            "splits": {
                split: {
                    "count": chars.count,
                    "words_total": words.total,
                    "chars": chars.stats(),
                    "words": words.stats(),
                }
                for split, (chars, words) in lengths.items()
            },
            "skipped": dict(counts),
            "notes": notes,
            "repairs": repairs.as_dict(),
            "options": to_dict(src),
        }
        write_json(staging / "summary.json", summary)
        write_json(staging / "sources.json", {"inputs": log.entries})
    return summary
