"""The README's path for your own data, end to end on a micro configuration: a user's CSV of
Greek support tickets goes through ``ulmfit add-dataset``, ``ulmfit repro`` and ``ulmfit predict``
(the registered champion), exactly as a newcomer types them."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_add_dataset import TICKETS  # noqa: E402
from test_pipeline import BIN, make_workspace, micro_params, run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_three_commands_from_a_csv_to_predictions(tmp_path):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    workspace = make_workspace(tmp_path / "ws", micro_params())
    with (workspace / "tickets.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["θέμα", "κατηγορία"])
        for label, texts in TICKETS.items():
            for text in texts * 2:  # 20 per class: enough to cut train, valid and test
                writer.writerow([text, label])
    new = tmp_path / "new.jsonl"
    pd.DataFrame(
        {"ticket": ["Χρεώθηκα ξανά χωρίς λόγο.", "Η εφαρμογή κολλάει στην αρχή."]}
    ).to_json(new, orient="records", lines=True, force_ascii=False)
    out = tmp_path / "predicted.parquet"

    added = run(
        [str(BIN / "ulmfit"), "add-dataset", "tickets.csv"]
        + ["--text", "θέμα", "--label", "κατηγορία", "--only"],
        workspace,
    )
    assert "2 classes" in added.stdout
    with prefect_test_harness(server_startup_timeout=300):
        run(
            [str(BIN / "ulmfit"), "repro"],
            workspace,
            PREFECT_API_URL=PREFECT_API_URL.value(),
        )
    run(
        [str(BIN / "ulmfit"), "predict", "--model", "models:/ulmfit-tickets@champion"]
        + ["--input", str(new), "--output", str(out), "--text-column", "ticket"],
        workspace,
    )

    lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    assert "evaluate@tickets" in lock and not any("bbc_news" in stage for stage in lock)
    frame = pd.read_parquet(out)
    assert list(frame["ticket"]) == ["Χρεώθηκα ξανά χωρίς λόγο.", "Η εφαρμογή κολλάει στην αρχή."]
    assert set(frame["label"]) <= set(TICKETS)
    probs = frame[[f"prob_{label}" for label in sorted(TICKETS)]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-4
    results = (workspace / "reports" / "results.md").read_text(encoding="utf-8")
    assert "tickets" in results
