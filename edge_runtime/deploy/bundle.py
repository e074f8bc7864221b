"""The export bundle: everything a torch-free runner needs, in one directory.

    model.onnx          the frozen classifier, [0,1] NCHW pixels -> (features, logits)
    stats.safetensors   what decides: the IDD gradient statistics (class means [C, K], tied
                        precision [K, K]) or the weights of a session's feature heads
    manifest.json       format version, producer versions, input geometry, classes, which score
                        decides ("decision") and its threshold, and the sha256 of both files

Two decisions exist: `gradient_mahalanobis` (the score of the statistics, as `export` fits them or
a session's static head holds them) and `feature_heads` (the mean logit of a session's memory_pu
heads: small MLPs on [features, log-softmax(logits)], what an adapted session decides with).

The manifest is written last, so a bundle cut short by a crash is refused rather than half-read.
Torch-free on purpose (numpy, safetensors, json): this module is what a firmware process imports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from edge_runtime import __version__
from edge_runtime.atomic import write_bytes_atomic, write_text_atomic
from edge_runtime.errors import InputError, StateError

if TYPE_CHECKING:
    from calibration.gaussian import TiedGaussian

FORMAT = "edge_runtime.deploy_bundle"
FORMAT_VERSION = 2
DECISIONS = ("gradient_mahalanobis", "feature_heads")
HEAD_ARRAYS = ("mean", "std", "w1", "b1", "w2", "b2")
MODEL_FILE = "model.onnx"
STATS_FILE = "stats.safetensors"
MANIFEST_FILE = "manifest.json"
SITE = "last_linear"
INPUT_NAME = "images"
OUTPUT_NAMES = ("features", "logits")
_PRODUCER_PACKAGES = ("torch", "onnx", "numpy", "safetensors")


@dataclass(frozen=True)
class FeatureHeadWeights:
    """One memory_pu head: logit = w2 . relu(w1 ((x - mean) / std) + b1) + b2, x = [features, log-softmax(logits)].

    float32: mean, std [I]; w1 [H, I]; b1 [H]; w2 [1, H]; b2 [1].
    """

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def check(self, in_dim: int, origin: str) -> None:
        hidden = self.w1.shape[0] if self.w1.ndim == 2 else -1
        expected = {"mean": (in_dim,), "std": (in_dim,), "w1": (hidden, in_dim), "b1": (hidden,), "w2": (1, hidden),
                    "b2": (1,)}
        wrong = [f"{name} {getattr(self, name).shape}" for name, shape in expected.items()
                 if getattr(self, name).shape != shape]
        if hidden < 1 or wrong:
            raise StateError(f"{origin}: feature head arrays do not fit inputs of {in_dim} values: {', '.join(wrong)}")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: checksums matched, shapes consistent, threshold finite."""

    root: Path
    classes: tuple[str, ...]
    input_size: int
    in_channels: int
    threshold: float  # of the deciding score (`decision`)
    means: np.ndarray | None  # float32 [C, K], K = C * (D + 1); decision "gradient_mahalanobis" only
    precision: np.ndarray | None  # float32 [K, K]; likewise
    heads: tuple[FeatureHeadWeights, ...]  # decision "feature_heads" only
    manifest: dict[str, Any]

    @property
    def decision(self) -> str:
        return self.manifest["decision"]

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def model_sha256(self) -> str:
        return self.manifest["files"][MODEL_FILE]["sha256"]

    @property
    def novel_label(self) -> int:
        """The label given to inputs judged novel: one past the known classes (the '+1')."""
        return len(self.classes)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_bundle(out_dir: str | os.PathLike, onnx_path: str | os.PathLike, threshold: float, classes: Sequence[str],
                  input_size: int, in_channels: int, gaussian: TiedGaussian | None = None,
                  heads: Sequence[FeatureHeadWeights] = ()) -> Bundle:
    """Write a bundle into `out_dir` (created) from an exported ONNX graph and what decides novelty.

    Exactly one of: `gaussian`, fitted at the last-linear gradient site of the same classifier
    (its score decides), or `heads`, a session's memory_pu feature heads (their mean logit
    decides). `threshold` is on the deciding score; `classes` are the known classes in label order.
    """
    root = Path(out_dir)
    classes = tuple(classes)
    if (gaussian is None) == (not heads):
        raise InputError("a bundle decides with either gradient statistics or feature heads: give exactly one")
    if not math.isfinite(threshold):
        raise InputError(f"threshold must be finite, got {threshold}")
    if gaussian is not None:
        arrays = {"means": gaussian.means.detach().cpu().float().numpy(),
                  "precision": gaussian.precision.detach().cpu().float().numpy()}
        _check_gaussian(arrays["means"], arrays["precision"], len(classes), "gaussian")
        stats = {"method": gaussian.method, "inverse": gaussian.inverse, "dim": int(arrays["means"].shape[1])}
    else:
        arrays = {}
        for index, head in enumerate(heads):
            head.check(heads[0].mean.shape[0], f"feature head {index}")
            arrays.update({f"head.{index}.{name}": np.ascontiguousarray(getattr(head, name), dtype=np.float32)
                           for name in HEAD_ARRAYS})
        stats = {"heads": len(heads), "in_dim": int(heads[0].mean.shape[0])}
    model_target = root / MODEL_FILE
    if Path(onnx_path).resolve() != model_target.resolve():
        write_bytes_atomic(model_target, Path(onnx_path).read_bytes())
    write_bytes_atomic(root / STATS_FILE, save_arrays(arrays, metadata={"format": FORMAT}))
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "producer": {"edge_runtime": __version__, **_installed_versions(_PRODUCER_PACKAGES)},
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0],
                  "channels": in_channels, "size": input_size},
        "outputs": list(OUTPUT_NAMES),
        "classes": list(classes),
        "site": SITE,
        "label_rule": "predicted",
        "decision": DECISIONS[0] if gaussian is not None else DECISIONS[1],
        "threshold": float(threshold),
        "statistics": stats,
        "files": {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
                  for name in (MODEL_FILE, STATS_FILE)},
    }
    write_text_atomic(root / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return load_bundle(root)


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read and verify a bundle; anything missing, altered, foreign or inconsistent is a StateError."""
    root = Path(path)
    manifest = _read_manifest(root / MANIFEST_FILE)
    for name in (MODEL_FILE, STATS_FILE):
        _verify_file(root, name, manifest)
    classes = tuple(manifest["classes"])
    means = precision = None
    heads: tuple[FeatureHeadWeights, ...] = ()
    try:
        arrays = load_arrays((root / STATS_FILE).read_bytes())
        if manifest["decision"] == DECISIONS[0]:
            means = arrays["means"].astype(np.float32, copy=False)
            precision = arrays["precision"].astype(np.float32, copy=False)
        else:
            heads = tuple(FeatureHeadWeights(**{name: arrays[f"head.{index}.{name}"] for name in HEAD_ARRAYS})
                          for index in range(int(manifest["statistics"]["heads"])))
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise StateError(f"{root / STATS_FILE}: not a readable statistics file ({exc})") from exc
    if means is not None:
        _check_gaussian(means, precision, len(classes), str(root / STATS_FILE), StateError)
    elif not heads:
        raise StateError(f"{root / MANIFEST_FILE}: decision {DECISIONS[1]!r} but no feature head")
    for index, head in enumerate(heads):
        head.check(heads[0].mean.shape[0], f"{root / STATS_FILE} head {index}")
    threshold = manifest["threshold"]
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise StateError(f"{root / MANIFEST_FILE}: threshold must be a finite number, got {threshold!r}")
    geometry = manifest["input"]
    return Bundle(root, classes, int(geometry["size"]), int(geometry["channels"]), float(threshold),
                  means, precision, heads, manifest)


def _check_gaussian(means: np.ndarray, precision: np.ndarray, num_classes: int, origin: str,
                    error: type[Exception] = InputError) -> None:
    """Means [C, K] and precision [K, K] with K = C * (D + 1): the last-linear site's layout."""
    dim = means.shape[1] if means.ndim == 2 else -1
    if means.shape[0] != num_classes or dim % num_classes or precision.shape != (dim, dim):
        raise error(f"{origin}: means {means.shape} and precision {precision.shape} do not fit {num_classes} "
                    f"classes at the last-linear site (K must be C * (D + 1))")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StateError(f"cannot read bundle manifest {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateError(f"{path} is not an edge_runtime deploy bundle manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise StateError(f"{path} has bundle format version {manifest.get('version')!r}; "
                         f"this runtime reads {FORMAT_VERSION}")
    missing = [key for key in ("classes", "threshold", "input", "files", "site", "decision", "statistics")
               if key not in manifest]
    if missing:
        raise StateError(f"{path} lacks {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["input"], dict):
        raise StateError(f"{path}: 'files' and 'input' must be mappings")
    if manifest["decision"] not in DECISIONS:
        raise StateError(f"{path}: decision {manifest['decision']!r} is not one of {DECISIONS}")
    if manifest["site"] != SITE:
        raise StateError(f"{path}: gradient site {manifest['site']!r} is not supported by the runner (only {SITE!r})")
    return manifest


def _verify_file(root: Path, name: str, manifest: dict[str, Any]) -> None:
    expected = manifest["files"].get(name, {}).get("sha256")
    if not (root / name).is_file():
        raise StateError(f"bundle file {root / name} is missing")
    actual = sha256_file(root / name)
    if actual != expected:
        raise StateError(f"bundle file {root / name} has sha256 {actual}, the manifest expects {expected}")


def _installed_versions(packages: Sequence[str]) -> dict[str, str]:
    """Versions from package metadata, without importing the packages (torch stays out of this module)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
