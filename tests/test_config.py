"""Config loading: every shipped config validates, and bad input names the key at fault."""

from pathlib import Path

import pytest

from edge_runtime.config import RunConfig, load_config, parse_config, with_overrides
from edge_runtime.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), RunConfig)


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"digits.yaml", "cifar10.yaml"}


def test_empty_document_gives_defaults():
    assert parse_config("") == RunConfig()


@pytest.mark.parametrize("text, fragments", [
    ("memory: {budget: 0}", ["memory.budget", "greater than 0"]),
    ("data: {dataset: cifar10, novel_class: dragon}", ["novel_class 'dragon'", "airplane", "truck"]),
    ("data: {novel_class: cat}", ["not a class of digits", "0, 1, 2"]),
    ("data: {foo: 1}", ["unknown key 'data.foo'", "novel_class"]),
    ("trian: {epochs: 3}", ["unknown key 'trian'", "train"]),
    ("train: {schedule: linear}", ["train.schedule", "'onecycle'", "'cosine'", "'linear'"]),
    ("train: {epochs: three}", ["train.epochs", "integer"]),
    ("detector: {target_fpr: 1.5}", ["detector.target_fpr", "less than 1"]),
    ("model: {arch: custom}", ["factory"]),
    ("ood_sets: [{dataset: mnist, bogus: 1}]", ["ood_sets.0.bogus", "limit"]),
    ("[1, 2]", ["top level must be a mapping"]),
    ("data: [", ["invalid YAML"]),
])
def test_bad_config_is_a_clear_error(text, fragments):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, origin="bad.yaml")
    message = str(caught.value)
    assert message.startswith("bad.yaml: ")
    for fragment in fragments:
        assert fragment in message


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_overrides_are_revalidated():
    config = with_overrides(RunConfig(), {"train.epochs": 3, "memory.budget": 1000})
    assert (config.train.epochs, config.memory.budget) == (3, 1000)
    with pytest.raises(ConfigError, match="memory.budget"):
        with_overrides(RunConfig(), {"memory.budget": -5})
    with pytest.raises(ConfigError, match="not a config section"):
        with_overrides(RunConfig(), {"seed.value": 1})
