"""Training the frozen classifier on real digits: accuracy, augmentation, checkpoints and resume."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from classifier_fixture import known_digits

from edge_runtime.config import ModelConfig, TrainConfig, evolve_config
from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import ConfigError, DataError, StateError
from edge_runtime.models.base import FrozenClassifier
from edge_runtime.models.registry import build_classifier
from edge_runtime.training import trainer
from edge_runtime.training.augment import augment_batch, random_flip, random_rotation, random_translate
from edge_runtime.training.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from edge_runtime.training.rotation_auxiliary import RotationAuxiliary
from edge_runtime.training.trainer import (compute_mean_std, evaluate_accuracy, predict_logits,
                                           train_classifier)

CPU = torch.device("cpu")
RECIPE = TrainConfig(epochs=6, batch_size=64, lr=0.1, label_smoothing=0.1, flip=False, translate=1)
SHORT = evolve_config(RECIPE, epochs=4, batch_size=128)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def train_set() -> ImageSet:
    """Digits 0-8 of the training split (digit 9 is the novel class and is filtered out)."""
    return known_digits(load_digits_split("train"), novel=9)[0]


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return known_digits(load_digits_split("test"), novel=9)[0]


def _fresh_model(train_set: ImageSet, width: int = 16) -> FrozenClassifier:
    torch.manual_seed(0)
    mean, std = compute_mean_std(train_set)
    return build_classifier(ModelConfig(width=width), 9, mean, std)


def test_mean_std_matches_float64_reference(train_set):
    mean, std = compute_mean_std(train_set)
    pixels = train_set.images.astype(np.float64) / 255.0
    assert mean == pytest.approx([pixels.mean()], rel=1e-9)
    assert std == pytest.approx([pixels.std()], rel=1e-9)


def test_mean_std_rejects_a_constant_channel(train_set):
    blank = ImageSet(np.zeros_like(train_set.images), train_set.labels, train_set.classes, "blank")
    with pytest.raises(DataError, match="blank"):
        compute_mean_std(blank)


def _reflect_padded(images: torch.Tensor, pixels: int) -> torch.Tensor:
    return F.pad(images, (pixels,) * 4, mode="reflect")


def test_translate_crops_every_image_from_its_padded_self(train_set):
    images = to_tensor(train_set.images[:64])
    shifted = random_translate(images, 2, torch.Generator().manual_seed(1))
    padded = _reflect_padded(images, 2)
    offsets = []
    for original, out in zip(padded, shifted):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(original[:, dy:dy + 8, dx:dx + 8], out)]
        assert matches, "output is not a crop of the reflect-padded input"
        offsets.append(matches[0])
    assert len(set(offsets)) > 5
    assert torch.equal(random_translate(images, 0, torch.Generator()), images)


def test_flip_mirrors_about_half_of_the_images(train_set):
    images = to_tensor(train_set.images[:200])
    flipped = random_flip(images, torch.Generator().manual_seed(2))
    mirrored = [torch.equal(f, i.flip(2)) and not torch.equal(f, i) for f, i in zip(flipped, images)]
    kept = [torch.equal(f, i) for f, i in zip(flipped, images)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 60 < sum(mirrored) < 140
    same = augment_batch(images, flip=False, translate=0, generator=torch.Generator())
    assert torch.equal(same, images)


def test_small_cnn_learns_nine_digit_classes(train_set, test_set):
    model = _fresh_model(train_set)
    report = train_classifier(model, train_set, RECIPE, CPU, seed=0, progress=False)
    assert report.epochs_run == 6 and len(report.history) == 6
    assert report.final_loss == report.history[-1] < report.history[0]
    assert not model.training
    assert evaluate_accuracy(model, test_set, CPU) >= 0.9


@pytest.mark.parametrize("mirror_average", [False, True])
def test_accuracy_reads_the_logits_the_runtime_reads(train_set, test_set, mirror_average):
    """Accuracy is measured on `embed`'s logits, so a mirror-averaging classifier is scored mirrored."""
    model = _fresh_model(train_set).eval()
    model.mirror_average = mirror_average
    logits = predict_logits(model, test_set, CPU, batch_size=100)
    with torch.no_grad():
        x = to_tensor(test_set.images)
        reference = (model(x).double() + model(x.flip(3)).double()) / 2 if mirror_average else model(x).double()
    torch.testing.assert_close(logits.double(), reference, atol=1e-5, rtol=1e-5)


def test_accuracy_needs_labels_the_model_knows(train_set, test_set):
    model = _fresh_model(train_set)
    unlabeled = ImageSet(test_set.images, np.full(len(test_set), -1), test_set.classes, "stream")
    with pytest.raises(DataError, match="stream"):
        evaluate_accuracy(model, unlabeled, CPU)


def test_translate_larger_than_the_image_is_a_config_error(train_set):
    with pytest.raises(ConfigError, match="train.translate"):
        train_classifier(_fresh_model(train_set), train_set, evolve_config(SHORT, translate=8), CPU,
                         seed=0, progress=False)


def test_random_rotation_turns_each_image_by_its_drawn_multiple_of_90_degrees(train_set):
    images = to_tensor(train_set.images[:64], CPU)
    turned, turns = random_rotation(images, torch.Generator().manual_seed(0))
    assert set(turns.tolist()) == {0, 1, 2, 3}
    for image, out, k in zip(images, turned, turns.tolist()):
        assert torch.equal(out, torch.rot90(image, k, dims=(1, 2)))


def test_rotation_head_learns_the_turns_beside_the_classes(train_set, test_set, tmp_path):
    model = _fresh_model(train_set)
    path = tmp_path / "rotation.ckpt"
    train_classifier(model, train_set, evolve_config(RECIPE, rotation_weight=0.5), CPU, seed=0,
                     checkpoint=path, progress=False)
    assert evaluate_accuracy(model, test_set, CPU) >= 0.9  # the class task still learns
    auxiliary = RotationAuxiliary(model.feature_dim, 0.5)
    auxiliary.load_state_dict(load_checkpoint(path).auxiliary)
    turned, turns = random_rotation(to_tensor(test_set.images, CPU), torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, _ = model.embed(turned)
        predicted = auxiliary.head(features).argmax(1)
    # Measured 0.74 on the turned test digits after 6 epochs (chance 0.25; a half-turned 0 or 8 looks upright).
    assert float((predicted == turns).double().mean()) >= 0.6
    assert set(model.state_dict()) == set(_fresh_model(train_set).state_dict())  # the head is not saved with it


def test_rotation_task_refuses_images_that_are_not_square(train_set):
    wide = ImageSet(train_set.images[:, :6], train_set.labels, train_set.classes, "cropped digits")
    with pytest.raises(ConfigError, match="rotation_weight needs square images.*6x8"):
        train_classifier(_fresh_model(train_set), wide, evolve_config(SHORT, rotation_weight=0.5), CPU,
                         seed=0, progress=False)


def _interrupt_at_batch(monkeypatch, batch_number: int) -> None:
    """Send Ctrl-C (a real SIGINT) while the given batch is being augmented."""
    calls = {"n": 0}

    def augment_and_maybe_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == batch_number:
            signal.raise_signal(signal.SIGINT)
        return augment_batch(*args, **kwargs)

    monkeypatch.setattr(trainer, "augment_batch", augment_and_maybe_interrupt)


@pytest.mark.parametrize("stop_after_batches, saved_at, ema_decay, rotation_weight", [
    (2 * 8, (1, 8), None, 0.0),  # Ctrl-C in the last batch of epoch 2: the 2 + 2 epochs case
    (8 + 3, (1, 3), 0.9, 0.0),  # Ctrl-C in the middle of epoch 2, with a weight average
    (8 + 5, (1, 5), None, 0.5),  # with the auxiliary rotation head (its weights and draws resume too)
])
def test_resume_after_ctrl_c_gives_the_uninterrupted_weights(train_set, tmp_path, monkeypatch,
                                                             stop_after_batches, saved_at, ema_decay, rotation_weight):
    cfg = evolve_config(SHORT, ema_decay=ema_decay, rotation_weight=rotation_weight)  # 1132 // 128 = 8 batches an epoch
    reference = _fresh_model(train_set)
    full = train_classifier(reference, train_set, cfg, CPU, seed=3, progress=False)

    path = tmp_path / "run.ckpt"
    with monkeypatch.context() as patch:
        _interrupt_at_batch(patch, stop_after_batches)
        with pytest.raises(KeyboardInterrupt):
            train_classifier(_fresh_model(train_set), train_set, cfg, CPU, seed=3, checkpoint=path, progress=False)
    saved = load_checkpoint(path)
    assert (saved.epoch, saved.step) == saved_at
    assert (saved.auxiliary is None) == (rotation_weight == 0)

    resumed = _fresh_model(train_set)
    report = train_classifier(resumed, train_set, cfg, CPU, seed=3, checkpoint=path, resume=True, progress=False)
    assert report.epochs_run == 4 - saved.epoch and report.history == full.history
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_ema_weights_are_returned_and_raw_weights_checkpointed(train_set, test_set, tmp_path):
    model = _fresh_model(train_set)
    path = tmp_path / "ema.ckpt"
    train_classifier(model, train_set, evolve_config(SHORT, ema_decay=0.95), CPU, seed=0,
                     checkpoint=path, progress=False)
    saved = load_checkpoint(path)
    returned = model.state_dict()
    assert all(torch.equal(returned[k], v) for k, v in saved.ema.items())
    assert not torch.equal(returned["network.fc.weight"], saved.model["network.fc.weight"])
    assert evaluate_accuracy(model, test_set, CPU) >= 0.9


def test_checkpoint_round_trip(train_set, tmp_path):
    model = _fresh_model(train_set)
    path = tmp_path / "one.ckpt"
    train_classifier(model, train_set, evolve_config(SHORT, epochs=1), CPU, seed=0, checkpoint=path, progress=False)
    saved = load_checkpoint(path)
    assert (saved.epoch, saved.step, saved.order, saved.ema, saved.auxiliary) == (1, 0, None, None, None)
    assert saved.config["train.epochs"] == 1 and saved.config["seed"] == 0
    assert saved.model.keys() == model.state_dict().keys()
    assert all(torch.equal(saved.model[k], v) for k, v in model.state_dict().items())
    copy = tmp_path / "copy.ckpt"
    save_checkpoint(copy, saved)
    again = load_checkpoint(copy)
    assert again.history == saved.history and torch.equal(again.rng, saved.rng)


@pytest.fixture()
def good_checkpoint(train_set, tmp_path) -> Path:
    path = tmp_path / "good.ckpt"
    train_classifier(_fresh_model(train_set), train_set, evolve_config(SHORT, epochs=1), CPU, seed=0,
                     checkpoint=path, progress=False)
    return path


def test_damaged_or_foreign_files_raise_state_error_and_stay_untouched(good_checkpoint, tmp_path, train_set):
    data = good_checkpoint.read_bytes()
    foreign_torch = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, foreign_torch)
    old_version = tmp_path / "old.ckpt"
    raw = torch.load(good_checkpoint, weights_only=True)
    raw["edge_runtime_checkpoint_version"] = FORMAT_VERSION + 1
    torch.save(raw, old_version)
    cases = {"truncated.ckpt": data[: len(data) // 2], "garbage.ckpt": b"not a checkpoint at all", "empty.ckpt": b""}
    paths = [foreign_torch, old_version]
    for name, content in cases.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(content)
    for path in paths:
        before = path.read_bytes()
        with pytest.raises(StateError, match=path.name):
            load_checkpoint(path)
        with pytest.raises(StateError, match=path.name):
            train_classifier(_fresh_model(train_set), train_set, SHORT, CPU, seed=0, checkpoint=path,
                             resume=True, progress=False)
        assert path.read_bytes() == before


def test_failed_save_keeps_the_previous_checkpoint(good_checkpoint, monkeypatch):
    before = good_checkpoint.read_bytes()
    saved = load_checkpoint(good_checkpoint)
    saved.epoch = 99

    def refuse(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("edge_runtime.atomic.os.replace", refuse)
    with pytest.raises(StateError, match="good.ckpt"):
        save_checkpoint(good_checkpoint, saved)
    assert good_checkpoint.read_bytes() == before
    assert sorted(p.name for p in good_checkpoint.parent.iterdir()) == ["good.ckpt"]


def test_resume_refuses_a_checkpoint_from_another_recipe(good_checkpoint, train_set):
    other = evolve_config(SHORT, epochs=1, lr=0.2)
    with pytest.raises(StateError, match=r"train.lr 0.1 -> 0.2"):
        train_classifier(_fresh_model(train_set), train_set, other, CPU, seed=0, checkpoint=good_checkpoint,
                         resume=True, progress=False)
