"""Your own labelled data: tables (CSV, TSV, JSON Lines, Parquet) and class folders, written
here as small real-looking files, end to end through ``prepare_dataset`` (and the tokenizer)."""

from __future__ import annotations

import csv
import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ulmfit.corpora import DatasetSource, prepare_dataset
from ulmfit.errors import InputError

# Support tickets in three languages; "billing" has a body with a newline inside its quotes.
TICKETS = [
    ("Invoice twice", "I was charged twice for March.\nPlease refund one.", "billing"),
    ("Refund status", "Where is my refund for order 1182?", "billing"),
    ("請求書", "先月の請求書が二重に発行されました。", "billing"),
    ("Τιμολόγιο", "Χρεώθηκα δύο φορές αυτόν τον μήνα.", "billing"),
    ("VAT number", "Please add our VAT number to the invoices.", "billing"),
    ("Card declined", "My card is declined although it is valid.", "billing"),
    ("Cannot log in", "The login page says my password is wrong.", "login"),
    ("ログインできません", "パスワードを再設定してもログインできません。", "login"),
    ("Σύνδεση", "Δεν μπορώ να συνδεθώ στον λογαριασμό μου.", "login"),
    ("2FA code", "The two-factor code never arrives by SMS.", "login"),
    ("Locked out", 'After five tries my account says "locked".', "login"),
    ("SSO error", "Single sign-on fails with error 403.", "login"),
    ("App crashes", "The app crashes when I open settings.", "bug"),
    ("アプリが落ちる", "設定を開くとアプリが終了します。", "bug"),
    ("Σφάλμα", "Η εφαρμογή κολλάει στην εκκίνηση.", "bug"),
    ("Export broken", "CSV export produces an empty file.", "bug"),
    ("Dark mode", "Text is invisible in dark mode, grey on grey.", "bug"),
    ("Search", "Search returns nothing for accented names, e.g. Zoë.", "bug"),
]
LABELS = ["billing", "bug", "login"]


def _write_csv(path, rows, header=("title", "body", "label"), delimiter=",", bom=False):
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path, rows):
    lines = [json.dumps(dict(title=t, body=b, label=y), ensure_ascii=False) for t, b, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_parquet(path, rows):
    title, body, label = zip(*rows, strict=True)
    pq.write_table(pa.table({"title": title, "body": body, "label": label}), path)
    return path


def _prepare(tmp_path, **kwargs):
    kwargs.setdefault("name", "tickets")
    return prepare_dataset(
        DatasetSource(**kwargs),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=lambda *a: None,
    )


def _read(path):
    return pq.read_table(path).to_pydict()


def _all_texts(tmp_path):
    out = tmp_path / "out"
    return [
        t for split in ("train", "valid", "test") for t in _read(out / f"{split}.parquet")["text"]
    ]


# ----------------------------------------------------------------------------------- formats


def test_one_csv_is_cut_into_stratified_splits_and_tokenized(tmp_path):
    data = _write_csv(tmp_path / "tickets.csv", TICKETS, bom=True)
    summary = _prepare(
        tmp_path,
        layout="table",
        path=str(data),
        text_columns=("title", "body"),
        title_join="newline",
    )
    assert summary["label_names"] == LABELS  # sorted, from the data
    counts = {name: s["count"] for name, s in summary["splits"].items()}
    assert counts == {"train": 12, "valid": 3, "test": 3}
    assert summary["splits"]["test"]["per_class"] == {"billing": 1, "bug": 1, "login": 1}
    assert any(
        "label order: the 3 values of 'label' found in the training data, sorted" in n
        for n in summary["notes"]
    )
    assert any("no test split given" in n for n in summary["notes"])
    texts = _all_texts(tmp_path)
    assert "Invoice twice\n\nI was charged twice for March.\nPlease refund one." in texts
    assert "請求書\n\n先月の請求書が二重に発行されました。" in texts
    train = _read(tmp_path / "out" / "train.parquet")
    for text, label, name in zip(train["text"], train["label"], train["label_name"], strict=True):
        assert LABELS[label] == name and text

    # The tokenize_dataset stage's task on the prepared folder, with a tokenizer of this text.
    from tasks.tokens import encode_splits_task
    from ulmfit.storage import read_tokens
    from ulmfit.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

    model = tmp_path / "tok" / "tokenizer.model"
    model.parent.mkdir()
    train_tokenizer(iter(texts * 3), model, TokenizerConfig(vocab_size=400, threads=1))
    stats = encode_splits_task.fn(
        tmp_path / "out", model, tmp_path / "tokens", labelled=True, workers=1, chunk_docs=8
    )
    assert {split: s["docs"] for split, s in stats.items()} == counts
    tokenizer = Tokenizer.load(model)
    for split in ("train", "test"):
        docs = read_tokens(tmp_path / "tokens" / f"{split}.parquet")
        prepared = _read(tmp_path / "out" / f"{split}.parquet")
        assert docs.labels.tolist() == prepared["label"]
        for i, text in enumerate(prepared["text"]):  # Japanese and Greek survive the round trip
            ids = docs.ids[docs.offsets[i] : docs.offsets[i + 1]].tolist()
            assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "fmt, write",
    [
        ("tsv", lambda p, rows: _write_csv(p, rows, delimiter="\t")),
        ("jsonl", _write_jsonl),
        ("parquet", _write_parquet),
    ],
)
def test_per_split_files_in_each_format(tmp_path, fmt, write):
    train = write(tmp_path / f"train.{fmt}", TICKETS)
    test = write(tmp_path / f"test.{fmt}", TICKETS[::6])
    summary = _prepare(
        tmp_path,
        layout="table",
        train_path=str(train),
        test_path=str(test),
        text_columns=("title", "body"),
        valid_fraction=0.2,
    )
    assert summary["label_names"] == LABELS
    assert summary["splits"]["test"]["count"] == 3
    assert summary["splits"]["train"]["count"] + summary["splits"]["valid"]["count"] == 18
    test_out = _read(tmp_path / "out" / "test.parquet")
    assert test_out["text"][0] == (
        "xxfld 1 Invoice twice xxfld 2 I was charged twice for March.\nPlease refund one."
    )
    assert test_out["label_name"] == ["billing", "login", "bug"]  # test keeps the file's order
    assert any("3 test rows have a text that also occurs in train" in n for n in summary["notes"])


def test_integer_labels_sort_as_numbers_and_other_file_shapes(tmp_path, caplog):
    # Stars 1..10 as JSON numbers: "10" sorts after "9", and 2.0 is the label "2".
    rows = [{"review": f"Review {i} 😀", "stars": i % 10 + 1} for i in range(40)]
    rows[1]["stars"] = 2.0
    (tmp_path / "reviews.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    summary = _prepare(
        tmp_path,
        layout="table",
        path=str(tmp_path / "reviews.json"),
        text_columns=("review",),
        label_column="stars",
        valid_fraction=0.0,
        test_fraction=0.25,
    )
    assert summary["label_names"] == [str(i) for i in range(1, 11)]
    assert "sorted as numbers" in summary["notes"][0]
    # A gzipped CSV, a YAML-style single text column, and format: given for an odd extension.
    with gzip.open(tmp_path / "t.csv.gz", "wt", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("body", "label"), *[(b, y) for _, b, y in TICKETS]])
    assert (
        _prepare(tmp_path, layout="table", path=str(tmp_path / "t.csv.gz"), text_columns="body")[
            "label_names"
        ]
        == LABELS
    )
    _write_csv(tmp_path / "t.txt", TICKETS, delimiter="\t")
    with caplog.at_level(logging.WARNING, logger="ulmfit.corpora"):
        summary = _prepare(
            tmp_path,
            layout="table",
            format="tsv",
            train_path=str(tmp_path / "t.txt"),
            test_path=str(tmp_path / "t.txt"),
            text_columns=("body",),
        )
    assert "18 test rows have a text that also occurs in train or valid" in caplog.text
    assert summary["notes"][-1].startswith("18 test rows")


def test_label_names_fix_the_order_and_reject_other_labels(tmp_path):
    data = _write_csv(tmp_path / "tickets.csv", TICKETS)
    order = ("login", "billing", "bug")
    summary = _prepare(
        tmp_path, layout="table", path=str(data), text_columns=("body",), label_names=order
    )
    assert summary["label_names"] == list(order)
    assert "as given in label_names" in summary["notes"][0]
    train = _read(tmp_path / "out" / "train.parquet")
    assert all(
        order[i] == name for i, name in zip(train["label"], train["label_name"], strict=True)
    )
    with pytest.raises(InputError, match=r"tickets\.csv:15: label 'bug' is not in label_names"):
        _prepare(
            tmp_path / "b",
            layout="table",
            path=str(data),
            label_names=("login", "billing"),
            text_columns=("body",),
        )
    assert not (tmp_path / "b" / "out").exists()


def test_params_yaml_section_for_own_data(tmp_path):
    import yaml

    from tasks.params import parse_params

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "profiles" / "default.yaml").read_text())
    data["datasets"]["tickets"] = yaml.safe_load(
        """
        source:
          layout: table
          path: data/tickets.csv
          format: null
          text_columns: [title, body]
          label_column: label
          label_names: null
        """
    )
    source = parse_params(data).dataset("tickets").source
    assert (source.name, source.layout, source.text_columns) == (
        "tickets",
        "table",
        ("title", "body"),
    )


def test_a_builtin_name_with_its_own_layout(tmp_path):
    data = _write_csv(tmp_path / "mine.csv", TICKETS)
    summary = _prepare(
        tmp_path, name="ag_news", layout="table", path=str(data), text_columns=("body",)
    )
    assert summary["dataset"] == "ag_news" and summary["label_names"] == LABELS


# ----------------------------------------------------------------------------------- folders


def _class_folders(root, rows, classes=None):
    for i, (title, body, label) in enumerate(rows):
        if classes is None or label in classes:
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / f"{i:03d}.txt").write_text(f"{title}\n{body}\n", encoding="utf-8")
    return root


def test_folder_with_train_test_and_unsup(tmp_path):
    root = tmp_path / "tickets"
    _class_folders(root / "train", TICKETS)
    _class_folders(root / "test", TICKETS[1::5])
    (root / "unsup").mkdir()
    (root / "unsup" / "a.txt").write_text("Το προϊόν ήρθε σπασμένο.", encoding="utf-8")
    (root / "unsup" / "b.txt").write_text("配送が遅れています。", encoding="utf-8")
    (root / "train" / "bug" / "notes.md").write_text("not a text file: ignored")
    summary = _prepare(tmp_path, layout="folder", path=str(root), valid_fraction=0.2)
    assert summary["label_names"] == LABELS
    assert "the 3 class folder names found in the training data, sorted" in summary["notes"][0]
    counts = {name: s["count"] for name, s in summary["splits"].items()}
    assert counts == {"train": 15, "valid": 3, "test": 4, "unsup": 2}
    unsup = _read(tmp_path / "out" / "unsup.parquet")
    assert sorted(unsup["text"]) == ["Το προϊόν ήρθε σπασμένο.", "配送が遅れています。"]
    assert unsup["label"] == [-1, -1]
    assert "Refund status\nWhere is my refund for order 1182?" in _all_texts(tmp_path)


def test_one_level_of_class_folders_gets_a_test_split(tmp_path):
    summary = _prepare(tmp_path, layout="folder", path=str(_class_folders(tmp_path / "d", TICKETS)))
    assert summary["splits"]["test"]["per_class"] == {"billing": 1, "bug": 1, "login": 1}
    assert "unsup" not in summary["splits"]


# ----------------------------------------------------------------------------------- bad input


def _fails(tmp_path, match, **kwargs):
    with pytest.raises(InputError, match=match) as err:
        _prepare(tmp_path, **kwargs)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    return err.value


def test_a_name_that_is_not_builtin_needs_a_layout(tmp_path):
    err = _fails(tmp_path, r"tickets: 'tickets' is not a built-in dataset", path="x.csv")
    assert "layout: table" in err.fix and "layout: folder" in err.fix


def test_missing_or_misspelt_column_lists_the_columns(tmp_path):
    data = _write_csv(tmp_path / "tickets.csv", TICKETS)
    err = _fails(
        tmp_path,
        r"tickets\.csv:1: no column 'bdy' \(did you mean 'body'\?\); the columns are: 'title', 'body', 'label'",
        layout="table",
        path=str(data),
        text_columns=("title", "bdy"),
    )
    assert "text_columns" in err.fix
    _fails(
        tmp_path,
        r"no column 'category'",
        layout="table",
        path=str(data),
        label_column="category",
        text_columns="body",
    )


def test_empty_text_names_the_row(tmp_path):
    rows = [*TICKETS[:4], ("", "   ", "billing"), *TICKETS[4:]]
    data = _write_csv(tmp_path / "tickets.csv", rows)
    # The first record spans lines 2-3 (a quoted newline), so the empty row 5 starts on line 7.
    _fails(
        tmp_path,
        r"tickets\.csv:7: empty text in row 5 \(column title, body\)",
        layout="table",
        path=str(data),
        text_columns=("title", "body"),
    )


def test_missing_label_names_the_row(tmp_path):
    rows = [{"text": t, "label": y} for _, t, y in TICKETS]
    rows[6]["label"] = None
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    err = _fails(
        tmp_path,
        r"t\.jsonl:7: no label in row 7 \(column 'label'\)",
        layout="table",
        path=str(tmp_path / "t.jsonl"),
    )
    assert "unsup_path" in err.fix


def test_a_test_label_that_train_never_had(tmp_path):
    train = _write_parquet(tmp_path / "train.parquet", TICKETS)
    test = _write_parquet(tmp_path / "test.parquet", [*TICKETS[:2], ("Hi", "Thanks!", "praise")])
    _fails(
        tmp_path,
        r"test\.parquet:3: label 'praise' never occurs in the training data \('billing', 'bug', 'login'\)",
        layout="table",
        train_path=str(train),
        test_path=str(test),
        text_columns=("body",),
    )
    root = _class_folders(tmp_path / "f" / "train", TICKETS)
    _class_folders(root.parent / "test", [("Hi", "Thanks!", "praise")])
    _fails(
        tmp_path,
        r"f/test/praise: label 'praise' never occurs",
        layout="folder",
        path=str(root.parent),
    )


def test_a_class_too_small_to_stratify(tmp_path):
    data = _write_csv(tmp_path / "tickets.csv", [*TICKETS, ("Hello", "Great service!", "praise")])
    err = _fails(
        tmp_path,
        r"tickets\.csv: class 'praise' has 1 training row\(s\): too few to stratify into train and valid and test \(at least 3 needed\)",
        layout="table",
        path=str(data),
        text_columns=("body",),
    )
    assert "test_path" in err.fix


def test_latin1_bytes_when_utf8_is_expected(tmp_path):
    data = tmp_path / "tickets.csv"
    data.write_bytes("body,label\nCaf\xe9 au lait,billing\n".encode("latin-1"))
    err = _fails(
        tmp_path,
        r"tickets\.csv:2: byte 0xE9 at offset 14 is not valid utf-8: the file is not in the utf-8 encoding expected",
        layout="table",
        path=str(data),
        text_columns=("body",),
    )
    assert "encoding:" in err.fix
    rows = "".join(f"Caf\xe9 {i},{y}\n" for i, y in enumerate(LABELS * 3))
    data.write_bytes(("body,label\n" + rows).encode("latin-1"))
    summary = _prepare(
        tmp_path, layout="table", path=str(data), text_columns=("body",), encoding="latin-1"
    )
    assert summary["label_names"] == LABELS and "Café 0" in _all_texts(tmp_path)
    utf16 = _write_csv(tmp_path / "tickets.tsv", TICKETS, delimiter="\t")
    utf16.write_text(utf16.read_text(encoding="utf-8"), encoding="utf-16")
    _fails(
        tmp_path / "u",
        r"tickets\.tsv:1: byte 0xFF .* UTF-16 byte order mark",
        layout="table",
        path=str(utf16),
    )
    summary = _prepare(
        tmp_path, layout="table", path=str(utf16), text_columns=("title", "body"), encoding="utf-16"
    )
    assert "請求書 xxfld 2" in " ".join(_all_texts(tmp_path))


def test_header_only_and_empty_files(tmp_path):
    data = tmp_path / "tickets.csv"
    data.write_text("title,body,label\n", encoding="utf-8")
    _fails(
        tmp_path,
        r"tickets\.csv: the file has no data rows \(only a header\)",
        layout="table",
        path=str(data),
        text_columns=("body",),
    )
    data.write_text("", encoding="utf-8")
    _fails(tmp_path, r"tickets\.csv: the file is empty", layout="table", path=str(data))


def test_empty_folder_and_one_class_only(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(
        tmp_path,
        r"empty: no class sub-folders found",
        layout="folder",
        path=str(tmp_path / "empty"),
    )
    root = _class_folders(tmp_path / "one", TICKETS, classes={"bug"})
    _fails(
        tmp_path,
        r"one: only one class \('bug'\): a classifier needs at least two",
        layout="folder",
        path=str(root),
    )
    (root / "login").mkdir()
    _fails(
        tmp_path, r"one/login: no \.txt files in this class folder", layout="folder", path=str(root)
    )


def test_unknown_format_extension_or_layout(tmp_path):
    data = _write_csv(tmp_path / "tickets.xlsx", TICKETS)
    err = _fails(
        tmp_path,
        r"tickets\.xlsx: cannot tell the format from the extension '\.xlsx'",
        layout="table",
        path=str(data),
    )
    assert "format:" in err.fix
    _fails(
        tmp_path,
        r"tickets\.xlsx: unknown format 'excel'",
        layout="table",
        path=str(data),
        format="excel",
    )
    _fails(tmp_path, r"tickets: unknown layout 'sheet'", layout="sheet", path=str(data))
    (tmp_path / "semi.csv").write_text("text;label\nBonjour;fr\n", encoding="utf-8")
    _fails(
        tmp_path,
        r"semi\.csv:1: the header 'text;label' is one column: the fields seem to be separated by ';'",
        layout="table",
        path=str(tmp_path / "semi.csv"),
    )
