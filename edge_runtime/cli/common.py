"""Arguments and set-up shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from edge_runtime.config import RunConfig, load_config, with_overrides
from edge_runtime.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def add_run_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """--config, --set, --out and --no-progress, the arguments every measuring command takes."""
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="YAML run config" + (f" (default: {default_config})" if default_config else ""))
    add_output_arguments(parser)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--set, --out and --no-progress, for commands whose config may come from elsewhere than --config."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable; VALUE is YAML)")
    parser.add_argument("--out", required=True, help="directory receiving result.json, plots and state")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_classifier_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--classifier: a saved frozen classifier to use; optional where the command can train one."""
    parser.add_argument("--classifier", required=required,
                        help="classifier.safetensors from `edge-runtime train`" + ("" if required else " (default: train one now)"))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Load --config and apply every --set KEY=VALUE."""
    config = load_config(args.config)
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from exc
    return with_overrides(config, overrides) if overrides else config
