"""The model registry: shapes of every architecture, custom factories, fastnet's whitening layer."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.config import ModelConfig, evolve_config
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import conform, to_tensor
from edge_runtime.errors import ConfigError, InputError
from edge_runtime.models.base import Normalize
from edge_runtime.models.fastnet import WHITEN_KERNEL, init_whitening
from edge_runtime.models.registry import build_classifier
from edge_runtime.training.trainer import compute_mean_std


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("train")


def _pixels(digits, size: int, channels: int, count: int) -> torch.Tensor:
    return to_tensor(conform(digits.subset(slice(0, count)), size, channels).images)


@pytest.mark.parametrize("arch, size, channels, batch, feature_dim", [
    ("small_cnn", 8, 1, 16, 32),
    ("small_cnn", 28, 1, 4, 32),
    ("fastnet", 32, 3, 2, 128),
    ("resnet18", 32, 3, 2, 512),
    ("resnet34", 8, 1, 2, 512),
])
def test_every_arch_embeds_real_images(digits, arch, size, channels, batch, feature_dim):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, input_size=size, in_channels=channels, width=16)
    model = build_classifier(cfg, 9, (0.3,) * channels, (0.4,) * channels).eval()
    assert isinstance(next(iter(model.network.children())), Normalize)
    assert model.final_layer_name == "fc" and model.num_classes == 9 and model.feature_dim == feature_dim
    x = _pixels(digits, size, channels, batch)
    with torch.no_grad():
        features, logits = model.embed(x)
        assert features.shape == (batch, feature_dim) and logits.shape == (batch, 9)
        assert torch.isfinite(features).all()
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(logits, model.final_linear(features))


@pytest.mark.parametrize("arch, size, channels", [("small_cnn", 8, 1), ("fastnet", 32, 3)])
def test_mirror_average_reads_each_image_and_its_mirror(digits, arch, size, channels):
    """Features, logits and layer statistics are the means over the two views; the final layer
    still maps the features to the logits, which the gradient closed form needs."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, input_size=size, in_channels=channels, width=8)
    single = build_classifier(cfg, 9, (0.3,) * channels, (0.4,) * channels).eval()
    mirrored = build_classifier(evolve_config(cfg, mirror_average=True), 9,
                                (0.3,) * channels, (0.4,) * channels).eval()
    mirrored.load_state_dict(single.state_dict())
    assert mirrored.mirror_average and not single.mirror_average
    x = _pixels(digits, size, channels, 6)
    layer = "stage1" if arch == "small_cnn" else "act"
    with torch.no_grad():
        direct, flipped = single.embed_with_stats(x, (layer,)), single.embed_with_stats(x.flip(3), (layer,))
        both = mirrored.embed_with_stats(x, (layer,))
        for got, a, b in zip(both, direct, flipped):
            torch.testing.assert_close(got, (a + b) / 2)
        assert not torch.allclose(both[1], direct[1])  # digits are not mirror-symmetric
        torch.testing.assert_close(both[1], mirrored.final_linear(both[0]))
        torch.testing.assert_close(mirrored(x), single(x))  # forward (what training calls) stays one view


@pytest.mark.parametrize("mirror", [False, True])
def test_shift_average_adds_each_view_moved_left_and_right(digits, mirror):
    """With shifts the outputs are the means over every view moved 0, +s and -s pixels (the
    uncovered edge reflected, as training pads), mirrored ones included; the final layer still maps
    the features to the logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="small_cnn", input_size=8, in_channels=1, width=8, mirror_average=mirror)
    single = build_classifier(ModelConfig(arch="small_cnn", input_size=8, in_channels=1, width=8),
                              9, (0.3,), (0.4,)).eval()
    shifting = build_classifier(evolve_config(cfg, shift_average=2), 9, (0.3,), (0.4,)).eval()
    shifting.load_state_dict(single.state_dict())
    assert shifting.view_count == (6 if mirror else 3)
    x = _pixels(digits, 8, 1, 5)
    padded = F.pad(x, (2, 2, 0, 0), mode="reflect")
    right, left = padded[..., :8], padded[..., 4:]
    torch.testing.assert_close(right[..., 2:], x[..., :6])  # content moved two columns right
    torch.testing.assert_close(left[..., :6], x[..., 2:])
    torch.testing.assert_close(right[..., 0], x[..., 2])  # the uncovered edge reflected
    views = [x, right, left] + ([x.flip(3), right.flip(3), left.flip(3)] if mirror else [])
    with torch.no_grad():
        expected = [torch.stack([single.embed(view)[k] for view in views]).mean(dim=0) for k in (0, 1)]
        features, logits = shifting.embed(x)
        torch.testing.assert_close(features, expected[0])
        torch.testing.assert_close(logits, expected[1])
        torch.testing.assert_close(logits, shifting.final_linear(features))
        assert not torch.allclose(logits, single.embed(x)[1])  # the shifted views did change the reading


def test_shift_as_wide_as_the_image_is_refused():
    with pytest.raises(ConfigError, match="shift_average 8 must be smaller than input_size 8"):
        ModelConfig(arch="small_cnn", input_size=8, shift_average=8)


def test_built_in_arch_rejects_other_final_layer_name():
    with pytest.raises(ConfigError, match="model.final_layer"):
        build_classifier(ModelConfig(final_layer="head"), 9, (0.3,), (0.4,))


def test_normalisation_must_match_channels():
    with pytest.raises(ConfigError, match="model.in_channels"):
        build_classifier(ModelConfig(in_channels=3), 9, (0.3,), (0.4,))


def test_fastnet_rejects_inputs_too_small_for_its_pools():
    with pytest.raises(ConfigError, match="model.input_size"):
        build_classifier(ModelConfig(arch="fastnet", input_size=8), 9, (0.3,), (0.4,))


def tiny_factory(num_classes: int) -> nn.Module:
    """A user network whose final linear layer sits at 'head.out'."""
    head = nn.Sequential(OrderedDict(hidden=nn.Linear(64, 24), act=nn.ReLU(), out=nn.Linear(24, num_classes)))
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), head=head))


def test_custom_factory_is_wrapped_with_normalize(digits):
    cfg = ModelConfig(arch="custom", factory=f"{__name__}:tiny_factory", final_layer="head.out")
    mean, std = compute_mean_std(digits)
    model = build_classifier(cfg, 9, mean, std).eval()
    x = _pixels(digits, 8, 1, 5)
    features, logits = model.embed(x)
    assert features.shape == (5, 24) and logits.shape == (5, 9)
    user_network = model.network.model
    torch.testing.assert_close(logits, user_network((x - mean[0]) / std[0]))


@pytest.mark.parametrize("factory", ["no_such_package_here.models:build", f"{__name__}:missing_factory", "no_colon"])
def test_custom_factory_that_cannot_be_found_names_model_factory(factory):
    with pytest.raises(ConfigError, match="model.factory"):
        build_classifier(ModelConfig(arch="custom", factory=factory), 9, (0.3,), (0.4,))


@pytest.mark.parametrize("final_layer, problem", [("head.act", "not an nn.Linear"), ("head.nothing", "not a submodule")])
def test_custom_final_layer_must_be_a_linear_layer(final_layer, problem):
    cfg = ModelConfig(arch="custom", factory=f"{__name__}:tiny_factory", final_layer=final_layer)
    with pytest.raises(ConfigError, match=rf"model.final_layer .*{problem}"):
        build_classifier(cfg, 9, (0.3,), (0.4,))


def test_fastnet_whitening_decorrelates_real_patches(digits):
    images = _pixels(digits, 16, 1, len(digits))
    mean, std = compute_mean_std(conform(digits, 16, 1))
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(arch="fastnet", input_size=16, width=8), 9, mean, std)
    conv = model.network.whiten
    before = conv.weight.detach().clone()
    init_whitening(model, images)
    weight = conv.weight.detach()
    assert not torch.equal(weight, before) and torch.isfinite(weight).all()
    assert not conv.weight.requires_grad
    half = weight.shape[0] // 2
    torch.testing.assert_close(weight[half:], -weight[:half])
    with torch.no_grad():
        responses = F.conv2d(model.network.normalize(images), weight[:half]).transpose(0, 1).flatten(1).double()
    covariance = torch.cov(responses)
    off_diagonal = covariance - torch.diag(covariance.diag())
    assert off_diagonal.abs().max() < 1e-3
    assert covariance.diag().max() <= 1.0 + 1e-3
    assert covariance.diag().max() > 0.99  # the strongest patch direction comes out with unit variance
    assert half == WHITEN_KERNEL ** 2


def test_init_whitening_rejects_other_models_and_bad_images(digits):
    small = build_classifier(ModelConfig(), 9, (0.3,), (0.4,))
    with pytest.raises(ConfigError, match="fastnet"):
        init_whitening(small, _pixels(digits, 8, 1, 4))
    fast = build_classifier(ModelConfig(arch="fastnet", input_size=16), 9, (0.3,), (0.4,))
    with pytest.raises(InputError, match=r"\[N,1,H,W\]"):
        init_whitening(fast, _pixels(digits, 16, 3, 4))


def test_embed_keeps_features_of_its_own_thread_only(digits):
    """Two threads embedding different batches through one model each get their own features."""
    import threading

    torch.manual_seed(0)
    model = build_classifier(ModelConfig(arch="small_cnn", input_size=8, in_channels=1, width=8), 9,
                             (0.5,), (0.25,)).eval()
    batches = [_pixels(digits, 8, 1, 64), _pixels(digits, 8, 1, 64).flip(0)]
    with torch.no_grad():
        expected = [model.embed(b)[0] for b in batches]
    failures: list[str] = []

    def worker(index: int) -> None:
        with torch.no_grad():
            for _ in range(50):
                features, logits = model.embed(batches[index])
                if not torch.equal(features, expected[index]):
                    failures.append(f"thread {index} got another thread's features")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
