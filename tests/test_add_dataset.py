"""``ulmfit add-dataset`` and the file formats of ``ulmfit predict``: a user's own file becomes a
dataset of params.yaml (checked first, comments kept), and predictions read and write the same
formats the prepare stage reads."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.add_dataset import add_dataset, dataset_name, describe
from flows.predict import read_rows, write_rows
from tasks.params import load_params
from ulmfit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Greek support tickets: a non-Latin script from end to end.
TICKETS = {
    "χρέωση": [
        "Χρεώθηκα δύο φορές για την ίδια συνδρομή αυτόν τον μήνα.",
        "Η κάρτα μου χρεώθηκε αλλά η παραγγελία δεν ολοκληρώθηκε.",
        "Θέλω επιστροφή χρημάτων για τη χρέωση της περασμένης εβδομάδας.",
        "Γιατί το τιμολόγιο δείχνει μεγαλύτερο ποσό από την προσφορά;",
        "Δεν αναγνωρίζω αυτή τη χρέωση στον λογαριασμό μου.",
        "Πώς αλλάζω τον τρόπο πληρωμής για την επόμενη χρέωση;",
        "Η έκπτωση δεν εφαρμόστηκε στον τελευταίο λογαριασμό.",
        "Χρεώθηκα μετά την ακύρωση της συνδρομής μου.",
        "Το ΦΠΑ στο τιμολόγιο φαίνεται λάθος.",
        "Μπορώ να πάρω απόδειξη για την πληρωμή του Μαρτίου;",
    ],
    "σφάλμα": [
        "Η εφαρμογή κλείνει μόλις ανοίξω τις ρυθμίσεις.",
        "Δεν μπορώ να συνδεθώ, βγάζει σφάλμα διακομιστή 500.",
        "Το κουμπί αποθήκευσης δεν κάνει τίποτα στο κινητό.",
        "Οι ειδοποιήσεις έρχονται διπλές από χθες.",
        "Η αναζήτηση δεν βρίσκει αρχεία με ελληνικά ονόματα.",
        "Η σελίδα φορτώνει συνέχεια χωρίς να εμφανίζει τίποτα.",
        "Μετά την ενημέρωση χάθηκαν οι αποθηκευμένες προτιμήσεις μου.",
        "Το αρχείο PDF που κατεβάζω είναι κατεστραμμένο.",
        "Ο συγχρονισμός σταματά στο 99% και δεν τελειώνει.",
        "Η εξαγωγή σε CSV αφήνει κενές στήλες.",
    ],
}


def _project(tmp_path: Path) -> Path:
    """A project root holding the default params.yaml."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    return root


def _tickets_csv(path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "θέμα", "κατηγορία"])
        rows = [(label, text) for label, texts in TICKETS.items() for text in texts]
        for index, (label, text) in enumerate(rows):
            writer.writerow([f"T-{index:03d}", text, label])
    return path


def test_a_csv_becomes_a_dataset_and_params_yaml_keeps_its_comments(tmp_path):
    root = _project(tmp_path)
    data = _tickets_csv(root / "Support Tickets.csv")
    assert dataset_name(data) == "support_tickets"
    added = add_dataset(root, data, text_columns=["θέμα"], label_column="κατηγορία", only=True)

    assert added.name == "support_tickets"
    assert added.source == {
        "layout": "table",
        "path": "Support Tickets.csv",  # relative to the project: the project can move
        "text_columns": ["θέμα"],
        "label_column": "κατηγορία",
    }
    assert added.removed == ("datasets.bbc_news",)
    assert added.summary["label_names"] == sorted(TICKETS)
    assert sum(s["count"] for s in added.summary["splits"].values()) == 20
    text = (root / "params.yaml").read_text(encoding="utf-8")
    # The round trip changes nothing else: comments (the one after the datasets section too),
    # null, quotes and long lines stay as written.
    before = (ROOT / "params.yaml").read_text(encoding="utf-8")
    for line in before.splitlines():
        if line.startswith(("# Stage", "  reuse:", "  title:", "  path: package:")):
            assert line in text.splitlines(), line
    params = load_params(root / "params.yaml")
    assert list(params.datasets) == ["support_tickets"]
    assert params.datasets["support_tickets"].source.label_column == "κατηγορία"
    report = describe(added)
    assert "2 classes" in report and "χρέωση" in report and "ulmfit repro" in report

    # Adding it again (another label column spelling fixed, say) replaces the source only.
    again = add_dataset(
        root, data, name="support_tickets", text_columns=["θέμα"], label_column="κατηγορία"
    )
    assert again.removed == ()
    assert list(load_params(root / "params.yaml").datasets) == ["support_tickets"]


def test_bad_data_is_refused_before_params_yaml_changes(tmp_path):
    root = _project(tmp_path)
    data = _tickets_csv(root / "tickets.csv")
    before = (root / "params.yaml").read_bytes()
    with pytest.raises(InputError) as error:
        add_dataset(root, data, text_columns=["subject"], label_column="κατηγορία")
    assert "subject" in str(error.value) and "θέμα" in str(error.value)  # lists the columns
    with pytest.raises(InputError, match="label column and its text column"):
        add_dataset(root, data, text_columns=["θέμα"], label_column=None)
    with pytest.raises(InputError, match="not a letter followed by"):
        add_dataset(root, data, name="my-tickets", text_columns=["θέμα"], label_column="κατηγορία")
    with pytest.raises(InputError, match="no such file"):
        add_dataset(root, root / "missing.csv", text_columns=["θέμα"], label_column="κατηγορία")
    assert (root / "params.yaml").read_bytes() == before


def test_a_folder_of_class_folders_from_the_command_line(tmp_path):
    root = _project(tmp_path)
    for label, texts in TICKETS.items():
        folder = root / "tickets" / label
        folder.mkdir(parents=True)
        for index, text in enumerate(texts):
            (folder / f"{index}.txt").write_text(text, encoding="utf-8")
    result = subprocess.run(
        [str(BIN / "ulmfit"), "add-dataset", "tickets"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "datasets.tickets.source" in result.stdout
    assert "2 classes" in result.stdout
    source = load_params(root / "params.yaml").datasets["tickets"].source
    assert (source.layout, source.path) == ("folder", "tickets")
    assert set(load_params(root / "params.yaml").datasets) == {"bbc_news", "tickets"}


@pytest.mark.parametrize(
    "name", ["rows.csv", "rows.tsv", "rows.jsonl", "rows.json", "rows.parquet", "rows.csv.gz"]
)
def test_predict_reads_and_writes_every_format(tmp_path, name):
    frame = pd.DataFrame({"id": ["007", "008"], "text": ["Ναι, δουλεύει.", 'a, "quoted"\nline']})
    path = tmp_path / name
    fmt = {"csv.gz": "csv"}.get(name.split(".", 1)[1], name.split(".", 1)[1])
    write_rows(frame, path, fmt)
    back = read_rows(path, fmt)
    assert back.to_dict("list") == frame.to_dict("list")  # "007" stays text
