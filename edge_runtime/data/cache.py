"""Decoded data sets kept on disk as .npz, so a tarball is decoded once, not on every run.

The key covers everything the decoded arrays depend on (the source file's identity, size and
mtime, the data set, split, per-class limit and LOADER_VERSION), so a changed source or loader
never serves stale arrays. A cache file that cannot be read is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.atomic import write_bytes_atomic
from edge_runtime.data.arrays import ImageSet
from edge_runtime.errors import DataError

LOADER_VERSION = 1  # bump whenever decoding changes what arrays a source yields


def cache_key(source: Path, dataset: str, split: str, limit_per_class: int | None) -> str:
    """A readable, collision-safe file stem such as 'cifar10-train-<24 hex digits>'."""
    resolved = source.resolve()
    stat = resolved.stat()
    facts = {"source": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dataset": dataset,
             "split": split, "limit_per_class": limit_per_class, "loader_version": LOADER_VERSION}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    return f"{dataset}-{split}-{digest}"


def cache_path(cache_dir: str | Path, key: str) -> Path:
    """Where the arrays for `key` live."""
    return Path(cache_dir) / f"{key}.npz"


def load_or_build(cache_dir: str | Path, key: str, build: Callable[[], ImageSet]) -> ImageSet:
    """The cached ImageSet for `key`, or `build()`'s result, written atomically for next time."""
    path = cache_path(cache_dir, key)
    cached = _read(path)
    if cached is not None:
        return cached
    data = build()
    buffer = io.BytesIO()
    np.savez(buffer, images=data.images, labels=data.labels,
             classes=np.array(data.classes, dtype=str), name=np.array(data.name))
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as exc:
        raise DataError(f"cannot write data cache {path}: {exc}; point cache_dir at a writable folder") from exc
    return data


def _read(path: Path) -> ImageSet | None:
    """The ImageSet stored at `path`, or None when it is absent, truncated or malformed."""
    if not path.is_file():
        return None
    try:
        # Opened here, not by np.load, so the handle is closed even when the archive is corrupt.
        with path.open("rb") as handle:
            archive = np.load(handle, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                return None
            with archive:
                labels = archive["labels"]
                classes = tuple(str(name) for name in archive["classes"])
                data = ImageSet(archive["images"], labels, classes, str(archive["name"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return data if labels.dtype == np.int64 else None
