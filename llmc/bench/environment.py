"""What a benchmark result records about the machine and the software it ran on."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from llmc import __version__


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int | None = None) -> dict[str, Any]:
    """Versions, CPU and load, without importing torch (its version comes from the package metadata)."""
    return {"llmc": __version__, "python": platform.python_version(), "torch": package_version("torch"),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "threads": threads, "loadavg_start": list(os.getloadavg())}
