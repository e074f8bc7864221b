"""Layer statistics as extra input of the memory_pu feature head, on real digits.

The small CNN of configs/digits.yaml (stages `stage1` [B, 32, 4, 4] and `stage2` [B, 64, 2, 2])
gives each image 2 x (32 + 64) statistics; they must be exactly the per-channel mean and
population std of those outputs, travel with the samples through the memory and the session's
state, and be refused clearly where they are missing or cannot be produced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from classifier_fixture import digits_session
from edge_runtime.config import BinaryHeadConfig, parse_config
from edge_runtime.continual.memory import RehearsalMemory
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.deploy.session_export import export_session_bundle
from edge_runtime.detectors.base import Observations
from edge_runtime.detectors.binary_head import BinaryHead
from edge_runtime.errors import ConfigError, InputError
from edge_runtime.metrics import ood_metrics
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.session import Session

LAYERS = ("stage1", "stage2")
STREAM_BATCH = 80


@pytest.fixture(scope="module")
def digits():
    """An adapted digits session whose memory_pu heads read the two stages' statistics."""
    torch.set_num_threads(1)
    overrides = {"detector.name": "grad_mahalanobis_ssl", "detector.pu_head.layer_stats": list(LAYERS),
                 "session.adapt_every": STREAM_BATCH}
    session, stream = digits_session(overrides, epochs=8)
    order = np.random.default_rng(0).permutation(len(stream))
    known = np.flatnonzero(stream.labels[order] < 9)[:200]
    novel = np.flatnonzero(stream.labels[order] == 9)
    picked = order[np.sort(np.concatenate([known, novel]))]
    for start in range(0, len(picked), STREAM_BATCH):
        session.observe(stream.images[picked[start:start + STREAM_BATCH]])
    session.adapt()
    return session, stream


def _stage_outputs(classifier, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two stages' outputs, computed by running the network's modules one after the other."""
    outputs, x = {}, pixels
    for name, module in classifier.network.named_children():
        x = module(x)
        outputs[name] = x
    return outputs


def test_statistics_are_the_channel_mean_and_std_of_the_named_layers(digits):
    session, stream = digits
    pixels = to_tensor(stream.images[:64])
    classifier = session.classifier
    with torch.no_grad():
        features, logits, stats = classifier.embed_with_stats(pixels, LAYERS)
        plain_features, plain_logits = classifier.embed(pixels)
        outputs = _stage_outputs(classifier, pixels)
    expected = torch.cat([torch.cat([outputs[name].mean(dim=(2, 3)), outputs[name].std(dim=(2, 3), correction=0)], 1)
                          for name in LAYERS], dim=1)
    assert stats.shape == (64, 2 * (32 + 64))
    torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features, plain_features)
    torch.testing.assert_close(logits, plain_logits)
    assert classifier.embed_with_stats(pixels, ())[2] is None


@pytest.mark.parametrize("layer, problem", [("stage9", "not a submodule"), ("flatten", "needs a conv layer")])
def test_layers_that_give_no_channel_statistics_are_refused_by_name(digits, layer, problem):
    session, stream = digits
    with pytest.raises(ConfigError, match=f"{layer!r}.*{problem}"):
        session.classifier.embed_with_stats(to_tensor(stream.images[:4]), (layer,))


def test_a_layer_that_runs_twice_per_pass_is_refused():
    conv = nn.Conv2d(1, 1, 3, padding=1)
    network = nn.Sequential(conv, conv, nn.Flatten(), nn.Linear(64, 2))  # one module at positions 0 and 1
    classifier = FrozenClassifier(network, "3")
    with pytest.raises(ConfigError, match="'0' ran 2 times"):
        classifier.embed_with_stats(torch.zeros(2, 1, 8, 8), ("0",))


def test_memory_pu_reading_layer_statistics_detects_the_held_out_digit(digits, record_property):
    session, _ = digits
    test = load_digits_split("test")
    prediction = session.predict(test.images)
    metrics = ood_metrics(prediction.scores[test.labels != 9], prediction.scores[test.labels == 9])
    record_property("auroc_per_sample", metrics["auroc"])
    # Measured 0.995 on this 8-epoch classifier (MSP in the committed digits evaluate: 0.981).
    assert metrics["auroc"] >= 0.95
    assert session.memory.stats is not None and session.memory.stats.shape == (session.memory.budget, 192)


def test_statistics_survive_save_and_load_with_pending_batches(digits, tmp_path):
    session, stream = digits
    session.observe(stream.images[:10])  # below adapt_every: stays pending, with its statistics
    path = tmp_path / "stats.state"
    session.save(path)
    restored = Session.load(path)
    assert restored.stat_layers == LAYERS
    assert restored._pending[0].stats is not None and restored._pending[0].stats.shape == (10, 192)
    np.testing.assert_array_equal(restored.memory.stats, session.memory.stats)
    images = stream.images[-50:]
    np.testing.assert_array_equal(restored.predict(images).scores, session.predict(images).scores)


def test_export_refuses_a_session_whose_heads_read_layer_statistics(digits, tmp_path):
    with pytest.raises(ConfigError, match="statistics of layers"):
        export_session_bundle(digits[0], tmp_path / "bundle", 17)


def test_feature_head_refuses_missing_statistics_and_a_different_width(digits):
    session, _ = digits
    memory = session.memory.observations()
    targets = torch.zeros(len(memory))
    targets[::2] = 1
    head = BinaryHead("feature_head", BinaryHeadConfig(arch="feature_head", epochs=1, layer_stats=LAYERS)).fit(
        memory, targets)
    without = Observations(None, memory.features, memory.logits)
    with pytest.raises(InputError, match="carry none"):
        head.logit(without)
    narrower = Observations(None, memory.features, memory.logits, memory.stats[:, :10])
    with pytest.raises(InputError, match="trained on 265 inputs per sample, got 83"):
        head.logit(narrower)


def test_config_keeps_the_pu_recipe_under_a_partial_section_and_refuses_stats_for_a_pixel_head():
    config = parse_config("detector:\n  pu_head:\n    layer_stats: [stage1]\n")
    assert config.detector.pu_head.arch == "feature_head" and config.detector.pu_head.epochs == 30
    assert config.detector.pu_head.layer_stats == ("stage1",)
    with pytest.raises(ConfigError, match="detector.binary: layer_stats feeds a feature_head"):
        parse_config("detector:\n  binary:\n    layer_stats: [stage1]\n")


def test_memory_stores_statistics_with_the_embeddings_and_restores_them():
    memory = RehearsalMemory(4, "reservoir", None, 0, (3, 2), stats_dim=5)
    rows = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    memory.add(None, np.arange(6) % 3, np.ones((6, 3), np.float32), np.ones((6, 2), np.float32), rows)
    restored = RehearsalMemory.from_state(memory.state_dict())
    np.testing.assert_array_equal(restored.stats, memory.stats)
    assert memory.observations().stats.shape == (4, 5)
    assert memory.nbytes == RehearsalMemory(4, "reservoir", None, 0, (3, 2)).nbytes + 4 * 5 * 4
    with pytest.raises(InputError, match="needs stats"):
        memory.add(None, np.zeros(1, np.int64), np.ones((1, 3), np.float32), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="embedding_dims"):
        RehearsalMemory(4, "reservoir", (8, 8, 1), 0, None, stats_dim=5)
