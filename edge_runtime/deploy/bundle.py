"""The export bundle: everything a torch-free runner needs, in one directory.

    model.onnx          the frozen classifier, [0,1] NCHW pixels -> (features, logits)
    stats.safetensors   the IDD gradient statistics: class means [C, K] and tied precision [K, K]
    manifest.json       format version, producer versions, input geometry, classes, threshold,
                        and the sha256 of both files

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
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
STATS_FILE = "stats.safetensors"
MANIFEST_FILE = "manifest.json"
SITE = "last_linear"
INPUT_NAME = "images"
OUTPUT_NAMES = ("features", "logits")
_PRODUCER_PACKAGES = ("torch", "onnx", "numpy", "safetensors")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: checksums matched, shapes consistent, threshold finite."""

    root: Path
    classes: tuple[str, ...]
    input_size: int
    in_channels: int
    threshold: float
    means: np.ndarray  # float32 [C, K], K = C * (D + 1)
    precision: np.ndarray  # float32 [K, K]
    manifest: dict[str, Any]

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


def export_bundle(out_dir: str | os.PathLike, onnx_path: str | os.PathLike, gaussian: TiedGaussian,
                  threshold: float, classes: Sequence[str], input_size: int, in_channels: int) -> Bundle:
    """Write a bundle into `out_dir` (created) from an exported ONNX graph and a fitted gradient Gaussian.

    `gaussian` must be fitted at the last-linear gradient site of the same classifier, `threshold`
    on its scores (novel when score > threshold); `classes` are the known classes in label order.
    """
    root = Path(out_dir)
    classes = tuple(classes)
    means = gaussian.means.detach().cpu().float().numpy()
    precision = gaussian.precision.detach().cpu().float().numpy()
    if means.shape[0] != len(classes) or means.shape[1] % len(classes):
        raise InputError(f"gaussian means {means.shape} do not fit {len(classes)} classes at the last-linear site "
                         f"(K must be C * (D + 1))")
    if not math.isfinite(threshold):
        raise InputError(f"threshold must be finite, got {threshold}")
    model_target = root / MODEL_FILE
    if Path(onnx_path).resolve() != model_target.resolve():
        write_bytes_atomic(model_target, Path(onnx_path).read_bytes())
    stats_metadata = {"format": FORMAT, "method": gaussian.method, "inverse": gaussian.inverse}
    write_bytes_atomic(root / STATS_FILE, save_arrays({"means": means, "precision": precision}, metadata=stats_metadata))
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
        "threshold": float(threshold),
        "gaussian": {"method": gaussian.method, "inverse": gaussian.inverse, "dim": int(means.shape[1])},
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
    try:
        arrays = load_arrays((root / STATS_FILE).read_bytes())
        means, precision = arrays["means"], arrays["precision"]
    except (SafetensorError, KeyError) as exc:
        raise StateError(f"{root / STATS_FILE}: not a readable statistics file ({exc})") from exc
    classes = tuple(manifest["classes"])
    dim = means.shape[1] if means.ndim == 2 else -1
    if means.shape[0] != len(classes) or dim % len(classes) or precision.shape != (dim, dim):
        raise StateError(f"{root / STATS_FILE}: means {means.shape} and precision {precision.shape} do not fit "
                         f"{len(classes)} classes at the last-linear site")
    threshold = manifest["threshold"]
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise StateError(f"{root / MANIFEST_FILE}: threshold must be a finite number, got {threshold!r}")
    geometry = manifest["input"]
    return Bundle(root, classes, int(geometry["size"]), int(geometry["channels"]), float(threshold),
                  means.astype(np.float32, copy=False), precision.astype(np.float32, copy=False), manifest)


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
    missing = [key for key in ("classes", "threshold", "input", "files", "site") if key not in manifest]
    if missing:
        raise StateError(f"{path} lacks {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["input"], dict):
        raise StateError(f"{path}: 'files' and 'input' must be mappings")
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
