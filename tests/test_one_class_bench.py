"""The one-class protocol helpers, the benchmark script end to end (tiny sizes, real MNIST), and the
committed one-class and synthetic result files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data.loader import load_split
from edge_runtime.one_class import (PAPER_MEAN_AUROC, PAPER_PER_CLASS_AUROC, first_per_class, load_one_class_data,
                                    stratified_halves)
from edge_runtime.synthetic import SINE_DISPLACEMENTS, SPHERE_RADII

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT.parent / "shared" / "tools" / "check_results.py"
RESULTS = ROOT / "benchmarks" / "results"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnist_test():
    return load_split("mnist", "test", progress=False)


def test_stratified_halves_are_disjoint_balanced_and_seeded(mnist_test):
    train, evaluation = stratified_halves(mnist_test, 0.5, seed=0)
    assert len(train) + len(evaluation) == len(mnist_test)
    for label in range(10):
        total = int((mnist_test.labels == label).sum())
        assert int((evaluation.labels == label).sum()) == round(total / 2)
    rows = lambda data: {row.tobytes() for row in data.images.reshape(len(data), -1)}  # noqa: E731
    assert not rows(train) & rows(evaluation)
    again, _ = stratified_halves(mnist_test, 0.5, seed=0)
    assert np.array_equal(again.images, train.images)


def test_mnist_one_class_data_states_the_split_it_uses():
    data = load_one_class_data("mnist", progress=False)
    assert (len(data.train), len(data.evaluation)) == (5000, 5000)
    assert "test split only" in data.split_note


def test_first_per_class_keeps_the_first_images_of_each_label(mnist_test):
    kept = first_per_class(mnist_test, 3)
    assert len(kept) == 30
    first_zeros = np.flatnonzero(mnist_test.labels == 0)[:3]
    assert np.array_equal(kept.images[kept.labels == 0], mnist_test.images[first_zeros])


def test_published_per_class_numbers_average_to_the_published_mean():
    for key, per_class in PAPER_PER_CLASS_AUROC.items():
        assert np.mean(list(per_class.values())) == pytest.approx(PAPER_MEAN_AUROC[key], abs=5e-4)


def test_benchmark_script_end_to_end_on_tiny_mnist(tmp_path):
    bench = _load_script("one_class")
    out = tmp_path / "run"
    code = bench.main(["--dataset", "mnist", "--out", str(out), "--classes", "0,1", "--limit-train", "40",
                       "--limit-eval", "15", "--methods", "vae_gradient,vae_gradient_mahalanobis,drocc",
                       "--set", "vae.vae_epochs=2", "--set", "vae.classifier_epochs=2", "--set", "drocc.epochs=3",
                       "--no-progress"])
    assert code == 0
    doc = json.loads((out / "result.json").read_text())
    expected = {f"auroc/one_class/{m}/mnist/{c}" for m in ("vae_gradient", "vae_gradient_mahalanobis", "drocc")
                for c in ("0", "1", "mean")}
    assert set(doc["metrics"]) == expected
    for method in ("vae_gradient", "drocc"):
        pair = [doc["metrics"][f"auroc/one_class/{method}/mnist/{c}"] for c in ("0", "1")]
        assert doc["metrics"][f"auroc/one_class/{method}/mnist/mean"] == pytest.approx(np.mean(pair))
    assert doc["config"]["detector"]["vae"]["vae_epochs"] == 2 and doc["config"]["limit_eval_per_class"] == 15
    assert "test split only" in doc["config"]["split"]
    checked = subprocess.run([sys.executable, str(CHECKER), str(out)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_table_puts_published_numbers_beside_ours():
    bench = _load_script("one_class")
    classes = ["airplane", "automobile"]
    metrics = {f"auroc/one_class/drocc/cifar10/{c}": 0.5 for c in [*classes, "mean"]}
    table = bench.one_class_table(metrics, "cifar10", classes, ("drocc",))
    assert "paper drocc" in table.splitlines()[0]
    assert "0.8166" in table and "0.7420" in table
    mnist = bench.one_class_table({f"auroc/one_class/drocc/mnist/{c}": 0.5 for c in ["0", "mean"]}, "mnist", ["0"],
                                  ("drocc",))
    assert "paper" not in mnist.splitlines()[0]


@pytest.mark.parametrize("folder, families", [
    ("one_class_mnist", {"vae_gradient", "vae_gradient_mahalanobis", "drocc", "drocc_lf"}),
    ("one_class_fashion_mnist", {"vae_gradient", "vae_gradient_mahalanobis", "drocc", "drocc_lf"}),
    ("drocc_sine", {"drocc", "drocc_lf", "ce_negatives", "ocsvm", "knn"}),
    ("drocc_sphere", {"drocc", "ocsvm", "knn"}),
])
def test_committed_results_follow_the_contract(folder, families):
    path = RESULTS / folder / "result.json"
    assert path.is_file(), f"{path} is missing: run the benchmark (see its docstring)"
    checked = subprocess.run([sys.executable, str(CHECKER), str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout
    metrics = json.loads(path.read_text())["metrics"]
    if folder == "drocc_sine":
        rows = [f"sine/displacement-{d}" for d in SINE_DISPLACEMENTS]
    elif folder == "drocc_sphere":
        rows = [f"sphere/radius-{r}" for r in SPHERE_RADII]
    else:
        dataset = folder.removeprefix("one_class_")
        rows = [f"{dataset}/{c}" for c in [*load_split(dataset, "test", progress=False).classes, "mean"]]
    for method in families:
        for row in rows:
            assert f"auroc/one_class/{method}/{row}" in metrics
