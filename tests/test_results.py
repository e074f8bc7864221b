"""Result files: written in the contract, and every committed one passes the shared checker."""

import json
from pathlib import Path

import pytest

from edge_runtime.results import format_table, metric_key, write_result

ROOT = Path(__file__).resolve().parents[1]


def test_written_result_follows_the_contract(tmp_path, check_results):
    path = write_result(tmp_path, {"seed": 0}, {"auroc/per_sample/msp/digits-9_vs_9": 0.75}, "cpu",
                        command="edge-runtime evaluate --config x")
    doc = json.loads(path.read_text())
    assert doc["device"].startswith("cpu: ")
    assert doc["metrics"] == {"auroc/per_sample/msp/digits-9_vs_9": 0.75}
    assert doc["created"].endswith("Z")
    check_results(path)


def test_commit_named_by_the_environment_where_git_is_absent(tmp_path, monkeypatch):
    """A leased GPU machine receives the checkout without .git; the launcher names the commit instead."""
    monkeypatch.setenv("EDGE_RUNTIME_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    doc = json.loads(write_result(tmp_path, {}, {"auroc/x/y": 0.5}, "cpu").read_text())
    assert doc["git_commit"] == "0123456789abcdef0123456789abcdef01234567"


def test_bad_metric_names_and_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Bad Name"):
        write_result(tmp_path, {}, {"Bad Name": 1.0}, "cpu")
    with pytest.raises(ValueError, match="auroc/x/y"):
        write_result(tmp_path, {}, {"auroc/x/y": float("nan")}, "cpu")
    assert not (tmp_path / "result.json").exists()


def test_metric_key_cleans_parts():
    assert metric_key("auroc", "per_sample", "Grad Mahalanobis", "cifar10-9_vs_cat") == \
        "auroc/per_sample/grad-mahalanobis/cifar10-9_vs_cat"


def test_format_table_aligns_columns():
    text = format_table([["msp", 0.5], ["knn", 0.91234]], ["detector", "auroc"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "0.9123" in text


def test_committed_results_pass_the_shared_checker(check_results):
    check_results(ROOT / "benchmarks" / "results")
