"""Config loading: every shipped config validates, and bad input names the key at fault."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_runtime.config import (DROCCConfig, MemoryConfig, OODSetConfig, RunConfig, config_from_dict, config_to_dict,
                                 evolve_config, load_config, parse_config, with_overrides)
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
    ("detector: {target_fpr: .nan}", ["detector.target_fpr", "greater than 0", "nan"]),
    ("train: {ema_decay: .nan}", ["train.ema_decay", "nan"]),
    ("train: {epochs: true}", ["train.epochs", "integer", "True"]),
    ("train: {epochs: 3.5}", ["train.epochs", "integer", "3.5"]),
    ("train: {lr: true}", ["train.lr", "number", "True"]),
    ("train: {flip: 1}", ["train.flip", "true or false"]),
    ("data: {path: 5}", ["data.path", "string"]),
    ("model: {in_channels: true}", ["model.in_channels", "1, 3"]),
    ("train: 5", ["train", "mapping"]),
    ("ood_sets: [{path: x}]", ["ood_sets.0.dataset", "missing"]),
    ("data: {novel_condition: {kind: haze, level: 9}}", ["data.novel_condition.level", "less than or equal to 5"]),
    ("model: {arch: custom}", ["factory"]),
    ("detector: {ssl_mode: woods, pu_head: {arch: paper_cnn}}", ["ssl_mode 'woods'", "feature_head", "paper_cnn"]),
    ("detector: {pu_extra_rounds: [woods], pu_head: {arch: paper_cnn}}", ["pu_extra_rounds 'woods'", "paper_cnn"]),
    ("detector: {pu_extra_rounds: [sal, drocc]}", ["detector.pu_extra_rounds", "'sal', 'woods'", "drocc"]),
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


def test_float_fields_take_ints_and_yaml_exponents_as_floats():
    config = parse_config("train: {lr: 1, weight_decay: 1e-4}\ndetector: {ridge: 0}")
    assert (config.train.lr, config.train.weight_decay, config.detector.ridge) == (1.0, 1e-4, 0.0)
    assert all(type(value) is float for value in (config.train.lr, config.train.weight_decay, config.detector.ridge))


def test_int_fields_take_integral_floats():
    config = parse_config("train: {epochs: 3.0}")
    assert config.train.epochs == 3 and type(config.train.epochs) is int


def test_evolve_config_validates_the_change():
    assert evolve_config(MemoryConfig(), budget=7) == MemoryConfig(budget=7)
    with pytest.raises(ConfigError, match="budget: must be greater than 0"):
        evolve_config(MemoryConfig(), budget=-5)
    with pytest.raises(ConfigError, match="policy"):
        evolve_config(MemoryConfig(), policy="fifo")
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        evolve_config(MemoryConfig(), bogus=1)


def test_evolve_config_takes_built_sections_and_mappings():
    config = evolve_config(RunConfig(), memory=MemoryConfig(budget=7), ood_sets=[{"dataset": "mnist"}])
    assert config.memory.budget == 7 and config.ood_sets == (OODSetConfig(dataset="mnist"),)
    with pytest.raises(ConfigError, match="ood_sets.0.limit"):
        evolve_config(RunConfig(), ood_sets=[{"dataset": "mnist", "limit": 0}])


def test_sections_refuse_bad_values_when_built_directly():
    with pytest.raises(ConfigError, match="budget: must be an integer"):
        MemoryConfig(budget=True)
    with pytest.raises(ConfigError, match="policy: must be one of"):
        MemoryConfig(policy="fifo")
    with pytest.raises(ConfigError, match="ce_epochs"):
        DROCCConfig(ce_epochs=40)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_to_dict_round_trips(path):
    config = load_config(path)
    assert config_from_dict(config_to_dict(config)) == config
    assert parse_config(yaml.safe_dump(config_to_dict(config))) == config
    json.dumps(config_to_dict(config))


def test_config_imports_without_pydantic():
    code = ("import sys; sys.modules['pydantic'] = None\n"
            "import edge_runtime.config, edge_runtime.session, edge_runtime.cli.main")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
