"""Dispatch: which implementation runs where, that it says so, and that the CPU choices are right;
the per-fit stats; and the benchmark script's smoke run against the result-file contract."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from classifier_fixture import fitted_digits_gradients
from torch import nn
from torch.func import functional_call, grad, vmap

from edge_runtime.config import load_config, with_overrides
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import ConfigError, InputError
from edge_runtime.experiment import CLASSIFIER_FILE, prepare_data, train_frozen_classifier
from kernels import (
    PRECISION_VARIANTS,
    dispatch,
    per_sample_weight_gradients,
    pick_gradient_implementation,
    pick_score_implementation,
    prepare_last_layer_stats,
    score_last_layer,
)
from kernels.reference import kernel_order, last_layer_scores

REPO = Path(__file__).resolve().parent.parent
# The closed-form torch path rounds like the fused kernels; bounds are kernels/triton_fused.py's, with 3x room.
STATED_MAX_ERROR = {"fp32": 9e-7, "bf16x3": 2e-5, "fp16x3": 2e-6, "fp16w": 5e-4, "fp16": 2e-3, "bf16w": 4e-3,
                    "bf16": 2e-2}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits_case():
    """(features, logits, means, precision) of the shared real-digits case."""
    return fitted_digits_gradients()


def _relative_error(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (scores.double() - reference).abs() / reference.abs()


# On a GPU machine the same checks run the compiled kernels that `auto` picks there (CI has no GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device, where auto picks a kernel"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(PRECISION_VARIANTS))
def test_auto_choice_is_within_the_stated_error(digits_case, variant, device):
    features, logits, means, precision = (t.to(device) for t in digits_case)
    probs = logits.softmax(dim=1)
    labels = probs.argmax(dim=1)
    scores, name = score_last_layer(features, probs, labels, prepare_last_layer_stats(means, precision, variant))
    reference = last_layer_scores(features.double(), probs.double(), labels, means.double(), precision.double())
    assert name == ("closed_form" if device == "cpu" else pick_score_implementation(device, variant))
    assert _relative_error(scores, reference).max() <= 3 * STATED_MAX_ERROR[variant]


def test_predicted_labels_and_logits_are_accepted(digits_case):
    features, logits, means, precision = digits_case
    stats = prepare_last_layer_stats(means, precision, "fp32")
    probs = logits.softmax(dim=1)
    explicit, _ = score_last_layer(features, probs, probs.argmax(dim=1), stats)
    predicted, _ = score_last_layer(features, probs, None, stats)
    from_logits, _ = score_last_layer(features, logits, None, stats, from_logits=True)
    torch.testing.assert_close(predicted, explicit)
    torch.testing.assert_close(from_logits, explicit, rtol=1e-5, atol=1e-4)
    novel = torch.from_numpy(load_digits_split("test").labels == 9)
    assert explicit[novel].median() > explicit[~novel].median()  # the held-out digit scores as more novel


def test_choice_follows_device_and_installed_triton(monkeypatch):
    assert pick_score_implementation("cpu") == "closed_form"
    assert pick_gradient_implementation("cpu") == "torch"
    if importlib.util.find_spec("triton") is not None:
        assert pick_score_implementation("cuda", "bf16") == "triton_fused"
        assert pick_gradient_implementation("cuda") == "triton"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(dispatch.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "triton" else real_find_spec(name, *rest))
    assert pick_score_implementation("cuda", "fp32") == "cuda_fused"
    assert pick_score_implementation("cuda", "fp16w") == "cuda_fused"  # one part: the Cholesky factor
    assert pick_score_implementation("cuda", "bf16x3") == "closed_form"  # the CUDA C kernel reads P in one part
    assert pick_gradient_implementation("cuda") == "cuda"


def test_unavailable_or_unknown_implementations_are_config_errors(digits_case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    features, logits, means, precision = digits_case
    stats = prepare_last_layer_stats(means, precision, "fp32")
    probs = logits.softmax(dim=1)
    for impl, reason in (("cuda_fused", "CUDA C kernels run on CUDA devices"), ("triton_fused", "Triton")):
        with pytest.raises(ConfigError, match=f"{impl}.*unavailable: {reason}"):
            score_last_layer(features, probs, None, stats, impl=impl)
    with pytest.raises(ConfigError, match="must be 'auto' or one of"):
        score_last_layer(features, probs, None, stats, impl="cublas")
    with pytest.raises(ConfigError, match="'cuda' is unavailable"):
        per_sample_weight_gradients(nn.Linear(3, 2), torch.zeros(1, 3), torch.zeros(1, 2), impl="cuda")


def test_wrong_inputs_name_the_tensor(digits_case):
    features, logits, means, precision = digits_case
    probs = logits.softmax(dim=1)
    stats = prepare_last_layer_stats(means, precision, "fp32")
    with pytest.raises(InputError, match="features must be"):
        score_last_layer(features[:, :10], probs, None, stats)
    with pytest.raises(InputError, match="probs must be"):
        score_last_layer(features, probs[:, :5], torch.zeros(len(probs), dtype=torch.long), stats)
    with pytest.raises(InputError, match="labels must lie in"):
        score_last_layer(features, probs, torch.full((len(probs),), 9), stats)
    with pytest.raises(InputError, match="precision variant must be one of"):
        prepare_last_layer_stats(means, precision, "int8")
    with pytest.raises(InputError, match="precision must be"):
        prepare_last_layer_stats(means, precision[:-1, :-1])


def test_stats_hold_the_fit_in_kernel_order(digits_case):
    _, _, means, precision = digits_case
    stats = prepare_last_layer_stats(means, precision, "bf16x3")
    order = kernel_order(9, 64)
    assert sorted(order.tolist()) == list(range(9 * 65))
    assert order[9 * 64 :].tolist() == [c * 65 + 64 for c in range(9)]  # the biases come last
    torch.testing.assert_close(stats.means, means.float()[:, order])
    sym = (precision.double() + precision.double().T) / 2
    restored = (stats.precision_parts[0].double() + stats.precision_parts[1].double()) * stats.precision_scale
    torch.testing.assert_close(restored, sym[order][:, order], rtol=2e-5, atol=2e-5 * float(sym.abs().max()))
    assert all(part.abs().max() <= 1 for part in stats.precision_parts)
    expected_quadratic = torch.einsum("ck,kl,cl->c", means.double(), precision.double(), means.double())
    torch.testing.assert_close(stats.mean_quadratics.double(), expected_quadratic, rtol=1e-5, atol=0)
    moved = stats.to("cpu")
    assert moved.variant == "bf16x3" and moved.precision_scale == stats.precision_scale


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_weight_gradients_match_torch_func(device):
    """A conv + sequence-linear net on real digits images (rows of each image as a sequence for the linear)."""
    torch.manual_seed(0)
    test = load_digits_split("test")
    images, labels = to_tensor(test.images[:6], device), torch.from_numpy(test.labels[:6]).to(device)
    conv, linear = nn.Conv2d(1, 4, 3, padding=1, dilation=1).to(device), nn.Linear(4 * 8, 10).to(device)

    def forward(p, x):
        hidden = functional_call(conv, {"weight": p["conv"], "bias": conv.bias}, (x,)).relu()
        rows = hidden.permute(0, 2, 1, 3).flatten(2)  # [B, 8 rows, 4*8]
        return functional_call(linear, {"weight": p["linear"], "bias": linear.bias}, (rows,)).mean(dim=1)

    def loss(p, image, label):
        return F.cross_entropy(forward(p, image[None]), label[None])

    params = {"conv": conv.weight.detach(), "linear": linear.weight.detach()}
    expected = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    conv_out = conv(images)
    rows = conv_out.relu().permute(0, 2, 1, 3).flatten(2)
    seq_out = linear(rows)
    conv_grad, seq_grad = torch.autograd.grad(F.cross_entropy(seq_out.mean(dim=1), labels, reduction="sum"),
                                              (conv_out, seq_out))
    conv_weights, name = per_sample_weight_gradients(conv, images, conv_grad)
    linear_weights, _ = per_sample_weight_gradients(linear, rows.detach(), seq_grad)
    assert name == ("torch" if device == "cpu" else pick_gradient_implementation(device))
    torch.testing.assert_close(conv_weights, expected["conv"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear_weights, expected["linear"], rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_refuse_layers_they_do_not_cover():
    x = torch.zeros(2, 4, 5, 5)
    with pytest.raises(InputError, match="groups=1"):
        per_sample_weight_gradients(nn.Conv2d(4, 4, 3, groups=2), x, torch.zeros(2, 4, 3, 3))
    with pytest.raises(InputError, match="nn.Linear and nn.Conv2d"):
        per_sample_weight_gradients(nn.BatchNorm2d(4), x, x)
    with pytest.raises(InputError, match="do not match a conv"):
        per_sample_weight_gradients(nn.Conv2d(4, 4, 3), x, torch.zeros(2, 4, 5, 5))


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look their module up while being built
    spec.loader.exec_module(benchmark)
    return benchmark


def test_benchmark_smoke_run_writes_a_contract_result(tmp_path, monkeypatch, check_results):
    benchmark = load_benchmark("kernels", monkeypatch)
    assert benchmark.main(["--smoke", "--out", str(tmp_path), "--variants", "fp32", "bf16x3", "--repeats", "1"]) == 0
    metrics = json.loads((tmp_path / "result.json").read_text())["metrics"]
    for impl in ("loop", "torch_func", "closed_form"):
        assert metrics[f"samples_per_s/{impl}/fp32/b16_k27"] > 0
        assert metrics[f"max_rel_error/{impl}/fp32/b16_k27"] < 1e-4
    assert metrics["speedup/closed_form/bf16x3/b16_k27"] == 1.0
    assert "samples_per_s/loop/bf16x3/b16_k27" not in metrics  # autograd baselines have no split variant
    assert 0 < metrics["end_to_end_fraction/fp32/b8"]
    check_results(tmp_path)


def test_accuracy_benchmark_measures_every_path_on_a_trained_digits_classifier(tmp_path, monkeypatch, check_results):
    """On the CPU: closed form, Triton interpreter and CUDA C host emulation against float64."""
    cfg = with_overrides(load_config(REPO / "configs/digits.yaml"), {"train.epochs": 2})
    split = prepare_data(cfg, progress=False).split
    train_frozen_classifier(cfg, split, torch.device("cpu"), tmp_path, progress=False)
    out = tmp_path / "accuracy"
    benchmark = load_benchmark("kernel_accuracy", monkeypatch)
    assert benchmark.main(["--config", str(REPO / "configs/digits.yaml"), "--classifier",
                           str(tmp_path / CLASSIFIER_FILE), "--samples", "40", "--variants", "fp32", "fp16w", "bf16x3",
                           "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    tag = "digits-9_k585"
    paths = ("closed_form", "triton_fused") + (("cuda_fused",) if shutil.which("g++") else ())
    for impl in paths:
        for mode in ("predicted", "y_opt"):
            assert metrics[f"max_rel_error/{impl}/fp32/{mode}/{tag}"] < 1e-5
            assert metrics[f"max_rel_error/{impl}/fp16w/{mode}/{tag}"] < 1e-3
            assert 0 < metrics[f"median_rel_error/{impl}/fp16w/{mode}/{tag}"] <= metrics[f"max_rel_error/{impl}/fp16w/{mode}/{tag}"]
        assert metrics[f"auroc/{impl}/fp32/{tag}"] == pytest.approx(metrics[f"auroc/float64/{tag}"], abs=1e-6)
    assert "max_rel_error/cuda_fused/bf16x3/predicted/" + tag not in metrics  # CUDA C reads P in one part
    assert metrics[f"max_rel_error/triton_fused/bf16x3/predicted/{tag}"] < 1e-4
    check_results(out)
