"""The one-class protocol helpers, the benchmark script end to end (tiny sizes, real MNIST), and the
committed one-class and synthetic result files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmark_script import load_benchmark
from edge_runtime.data.catalog import CATALOG
from edge_runtime.data.loader import load_split
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.one_class import (first_per_class, load_one_class_data, load_one_class_folds, stratified_folds,
                                    stratified_halves)
from edge_runtime.synthetic import SINE_DISPLACEMENTS, SPHERE_RADII

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

OURS = {"vae_gradient_mahalanobis", "vae_gradient_factors_mahalanobis"}  # the two forms of our head


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


def test_stratified_folds_evaluate_every_image_once_never_by_a_model_trained_on_it(mnist_test):
    folds = stratified_folds(mnist_test, 5, seed=0)
    rows = lambda data: [row.tobytes() for row in data.images.reshape(len(data), -1)]  # noqa: E731
    evaluated = [row for _, evaluation in folds for row in rows(evaluation)]
    assert sorted(evaluated) == sorted(rows(mnist_test))
    for train, evaluation in folds:
        assert len(train) + len(evaluation) == len(mnist_test)
        assert not set(rows(train)) & set(rows(evaluation))
        for label in range(10):
            total = int((mnist_test.labels == label).sum())
            assert int((evaluation.labels == label).sum()) in (total // 5, total // 5 + 1)
    with pytest.raises(DataError, match="2..20"):
        stratified_folds(mnist_test, 1, seed=0)


def test_folds_are_only_for_the_data_set_without_a_training_split():
    folds = load_one_class_folds("mnist", 4, progress=False)
    assert len(folds) == 4 and "4-fold" in folds[0].split_note
    with pytest.raises(DataError, match="own training split"):
        load_one_class_folds("fashion_mnist", 4, progress=False)


def test_mnist_one_class_data_states_the_split_it_uses():
    data = load_one_class_data("mnist", progress=False)
    assert (len(data.train), len(data.evaluation)) == (5000, 5000)
    assert "test split only" in data.split_note


def test_first_per_class_keeps_the_first_images_of_each_label(mnist_test):
    kept = first_per_class(mnist_test, 3)
    assert len(kept) == 30
    first_zeros = np.flatnonzero(mnist_test.labels == 0)[:3]
    assert np.array_equal(kept.images[kept.labels == 0], mnist_test.images[first_zeros])


def test_benchmark_script_end_to_end_on_tiny_mnist(tmp_path, check_results):
    bench = load_benchmark("one_class")
    out = tmp_path / "run"
    code = bench.main(["--dataset", "mnist", "--out", str(out), "--classes", "0,1", "--limit-train", "40",
                       "--limit-eval", "15", "--methods", "vae_gradient,vae_gradient_mahalanobis,drocc,rotation",
                       "--set", "vae.vae_epochs=2", "--set", "vae.classifier_epochs=2", "--set", "drocc.epochs=3",
                       "--set", "rotation.epochs=2", "--set", "rotation.width=2", "--no-progress"])
    assert code == 0
    doc = json.loads((out / "result.json").read_text())
    expected = {f"auroc/one_class/{m}/mnist/{c}"
                for m in ("vae_gradient", "vae_gradient_mahalanobis", "drocc", "rotation") for c in ("0", "1", "mean")}
    assert set(doc["metrics"]) == expected
    assert doc["config"]["detector"]["rotation"]["epochs"] == 2
    for method in ("vae_gradient", "drocc", "rotation"):
        pair = [doc["metrics"][f"auroc/one_class/{method}/mnist/{c}"] for c in ("0", "1")]
        assert doc["metrics"][f"auroc/one_class/{method}/mnist/mean"] == pytest.approx(np.mean(pair))
    assert doc["config"]["detector"]["vae"]["vae_epochs"] == 2 and doc["config"]["limit_eval_per_class"] == 15
    assert "test split only" in doc["config"]["split"]
    check_results(out)


def test_benchmark_script_averages_auroc_over_folds(tmp_path, check_results):
    bench = load_benchmark("one_class")
    out = tmp_path / "folds"
    assert bench.main(["--dataset", "mnist", "--folds", "2", "--out", str(out), "--classes", "3", "--limit-train", "30",
                       "--limit-eval", "10", "--methods", "vae_gradient_mahalanobis,vae_gradient_factors_mahalanobis",
                       "--set", "vae.vae_epochs=2",
                       "--no-progress"]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["config"]["folds"] == 2 and "2-fold cross-validation" in doc["config"]["split"]
    assert set(doc["metrics"]) == {f"auroc/one_class/{m}/mnist/{c}" for m in OURS for c in ("3", "mean")}
    check_results(out)
    with pytest.raises(SystemExit):
        bench.main(["--dataset", "mnist", "--folds", "2", "--validation", "--out", str(out)])


def test_sweep_runs_each_value_and_names_it_in_the_metric(tmp_path, check_results):
    bench = load_benchmark("one_class")
    out = tmp_path / "sweep"
    assert bench.main(["--dataset", "mnist", "--validation", "--out", str(out), "--classes", "1", "--limit-train", "30",
                       "--limit-eval", "10", "--methods", "drocc", "--set", "drocc.epochs=3",
                       "--sweep", "drocc.radius=2,16", "--no-progress"]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert set(doc["metrics"]) == {f"auroc/one_class/drocc.radius-{r}/mnist/{c}"
                                   for r in (2, 16) for c in ("1", "mean")}
    assert doc["config"]["sweep"]["key"] == "detector.drocc.radius" and doc["config"]["sweep"]["values"] == [2, 16]
    assert doc["config"]["detector"]["drocc"]["radius"] == 2 and doc["config"]["detector"]["drocc"]["epochs"] == 3
    assert "validation" in doc["config"]["split"]
    check_results(out)
    for bad in ("drocc.radius=2", "drocc.radius", "=1,2", "drocc.radius=2,2"):
        with pytest.raises(SystemExit):
            bench.main(["--dataset", "mnist", "--out", str(out), "--sweep", bad])
    with pytest.raises(ConfigError, match="radius"):  # an invalid value is refused before anything trains
        bench.main(["--dataset", "mnist", "--out", str(out), "--methods", "drocc", "--sweep", "drocc.radius=2,-1"])


def test_table_puts_published_numbers_beside_ours():
    bench = load_benchmark("one_class")
    classes = ["airplane", "automobile"]
    metrics = {f"auroc/one_class/drocc/cifar10/{c}": 0.5 for c in [*classes, "mean"]}
    table = bench.one_class_table(metrics, "cifar10", classes, ("drocc",))
    assert "paper drocc" in table.splitlines()[0]
    assert "0.7420" in table and "n/a" in table  # the mean is published; per-class numbers are not quoted
    mnist = bench.one_class_table({f"auroc/one_class/drocc/mnist/{c}": 0.5 for c in ["0", "mean"]}, "mnist", ["0"],
                                  ("drocc",))
    assert "paper" not in mnist.splitlines()[0]
    swept = ("drocc.radius-2", "drocc.radius-8")
    swept_metrics = {f"auroc/one_class/{m}/cifar10/{c}": 0.5 for m in swept for c in [*classes, "mean"]}
    sweep_table = bench.one_class_table(swept_metrics, "cifar10", classes, swept)
    assert sweep_table.splitlines()[0].count("paper drocc") == 1  # one published column for the swept method


@pytest.mark.parametrize("folder, dataset, families", [
    ("one_class_mnist", "mnist", {"vae_gradient", "vae_gradient_mahalanobis", "drocc", "drocc_lf"}),
    ("one_class_mnist_5fold", "mnist", {"vae_gradient", "vae_reconstruction", "vae_latent", "vae_gradient_mahalanobis"}),
    ("one_class_fashion_mnist", "fashion_mnist", {"vae_gradient", "vae_gradient_mahalanobis", "drocc"}),
    ("one_class_cifar10", "cifar10", {"vae_gradient", "vae_reconstruction", "vae_latent", "vae_gradient_mahalanobis"}),
    ("one_class_cifar10_drocc_cpu", "cifar10", {"drocc", "drocc_lf"}),
    *((f"one_class_{dataset}_{kind}", dataset, OURS) for dataset in ("mnist", "fashion_mnist", "cifar10")
      for kind in ("factors", "validation")),
    ("one_class_mnist_5fold_factors", "mnist", OURS),
    *((f"one_class_cifar10_drocc_validation_{name}", "cifar10", {f"drocc.{key}-{value}" for value in values})
      for name, key, values in (("radius", "radius", (2, 8, 32, 128)),
                                ("step", "ascent_step_size", (0.001, 0.1, 1.0, 4.0)),
                                ("epochs", "epochs", (1, 3, 10, 40)), ("gamma", "gamma", (1, 2, 4)),
                                ("width", "width", (8, 32)))),
    ("drocc_sine", None, {"drocc", "drocc_lf", "ce_negatives", "ocsvm", "knn"}),
    ("drocc_sphere", None, {"drocc", "ocsvm", "knn"}),
])
def test_committed_results_follow_the_contract(folder, dataset, families, check_results):
    path = RESULTS / folder / "result.json"
    assert path.is_file(), f"{path} is missing: run the benchmark (see its docstring)"
    check_results(path)
    doc = json.loads(path.read_text())
    metrics = doc["metrics"]
    if folder == "drocc_sine":
        rows = [f"sine/displacement-{d}" for d in SINE_DISPLACEMENTS]
    elif folder == "drocc_sphere":
        rows = [f"sphere/radius-{r}" for r in SPHERE_RADII]
    else:
        assert doc["config"]["validation"] == ("_validation" in folder)
        classes = CATALOG[dataset].classes or load_split(dataset, "test", progress=False).classes
        rows = [f"{dataset}/{c}" for c in [*classes, "mean"]]
    for method in families:
        for row in rows:
            assert f"auroc/one_class/{method}/{row}" in metrics


ROTATION_HALVES = ("one_class_cifar10_rotation_a", "one_class_cifar10_rotation_b")


def test_committed_rotation_halves_cover_cifar10_once_with_one_recipe(check_results):
    """The CIFAR-10 rotation run is two files of five classes each (one CPU job would not fit a session)."""
    docs = []
    for folder in ROTATION_HALVES:
        path = RESULTS / folder / "result.json"
        assert path.is_file(), f"{path} is missing: run the benchmark (see its docstring)"
        check_results(path)
        docs.append(json.loads(path.read_text()))
    covered = [name for doc in docs for name in doc["config"]["classes"]]
    assert sorted(covered) == sorted(CATALOG["cifar10"].classes)
    for doc in docs:
        assert doc["config"]["validation"] is False and doc["config"]["limit_train_per_class"] is None
        assert doc["config"]["detector"]["rotation"] == docs[0]["config"]["detector"]["rotation"]
        for name in [*doc["config"]["classes"], "mean"]:
            assert f"auroc/one_class/rotation/cifar10/{name}" in doc["metrics"]


def test_validation_split_never_touches_the_evaluation_images():
    data = load_one_class_data("mnist", progress=False, validation=True)
    plain = load_one_class_data("mnist", progress=False)
    assert len(data.train) + len(data.evaluation) == len(plain.train)
    rows = lambda images: {row.tobytes() for row in images.reshape(len(images), -1)}  # noqa: E731
    assert not rows(data.evaluation.images) & rows(plain.evaluation.images)
    assert not rows(data.train.images) & rows(plain.evaluation.images)
    assert "validation" in data.split_note


def test_novel_condition_benchmark_end_to_end_on_digits(tmp_path, check_results):
    bench = load_benchmark("novel_condition")
    out = tmp_path / "conditions"
    assert bench.main(["--dataset", "digits", "--out", str(out), "--limit-train", "40", "--limit-eval", "10",
                       "--vae-epochs", "5", "--no-progress"]) == 0
    doc = json.loads((out / "result.json").read_text())
    methods = {f"{feature}-{head}" for feature in bench.FEATURES for head in bench.HEADS}
    rows = {f"{kind}-{level}" for kind in ("lens_blur", "gaussian_blur", "gaussian_noise", "haze", "rain")
            for level in range(1, 6)} | {"mean"}
    assert set(doc["metrics"]) == {f"auroc/novel_condition/{m}/digits/{r}" for m in methods for r in rows}
    check_results(out)
