"""The CUDA C kernels: compiled with nvcc for Jetson Orin and H100, executed through the CPU host
emulation against float64, and run on a GPU where there is one. The loaders refuse clearly elsewhere.

Random tensors only check algebra and odd shapes; accuracy claims rest on real digits data.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from classifier_fixture import fitted_digits_gradients
from kernel_cases import ODD_SHAPE_BOUND, random_last_layer_case, relative_error
from torch import nn
from torch.func import functional_call, grad, vmap

from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import ConfigError
from kernels.cuda_build import (
    compile_cubin,
    cuda_batched_outer,
    cuda_last_layer_scores,
    find_nvcc,
    load_cuda_kernels,
    torch_extension_sources,
)
from kernels.reference import (
    conv2d_columns,
    last_layer_scores,
    prepare_last_layer_stats,
)

# Largest relative error vs float64 stated in kernels/cuda_build.py for the digits case, with 3x room.
STATED_MAX_ERROR = {"fp32": 3e-6, "fp16w": 6e-4, "fp16": 2e-3, "bf16w": 4e-3, "bf16": 2e-2}
NO_GPU = "needs a CUDA device to run (compiled and emulated on the CPU by the other tests)"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits_case():
    """(features, softmax outputs, means, precision) of the shared real-digits case."""
    features, logits, means, precision = fitted_digits_gradients(128)
    return features, logits.softmax(dim=1), means, precision


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])  # Jetson Orin, H100
def test_sources_compile_cleanly_with_nvcc(tmp_path, arch):
    if find_nvcc() is None:
        pytest.skip("nvcc is not installed (CUDA_HOME/bin or PATH); the kernels cannot be compiled here")
    build = compile_cubin(arch, tmp_path / f"kernels_{arch}.cubin")
    assert build.returncode == 0, build.stderr
    assert build.stderr.strip() == "", f"nvcc printed diagnostics:\n{build.stderr}"
    assert (tmp_path / f"kernels_{arch}.cubin").stat().st_size > 0


@pytest.mark.parametrize("variant", list(STATED_MAX_ERROR))
def test_emulated_kernel_matches_float64_on_real_digits(digits_case, variant):
    features, probs, means, precision = digits_case
    stats = prepare_last_layer_stats(means, precision, variant)
    labels = probs.argmax(dim=1)
    reference = last_layer_scores(features.double(), probs.double(), labels, means.double(), precision.double())
    scores = cuda_last_layer_scores(features, probs, labels, stats, backend="host_emulation")
    assert relative_error(scores, reference).max() <= 3 * STATED_MAX_ERROR[variant]


@pytest.mark.parametrize("variant", ["fp32", "fp16w"])  # the upper-half walk and the whitened one
def test_emulated_kernel_with_given_labels(digits_case, variant):
    features, probs, means, precision = digits_case
    labels = (probs.argmax(dim=1) + 1 + torch.arange(len(probs)) % 8) % 9
    reference = last_layer_scores(features.double(), probs.double(), labels, means.double(), precision.double())
    scores = cuda_last_layer_scores(features, probs, labels, prepare_last_layer_stats(means, precision, variant),
                                    backend="host_emulation")
    assert relative_error(scores, reference).max() <= 3 * STATED_MAX_ERROR[variant]


@pytest.mark.parametrize(("batch", "classes", "feature_dim"), [(1, 3, 5), (70, 4, 40)])
@pytest.mark.parametrize("variant", ["fp32", "bf16", "fp16w", "bf16w"])
def test_emulated_kernel_on_odd_shapes(batch, classes, feature_dim, variant):
    """K below one 32-wide tile with one sample; D = 40 (tiles of 32 and 8) over two 64-sample blocks."""
    features, probs, labels, means, precision, reference = random_last_layer_case(batch, classes, feature_dim,
                                                                                  seed=batch + classes)
    scores = cuda_last_layer_scores(features, probs, labels, prepare_last_layer_stats(means, precision, variant),
                                    backend="host_emulation")
    assert relative_error(scores, reference).max() <= ODD_SHAPE_BOUND[variant]


def test_emulated_per_sample_conv_gradients_match_torch_func():
    torch.manual_seed(0)
    test = load_digits_split("test")
    images, labels = to_tensor(test.images[:5]), torch.from_numpy(test.labels[:5])
    conv, linear = nn.Conv2d(1, 17, 3, padding=1), nn.Linear(17 * 8 * 8, 10)  # O = 17: two output tiles
    network = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear)
    params = {name: p.detach() for name, p in network.named_parameters()}

    def loss(p, image, label):
        return F.cross_entropy(functional_call(network, p, (image[None],)), label[None])

    expected = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)["0.weight"]
    conv_out = conv(images)
    (conv_grad,) = torch.autograd.grad(F.cross_entropy(linear(conv_out.relu().flatten(1)), labels, reduction="sum"),
                                       conv_out)
    columns, flat_grad = conv2d_columns(images, conv_grad, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    got = cuda_batched_outer(flat_grad, columns, backend="host_emulation").reshape(expected.shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_split_precision_variants_are_refused(digits_case):
    features, probs, means, precision = digits_case
    with pytest.raises(ConfigError, match="one part"):
        cuda_last_layer_scores(features, probs, probs.argmax(dim=1), prepare_last_layer_stats(means, precision, "bf16x3"),
                               backend="host_emulation")


def test_torch_extension_sources_hold_kernels_and_launchers():
    declarations, cuda = torch_extension_sources()
    assert "torch::Tensor last_layer_partials(" in declarations and "torch::Tensor batched_outer(" in declarations
    for kernel in ("last_layer_score_f32", "last_layer_score_bf16", "last_layer_score_f16",
                   "last_layer_score_bf16_whitened", "last_layer_score_f16_whitened", "batched_outer_f32"):
        assert cuda.count(kernel) >= 2, f"{kernel} must be both defined and launched"
    assert "#include \"" not in cuda, "headers must be pasted in so load_inline's hash covers them"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_loaders_refuse_clearly_without_a_gpu():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        load_cuda_kernels("torch")
    with pytest.raises(ConfigError, match="no CUDA C backend could be loaded"):
        load_cuda_kernels("auto")
    with pytest.raises(ConfigError, match="backend must be"):
        load_cuda_kernels("opencl")


def test_pycuda_loader_names_what_is_missing():
    if importlib.util.find_spec("pycuda") is not None and torch.cuda.is_available():
        pytest.skip("pycuda and a GPU are both present; the GPU test below covers the loader")
    expected = "pip install pycuda" if importlib.util.find_spec("pycuda") is None else "needs a CUDA device"
    with pytest.raises(ConfigError, match=expected):
        load_cuda_kernels("pycuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("backend", ["torch", "pycuda"])
@pytest.mark.parametrize("variant", ["fp32", "fp16w"])
def test_gpu_kernel_matches_float64(digits_case, backend, variant):
    if backend == "pycuda" and importlib.util.find_spec("pycuda") is None:
        pytest.skip("pycuda is not installed")
    features, probs, means, precision = (t.cuda() for t in digits_case)
    labels = probs.argmax(dim=1)
    reference = last_layer_scores(features.double(), probs.double(), labels, means.double(), precision.double())
    stats = prepare_last_layer_stats(means, precision, variant)
    scores = cuda_last_layer_scores(features, probs, labels, stats, backend=backend)
    assert relative_error(scores, reference).max() <= 3 * STATED_MAX_ERROR[variant]
