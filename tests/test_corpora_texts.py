"""Pretraining on your own text: plain text, JSON Lines and Parquet through ``prepare_wikipedia``."""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import json
import lzma
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.corpora.builders import CorpusServer, tar_gz

from ulmfit.config import from_dict
from ulmfit.corpora import WikipediaSource, own_text, prepare_wikipedia, wikipedia
from ulmfit.corpora.output import ArticleWriter
from ulmfit.corpora.splits import LengthTally, length_stats
from ulmfit.errors import InputError

# Real-looking news-like sentences in eight languages and six scripts (written for these tests).
DOCS = [
    "The river town kept its old stone bridge, and every spring the market filled the square with bread and cherries.",
    "Der Fluss war im Winter zugefroren, und die Kinder liefen bis zur kleinen Insel hinüber, wo die alte Mühle stand.",
    "Летом в деревне открылась новая библиотека, и по вечерам там собирались школьники, чтобы читать и спорить о книгах.",
    "Η βιβλιοθήκη της πόλης απέκτησε φέτος χιλιάδες νέα βιβλία, και οι αναγνώστες γέμισαν τις αίθουσες κάθε απόγευμα.",
    "駅前の小さな書店は創業百年を迎え、地元の人々は記念の朗読会に集まって古い物語を聞いた。",
    "نظمت المدينة معرضا للكتاب في الساحة القديمة، وحضره آلاف الزوار من القرى المجاورة طوال الأسبوع.",
    "Le vieux phare de la côte a été restauré par des bénévoles, qui ont repeint la lanterne et réparé l’escalier.",
    "सुबह की बारिश के बाद गाँव के खेतों में हरियाली लौट आई और किसान नई फसल की तैयारी में जुट गए।",
]


def _doc(i: int) -> str:
    return f"{DOCS[i % len(DOCS)]} ({i})"


def _prepare(tmp_path, **kwargs):
    return prepare_wikipedia(
        WikipediaSource(**kwargs),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=lambda *a: None,
    )


def _rows(tmp_path, split="train"):
    return pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pydict()


def _no_output(tmp_path) -> bool:
    return not [p for p in tmp_path.iterdir() if "out" in p.name]


def test_text_file_one_document_per_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    # A byte-order mark, Windows line ends and blank lines: none of them is a document.
    body = "\ufeff" + DOCS[0] + "\r\n\r\n" + "\n".join(DOCS[1:]) + "\n   \n"
    corpus.write_bytes(body.encode())
    summary = _prepare(tmp_path, path=str(corpus), min_chars=0, valid_fraction=0.0)
    assert summary["kind"] == "text"  # guessed from the name
    assert summary["splits"]["train"]["count"] == len(DOCS)
    assert summary["splits"]["valid"]["count"] == 0 and summary["skipped"] == {}
    train = _rows(tmp_path)
    assert train["text"] == DOCS
    assert train["title"][:3] == ["corpus.txt:1", "corpus.txt:3", "corpus.txt:4"]
    limited = _prepare(tmp_path, path=str(corpus), kind="text", min_chars=0, max_articles=3)
    assert sum(s["count"] for s in limited["splits"].values()) == 3


def test_text_paragraphs_from_a_folder_recursively_in_natural_order(tmp_path):
    folder = tmp_path / "books"
    (folder / "vol").mkdir(parents=True)
    paragraph = [f"{_doc(i)}\n{_doc(i + 3)}" for i in range(6)]  # each document spans two lines
    (folder / "part10.txt").write_text(f"{paragraph[3]}\n\n{paragraph[4]}\n")
    (folder / "part2.txt").write_text(f"\n{paragraph[1]}\n  \n\n{paragraph[2]}")
    (folder / "a1.txt").write_text(paragraph[0])
    with gzip.open(folder / "vol" / "part1.txt.gz", "wt", encoding="utf-8") as f:
        f.write(paragraph[5])
    (folder / "README.md").write_text("Not a document of the corpus.\n")
    (folder / ".draft.txt").write_text("A hidden draft is not read.\n")
    summary = _prepare(
        tmp_path,
        path=str(folder),
        documents="paragraphs",
        min_chars=0,
        valid_fraction=0.0,
    )
    assert summary["kind"] == "text"
    train = _rows(tmp_path)
    assert train["text"] == paragraph
    assert train["title"] == [
        "a1.txt:1",
        "part2.txt:2",
        "part2.txt:6",
        "part10.txt:1",
        "part10.txt:4",
        "vol/part1.txt.gz:1",
    ]


@pytest.mark.parametrize(
    ("suffix", "compress"), [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)]
)
def test_compressed_text_and_jsonl_read_like_plain(tmp_path, suffix, compress):
    lines = "\n".join(DOCS) + "\n"
    records = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS)
    (tmp_path / f"corpus.txt{suffix}").write_bytes(compress(lines.encode()))
    (tmp_path / f"corpus.jsonl{suffix}").write_bytes(compress(records.encode()))
    for name, kind in ((f"corpus.txt{suffix}", "text"), (f"corpus.jsonl{suffix}", "jsonl")):
        summary = _prepare(tmp_path, path=str(tmp_path / name), min_chars=0, valid_fraction=0.0)
        assert summary["kind"] == kind
        train = _rows(tmp_path)
        assert train["text"] == DOCS and train["title"][1] == f"{name}:2"


def test_jsonl_reads_the_named_column_and_counts_empty_documents(tmp_path):
    corpus = tmp_path / "news.jsonl"
    lines = [
        json.dumps({"id": i, "content": d, "lang": "xx"}, ensure_ascii=i % 2 == 0)
        for i, d in enumerate(DOCS)
    ]
    lines[3:3] = ["", json.dumps({"id": 98, "content": None}), json.dumps({"content": "  "})]
    lines.append(
        '{"id": 99, "content": "A broken escape \\ud800 inside an otherwise fine document."}'
    )
    corpus.write_text("\n".join(lines) + "\n")
    summary = _prepare(
        tmp_path, path=str(corpus), text_column="content", min_chars=0, valid_fraction=0.0
    )
    assert summary["kind"] == "jsonl"
    assert summary["skipped"] == {"skipped_empty": 2}
    assert summary["repairs"]["counts"] == {"invalid_bytes": 1}
    assert summary["repairs"]["examples"]["invalid_bytes"] == [f"{corpus}:12"]
    train = _rows(tmp_path)
    assert train["text"][:-1] == DOCS
    assert train["text"][-1] == "A broken escape \ufffd inside an otherwise fine document."
    assert train["title"][2:4] == ["news.jsonl:3", "news.jsonl:7"]


def test_parquet_file_and_folder_read_in_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(own_text, "_PARQUET_BATCH_ROWS", 3)  # several batches per file
    folder = tmp_path / "data"
    folder.mkdir()
    docs = [_doc(i) for i in range(20)]
    first = pa.table({"id": list(range(12)), "text": docs[:10] + [None, ""]})
    pq.write_table(first, folder / "train-00000-of-00002.parquet", row_group_size=4)
    second = pa.table({"text": pa.array(docs[10:], pa.large_string())})
    pq.write_table(second, folder / "train-00001-of-00002.parquet", row_group_size=4)
    summary = _prepare(tmp_path, path=str(folder), min_chars=0, valid_fraction=0.0)
    assert summary["kind"] == "parquet" and summary["skipped"] == {"skipped_empty": 2}
    train = _rows(tmp_path)
    assert train["text"] == docs
    assert train["title"][9:11] == [
        "train-00000-of-00002.parquet:10",
        "train-00001-of-00002.parquet:1",
    ]
    # A binary column is decoded as UTF-8, a stray Latin-1 byte repaired and counted.
    raw = [d.encode() for d in docs[:3]] + [
        b"Caf\xe9 au lait and croissants, served every morning."
    ]
    pq.write_table(pa.table({"body": pa.array(raw, pa.binary())}), tmp_path / "bytes.parquet")
    summary = _prepare(
        tmp_path,
        path=str(tmp_path / "bytes.parquet"),
        text_column="body",
        min_chars=0,
        valid_fraction=0.0,
        max_repair_fraction=0.5,
    )
    assert summary["repairs"]["counts"] == {"invalid_bytes": 1}
    assert _rows(tmp_path)["text"][3].startswith("Café au lait")


def test_a_url_is_downloaded_checked_and_recorded(tmp_path):
    data = gzip.compress(_jsonl(*({"text": d} for d in DOCS)).encode())
    server = CorpusServer().start()
    try:
        server.files["corpus.jsonl.gz"] = data
        digest = hashlib.sha256(data).hexdigest()
        summary = _prepare(tmp_path, url=server.url("corpus.jsonl.gz"), sha256=digest, min_chars=0)
        assert summary["kind"] == "jsonl"
        assert sum(s["count"] for s in summary["splits"].values()) == len(DOCS)
        inputs = json.loads((tmp_path / "out" / "sources.json").read_text())["inputs"]
        assert (
            inputs[0]["origin"] == server.url("corpus.jsonl.gz") and inputs[0]["sha256"] == digest
        )
        fresh = tmp_path / "fresh"  # an empty cache: the file is downloaded again, and refused
        fresh.mkdir()
        with pytest.raises(InputError, match="sha256"):
            _prepare(fresh, url=server.url("corpus.jsonl.gz"), sha256="0" * 64)
        assert _no_output(fresh)
    finally:
        server.stop()


def test_an_archive_of_text_files_is_extracted_and_guessed(tmp_path):
    members = {f"corpus/{name}.txt": (_doc(i) + "\n").encode() for i, name in enumerate("abc")}
    archive = tar_gz(tmp_path / "corpus.tar.gz", members)
    summary = _prepare(tmp_path, path=str(archive), min_chars=0, valid_fraction=0.0)
    assert summary["kind"] == "text"
    assert _rows(tmp_path)["title"] == ["corpus/a.txt:1", "corpus/b.txt:1", "corpus/c.txt:1"]


def test_valid_split_is_seeded_streamed_and_byte_identical(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(_doc(i) + "\n" for i in range(400)))
    outputs = []
    for seed in (7, 7, 8):
        _prepare(tmp_path, path=str(corpus), min_chars=0, valid_fraction=0.25, seed=seed)
        outputs.append(
            {
                name: (tmp_path / "out" / name).read_bytes()
                for name in ("train.parquet", "valid.parquet", "summary.json")
            }
        )
        if seed == 7:
            valid_7 = set(_rows(tmp_path, "valid")["title"])
            train_7 = set(_rows(tmp_path)["title"])
    assert outputs[0] == outputs[1]
    assert outputs[0]["valid.parquet"] != outputs[2]["valid.parquet"]
    assert 60 <= len(valid_7) <= 140 and not valid_7 & train_7 and len(valid_7 | train_7) == 400
    # A document's split depends on its position only: filtering others out does not move it.
    _prepare(tmp_path, path=str(corpus), min_chars=115, valid_fraction=0.25, seed=7)
    kept_valid = set(_rows(tmp_path, "valid")["title"])
    assert kept_valid and kept_valid <= valid_7
    assert set(_rows(tmp_path)["title"]) <= train_7


def test_min_chars_skips_short_documents_counts_them_and_says_so(tmp_path):
    corpus = tmp_path / "corpus.txt"
    long_docs = [" ".join(DOCS[i:] + DOCS[:i]) for i in range(3)]  # ~750 characters each
    corpus.write_text("\n".join(long_docs + DOCS) + "\n")
    summary = _prepare(tmp_path, path=str(corpus), valid_fraction=0.0)  # the default 200
    assert summary["splits"]["train"]["count"] == 3
    assert summary["skipped"] == {"skipped_short": len(DOCS)}
    assert "min_chars=200" in summary["notes"][0]
    everything = _prepare(tmp_path, path=str(corpus), valid_fraction=0.0, min_chars=0)
    assert everything["splits"]["train"]["count"] == 3 + len(DOCS) and everything["notes"] == []


def test_one_invalid_byte_is_repaired_and_counted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = [_doc(i).encode() for i in range(200)]
    lines[4] = b"Le caf\xe9 du port ouvre \xe0 six heures, avant l'arriv\xe9e des bateaux."
    corpus.write_bytes(b"\n".join(lines))
    summary = _prepare(tmp_path, path=str(corpus), min_chars=0, valid_fraction=0.0)
    assert summary["repairs"]["counts"] == {"invalid_bytes": 1}
    assert summary["repairs"]["examples"]["invalid_bytes"] == [f"{corpus}:5"]
    assert _rows(tmp_path)["text"][4].startswith("Le café du port ouvre à six heures")


def test_own_text_trains_a_tokenizer_that_round_trips_every_script(tmp_path):
    from ulmfit.tokenizer import TokenizerConfig, train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(_doc(i) + "\n" for i in range(80)))
    _prepare(tmp_path, path=str(corpus), min_chars=0)
    texts = _rows(tmp_path)["text"]
    tokenizer = train_tokenizer(
        iter(texts), tmp_path / "tok.model", TokenizerConfig(vocab_size=600)
    )
    for doc in DOCS:
        assert tokenizer.decode(tokenizer.encode([doc])[0]) == doc


def test_length_tally_gives_the_statistics_of_the_full_list():
    rng = np.random.default_rng(0)
    for size in (0, 1, 2, 3, 10, 101):
        lengths = rng.integers(0, 40, size)
        tally = LengthTally()
        for length in lengths.tolist():
            tally.add(length)
        assert tally.stats() == length_stats(lengths)
        assert (tally.count, tally.total) == (size, int(lengths.sum()))


def test_unknown_kind_or_documents_is_refused_before_any_work():
    with pytest.raises(InputError) as info:
        WikipediaSource(kind="txt", path="/nonexistent/corpus.txt")
    message = str(info.value)
    assert message.startswith("wikipedia.kind: unknown kind 'txt'")
    for kind in ("dump", "wikitext103", "wikiextractor", "text", "jsonl", "parquet"):
        assert kind in message
    with pytest.raises(ValueError, match="wikipedia.kind: got 'csv', expected one of dump"):
        from_dict(WikipediaSource, {"kind": "csv"}, where="wikipedia")  # as params.yaml is read
    with pytest.raises(InputError, match="unknown value 'sentences'; use lines or paragraphs"):
        WikipediaSource(kind="text", documents="sentences")


def _write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def _jsonl(*records) -> str:
    return "".join(
        (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
    )


BAD_INPUTS = {
    "jsonl line not JSON": (
        lambda d: _write(d / "c.jsonl", _jsonl({"text": DOCS[0]}, '{"text": "unterminated')),
        {},
        r"c\.jsonl:2: not valid JSON \(Unterminated string",
    ),
    "jsonl line not an object": (
        lambda d: _write(d / "c.jsonl", _jsonl(["a", "list"])),
        {},
        r"c\.jsonl:1: the line is a JSON array, not an object",
    ),
    "jsonl text column missing": (
        lambda d: _write(d / "c.jsonl", _jsonl({"id": 1, "body": DOCS[1]})),
        {},
        r"c\.jsonl:1: no key 'text' \(this line has: id, body\)\. Fix: set text_column",
    ),
    "jsonl text not a string": (
        lambda d: _write(d / "c.jsonl", _jsonl({"text": 12})),
        {},
        r"c\.jsonl:1: 'text' is a JSON number, not a string",
    ),
    "parquet text column missing": (
        lambda d: (
            pq.write_table(pa.table({"id": [1], "body": [DOCS[2]]}), d / "c.parquet")
            or d / "c.parquet"
        ),
        {},
        r"c\.parquet: no column 'text' \(the columns are: id, body\)",
    ),
    "parquet column not text": (
        lambda d: pq.write_table(pa.table({"text": [1, 2]}), d / "c.parquet") or d / "c.parquet",
        {},
        r"column 'text' holds int64, not text",
    ),
    "not parquet": (
        lambda d: _write(d / "c.txt", DOCS[0]),
        {"kind": "parquet"},
        r"c\.txt: not a readable Parquet file",
    ),
    "empty folder": (
        lambda d: d,
        {"kind": "text"},
        r"no \.txt \(or \.txt\.gz/\.bz2/\.xz\) files in this folder or its subfolders",
    ),
    "folder without parquet files": (
        lambda d: _write(d / "notes" / "a.txt", DOCS[0]).parent.parent,
        {"kind": "parquet"},
        r"no \.parquet files in this folder",
    ),
    "folder of several kinds": (
        lambda d: (
            _write(d / "a.txt", DOCS[0]).parent
            and _write(d / "b.jsonl", _jsonl({"text": DOCS[1]})).parent
        ),
        {},
        r"the folder holds files of several kinds \(jsonl, text\)\. Fix: set kind",
    ),
    "unrecognised file": (
        lambda d: _write(d / "c.csv", "text\nhello\n"),
        {},
        r"c\.csv: not a MediaWiki XML dump.*Fix: set kind to one of dump, wikitext103, wikiextractor, text, jsonl, parquet",
    ),
    "no documents left": (
        lambda d: _write(d / "c.txt", "\n".join(DOCS)),
        {},
        r"no document of at least 200 characters went to the train split \(skipped: 8 short\)",
    ),
    "latin-1 file": (
        lambda d: _write(
            d / "c.txt",
            "\n".join(f"{DOCS[i % 2]} ({i}) – Grüße" for i in range(20)).encode("cp1252"),
        ),
        {"min_chars": 0},
        r"c\.txt: 20 of 20 rows needed repair \(invalid bytes, first at .*c\.txt:1\).*Fix: convert the file to UTF-8",
    ),
    "utf-16 file": (
        lambda d: _write(d / "c.txt", "\n".join(DOCS).encode("utf-16")),
        {},
        r"c\.txt:1: the text is UTF-16, not UTF-8\. Fix: convert it: iconv",
    ),
    "utf-16 inside gzip": (
        lambda d: _write(d / "c.txt.gz", gzip.compress("\n".join(DOCS).encode("utf-16-le"))),
        {},
        r"c\.txt\.gz:1: the text is UTF-16, not UTF-8",
    ),
    "invalid byte when strict": (
        lambda d: _write(d / "c.txt", b"caf\xe9 " * 60),
        {"strict": True, "min_chars": 0},
        r"c\.txt:1: byte 0xE9 at offset 3 is not UTF-8",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_leaves_no_output(tmp_path, case):
    build, options, message = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    source = build(tmp_path / "in")
    with pytest.raises(InputError, match=message):
        _prepare(tmp_path, path=str(source), **options)
    assert _no_output(tmp_path)


def test_streaming_a_large_file_keeps_the_python_heap_small(tmp_path, monkeypatch):
    """12 MB of text in 5 KB lines through the whole of ``prepare_wikipedia``: the
    Python heap's peak stays a small fraction of the input. ArticleWriter's row-group buffer
    (a constant 8M characters, ~30 MB of heap) is shrunk so that the check sees whatever grows
    with the input; imports are warmed up first so that they are not counted."""
    monkeypatch.setattr(
        wikipedia, "ArticleWriter", functools.partial(ArticleWriter, group_chars=1 << 16)
    )
    line = (" ".join(DOCS) + " ") * 4
    block = "".join(f"{i} {line}\n" for i in range(500)).encode()
    corpus = tmp_path / "big.txt"
    corpus.write_bytes(block)
    _prepare(tmp_path, path=str(corpus), min_chars=0)
    repeats = 12 * 2**20 // len(block)
    with open(corpus, "ab") as f:
        for _ in range(repeats):
            f.write(block)
    size = corpus.stat().st_size
    tracemalloc.start()
    try:
        summary = _prepare(tmp_path, path=str(corpus), min_chars=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(s["count"] for s in summary["splits"].values()) == 500 * (1 + repeats)
    assert peak < size / 4, f"peak Python heap {peak / 2**20:.1f} MB for {size / 2**20:.0f} MB"
