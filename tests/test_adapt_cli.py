"""`edge-runtime adapt` end to end on digits: per-round log, saved session, result file in the contract."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.cli.main import main
from edge_runtime.session import Session

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/digits.yaml")
QUICK = ["--no-progress", "--set", "train.epochs=5", "--set", "detector.name=grad_mahalanobis_ssl",
         "--set", "session.adapt_every=80"]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt")
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli.main", "adapt", "--config", CONFIG,
                           "--out", str(out), *QUICK], check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def test_each_round_is_logged_and_written(adapted):
    out, printed = adapted
    lines = [line for line in printed.splitlines() if line.startswith("round ")]
    with open(out / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # 100 known + 120 novel samples, a round every 80 and one over the rest: 3 rounds.
    assert len(lines) == len(rows) == 3
    assert "separation AUROC (out-of-fold)" in lines[0] and "pseudo-label accuracy" in lines[0]
    assert [int(r["round"]) for r in rows] == [1, 2, 3] and [int(r["pool_size"]) for r in rows] == [80, 160, 220]
    assert 0.0 < float(rows[-1]["novel_share"]) < 1.0 and float(rows[-1]["separation_auroc"]) > 0.6
    assert all(row["candidates"].startswith("round ") for row in rows)  # memory_pu's kept round, also printed
    assert all(line.endswith(f"kept {row['candidates']}") for line, row in zip(lines, rows))


def test_result_file_holds_accuracy_per_protocol_cost_and_footprint(adapted, check_results):
    out, printed = adapted
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    for protocol in ("per_sample", "homogeneous_batches"):
        assert metrics[f"single_head_acc/{protocol}/budget100/digits-9/9"] >= 0.85
    assert metrics["adapt_seconds/budget100/digits-9/9"] > 0
    assert metrics["state_bytes/budget100/digits-9/9"] == (out / "session.state").stat().st_size
    assert metrics["memory_bytes/host/budget100/digits-9/9"] > 0
    assert printed.index("per_sample") < printed.index("homogeneous_batches")
    check_results(out / "result.json")


def test_saved_session_resumes_with_the_learned_class(adapted, digits_test):
    out, _ = adapted
    session = Session.load(out / "session.state")
    assert session.classes[-1] == "9" and session.rounds == 3
    nines = digits_test.labels == 9
    prediction = session.predict(digits_test.images)
    # The memory-calibrated threshold (100 memory digits, target 0.05) trades a few 9s for few false
    # alarms: measured 0.74 of the 9s answered 9, 0.01 of the other digits.
    assert (prediction.labels[nines] == 9).mean() >= 0.6
    assert (prediction.labels[~nines] == 9).mean() <= 0.05


def test_reusing_the_classifier_and_refusing_a_run_without_novel_class(adapted, tmp_path, capsys):
    out, _ = adapted
    args = ["adapt", "--config", CONFIG, "--out", str(tmp_path / "again"), "--classifier",
            str(out / "classifier.safetensors"), *QUICK]
    assert main(args) == 0
    assert not (tmp_path / "again" / "train_checkpoint.pt").exists()  # nothing was trained
    assert main([*args, "--set", "data.novel_class=null"]) == 2
    assert "neither data.novel_class nor data.novel_condition is set" in capsys.readouterr().err
