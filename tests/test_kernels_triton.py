"""The Triton kernels against float64 references, on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before the kernels are decorated, so it is set here before they are
imported, and then put back so that other test modules see the environment they expect.
Random tensors only check algebra and odd shapes; accuracy claims rest on real digits data.
"""

from __future__ import annotations

import os

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
from kernels import triton_fused, triton_per_sample  # noqa: E402

if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from classifier_fixture import fitted_digits_gradients  # noqa: E402
from kernel_cases import ODD_SHAPE_BOUND, random_last_layer_case, relative_error  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from edge_runtime.data.digits import load_digits_split  # noqa: E402
from edge_runtime.data.transforms import to_tensor  # noqa: E402
from kernels.dispatch import per_sample_weight_gradients, score_last_layer  # noqa: E402
from kernels.reference import (  # noqa: E402
    PRECISION_VARIANTS,
    closed_form_scores,
    last_layer_scores,
    prepare_last_layer_stats,
)

# Largest relative error vs float64 stated in kernels/triton_fused.py for the digits case, with 3x room
# for platform differences in float32 summation order.
STATED_MAX_ERROR = {"fp32": 9e-7, "bf16x3": 2e-5, "fp16x3": 2e-6, "fp16w": 5e-4, "fp16": 2e-3, "bf16w": 4e-3,
                    "bf16": 2e-2}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_were_built_for_the_interpreter():
    assert type(triton_fused._fused_score_kernel).__name__ == "InterpretedFunction", (
        "kernels.triton_fused was imported before this module set TRITON_INTERPRET=1")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits_case():
    """(features, softmax outputs, means, precision) of the shared real-digits case."""
    features, logits, means, precision = fitted_digits_gradients()
    return features, logits.softmax(dim=1), means, precision


@pytest.mark.parametrize("variant", list(PRECISION_VARIANTS))
def test_fused_scores_match_float64_on_real_digits(digits_case, variant):
    features, probs, means, precision = digits_case
    stats = prepare_last_layer_stats(means, precision, variant)
    labels = probs.argmax(dim=1)
    reference = last_layer_scores(features.double(), probs.double(), labels, means.double(), precision.double())
    fused = triton_fused.fused_last_layer_scores(features, probs, labels, stats, block_b=1024, block_t=64)
    error = relative_error(fused, reference)
    assert error.max() <= 3 * STATED_MAX_ERROR[variant], f"{variant}: max relative error {error.max():.2e}"
    # Same rounding as the unfused torch path; only the order of float32 sums differs.
    unfused_error = relative_error(closed_form_scores(features, probs, labels, stats), reference)
    assert error.max() <= 3 * unfused_error.max() + 1e-6


@pytest.mark.parametrize("variant", ["fp32", "fp16w", "bf16w"])  # the upper-half walk and the whitened one
def test_given_labels_and_predicted_labels_through_dispatch(digits_case, variant):
    features, probs, means, precision = digits_case
    features, probs = features[:40], probs[:40]
    stats = prepare_last_layer_stats(means, precision, variant)
    shifted = (probs.argmax(dim=1) + 1 + torch.arange(40) % 8) % 9  # wrong labels: large gradients
    given, name = score_last_layer(features, probs, shifted, stats, impl="triton_fused")
    predicted, _ = score_last_layer(features, probs, None, stats, impl="triton_fused")
    assert name == "triton_fused"
    for labels, scores in ((shifted, given), (probs.argmax(dim=1), predicted)):
        reference = last_layer_scores(features.double(), probs.double(), labels, means.double(), precision.double())
        assert relative_error(scores, reference).max() <= 3 * STATED_MAX_ERROR[variant]
    assert given.mean() > predicted.mean()


@pytest.mark.parametrize(("batch", "classes", "feature_dim", "block_t", "variant"), [
    (1, 3, 5, 16, "fp32"),     # K = 18 < one tile; a single sample
    (1, 3, 5, 16, "bf16"),
    (1, 3, 5, 16, "fp16w"),
    (17, 4, 40, 32, "fp32"),   # D = 40: weight tiles of 32 and 8; row blocks of 16 and 1
    (17, 4, 40, 32, "bf16x3"),
    (17, 4, 40, 32, "fp16w"),
    (17, 4, 40, 32, "bf16w"),
    (9, 9, 33, 64, "fp32"),    # weight tiles of 33 < 64 beside one tile of the 9 biases
    (9, 9, 33, 64, "bf16w"),
])
def test_odd_shapes_against_float64(batch, classes, feature_dim, block_t, variant):
    features, probs, labels, means, precision, reference = random_last_layer_case(batch, classes, feature_dim,
                                                                                  seed=batch * 100 + classes)
    stats = prepare_last_layer_stats(means, precision, variant)
    fused = triton_fused.fused_last_layer_scores(features, probs, labels, stats, block_b=16, block_t=block_t)
    assert fused.shape == (batch,)
    assert relative_error(fused, reference).max() <= ODD_SHAPE_BOUND[variant]


def test_empty_batch_gives_empty_scores(digits_case):
    features, probs, means, precision = digits_case
    stats = prepare_last_layer_stats(means, precision, "fp32")
    empty = triton_fused.fused_last_layer_scores(features[:0], probs[:0], torch.zeros(0, dtype=torch.long), stats)
    assert empty.shape == (0,)


def test_per_sample_conv_and_linear_gradients_match_torch_func():
    """A conv + linear net on real digits images: per-sample weight gradients of both layers."""
    torch.manual_seed(0)
    test = load_digits_split("test")
    images, labels = to_tensor(test.images[:6]), torch.from_numpy(test.labels[:6])
    conv, linear = nn.Conv2d(1, 5, 3, stride=2, padding=1), nn.Linear(5 * 4 * 4, 10)
    network = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear)
    params = {name: p.detach() for name, p in network.named_parameters()}

    def loss(p, image, label):
        return F.cross_entropy(functional_call(network, p, (image[None],)), label[None])

    expected = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    conv_out = conv(images)
    hidden = conv_out.relu().flatten(1)
    logits = linear(hidden)
    # Samples do not interact, so the gradient of the summed loss w.r.t. sample b's activations is b's own.
    conv_grad, logit_grad = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), (conv_out, logits))
    conv_weights, name = per_sample_weight_gradients(conv, images, conv_grad, impl="triton")
    linear_weights, _ = per_sample_weight_gradients(linear, hidden.detach(), logit_grad, impl="triton")
    assert name == "triton"
    torch.testing.assert_close(conv_weights, expected["0.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear_weights, expected["3.weight"], rtol=1e-5, atol=1e-6)


def test_batched_outer_handles_sequences_and_strides():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(3, 37, 20, generator=generator)
    grad_outputs = torch.randn(3, 37, 70, generator=generator)  # O = 70 spans three 32-row tiles
    product = triton_per_sample.batched_outer(grad_outputs.transpose(1, 2), inputs.transpose(1, 2))
    expected = torch.einsum("bto,bti->boi", grad_outputs.double(), inputs.double())
    torch.testing.assert_close(product.double(), expected, rtol=1e-5, atol=1e-5)
