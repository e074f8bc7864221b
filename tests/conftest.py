"""Shared fixtures: real images loaded once per test run, and a single-thread guard for small models."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run only in its interpreter, and the flag must be set before any test
# module imports them (kernels/__init__ does), so it is set here, first. Asked of CUDA itself: a
# sandboxed GPU machine need not show /dev/nvidia0.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from edge_runtime.data.arrays import ImageSet
from edge_runtime.data.catalog import SHARED_DATA
from edge_runtime.data.loader import load_split
from edge_runtime.data.transforms import to_tensor

CIFAR_SMALL_PER_CLASS = 30


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder; its absence fails the run rather than skipping the data tests."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder {SHARED_DATA} is missing (set EDGE_RUNTIME_DATA to its location)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits_train() -> ImageSet:
    return load_split("digits", "train")


@pytest.fixture(scope="session")
def digits_test() -> ImageSet:
    return load_split("digits", "test")


ONE_CLASS_DIGIT = 0


@pytest.fixture(scope="session")
def one_class_digits(digits_train: ImageSet, digits_test: ImageSet) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The one-class detectors' data: (training images of ONE_CLASS_DIGIT, all test images, test labels), [0,1] NCHW."""
    normal = digits_train.images[digits_train.labels == ONE_CLASS_DIGIT]
    return to_tensor(normal), to_tensor(digits_test.images), digits_test.labels


@pytest.fixture(scope="session")
def cifar_small(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageSet]:
    """The first 30 images per class of CIFAR-10's train and test splits (the JPEG copy)."""
    cache_dir = tmp_path_factory.mktemp("data-cache")
    return {split: load_split("cifar10", split, path=str(shared_data / "cifar10-jpeg.tar.gz"), cache_dir=cache_dir,
                              limit_per_class=CIFAR_SMALL_PER_CLASS, progress=False)
            for split in ("train", "test")}


@pytest.fixture(scope="module")
def single_thread():
    """Small models train faster on one thread than on two threads fighting other processes for two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


REPO_ROOT = Path(__file__).resolve().parents[1]
# Beside the checkout like the data; EDGE_RUNTIME_RESULT_CHECKER points at a copy (a clone elsewhere, a leased GPU machine).
RESULT_CHECKER = Path(os.environ.get("EDGE_RUNTIME_RESULT_CHECKER",
                                     REPO_ROOT.parent / "shared" / "tools" / "check_results.py"))


@pytest.fixture(scope="session")
def check_results() -> Callable[[Path], None]:
    """Run the shared result-contract checker on a file or folder; any problem fails the test."""
    if not RESULT_CHECKER.is_file():
        pytest.fail(f"the shared result checker is missing: {RESULT_CHECKER} "
                    "(set EDGE_RUNTIME_RESULT_CHECKER to its location)")

    def check(path: Path) -> None:
        done = subprocess.run([sys.executable, str(RESULT_CHECKER), str(path)], capture_output=True, text=True,
                              cwd=REPO_ROOT)
        assert done.returncode == 0, done.stdout + done.stderr

    return check
