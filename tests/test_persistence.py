"""The saved frozen classifier: round trip, and refusal of foreign, corrupt or mismatched files."""

import pytest
import torch

from classifier_fixture import known_digits
from edge_runtime.config import ModelConfig, evolve_config
from edge_runtime.data.transforms import to_tensor
from edge_runtime.errors import StateError
from edge_runtime.models.persistence import load_classifier, save_classifier
from edge_runtime.models.registry import build_classifier
from edge_runtime.training.trainer import compute_mean_std

CFG = ModelConfig(arch="small_cnn", input_size=8, in_channels=1, width=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_train):
    known, _ = known_digits(digits_train)
    torch.manual_seed(0)
    classifier = build_classifier(CFG, 9, *compute_mean_std(known)).eval()
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    save_classifier(path, classifier, CFG, known.classes)
    return path, classifier, known


def test_round_trip_gives_identical_outputs(saved):
    path, classifier, known = saved
    loaded, classes = load_classifier(path, CFG)
    x = to_tensor(known.images[:32])
    assert classes == known.classes
    torch.testing.assert_close(loaded(x), classifier(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.network[0].mean, classifier.network[0].mean)


def test_other_architecture_is_refused(saved):
    with pytest.raises(StateError, match="model config"):
        load_classifier(saved[0], evolve_config(CFG, width=16))


def test_mirror_averaging_is_how_weights_are_read_not_what_they_are(saved):
    """A classifier saved without mirror averaging serves a config that turns it on, and mirrors."""
    path, classifier, known = saved
    loaded, _ = load_classifier(path, evolve_config(CFG, mirror_average=True))
    x = to_tensor(known.images[:32])
    assert loaded.mirror_average
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x)[1], (classifier(x) + classifier(x.flip(3))) / 2)


def test_shift_averaging_is_how_weights_are_read_not_what_they_are(saved):
    """Likewise for shifted views: the saved weights serve a config that reads three views."""
    path, classifier, known = saved
    loaded, _ = load_classifier(path, evolve_config(CFG, shift_average=1))
    x = to_tensor(known.images[:32])
    assert loaded.view_count == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x)[1], classifier.embed(loaded.views(x))[1].unflatten(0, (3, -1)).mean(0))


def _with_model_metadata(saved_path, path, model_json: str):
    """A copy of the saved classifier whose stored model config is `model_json`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(saved_path, "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    save_file(tensors, path, metadata={**metadata, "model": model_json})
    return path


def test_file_written_by_the_pydantic_era_still_loads(saved, tmp_path):
    # what pydantic's model_dump_json wrote: compact separators, every field
    old = _with_model_metadata(saved[0], tmp_path / "old.safetensors", '{"arch":"small_cnn","input_size":8,'
                               '"in_channels":1,"width":8,"factory":null,"final_layer":"fc"}')
    assert load_classifier(old, CFG)[1] == saved[2].classes


def test_unreadable_model_config_is_refused(saved, tmp_path):
    broken = _with_model_metadata(saved[0], tmp_path / "broken.safetensors", '{"arch": "small_cnn", "width": "wide"}')
    with pytest.raises(StateError, match="broken.safetensors.*model config.*width"):
        load_classifier(broken, CFG)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_is_refused(saved, tmp_path, damage):
    blob = saved[0].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes({"truncate": blob[: len(blob) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    with pytest.raises(StateError, match="broken.safetensors"):
        load_classifier(broken, CFG)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign, metadata={"format": "something.else"})
    with pytest.raises(StateError, match="not an edge_runtime classifier"):
        load_classifier(foreign, CFG)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(StateError, match="nothing.safetensors"):
        load_classifier(tmp_path / "nothing.safetensors", CFG)
