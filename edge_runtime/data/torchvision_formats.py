"""torchvision's on-disk layouts, so a machine that already holds them needs no second copy.

CIFAR-10 as `cifar-10-batches-py` (pickled batches) and MNIST / Fashion-MNIST as `<root>/MNIST/raw`
or `<root>/FashionMNIST/raw` (IDX files, read by `edge_runtime.data.idx`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.idx import has_idx_files
from edge_runtime.errors import DataError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
IDX_ROOT_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_CIFAR_SIDE = 32


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR batches, which hold only dicts, lists and numpy arrays, and refuses anything else.

    A plain pickle.load would run whatever code a tampered file names; this admits only the
    globals numpy needs to rebuild an array.
    """

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def find_cifar_batches(path: Path) -> Path | None:
    """The folder holding CIFAR-10's pickled batches: `path` itself or `path/cifar-10-batches-py`."""
    for candidate in (path, path / CIFAR_FOLDER):
        if any((candidate / batch).is_file() for batches in CIFAR_BATCHES.values() for batch in batches):
            return candidate
    return None


def read_cifar_batches(folder: Path, split: str, classes: tuple[str, ...], name: str) -> ImageSet:
    """One split of `cifar-10-batches-py` as uint8 [N, 32, 32, 3] (rows are stored R, G, B planes)."""
    if split not in CIFAR_BATCHES:
        raise DataError(f"{folder}: CIFAR-10 batches have splits {', '.join(CIFAR_BATCHES)}, not {split!r}")
    images, labels = [], []
    for batch_name in CIFAR_BATCHES[split]:
        batch = _read_batch(folder / batch_name)
        images.append(batch["data"].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1))
        labels.append(batch["labels"])
    label_array = np.concatenate(labels)
    if len(label_array) and (label_array.min() < 0 or label_array.max() >= len(classes)):
        raise DataError(f"{folder}: labels outside 0..{len(classes) - 1}")
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), label_array, classes, name)


def find_idx_folder(path: Path, dataset: str) -> Path | None:
    """Where the IDX files are: `path`, `path/raw` or torchvision's `path/MNIST/raw` (FashionMNIST)."""
    candidates = [path, path / "raw"]
    if dataset in IDX_ROOT_FOLDERS:
        candidates.append(path / IDX_ROOT_FOLDERS[dataset] / "raw")
    return next((folder for folder in candidates if has_idx_files(folder)), None)


def _read_batch(path: Path) -> dict[str, np.ndarray]:
    """A batch's `data` (uint8 [N, 3072]) and `labels` (int64 [N]); keys are bytes in the originals."""
    try:
        with path.open("rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError as exc:
        raise DataError(f"CIFAR-10 batch {path} is missing") from exc
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    fields = {}
    for key in ("data", "labels"):
        value = batch.get(key.encode(), batch.get(key)) if isinstance(batch, dict) else None
        if value is None:
            raise DataError(f"CIFAR-10 batch {path} has no {key!r} entry")
        fields[key] = np.asarray(value)
    data, labels = fields["data"], fields["labels"]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _CIFAR_SIDE ** 2:
        raise DataError(f"CIFAR-10 batch {path}: expected uint8 [N, 3072] data, got {data.dtype} {data.shape}")
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise DataError(f"CIFAR-10 batch {path}: expected {len(data)} integer labels, got {labels.dtype} {labels.shape}")
    return {"data": data, "labels": labels.astype(np.int64)}
