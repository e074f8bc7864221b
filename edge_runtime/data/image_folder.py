"""ImageFolder-shaped data sets (`split/class/image`) from a directory or a tarball.

A tarball is read member by member in one pass, never unpacked to disk: only the asked split's
files are kept in memory (with `limit_per_class`, only the first N names per class), and only
those are decoded. Decoded arrays are cached by `edge_runtime.data.cache`, not here.
"""

from __future__ import annotations

import bisect
import io
import os
import tarfile
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from edge_runtime.data.arrays import UNLABELED, ImageSet
from edge_runtime.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
UNLABELED_FOLDER = "unlabeled"  # a split whose only class folder has this name carries no labels
_GREY_MODES = frozenset({"1", "L", "LA", "P", "PA", "I", "I;16", "F"})

# class folder -> [(member name, encoded bytes)], sorted by name
Members = dict[str, list[tuple[str, bytes]]]


def is_tarball(path: Path) -> bool:
    """A file named like a (possibly gzipped) tar archive."""
    return path.is_file() and path.name.lower().endswith(TARBALL_SUFFIXES)


def read_image_folder(source: Path, split: str, classes: tuple[str, ...] | None, channels: int | None,
                      limit_per_class: int | None, name: str, progress: bool = True) -> ImageSet:
    """Decode `source/split/<class>/<image>` into one ImageSet.

    `classes` fixes the label order (None: sorted folder names); `channels` fixes grey (1) or RGB (3)
    (None: whichever most images are). Images of one split must share one size.
    """
    members, splits_found = (_tar_members if is_tarball(source) else _directory_members)(source, split, limit_per_class)
    if not members:
        found = ", ".join(sorted(splits_found)) or "none with split/class/image files"
        raise DataError(f"{source} has no split {split!r}; splits found: {found}")
    class_names, label_of = _label_map(sorted(members), classes, source, split)
    folders = sorted(members, key=label_of.__getitem__)  # images come out in label order
    files = [file for folder in folders for file in members[folder]]
    labels = np.repeat(np.array([label_of[folder] for folder in folders], dtype=np.int64),
                       [len(members[folder]) for folder in folders])
    images = _decode_all(files, _decode_mode(files, channels, source), source, name, progress)
    return ImageSet(images, labels, class_names, name)


def decode_image(data: bytes, mode: str) -> np.ndarray:
    """One encoded image as uint8 [H, W, C], converted to Pillow `mode` ('L' or 'RGB')."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert(mode))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _tar_members(source: Path, split: str, limit: int | None) -> tuple[Members, set[str]]:
    """Stream the archive once, keeping the bytes of `split`'s images only (the first `limit` names per class)."""
    kept: Members = defaultdict(list)
    splits_found: set[str] = set()
    try:
        with tarfile.open(source, mode="r|*") as archive:
            for member in archive:
                parts = _image_parts(member.name) if member.isfile() else None
                if parts is None:
                    continue
                splits_found.add(parts[0])
                bucket = kept[parts[1]] if parts[0] == split else None
                if bucket is None or (limit is not None and len(bucket) == limit and member.name > bucket[-1][0]):
                    continue  # another split, or past this class's first `limit` names: never read
                bisect.insort(bucket, (member.name, archive.extractfile(member).read()))
                if limit is not None and len(bucket) > limit:
                    bucket.pop()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot read tarball {source}: {exc}") from exc
    return dict(kept), splits_found


def _directory_members(source: Path, split: str, limit: int | None) -> tuple[Members, set[str]]:
    """Read `split`'s image files; every class keeps its first `limit` file names."""
    if not source.is_dir():
        raise DataError(f"{source} is neither a directory nor a tarball ({', '.join(TARBALL_SUFFIXES)})")
    splits_found = {entry.name for entry in source.iterdir() if entry.is_dir() and not entry.name.startswith(".")}
    if split not in splits_found:
        return {}, splits_found
    members: Members = {}
    for class_dir in sorted((source / split).iterdir()):
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        files = sorted(f for f in class_dir.iterdir() if f.is_file() and _is_image_name(f.name))
        try:
            members[class_dir.name] = [(str(f), f.read_bytes()) for f in files[:limit]]
        except OSError as exc:
            raise DataError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return {folder: files for folder, files in members.items() if files}, splits_found


def _image_parts(member_name: str) -> tuple[str, str, str] | None:
    """(split, class folder, file name) for an image at depth split/class/file, else None."""
    parts = member_name.removeprefix("./").split("/")
    if len(parts) != 3 or parts[0].startswith(".") or parts[1].startswith(".") or not _is_image_name(parts[2]):
        return None
    return parts[0], parts[1], parts[2]


def _is_image_name(file_name: str) -> bool:
    """An image file by its suffix; hidden files (e.g. macOS '._x.jpg' forks) are not images."""
    return not file_name.startswith(".") and os.path.splitext(file_name)[1].lower() in IMAGE_SUFFIXES


def _label_map(folders: list[str], classes: tuple[str, ...] | None, source: Path,
               split: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """Class names and each folder's label; an `unlabeled`-only split gives UNLABELED and no classes."""
    if folders == [UNLABELED_FOLDER]:
        return (), {UNLABELED_FOLDER: UNLABELED}
    if UNLABELED_FOLDER in folders:
        raise DataError(f"{source}/{split}: an '{UNLABELED_FOLDER}' folder beside class folders {folders} is ambiguous")
    class_names = tuple(folders) if classes is None else classes
    foreign = [folder for folder in folders if folder not in class_names]
    if foreign:
        raise DataError(f"{source}/{split}: folders {foreign} are not classes of this data set; expected {list(class_names)}")
    return class_names, {folder: class_names.index(folder) for folder in folders}


def _decode_mode(files: list[tuple[str, bytes]], channels: int | None, source: Path) -> str:
    """'L' or 'RGB': from `channels`, else the mode most images have (headers only, no decoding)."""
    if channels is None:
        grey = 0
        for member, data in files:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    grey += image.mode in _GREY_MODES
            except OSError as exc:
                raise DataError(f"cannot read image {member} in {source}: {exc}") from exc
        channels = 1 if 2 * grey > len(files) else 3
    if channels not in (1, 3):
        raise DataError(f"{source}: images can be decoded to 1 or 3 channels, not {channels}")
    return "L" if channels == 1 else "RGB"


def _decode_all(files: list[tuple[str, bytes]], mode: str, source: Path, name: str, progress: bool) -> np.ndarray:
    """Decode into one preallocated uint8 [N, H, W, C] array; every image must have the first one's size."""
    first = _decode_checked(files[0], mode, source)
    images = np.empty((len(files), *first.shape), dtype=np.uint8)
    for index, file in enumerate(tqdm(files, desc=f"decoding {name}", unit="img", disable=not progress)):
        pixels = first if index == 0 else _decode_checked(file, mode, source)
        if pixels.shape != first.shape:
            raise DataError(f"image {file[0]} in {source} is {pixels.shape[:2]}, the split's first image {first.shape[:2]}")
        images[index] = pixels
    return images


def _decode_checked(file: tuple[str, bytes], mode: str, source: Path) -> np.ndarray:
    """`decode_image`, with a failure reported as a DataError naming the file."""
    member, data = file
    try:
        return decode_image(data, mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {member} in {source}: {exc}") from exc
