"""benchmarks/gpu_session.sh: the leased-GPU command keeps going past a bad step and always packs $OUT."""

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def test_unknown_step_is_reported_and_the_results_archive_still_written(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT), "no-such-step"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "unknown step 'no-such-step'" in (tmp_path / "log.txt").read_text()
    with tarfile.open(tmp_path / "results.tar.gz") as archive:
        assert archive.getnames() == ["."]


def test_a_failing_step_does_not_stop_the_next(tmp_path):
    # PYTHON=false makes the step's command fail at once; the step after it must still run.
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": "false"}
    subprocess.run(["bash", str(SCRIPT), "drocc:0", "next-step"], capture_output=True, text=True, env=env, timeout=60)
    log = (tmp_path / "log.txt").read_text()
    assert "=== drocc:0: exit 1" in log
    assert "unknown step 'next-step'" in log


def test_steps_past_the_deadline_are_skipped_and_the_archive_still_written(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": "false", "DEADLINE_S": "40"}
    subprocess.run(["bash", str(SCRIPT), "kernels"], capture_output=True, text=True, env=env, timeout=60)
    assert "=== kernels: skipped" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "results.tar.gz").is_file()


def test_held_out_class_steps_train_and_evaluate_that_class_with_its_own_classifier(tmp_path):
    # A stand-in interpreter that logs its arguments and leaves a classifier where `train` writes one.
    fake_python = tmp_path / "python"
    calls = tmp_path / "calls.txt"
    fake_python.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [ "$3" = train ]; then out="${{@: -2:1}}"; mkdir -p "$out"; touch "$out/classifier.safetensors"; fi
""")
    fake_python.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(fake_python)}
    subprocess.run(["bash", str(SCRIPT), "train:airplane", "evaluate:airplane", "evaluate"],
                   capture_output=True, text=True, env=env, timeout=60)
    train, evaluate_held_out, evaluate_cat = calls.read_text().splitlines()
    assert "train" in train.split() and "--set data.novel_class=airplane" in train
    assert train.split("--out ")[1].split()[0].endswith("/cifar10_fastnet_train_airplane")
    assert "--set data.novel_class=airplane" in evaluate_held_out
    assert "cifar10_fastnet_train_airplane/classifier.safetensors" in evaluate_held_out
    assert "cifar10_fastnet_evaluate_airplane" in evaluate_held_out
    # The config's own held-out class: no override, and no classifier since no `train` step made one.
    assert "novel_class" not in evaluate_cat and "--classifier" not in evaluate_cat
    assert evaluate_cat.split("--out ")[1].split()[0].endswith("/cifar10_fastnet_evaluate")
