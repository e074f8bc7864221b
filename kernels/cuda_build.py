"""Building and loading the CUDA C kernels of kernels/cuda, for GPUs without Triton (Jetson).

Three ways to get the same kernels, all behind one small interface (`CudaKernels`):
- "torch":  torch.utils.cpp_extension.load_inline compiles the kernels plus torch launchers
            (kernels/cuda/torch_bindings.cu) once and caches the build; needs nvcc and a GPU.
- "pycuda": pycuda's SourceModule compiles the kernels alone; launches go on the legacy default
            stream, which is torch's default stream. pycuda is optional and imported only here.
- "host_emulation": g++ compiles the kernels against kernels/cuda/host_emulation.h and runs them
            on the CPU (one std::thread per CUDA thread). Slow; it exists so that tests on machines
            without a GPU execute the CUDA C code itself rather than only compiling it.
`compile_cubin` runs nvcc alone (any machine with nvcc) to check the sources build for an arch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch

from edge_runtime.errors import ConfigError, InputError
from kernels.reference import (
    PRECISION_VARIANTS,
    LastLayerStats,
    kernel_operands,
    score_tiles,
    scores_from_partials,
)

CUDA_SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
KERNEL_HEADERS = ("last_layer_score.cuh", "per_sample_grad.cuh")
SCORE_TILE_B = 64  # samples per block
SCORE_TILE_K = 32  # gradient entries per tile; the tile table is built with this width
SCORE_THREADS = 256  # threads per scoring block
OUTER_TILE = 16  # the per-sample GEMM's output tile is OUTER_TILE x OUTER_TILE, one thread per entry
BACKENDS = ("torch", "pycuda", "host_emulation")
# (element type of the stored matrix, whitened) -> kernel entry of last_layer_score.cuh
_SCORE_KERNELS = {(torch.float32, False): "last_layer_score_f32", (torch.bfloat16, False): "last_layer_score_bf16",
                  (torch.float16, False): "last_layer_score_f16",
                  (torch.bfloat16, True): "last_layer_score_bf16_whitened",
                  (torch.float16, True): "last_layer_score_f16_whitened"}


class CudaKernels(Protocol):
    """What every backend offers; tensors live where the backend runs (GPU, or CPU for host_emulation)."""

    def last_layer_partials(self, x: torch.Tensor, coef: torch.Tensor, labels: torch.Tensor,
                            mean_weight: torch.Tensor, inv_scale: torch.Tensor, means: torch.Tensor,
                            precision: torch.Tensor, tiles: torch.Tensor, whitened: bool) -> torch.Tensor:
        """Per-tile partial scores [T, B] (see last_layer_score.cuh); whitened: precision is a Cholesky factor."""

    def batched_outer(self, grad_outputs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """out[b] = grad_outputs[b] [O, L] @ columns[b] [I, L]^T, [B, O, I] float32."""


def compile_definitions() -> list[str]:
    """The preprocessor definitions every build of the kernels gets (tile sizes live here, once)."""
    return [f"-DSCORE_TILE_B={SCORE_TILE_B}", f"-DSCORE_TILE_K={SCORE_TILE_K}", f"-DSCORE_THREADS={SCORE_THREADS}",
            f"-DOUTER_TILE={OUTER_TILE}"]


def kernel_source() -> str:
    """Both kernel headers joined into one self-contained translation unit."""
    return "\n".join((CUDA_SOURCE_DIR / name).read_text() for name in KERNEL_HEADERS)


def torch_extension_sources() -> tuple[str, str]:
    """(C++ declarations, CUDA source) for load_inline: the kernels followed by their torch launchers.

    The headers are pasted in rather than #included so that load_inline's source hash, which
    decides when to rebuild, covers every line that is compiled.
    """
    cuda = kernel_source() + "\n" + (CUDA_SOURCE_DIR / "torch_bindings.cu").read_text()
    declarations = [re.search(rf"^torch::Tensor {name}\([^)]*\)", cuda, re.MULTILINE).group(0) + ";"
                    for name in ("last_layer_partials", "batched_outer")]
    return "#include <torch/extension.h>\n" + "\n".join(declarations) + "\n", cuda


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME, else from PATH; None when neither has one."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir() -> Path:
    """The toolkit's include folder (for cuda_fp16.h / cuda_bf16.h in host builds)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = find_nvcc()
    candidates = [Path(home) / "include"] if home else []
    candidates += [Path(nvcc).resolve().parent.parent / "include"] if nvcc else []
    candidates += [Path("/usr/local/cuda/include")]
    for folder in candidates:
        if (folder / "cuda_fp16.h").is_file():
            return folder
    raise ConfigError(f"CUDA headers (cuda_fp16.h) not found in {[str(c) for c in candidates]}; set CUDA_HOME")


def compile_cubin(arch: str, output: Path, nvcc: str | None = None) -> subprocess.CompletedProcess:
    """nvcc the kernels to a cubin for `arch` (e.g. "sm_87" Jetson Orin, "sm_90" H100), warnings as errors.

    Needs no GPU. Returns the finished process: returncode 0 and empty stderr mean a clean build.
    """
    compiler = nvcc or find_nvcc()
    if compiler is None:
        raise ConfigError("nvcc was not found in CUDA_HOME/bin or on PATH; install the CUDA toolkit to build the kernels")
    source = output.with_suffix(".cu")
    source.write_text(kernel_source())
    command = [compiler, "-x", "cu", f"-arch={arch}", "-cubin", "-O3", "--Werror", "all-warnings",
               *compile_definitions(), "-o", str(output), str(source)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def load_cuda_kernels(backend: str = "auto") -> CudaKernels:
    """The kernels through `backend`: "torch", "pycuda", "host_emulation", or "auto" (torch, else pycuda)."""
    if backend == "auto":
        try:
            return load_cuda_kernels("torch")
        except (ConfigError, OSError, RuntimeError) as torch_failure:
            try:
                return load_cuda_kernels("pycuda")
            except ConfigError as pycuda_failure:
                raise ConfigError(f"no CUDA C backend could be loaded: torch extension: {torch_failure}; "
                                  f"pycuda: {pycuda_failure}") from pycuda_failure
    if backend == "torch":
        return _torch_extension()
    if backend == "pycuda":
        return _pycuda_kernels()
    if backend == "host_emulation":
        return _host_emulation()
    raise ConfigError(f"CUDA backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def cuda_precision_refusal(variant: str) -> str | None:
    """Why the CUDA C kernel cannot score stats of precision `variant`, or None when it can.

    It reads the stored matrix in one part; the split variants are for matrix units (Triton, torch).
    """
    if PRECISION_VARIANTS[variant].parts == 1:
        return None
    one_part = ", ".join(repr(name) for name, other in PRECISION_VARIANTS.items() if other.parts == 1)
    return (f"the CUDA C kernel reads P in one part; variant {variant!r} is for Triton and torch; "
            f"prepare the stats as one of {one_part}")


def cuda_last_layer_scores(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, stats: LastLayerStats,
                           backend: str = "auto") -> torch.Tensor:
    """Gradient Mahalanobis scores [B] through the CUDA C kernel; float32 arithmetic throughout.

    The stored matrix (P, or its Cholesky factor for whitened variants) is read in the stats'
    element type and z stays float32, so the only error beyond float32 is the matrix's rounding;
    split variants (bf16x3, fp16x3) are for matrix units and are refused. Measured through the host
    emulation on the digits case of kernels/triton_fused.py (largest relative error vs float64,
    median in brackets): fp32 3e-6 (9e-8), fp16w 6e-4 (2e-5), fp16 2e-3 (3e-5), bf16w 4e-3 (1e-4),
    bf16 2e-2 (6e-4).
    """
    refusal = cuda_precision_refusal(stats.variant)
    if refusal is not None:
        raise ConfigError(refusal)
    spec = PRECISION_VARIANTS[stats.variant]
    kernels = load_cuda_kernels(backend)
    operands = kernel_operands(features, probs, labels, stats)
    tiles = score_tiles(stats.num_classes, stats.feature_dim, SCORE_TILE_K).to(stats.device)
    partial = kernels.last_layer_partials(operands.x, operands.coef, labels.contiguous(), operands.mean_weight,
                                          operands.inv_scale, stats.means, stats.precision_parts[0], tiles,
                                          spec.whitened)
    return scores_from_partials(partial, operands, stats)


def cuda_batched_outer(grad_outputs: torch.Tensor, columns: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """grad_outputs [B, O, L] @ columns [B, I, L]^T per sample, [B, O, I] float32, through the CUDA C kernel."""
    if grad_outputs.ndim != 3 or columns.ndim != 3 or grad_outputs.shape[::2] != columns.shape[::2]:
        raise InputError(f"grad_outputs [B, O, L] and columns [B, I, L] disagree: "
                         f"{tuple(grad_outputs.shape)} vs {tuple(columns.shape)}")
    return load_cuda_kernels(backend).batched_outer(grad_outputs.float().contiguous(), columns.float().contiguous())


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} needs a CUDA device, and torch.cuda.is_available() is False on this machine")


@lru_cache(maxsize=1)
def _torch_extension() -> CudaKernels:
    _require_cuda("the CUDA C kernels through torch's extension loader")
    from torch.utils.cpp_extension import load_inline

    cpp, cuda = torch_extension_sources()
    return load_inline(name="edge_runtime_cuda_kernels", cpp_sources=cpp, cuda_sources=cuda,
                       functions=["last_layer_partials", "batched_outer"],
                       extra_cuda_cflags=["-O3", *compile_definitions()])


@lru_cache(maxsize=1)
def _pycuda_kernels() -> CudaKernels:
    try:
        from pycuda.compiler import SourceModule
    except ImportError as exc:
        raise ConfigError("the pycuda loader needs pycuda (pip install pycuda); "
                          "the torch extension loader (backend='torch') needs only torch and nvcc") from exc
    _require_cuda("the CUDA C kernels through pycuda")
    import pycuda.autoprimaryctx  # noqa: F401  -- share the primary context that torch uses

    return _PycudaKernels(SourceModule(kernel_source(), no_extern_c=True, options=["-O3", *compile_definitions()]))


class _PycudaKernels:
    """CudaKernels over a pycuda module: torch allocates, pycuda launches with raw device pointers."""

    def __init__(self, module) -> None:
        self._score = {key: module.get_function(name) for key, name in _SCORE_KERNELS.items()}
        self._outer = module.get_function("batched_outer_f32")

    def last_layer_partials(self, x, coef, labels, mean_weight, inv_scale, means, precision, tiles, whitened):
        import numpy as np

        batch, num_tiles = x.shape[0], tiles.shape[0]
        partial = torch.empty(num_tiles, batch, dtype=torch.float32, device=x.device)
        if batch:
            tensors = (x, coef, labels, mean_weight, inv_scale, means, precision, tiles, partial)
            pointers = [np.uintp(t.data_ptr()) for t in tensors]
            sizes = [np.int32(v) for v in (batch, means.shape[1], x.stride(0), coef.stride(0), num_tiles)]
            self._score[precision.dtype, whitened](*pointers, *sizes, block=(SCORE_THREADS, 1, 1),
                                                   grid=(-(-batch // SCORE_TILE_B), num_tiles))
        return partial

    def batched_outer(self, grad_outputs, columns):
        import numpy as np

        batch, n_out, length = grad_outputs.shape
        n_in = columns.shape[1]
        out = torch.empty(batch, n_out, n_in, dtype=torch.float32, device=grad_outputs.device)
        if out.numel():
            self._outer(np.uintp(grad_outputs.data_ptr()), np.uintp(columns.data_ptr()), np.uintp(out.data_ptr()),
                        np.int32(n_out), np.int32(n_in), np.int32(length), block=(OUTER_TILE, OUTER_TILE, 1),
                        grid=(-(-n_in // OUTER_TILE), -(-n_out // OUTER_TILE), batch))
        return out


@lru_cache(maxsize=1)
def _host_emulation() -> CudaKernels:
    compiler = shutil.which("g++")
    if compiler is None:
        raise ConfigError("the host emulation of the CUDA kernels needs g++ on PATH")
    sources = [CUDA_SOURCE_DIR / name for name in (*KERNEL_HEADERS, "host_emulation.h", "host_emulation.cpp")]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    library = Path(tempfile.gettempdir()) / f"edge_runtime_cuda_emulation_{digest}.so"
    if not library.exists():
        include = cuda_include_dir()
        staging = library.with_suffix(f".{os.getpid()}.tmp")
        command = [compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
                   f"-I{CUDA_SOURCE_DIR}", f"-I{include}", *compile_definitions(),
                   str(CUDA_SOURCE_DIR / "host_emulation.cpp"), "-o", str(staging)]
        build = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if build.returncode != 0:
            raise ConfigError(f"building the CUDA host emulation failed:\n{build.stderr}")
        staging.replace(library)
    return _EmulatedKernels(ctypes.CDLL(str(library)))


class _EmulatedKernels:
    """CudaKernels over the CPU build: same grid, same arguments, CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library

    def last_layer_partials(self, x, coef, labels, mean_weight, inv_scale, means, precision, tiles, whitened):
        tensors = (x, coef, labels, mean_weight, inv_scale, means, precision, tiles)
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            raise InputError("the host emulation takes contiguous CPU tensors")
        batch, num_tiles = x.shape[0], tiles.shape[0]
        partial = torch.empty(num_tiles, batch, dtype=torch.float32)
        status = self._library.emulate_last_layer_score(
            ctypes.c_int(precision.element_size() * 8), ctypes.c_int(precision.dtype == torch.bfloat16),
            ctypes.c_int(whitened), *(ctypes.c_void_p(t.data_ptr()) for t in (*tensors, partial)),
            *(ctypes.c_int(v) for v in (batch, means.shape[1], x.stride(0), coef.stride(0), num_tiles)))
        if status != 0:
            raise InputError(f"no scoring kernel for {'whitened ' if whitened else ''}{precision.dtype}; kernels: "
                             f"{sorted(_SCORE_KERNELS.values())}")
        return partial

    def batched_outer(self, grad_outputs, columns):
        batch, n_out, length = grad_outputs.shape
        out = torch.empty(batch, n_out, columns.shape[1], dtype=torch.float32)
        self._library.emulate_batched_outer(*(ctypes.c_void_p(t.data_ptr()) for t in (grad_outputs, columns, out)),
                                            *(ctypes.c_int(v) for v in (batch, n_out, columns.shape[1], length)))
        return out
