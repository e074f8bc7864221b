"""load_split on every supported source and layout, the decode cache, and conform() on real images."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.data import image_folder
from edge_runtime.data.arrays import UNLABELED, ImageSet
from edge_runtime.data.cache import cache_key, cache_path
from edge_runtime.data.catalog import CATALOG, CIFAR10_CLASSES, DIGIT_CLASSES, FASHION_CLASSES
from edge_runtime.data.loader import load_split
from edge_runtime.data.transforms import conform
from edge_runtime.errors import DataError

MNIST_PER_CLASS = 20


@pytest.fixture(scope="module")
def mnist_small(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    return load_split("mnist", "test", path=str(shared_data / "mnist-test.tar.gz"),
                      cache_dir=tmp_path_factory.mktemp("mnist-cache"), limit_per_class=MNIST_PER_CLASS, progress=False)


def _tar_bytes(tarball: Path, wanted: set[str] | None = None) -> dict[str, bytes]:
    """Member name -> bytes for the `wanted` regular files (all of them when None)."""
    found = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            if member.isfile() and (wanted is None or member.name in wanted):
                found[member.name] = archive.extractfile(member).read()
                if wanted is not None and len(found) == len(wanted):
                    break
    return found


def _pil_pixels(data: bytes, mode: str) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """The IDX layout: two zero bytes, dtype code 0x08 (uint8), ndim, big-endian sizes, raw values."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _write_cifar_batch(path: Path, data: ImageSet) -> None:
    """CIFAR-10's python layout: bytes keys, rows of 1024 R then 1024 G then 1024 B values."""
    rows = data.images.transpose(0, 3, 1, 2).reshape(len(data), -1)
    batch = {b"batch_label": b"edge_runtime test batch", b"labels": data.labels.tolist(), b"data": rows,
             b"filenames": [f"{i}.png".encode() for i in range(len(data))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_digits_load_as_grey_8x8_with_a_per_class_limit(digits_train: ImageSet, digits_test: ImageSet) -> None:
    assert digits_train.images.shape[1:] == (8, 8, 1) and digits_train.classes == DIGIT_CLASSES
    assert len(digits_train) + len(digits_test) == 1797
    limited = load_split("digits", "train", limit_per_class=5)
    assert np.bincount(limited.labels).tolist() == [5] * 10
    first_zeros = digits_train.images[np.flatnonzero(digits_train.labels == 0)[:5]]
    np.testing.assert_array_equal(limited.images[limited.labels == 0], first_zeros)


def test_cifar_tarball_keeps_the_first_images_by_member_name(cifar_small: dict[str, ImageSet], shared_data: Path) -> None:
    train = cifar_small["train"]
    assert train.images.shape == (300, 32, 32, 3) and train.classes == CIFAR10_CLASSES
    assert np.bincount(train.labels).tolist() == [30] * 10 and np.bincount(cifar_small["test"].labels).tolist() == [30] * 10
    expected = {0: "train/airplane/0000.jpg", 29: "train/airplane/0029.jpg", 30: "train/automobile/0000.jpg"}
    originals = _tar_bytes(shared_data / "cifar10-jpeg.tar.gz", set(expected.values()))
    for index, member in expected.items():
        np.testing.assert_array_equal(train.images[index], _pil_pixels(originals[member], "RGB"))


def test_mnist_tarball_is_grey_28x28_in_catalog_class_order(mnist_small: ImageSet, shared_data: Path) -> None:
    assert mnist_small.images.shape == (10 * MNIST_PER_CLASS, 28, 28, 1) and mnist_small.classes == DIGIT_CLASSES
    assert mnist_small.labels.tolist() == sorted(mnist_small.labels.tolist())
    members = _tar_bytes(shared_data / "mnist-test.tar.gz")
    first_seven = min(name for name in members if name.startswith("test/7/"))
    np.testing.assert_array_equal(mnist_small.images[7 * MNIST_PER_CLASS], _pil_pixels(members[first_seven], "L"))


def test_unknown_split_names_the_splits_that_exist(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no split 'train'; splits found: test"):
        load_split("mnist", "train", path=str(shared_data / "mnist-test.tar.gz"), cache_dir=tmp_path, progress=False)


def test_tinyimagenet_is_unlabeled_and_greyscale_images_become_rgb(shared_data: Path, tmp_path: Path) -> None:
    tarball = shared_data / "tinyimagenet-test.tar.gz"
    data = load_split("tinyimagenet", "test", path=str(tarball), cache_dir=tmp_path, limit_per_class=300, progress=False)
    assert data.images.shape == (300, 64, 64, 3) and data.classes == ()
    assert (data.labels == UNLABELED).all()
    members = _tar_bytes(tarball)
    first_names = sorted(members)[:300]
    grey = [i for i, name in enumerate(first_names) if Image.open(io.BytesIO(members[name])).mode == "L"]
    assert grey, "the first 300 Tiny ImageNet test images should include greyscale ones"
    for index in grey:
        rgb = data.images[index]
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        np.testing.assert_array_equal(rgb[..., :1], _pil_pixels(members[first_names[index]], "L"))


def test_fashion_mnist_reads_the_debian_idx_files() -> None:
    test = load_split("fashion_mnist", "test", progress=False)
    assert test.images.shape == (10_000, 28, 28, 1) and test.classes == FASHION_CLASSES
    assert np.bincount(test.labels).tolist() == [1000] * 10
    train = load_split("fashion_mnist", "train", limit_per_class=10, progress=False)
    assert len(train) == 100 and np.bincount(train.labels).tolist() == [10] * 10
    assert train.images.std() > 30, "real garments, not a blank array"


def test_torchvision_cifar_batches_read_back_real_images(cifar_small: dict[str, ImageSet], tmp_path: Path) -> None:
    train, test = cifar_small["train"], cifar_small["test"]
    batches = tmp_path / "cifar-10-batches-py"
    for number, rows in enumerate(np.array_split(np.arange(len(train)), 5), start=1):
        _write_cifar_batch(batches / f"data_batch_{number}", train.subset(rows))
    _write_cifar_batch(batches / "test_batch", test)
    for path in (tmp_path, batches):
        loaded = load_split("cifar10", "train", path=str(path), progress=False)
        np.testing.assert_array_equal(loaded.images, train.images)
        np.testing.assert_array_equal(loaded.labels, train.labels)
    loaded_test = load_split("cifar10", "test", path=str(tmp_path), limit_per_class=3, progress=False)
    first_three = np.concatenate([np.flatnonzero(test.labels == c)[:3] for c in range(10)])
    np.testing.assert_array_equal(loaded_test.images, test.images[np.sort(first_three)])


def test_cifar_batch_naming_a_foreign_global_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Hostile:
        def __reduce__(self):
            return (print, ("a CIFAR batch must not run code",))

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": Hostile(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"\.print is not allowed"):
        load_split("cifar10", "test", path=str(tmp_path), progress=False)
    assert "must not run code" not in capsys.readouterr().out


def test_torchvision_mnist_raw_idx_gz_and_plain(mnist_small: ImageSet, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    half = len(mnist_small) // 2
    parts = {"train": mnist_small.subset(np.arange(half)), "test": mnist_small.subset(np.arange(half, len(mnist_small)))}
    for split, prefix, compress in (("train", "train", False), ("test", "t10k", True)):
        suffix = ".gz" if compress else ""
        _write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", parts[split].images[..., 0], compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", parts[split].labels.astype(np.uint8), compress)
    for split, expected in parts.items():
        loaded = load_split("mnist", split, path=str(tmp_path), progress=False)
        np.testing.assert_array_equal(loaded.images, expected.images)
        np.testing.assert_array_equal(loaded.labels, expected.labels)
        assert loaded.classes == DIGIT_CLASSES


def test_truncated_idx_file_is_a_data_error(mnist_small: ImageSet, tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", mnist_small.images[..., 0], compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", mnist_small.labels.astype(np.uint8), compress=False)
    images_file = tmp_path / "t10k-images-idx3-ubyte"
    images_file.write_bytes(images_file.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: IDX header promises shape"):
        load_split("mnist", "test", path=str(tmp_path), progress=False)


def test_second_load_is_served_from_the_cache(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = str(shared_data / "mnist-test.tar.gz")
    first = load_split("mnist", "test", path=tarball, cache_dir=tmp_path, limit_per_class=3, progress=False)

    def no_decoding(data: bytes, mode: str) -> np.ndarray:
        raise AssertionError("decoded an image although the cache holds this split")

    monkeypatch.setattr(image_folder, "decode_image", no_decoding)
    again = load_split("mnist", "test", path=tarball, cache_dir=tmp_path, limit_per_class=3, progress=False)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.classes == first.classes and again.name == first.name
    with pytest.raises(AssertionError, match="decoded an image"):
        load_split("mnist", "test", path=tarball, cache_dir=tmp_path, limit_per_class=4, progress=False)


def test_corrupt_cache_file_is_rebuilt(shared_data: Path, tmp_path: Path) -> None:
    tarball = shared_data / "mnist-test.tar.gz"
    first = load_split("mnist", "test", path=str(tarball), cache_dir=tmp_path, limit_per_class=2, progress=False)
    cached = cache_path(tmp_path, cache_key(tarball, "mnist", "test", 2))
    cached.write_bytes(cached.read_bytes()[:1000])
    rebuilt = load_split("mnist", "test", path=str(tarball), cache_dir=tmp_path, limit_per_class=2, progress=False)
    np.testing.assert_array_equal(rebuilt.images, first.images)
    with np.load(cached) as archive:
        np.testing.assert_array_equal(archive["images"], first.images)


def test_missing_path_names_the_path_and_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cifar10-jpeg.tar.gz"
    with pytest.raises(DataError) as caught:
        load_split("cifar10", "train", path=str(missing))
    assert str(missing) in str(caught.value) and CATALOG["cifar10"].how_to_get in str(caught.value)
    with pytest.raises(DataError, match="needs a path"):
        load_split("image_folder", "train")
    with pytest.raises(DataError, match="known: digits, cifar10"):
        load_split("cifar100", "train")


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_directory_uses_sorted_folders_and_majority_channels(digits_train: ImageSet, tmp_path: Path) -> None:
    zeros = digits_train.images[digits_train.labels == 0][:4, ..., 0]
    ones = digits_train.images[digits_train.labels == 1][:3, ..., 0]
    for i, pixels in enumerate(zeros):
        _save_png(tmp_path / "train" / "zero" / f"{i}.png", pixels)
    for i, pixels in enumerate(ones[:2]):
        _save_png(tmp_path / "train" / "one" / f"{i}.png", pixels)
    _save_png(tmp_path / "train" / "one" / "2.png", np.repeat(ones[2][..., None], 3, axis=2))  # an RGB straggler
    (tmp_path / "train" / "one" / "notes.txt").write_text("not an image")

    data = load_split("image_folder", "train", path=str(tmp_path), progress=False)
    assert data.classes == ("one", "zero") and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert data.images.shape == (7, 8, 8, 1)
    np.testing.assert_array_equal(data.images[:3, ..., 0], ones)
    np.testing.assert_array_equal(data.images[3:, ..., 0], zeros)

    _save_png(tmp_path / "train" / "zero" / "9.png", np.zeros((9, 9), np.uint8))
    with pytest.raises(DataError, match=r"9\.png .* is \(9, 9\)"):
        load_split("image_folder", "train", path=str(tmp_path), progress=False)


def test_conform_turns_mnist_into_cifar_geometry(mnist_small: ImageSet) -> None:
    conformed = conform(mnist_small, size=32, channels=3)
    assert conformed.images.shape == (len(mnist_small), 32, 32, 3)
    rgb = conformed.images.astype(np.int16)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    per_image_mean = mnist_small.images.reshape(len(mnist_small), -1).mean(axis=1)
    conformed_mean = conformed.images[..., 0].reshape(len(mnist_small), -1).mean(axis=1)
    np.testing.assert_allclose(conformed_mean, per_image_mean, atol=3.0)
    np.testing.assert_array_equal(conformed.labels, mnist_small.labels)
