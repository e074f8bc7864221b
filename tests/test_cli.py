"""The console script end to end on the embedded digits set: train, evaluate, demo, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_script import load_benchmark
from edge_runtime.cli.main import SUBCOMMANDS, main
from edge_runtime.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--no-progress", "--set", "train.epochs=3", "--set", "detector.binary.epochs=3"]


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _run_digits_study(script: str, trained: Path, out: Path, *extra: str) -> dict:
    """Run a benchmark script on the digits config with the trained classifier; its result.json."""
    assert load_benchmark(script).main(["--config", str(ROOT / "configs/digits.yaml"), "--out", str(out), *extra,
                                        "--classifier", str(trained / "classifier.safetensors"), *QUICK]) == 0
    return _result(out)


@pytest.mark.parametrize("command", [[], *([name] for name in SUBCOMMANDS)])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert "usage: edge-runtime" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(["train", "--config", str(ROOT / "configs/digits.yaml"), "--out", str(out), *QUICK]) == 0
    return out


def test_train_writes_classifier_checkpoint_plot_and_result(trained):
    assert {"classifier.safetensors", "train_checkpoint.pt", "training_loss.png", "result.json"} <= \
        {p.name for p in trained.iterdir()}
    metrics = _result(trained)["metrics"]
    assert metrics["idd_acc/digits-9"] > 0.8


def test_train_resumes_from_its_checkpoint(trained, capsys):
    more = ["--set", "train.epochs=3"]
    assert main(["train", "--config", str(ROOT / "configs/digits.yaml"), "--out", str(trained), "--resume",
                 "--no-progress", *more, "--set", "detector.binary.epochs=3"]) == 0
    assert "| 0 " in capsys.readouterr().out  # all 3 epochs were already done: 0 run now


def test_evaluate_reports_both_protocols_per_sample_first(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--config", str(ROOT / "configs/digits.yaml"), "--out", str(out),
                 "--classifier", str(trained / "classifier.safetensors"), *QUICK])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.index("protocol per_sample") < printed.index("protocol homogeneous_batches")
    metrics = _result(out)["metrics"]
    for detector in ("msp", "max_logit", "energy", "feature_mahalanobis", "knn", "react", "vim", "gradnorm",
                     "grad_mahalanobis"):
        for protocol in ("per_sample", "homogeneous_batches"):
            for family in ("auroc", "aupr_in", "aupr_out", "fpr95"):
                assert 0.0 <= metrics[f"{family}/{protocol}/{detector}/digits-9_vs_9"] <= 1.0
    assert metrics["auroc/per_sample/grad_mahalanobis/digits-9_vs_9"] > 0.8
    assert (out / "scores.png").stat().st_size > 0


def test_checker_accepts_what_train_writes(trained, check_results):
    check_results(trained / "result.json")


def test_classifier_for_other_classes_is_refused(trained, tmp_path, capsys):
    code = main(["evaluate", "--config", str(ROOT / "configs/digits.yaml"), "--out", str(tmp_path),
                 "--classifier", str(trained / "classifier.safetensors"), "--set", "data.novel_class='3'", *QUICK])
    assert code == 2
    assert "trained on classes" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--set", "memory.budget=0"], "memory.budget"),
    (["--set", "nonsense"], "KEY=VALUE"),
    (["--set", "data.novel_class=dragon"], "not a class of digits"),
])
def test_bad_input_is_one_clear_line_and_exit_2(args, message, tmp_path, capsys):
    code = main(["train", "--config", str(ROOT / "configs/digits.yaml"), "--out", str(tmp_path), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-runtime train: error: ") and message in err


def test_invalid_yaml_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "invalid YAML" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_through_the_console_script(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([str(Path(sys.executable).parent / "edge-runtime"), "demo", "--out", str(out), *QUICK],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "9+1 single-head accuracy" in done.stdout and "demo finished" in done.stdout
    metrics = _result(out)["metrics"]
    assert any(k.startswith("single_head_acc/per_sample/") for k in metrics)


def test_pu_ceiling_puts_the_label_free_heads_beside_heads_trained_on_the_stream_labels(trained, tmp_path, check_results):
    out = tmp_path / "ceiling"
    metrics = _run_digits_study("pu_ceiling", trained, out)["metrics"]
    methods = ("memory_pu", "stream_labels")
    assert set(metrics) == {f"{family}/{protocol}/{method}/digits-9_vs_9" for method in methods
                            for protocol in ("per_sample", "homogeneous_batches")
                            for family in ("auroc", "aupr_in", "aupr_out", "fpr95")} | \
        {f"{family}/{method}/digits-9_vs_9" for method in methods
         for family in ("novel_share", "memory_vs_stream_known_auroc", "false_alarm_rate", "novel_flagged_rate")}
    assert metrics["novel_share/stream_labels/digits-9_vs_9"] == pytest.approx(120 / 220)  # digits.yaml's stream
    for method in methods:  # feature heads score each input alone: the protocols agree
        assert metrics[f"auroc/per_sample/{method}/digits-9_vs_9"] == \
            metrics[f"auroc/homogeneous_batches/{method}/digits-9_vs_9"] > 0.8
    # One round on confirmed labels is strictly out-of-fold: memory and the stream's known digits alike.
    assert 0.35 <= metrics["memory_vs_stream_known_auroc/stream_labels/digits-9_vs_9"] <= 0.65
    for method in methods:  # threshold from a 100-sample memory at 5%: measured 0.04-0.05 and 0.93-0.96
        assert metrics[f"false_alarm_rate/{method}/digits-9_vs_9"] <= 0.15
        assert metrics[f"novel_flagged_rate/{method}/digits-9_vs_9"] >= 0.8
    check_results(out)


def test_evaluate_adapts_to_an_outside_ood_set(trained, tmp_path, shared_data):
    """MNIST digits (another data set, with classes of its own) as the novel input type of a digits run."""
    out = tmp_path / "mnist"
    code = main(["evaluate", "--config", str(ROOT / "configs/digits.yaml"), "--out", str(out),
                 "--classifier", str(trained / "classifier.safetensors"), *QUICK,
                 "--set", "ood_sets=[{dataset: mnist, limit: 240}]", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    metrics = _result(out)["metrics"]
    for protocol in ("per_sample", "homogeneous_batches"):
        assert 0.0 <= metrics[f"auroc/{protocol}/grad_mahalanobis_ssl_memory_pu/digits-9_vs_mnist"] <= 1.0
        assert 0.0 <= metrics[f"auroc/{protocol}/msp/digits-9_vs_mnist"] <= 1.0


def test_evaluate_runs_only_the_self_supervised_modes_asked_for(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--config", str(ROOT / "configs/digits.yaml"), "--out", str(out),
            "--classifier", str(trained / "classifier.safetensors"), *QUICK]
    assert main([*args, "--ssl-modes", "memory_pu,algorithm1"]) == 2
    assert "--ssl-modes takes a comma-separated subset of memory_pu, sal, woods, paper; got 'memory_pu,algorithm1'" \
        in capsys.readouterr().err
    assert main([*args, "--ssl-modes", "memory_pu,sal,woods"]) == 0
    detectors = {key.split("/")[2] for key in _result(out)["metrics"] if key.startswith("auroc/")}
    assert {"grad_mahalanobis_ssl_memory_pu", "grad_mahalanobis_ssl_sal", "grad_mahalanobis_ssl_woods"} <= detectors
    assert "grad_mahalanobis_ssl_paper" not in detectors


def test_react_percentile_selection_reads_the_clipping_cost_on_held_back_images(trained, tmp_path, check_results):
    out = tmp_path / "react"
    metrics = _run_digits_study("react_percentile_selection", trained, out)["metrics"]
    shares = [metrics[f"clipped_share/p{p}/digits-9"] for p in ("90", "95", "99", "99_9", "100")]
    # The clip is a percentile of the training features: about that share of held-back values lies above it.
    assert shares[0] == pytest.approx(0.10, abs=0.05) and shares[-1] <= 0.01 and shares == sorted(shares, reverse=True)
    # Clipping at the largest training activation hardly changes a prediction.
    assert metrics["calibration_acc/p100/digits-9"] == pytest.approx(metrics["calibration_acc/unclipped/digits-9"], abs=0.01)
    check_results(out)


def test_view_selection_reports_each_reading_on_the_held_back_images(trained, tmp_path, check_results):
    bench = load_benchmark("view_selection")
    assert bench.readings("1") == {"one_view": (False, 0), "mirror_average": (True, 0), "mirror_shift_1": (True, 1)}
    with pytest.raises(ConfigError, match="positive"):
        bench.readings("0")
    out = tmp_path / "views"
    metrics = _run_digits_study("view_selection", trained, out, "--shifts", "1")["metrics"]
    accuracies = [metrics[f"calibration_acc/{reading}/digits-9"] for reading in ("one_view", "mirror_average", "mirror_shift_1")]
    assert accuracies[0] > 0.85  # the digits classifier as trained
    # Digits are not mirror-symmetric, and a classifier trained without flips loses on mirrored views.
    assert accuracies[1] < accuracies[0]
    check_results(out)


@pytest.mark.parametrize("config, shifts, refusal", [
    ("digits.yaml", "1,8", "shift_average 8 must be smaller than input_size 8"),  # as wide as the images
    ("cifar10-fastnet.yaml", "9", "shift_average: must be less than or equal to 8 (got 9)"),  # the field's bound
])
def test_view_selection_refuses_a_shift_the_model_section_refuses_before_any_work(config, shifts, refusal, tmp_path,
                                                                                   capsys):
    out = tmp_path / "views"
    with pytest.raises(SystemExit) as refused:
        load_benchmark("view_selection").main(["--config", str(ROOT / "configs" / config), "--out", str(out),
                                               "--shifts", shifts, *QUICK])
    assert refused.value.code == 2
    assert f"--shifts: {refusal}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("script", ["view_selection", "react_percentile_selection"])
def test_held_back_studies_refuse_an_empty_calibration_split_before_training(script, tmp_path):
    out = tmp_path / script
    with pytest.raises(DataError, match="calibration split is empty"):
        load_benchmark(script).main(["--config", str(ROOT / "configs/digits.yaml"), "--out", str(out),
                                     "--set", "data.calibration_holdout=0", *QUICK])
    assert not (out / "classifier.safetensors").exists()


def test_layer_stats_selection_reports_the_label_free_criterion_per_layer_set(trained, tmp_path, check_results):
    bench = load_benchmark("layer_stats_selection")
    assert bench.parse_candidates("none, stage1+stage2") == {"none": (), "stage1+stage2": ("stage1", "stage2")}
    out = tmp_path / "selection"
    metrics = _run_digits_study("layer_stats_selection", trained, out, "--candidates", "none,stage1+stage2")["metrics"]
    assert set(metrics) == {f"{metric}/{candidate}/digits-9_vs_9" for metric in ("pu_separation", "stream_auroc")
                            for candidate in ("none", "stage1-and-stage2")}
    # The stream holds known digits and 9s in a fixed mix: a separating head gives both well above chance.
    assert all(0.6 < value <= 1.0 for value in metrics.values())
    check_results(out)
