"""`edge-runtime bench budget` on digits: the Table 4 layout with tiny budgets, two novel classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.cli.bench import PAPER_TABLE4, budget_markdown
from edge_runtime.cli.main import main
from edge_runtime.config import load_config, with_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/digits.yaml")
QUICK = ["--no-progress", "--set", "train.epochs=5", "--set", "detector.name=grad_mahalanobis_ssl"]
NOVEL = ("3", "9")
BUDGETS = (30, 60)


def _metrics(out: Path) -> dict[str, float]:
    return json.loads((out / "result.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    assert main(["bench", "budget", "--config", CONFIG, "--budgets", ",".join(map(str, BUDGETS)),
                 "--novel", ",".join(NOVEL), "--out", str(out), *QUICK]) == 0
    return out


def test_every_class_budget_and_protocol_is_measured(bench, check_results):
    metrics = _metrics(bench)
    for novel in NOVEL:
        assert metrics[f"idd_acc/digits-9/{novel}"] > 0.9
        for budget in BUDGETS:
            for protocol in ("per_sample", "homogeneous_batches"):
                names = f"{protocol}/budget{budget}/digits-9/{novel}"
                accuracy = metrics[f"single_head_acc/{names}"]
                assert accuracy >= 0.8
                # Single-head accuracy is the novel tenth's recall plus the known images kept and
                # labelled right, so a false alarm rate can only take from the known part.
                recall, false_alarm = metrics[f"novel_recall/{names}"], metrics[f"false_alarm/{names}"]
                assert 0.0 < recall <= 1.0 and 0.0 <= false_alarm < 0.5
                assert accuracy <= 0.1 * recall + 0.9 * (1 - false_alarm) + 0.02  # digits: ~10% per class
            assert metrics[f"adapt_seconds/budget{budget}/digits-9/{novel}"] > 0
            assert metrics[f"state_bytes/budget{budget}/digits-9/{novel}"] > 0
    # A bigger memory costs proportionally more host bytes (the budget is allocated up front).
    small, large = (metrics[f"memory_bytes/host/budget{b}/digits-9/3"] for b in BUDGETS)
    assert large == pytest.approx(2 * small)
    check_results(bench / "result.json")


def test_markdown_table_and_bar_chart_are_written(bench):
    report = (bench / "budget.md").read_text()
    assert report.index("protocol `per_sample`") < report.index("protocol `homogeneous_batches`")
    assert "| budget         | 3     | 9     | mean  |" in report and "30 (memory_pu)" in report and "60 (memory_pu)" in report
    assert "paper" not in report  # the paper's row belongs to CIFAR-10 only
    assert "adapt seconds" in report
    assert "## where the misses are" in report and "novel recall, `per_sample`" in report
    assert (bench / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_classifiers_are_reused_and_give_the_same_numbers(bench, tmp_path):
    classifier = bench / "classifiers" / "3" / "classifier.safetensors"
    stamp = classifier.stat().st_mtime_ns
    out = tmp_path / "again"
    assert main(["bench", "budget", "--config", CONFIG, "--budgets", "30", "--novel", "3", "--out", str(out),
                 "--classifier-dir", str(bench / "classifiers"), *QUICK]) == 0
    assert classifier.stat().st_mtime_ns == stamp
    key = "single_head_acc/per_sample/budget30/digits-9/3"
    assert _metrics(out)[key] == _metrics(bench)[key]


@pytest.mark.parametrize("args, message", [
    (["--novel", "dragon"], "not a class of digits"),
    (["--novel", "3", "--set", "memory.policy=fifo"], "memory.policy"),
])
def test_bad_choices_are_one_clear_line(args, message, tmp_path, capsys):
    assert main(["bench", "budget", "--config", CONFIG, "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_budgets_and_missing_action_are_usage_errors(tmp_path):
    for argv in (["bench", "budget", "--config", CONFIG, "--out", str(tmp_path), "--budgets", "0,500"], ["bench"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2


def test_cifar10_tables_carry_the_papers_row_beside_ours():
    cfg = with_overrides(load_config(ROOT / "configs/cifar10.yaml"), {"detector.name": "grad_mahalanobis_ssl"})
    classes, budgets = ("airplane", "cat"), (500,)
    given = {"per_sample": 0.9, "homogeneous_batches": 0.8}  # stand-in accuracies: this checks the layout only
    metrics = {f"single_head_acc/{p}/budget500/cifar10-9/{c}": v for p, v in given.items() for c in classes}
    metrics |= {f"{family}/budget500/cifar10-9/{c}": 1.0 for family in ("adapt_seconds", "state_bytes",
                "memory_bytes/host", "memory_bytes/device") for c in classes}
    metrics |= {f"idd_acc/cifar10-9/{c}": 0.95 for c in classes}
    report = budget_markdown(metrics, cfg, "cifar10-9", classes, budgets)
    paper_mean = (PAPER_TABLE4[500][0] + PAPER_TABLE4[500][3]) / 2
    assert f"| 500 (paper, Table 4) | 90.58    | 91.70 | {paper_mean:.2f} |" in report
    assert "| 500 (memory_pu)      | 90.00    | 90.00 | 90.00 |" in report


def test_resume_keeps_measured_classes_and_refuses_another_config(bench, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    earlier = json.loads((bench / "result.json").read_text())
    # As if stopped after class 3; a marked timing shows whether class 3 was measured again.
    kept = {k: 123.0 if k.startswith("adapt_seconds") else v for k, v in earlier["metrics"].items() if k.endswith("/3")}
    (out / "result.json").write_text(json.dumps({**earlier, "metrics": kept}))
    args = ["bench", "budget", "--config", CONFIG, "--budgets", ",".join(map(str, BUDGETS)),
            "--novel", ",".join(NOVEL), "--out", str(out), "--classifier-dir", str(bench / "classifiers"), *QUICK]
    assert main([*args, "--resume"]) == 0
    resumed = _metrics(out)
    assert {k: resumed[k] for k in kept} == kept  # class 3 was not measured again
    key = "single_head_acc/per_sample/budget30/digits-9/9"
    assert resumed[key] == _metrics(bench)[key]  # class 9 was, with the same saved classifier
    assert "| 3     | 9     |" in (out / "budget.md").read_text().replace("budget    ", "")
    other = [a if a != "train.epochs=5" else "train.epochs=6" for a in args]
    assert main([*other, "--resume"]) == 2  # another config: refused, results untouched
    assert _metrics(out) == resumed
