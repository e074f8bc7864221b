"""The one entry point that turns a catalog name and a split into an in-memory ImageSet.

Which reader runs follows from the data set and what `path` holds: torchvision's CIFAR-10 batches,
IDX files (MNIST, Fashion-MNIST), or an ImageFolder-shaped directory or tarball. Tarballs are
decoded once and then served from the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.cache import cache_key, load_or_build
from edge_runtime.data.catalog import CATALOG, DatasetInfo
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.idx import read_idx_split
from edge_runtime.data.image_folder import is_tarball, read_image_folder
from edge_runtime.data.torchvision_formats import find_cifar_batches, find_idx_folder, read_cifar_batches
from edge_runtime.errors import DataError

DEFAULT_CACHE_DIR = ".cache/edge_runtime"
_IDX_DATASETS = ("mnist", "fashion_mnist")


def load_split(dataset: str, split: str, path: str | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
               limit_per_class: int | None = None, progress: bool = True) -> ImageSet:
    """Load `split` of the catalog data set `dataset` as uint8 [N, H, W, C] images.

    `path` overrides the catalog's default location; `limit_per_class` keeps the first N images of
    each class (file order for arrays, member-name order for image folders), for quick runs.
    """
    if dataset not in CATALOG:
        raise DataError(f"unknown data set {dataset!r}; known: {', '.join(CATALOG)}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be a positive integer or None, got {limit_per_class}")
    info = CATALOG[dataset]
    name = f"{dataset}-{split}"
    if dataset == "digits":
        if path is not None:
            raise DataError(f"digits ships with scikit-learn and takes no path (got {path!r})")
        return _first_per_class(load_digits_split(split), limit_per_class)
    source = _existing_source(info, path)
    if dataset == "cifar10" and (batches := find_cifar_batches(source)) is not None:
        return _first_per_class(read_cifar_batches(batches, split, info.classes, name), limit_per_class)
    if dataset in _IDX_DATASETS and (idx_folder := find_idx_folder(source, dataset)) is not None:
        return _first_per_class(read_idx_split(idx_folder, split, info.classes, name), limit_per_class)
    # image_folder's catalog channel count is only a default for models, not a fact about the files.
    channels = None if dataset == "image_folder" else info.channels

    def decode() -> ImageSet:
        return read_image_folder(source, split, info.classes, channels, limit_per_class, name, progress)

    if not is_tarball(source):
        return decode()  # a directory's mtime does not follow edits to its files, so it is not cached
    return load_or_build(cache_dir, cache_key(source, dataset, split, limit_per_class), decode)


def _existing_source(info: DatasetInfo, path: str | None) -> Path:
    """`path`, else the catalog default; a missing one is a DataError that says how to get it."""
    source = Path(path).expanduser() if path is not None else info.default_path
    if source is None:
        raise DataError(f"{info.name} needs a path: {info.how_to_get}")
    if not source.exists():
        raise DataError(f"{info.name}: {source} does not exist; {info.how_to_get}")
    return source


def _first_per_class(data: ImageSet, limit: int | None) -> ImageSet:
    """The first `limit` images of each label, in their original order."""
    if limit is None:
        return data
    keep = np.zeros(len(data), dtype=bool)
    for label in np.unique(data.labels):
        keep[np.flatnonzero(data.labels == label)[:limit]] = True
    return data.subset(keep)
