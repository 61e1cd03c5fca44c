"""Package data: the bundled profiles and the default calibration text, found through importlib.resources.

Both are data packages of the llmc distribution, so one lookup serves a wheel install, an editable
install and the tests of a checkout:

    llmc.bundled_profiles   the repository's profiles/ (mapped by package-dir in pyproject.toml,
                            as passes/ is to llmc.passes)
    llmc.data               llmc/data/: the default calibration text, with its provenance and license

pip installs llmc unpacked, so the resources are files on disk, and the lookups return Paths: a
profile's relative `calib` is resolved against its file, and calibration records the path and the
hash of the text it read.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from llmc.errors import ConfigError

PROFILES_PACKAGE = "llmc.bundled_profiles"
DATA_PACKAGE = "llmc.data"
CALIBRATION_TEXT = "tinystories_calib.txt"


def _package_dir(package: str) -> Path:
    """The directory of one of llmc's data packages. An editable install made before the package
    existed does not know where it lives: that is a one-line error that says to reinstall."""
    try:
        root = files(package)
    except ModuleNotFoundError:
        raise ConfigError(f"{package}: llmc's package data is not installed",
                          hint="reinstall llmc (pip install -e . in a checkout)") from None
    if not isinstance(root, Path):
        raise ConfigError(f"{package}: llmc's package data is not on disk ({root})", hint="install llmc with pip")
    return root


def profile_dir() -> Path:
    """The directory of the bundled profiles (NAME.toml)."""
    return _package_dir(PROFILES_PACKAGE)


def default_calibration() -> Path:
    """The calibration text `llmc quantize` uses when neither --calib nor the profile names one."""
    return _package_dir(DATA_PACKAGE) / CALIBRATION_TEXT
