"""triton, imported on first use. The kernel modules of this set (norm, rope, activation, linear,
kv_write, attention) import triton at their top, and nothing imports them until a kernel first runs
(`module(name)`): so `import llmc` and `import llmc.kernels.triton` work without triton, and a test
can set TRITON_INTERPRET=1 before the first call (triton reads it when `@triton.jit` decorates, that
is when a kernel module is imported). Without triton, the first kernel call raises ConfigError.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from llmc.errors import ConfigError

PACKAGE = "triton>=3.2"
INSTALL_HINT = "pip install 'llmc[gpu]'"
_modules: dict[str, ModuleType] = {}
_interpreted: bool | None = None          # whether the kernel modules were compiled for the interpreter


def require_triton() -> ModuleType:
    """The triton package, or ConfigError naming the extra that installs it."""
    try:
        import triton
    except ImportError:
        raise ConfigError(f"the triton kernel set needs the triton package ({PACKAGE})",
                          hint=INSTALL_HINT) from None
    return triton


def version() -> str | None:
    """triton's version, or None when it is not installed (compiling for triton does not need it)."""
    try:
        return require_triton().__version__
    except ConfigError:
        return None


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def module(name: str) -> ModuleType:
    """The kernel module `llmc.kernels.triton.<name>`, imported (with triton) on first use."""
    global _interpreted
    found = _modules.get(name)
    if found is None:
        require_triton()
        if _interpreted is None:
            _interpreted = interpreter_requested()
        found = _modules[name] = importlib.import_module(f"llmc.kernels.triton.{name}")
    return found


def check_device(*tensors) -> None:
    """Triton kernels run on an NVIDIA GPU; CPU tensors only under the interpreter, which must have
    been asked for (TRITON_INTERPRET=1) before the first triton kernel ran."""
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not _interpreted:
            raise ConfigError(f"triton kernels got a tensor on {t.device.type}; they run on an NVIDIA GPU, "
                              "or on the CPU only under TRITON_INTERPRET=1 (for verification)",
                              hint="set TRITON_INTERPRET=1 before the first triton kernel runs")
