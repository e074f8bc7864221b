"""IDX files (MNIST, Fashion-MNIST): a small big-endian header, then raw values, gzipped or not.

MNIST's and Fashion-MNIST's canonical releases, Debian's dataset-fashion-mnist package and
torchvision's `raw/` folders all hold the same four files, so one reader serves all of them.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from edge_runtime.data.arrays import ImageSet
from edge_runtime.errors import DataError

SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (gzip detected from its first bytes, not its name)."""
    try:
        raw = path.read_bytes()
        if raw.startswith(_GZIP_MAGIC):
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: IDX header truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataError(f"{path}: IDX header promises shape {shape} ({expected} bytes), file holds {len(raw) - header_size}")
    # bytearray makes the array writable, so torch.from_numpy can use it without a copy warning.
    return np.frombuffer(bytearray(raw[header_size:]), dtype=dtype).reshape(shape)


def find_idx_file(folder: Path, split: str, kind: str) -> Path | None:
    """`train-images-idx3-ubyte` and friends, gzipped or not; `kind` is 'images' or 'labels'."""
    dims = 3 if kind == "images" else 1
    for suffix in ("", ".gz"):
        candidate = folder / f"{SPLIT_PREFIXES[split]}-{kind}-idx{dims}-ubyte{suffix}"
        if candidate.is_file():
            return candidate
    return None


def has_idx_files(folder: Path) -> bool:
    """Whether `folder` holds the images file of at least one split."""
    return folder.is_dir() and any(find_idx_file(folder, split, "images") for split in SPLIT_PREFIXES)


def read_idx_split(folder: Path, split: str, classes: tuple[str, ...], name: str) -> ImageSet:
    """One split of an IDX data set as uint8 [N, 28, 28, 1] with labels indexing `classes`."""
    if split not in SPLIT_PREFIXES:
        raise DataError(f"{name}: IDX data sets have splits {', '.join(SPLIT_PREFIXES)}, not {split!r}")
    paths = {}
    for kind in ("images", "labels"):
        paths[kind] = find_idx_file(folder, split, kind)
        if paths[kind] is None:
            dims = 3 if kind == "images" else 1
            raise DataError(f"{folder} has no {SPLIT_PREFIXES[split]}-{kind}-idx{dims}-ubyte[.gz] for split {split!r}")
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{paths['images']}: expected uint8 [N, H, W] images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths['labels']}: {labels.shape} labels for {len(images)} images in {paths['images']}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{paths['labels']}: labels outside 0..{len(classes) - 1}")
    return ImageSet(images[..., None], labels.astype(np.int64), classes, name)
