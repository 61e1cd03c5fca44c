"""The native part of the CPU kernels: `gemm.c`, compiled once per machine (with -march=native)
into a cache directory and called through ctypes. Its OpenMP calls go to the runtime torch has
already loaded, so it shares torch's threads instead of competing with them.

Where it is built. `$LLMC_CACHE_DIR/kernels/<key>/libllmc_cpu.so` (default root `~/.cache/llmc`);
the key hashes the source, the flags, the compiler's path, the CPU's flags and ABI_VERSION. A build
goes to `.libllmc_cpu.so.<host>.<pid>.tmp` next to it and is renamed into place, then its sha256 is
written to `libllmc_cpu.so.sha256` the same way, so concurrent builders never see a partial file;
temp files of this host's processes that are no longer alive are removed at the next build.

Trust rules. Loading a library runs its code as the caller, so, as ssh does with its keys, the cache
is used only if every directory from the cache root down to the key directory, and the library and
its digest file, are owned by the current user and not writable by group or others; llmc creates its
directories 0700, the library 0700 and the digest 0600. A cached library is loaded only if its bytes
hash to the recorded sha256 (a truncated, corrupt or unrecorded file is never mapped), and once
loaded it must export every function llmc calls and return ABI_VERSION from `llmc_abi_version()`;
otherwise it is rebuilt.

Fallbacks. If the cache is refused or cannot be written (HOME unset or missing, a read-only
directory, a file where a directory should be), the library is built in a private temporary
directory (`tempfile.mkdtemp`: mode 0700, under $TMPDIR, removed at exit). If that fails too, or no
C compiler is found, or compiling fails, the CPU kernels use torch's matmul for every shape. Each
case prints one `llmc: warning:` line on stderr; `status()` says why the library is unavailable,
and the bench records it.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from _ctypes import dlclose
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from llmc.io import removed_on_failure

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemm.c", "step.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("linear.h", "simd.h", "fp8.h", "widen.h"))   # included by the sources: part of the cache key
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")   # fusions explicit
MAX_ROWS = 8             # above this, torch's GEMM (MKL/oneDNN) is as fast or faster (benchmarked)
ABI_VERSION = 7          # what gemm.c's llmc_abi_version() returns: bump both when an export changes
LIB_NAME = "libllmc_cpu.so"
DIGEST_NAME = LIB_NAME + ".sha256"
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {           # every export llmc calls: (argtypes, restype)
    "llmc_abi_version": ([], _INT),
    "llmc_linear_f32": ([_P] * 4 + [_I64] * 3 + [_INT], None),
    "llmc_linear_i8": ([_P] * 5 + [_I64] * 3 + [_INT], None),
    "llmc_linear_i4g": ([_P] * 6 + [_I64] * 4 + [_INT], None),
    "llmc_dequant_i4g": ([_P] * 4 + [_I64] * 3 + [_INT], None),
    "llmc_linear_weight": ([_P, _P, _P, _I64, _INT], None),
    "llmc_packed_bytes": ([_P], _I64),
    "llmc_pack_weight": ([_P, _P], None),
    "llmc_step": ([_P, _P], None),
    "llmc_e4m3_encode": ([_P, _P, _I64], _INT),
}
_HOST = socket.gethostname()
_TEMP = re.compile(rf"\.(?:{re.escape(LIB_NAME)}|{re.escape(DIGEST_NAME)})\.{re.escape(_HOST)}\.(?P<pid>\d+)\.tmp")

_error: str | None = None
_lock = threading.Lock()


class _Refused(Exception):
    """This directory cannot or must not hold the library; the message names the path and why."""


class _Mismatch(Exception):
    """A library file is not the one this llmc expects (ABI version, symbols, or not loadable)."""


class _Unavailable(Exception):
    """No native library in this process; the message says why."""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The native library, built or loaded once per process; None (with one warning) when unavailable."""
    global _error
    with _lock:
        _error = None
        try:
            return _library()
        except _Unavailable as e:
            _error = str(e)
            _warn(f"{e}; CPU kernels use torch matmul only")
            return None


def _library() -> ctypes.CDLL:
    """The persistent cache, else a private temporary build (with a warning); raises _Unavailable."""
    cc = _compiler()
    if cc is None:
        raise _Unavailable("no C compiler (cc/gcc) on PATH")
    try:
        return _load_or_build(_key_dir(_cache_key(cc)), cc)
    except _Refused as e:
        refused = f"not using the kernel cache: {e}"
    try:
        private = _private_dir()
        lib = _load_or_build(private, cc)
    except (_Refused, _Unavailable) as e:
        raise _Unavailable(f"{refused}; {e}") from None
    _warn(f"{refused}; built the CPU kernels in the private temporary directory {private}")
    return lib


def _warn(message: str) -> None:
    print(f"llmc: warning: {message}", file=sys.stderr)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return flags


def _cache_key(cc: str) -> str:
    parts = (*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(FLAGS).encode(), cc.encode(), _cpu_signature().encode(),
             f"abi {ABI_VERSION}".encode())
    return hashlib.sha256(b"".join(parts)).hexdigest()[:16]


# ---- where: the cache root and its trust rules -------------------------------------------------------

def _cache_root() -> Path:
    if root := os.environ.get("LLMC_CACHE_DIR"):
        return Path(root)
    home = os.environ.get("HOME")
    if not home:
        raise _Refused("HOME is not set (nor LLMC_CACHE_DIR)")
    if not os.path.isdir(home):
        raise _Refused(f"HOME {home} is not a directory")
    return Path(home) / ".cache" / "llmc"


def _key_dir(key: str) -> Path:
    """$root/kernels/<key>, each level created 0700 if missing and refused unless trusted."""
    root = _cache_root()
    for d in (root, root / "kernels", root / "kernels" / key):
        try:
            d.mkdir(mode=0o700, parents=(d == root))
        except FileExistsError:
            pass
        except OSError as e:
            raise _Refused(f"cannot create {d}: {e.strerror}") from None
        if (why := _trusted_dir(d)) is not None:
            raise _Refused(why)
    return d


def _untrusted(path: Path, st: os.stat_result) -> str | None:
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _trusted_dir(path: Path) -> str | None:
    """None if `path` is a directory that only this user can write to, else the reason it is not."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    return _untrusted(path, st)


def _trusted_file(path: Path) -> str | None:
    """None if `path` is missing or a regular file that only this user can write to, else the reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return _untrusted(path, st)


def _private_dir() -> Path:
    try:
        d = tempfile.mkdtemp(prefix="llmc-kernels-")          # mode 0700, a fresh name
    except OSError as e:
        raise _Refused(f"cannot create a private temporary directory: {e.strerror}") from None
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return Path(d)


# ---- what: verify a cached library, or build one -------------------------------------------------------

def _load_or_build(d: Path, cc: str) -> ctypes.CDLL:
    try:
        return _load_cached(d) or _build(d, cc)
    except OSError as e:
        raise _Refused(f"cannot use {e.filename or d}: {e.strerror or e}") from None


def _load_cached(d: Path) -> ctypes.CDLL | None:
    """The library cached in `d` if it passes every check; None means: build it (again)."""
    lib = d / LIB_NAME
    for f in (lib, d / DIGEST_NAME):
        if (why := _trusted_file(f)) is not None:
            raise _Refused(why)
    if not _verified(lib):
        return None
    try:
        return _load(lib)
    except _Mismatch:
        return None


def _verified(lib_path: Path) -> bool:
    """The file's bytes hash to the digest recorded next to it when it was built. Reading it all
    (never mapping it) is what keeps a truncated library from crashing the process with SIGBUS."""
    try:
        recorded = lib_path.with_name(DIGEST_NAME).read_text().split()
        return bool(recorded) and _sha256(lib_path) == recorded[0]
    except (OSError, UnicodeDecodeError):
        return False


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load(path: Path) -> ctypes.CDLL:
    """dlopen `path`, then require every export and our ABI version; raises _Mismatch (unloaded again)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise _Mismatch(f"cannot load {path}: {e}") from None
    if (why := _abi_mismatch(lib)) is not None:
        dlclose(lib._handle)            # a rebuild at the same path must not get this handle back
        raise _Mismatch(f"{path} {why}")
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def _abi_mismatch(lib: ctypes.CDLL) -> str | None:
    missing = [name for name in SIGNATURES if not hasattr(lib, name)]
    if missing:
        return f"lacks {', '.join(missing)}"
    fn = lib.llmc_abi_version
    fn.argtypes, fn.restype = [], ctypes.c_int
    version = fn()
    return None if version == ABI_VERSION else f"has ABI version {version}, expected {ABI_VERSION}"


def _build(d: Path, cc: str) -> ctypes.CDLL:
    """Compile into a temp file in `d`, load that very file, then publish it and its digest."""
    _remove_stale_temps(d)
    tmp = d / _temp_name(LIB_NAME)
    try:
        _create(tmp, 0o700)
    except OSError as e:
        raise _Refused(f"cannot write to {d}: {e.strerror}") from None
    try:
        with removed_on_failure(tmp):
            _compile(cc, tmp)
            digest, lib = _sha256(tmp), _load(tmp)
    except _Mismatch as e:
        raise _Unavailable(f"the freshly built {LIB_NAME} is unusable: {e}") from None
    os.replace(tmp, d / LIB_NAME)                   # atomic: readers see the old file or the new one
    _write_atomic(d / DIGEST_NAME, f"{digest}  {LIB_NAME}\n")
    return lib


def _compile(cc: str, out: Path) -> None:
    r = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"], capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
        raise _Unavailable(f"compiling {' and '.join(f.name for f in SOURCES)} failed: {last}")
    os.chmod(out, 0o700)                            # the linker may have recreated the file


def _temp_name(name: str) -> str:
    return f".{name}.{_HOST}.{os.getpid()}.tmp"


def _create(path: Path, mode: int) -> None:
    """An empty file of our own with `mode`; this pid's leftover from an earlier attempt goes first."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(_temp_name(path.name))
    _create(tmp, 0o600)
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale_temps(d: Path) -> None:
    """Temp files of builders on this host whose process is gone (killed mid-build); never a live one's."""
    for p in d.iterdir():
        m = _TEMP.fullmatch(p.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True                                 # not a process id: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                 # exists, another user's
    return True


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
