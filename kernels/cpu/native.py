"""The native part of the CPU kernels: `gemm.c`, compiled once per machine (with -march=native)
into a cache directory and called through ctypes. Its OpenMP calls go to the runtime torch has
already loaded, so it shares torch's threads instead of competing with them.

If no C compiler is found the library is unavailable; `status()` says so and why, the CPU
kernels use torch's matmul for every shape, and the bench records it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("gemm.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
MAX_ROWS = 8             # above this, torch's GEMM (MKL/oneDNN) is as fast or faster (benchmarked)

_error: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("LLMC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llmc")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return flags


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    global _error
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        _error = "no C compiler (cc/gcc) on PATH"
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + cc.encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / key / "libllmc_cpu.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp)
            _error = f"compiling {SOURCE.name} failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}"
            print(f"llmc: warning: {_error}; CPU kernels use torch matmul only", file=sys.stderr)
            return None
        os.replace(tmp, target)                 # atomic: concurrent builders agree
    lib = ctypes.CDLL(str(target))
    fn = lib.llmc_linear_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = None
    lib.llmc_linear_i8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.llmc_linear_i8.restype = None
    lib.llmc_linear_i4g.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.llmc_linear_i4g.restype = None
    lib.llmc_dequant_i4g.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.llmc_dequant_i4g.restype = None
    return lib


def status() -> dict:
    lib = library()
    return {"native_gemm": lib is not None, "max_rows": MAX_ROWS, "error": _error}


def applies(x: Tensor, weight: Tensor) -> bool:
    """The native kernel runs fp32 CPU matmuls of at most MAX_ROWS rows with contiguous operands."""
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype == torch.float32 and
            weight.dtype == torch.float32 and x.is_contiguous() and weight.is_contiguous() and
            library() is not None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ weight[N, K].T (+ bias): the caller checked `applies`."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    b = bias.contiguous() if bias is not None else None
    library().llmc_linear_f32(x.data_ptr(), weight.data_ptr(), b.data_ptr() if b is not None else None,
                              y.data_ptr(), m, n, k, torch.get_num_threads())
    return y


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def linear_int8(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x [M, K] fp32 @ (q int8 [N, K] * scale [N, 1]).T (+ bias)."""
    x = x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    library().llmc_linear_i8(x.data_ptr(), q.data_ptr(), scale.data_ptr(), _ptr(bias), y.data_ptr(), m, n, k,
                             torch.get_num_threads())
    return y


def linear_int4(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                bias: Tensor | None) -> Tensor:
    """x [M, K] fp32 @ dequantized int4 group-wise weight [N, K].T (+ bias)."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    library().llmc_linear_i4g(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), _ptr(bias),
                              y.data_ptr(), m, n, k, group_size, torch.get_num_threads())
    return y


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, k: int, group_size: int) -> Tensor:
    """Packed int4 group-wise [N, ceil(K/2)] -> fp32 [N, K], the same values as formats.dequantize."""
    n = packed.shape[0]
    w = torch.empty(n, k, dtype=torch.float32)
    library().llmc_dequant_i4g(packed.contiguous().data_ptr(), scale.contiguous().data_ptr(),
                               zero.contiguous().data_ptr(), w.data_ptr(), n, k, group_size, torch.get_num_threads())
    return w
