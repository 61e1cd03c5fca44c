"""Profiles: named recipes in TOML, one table per verb, that set the defaults of its options.

    llmc quantize MODEL -o OUT --profile int4-gptq          # profiles/int4-gptq.toml
    llmc quantize MODEL -o OUT --profile ./mine.toml --group-size 64

An option given on the command line wins over the profile; the profile wins over the built-in
default. A profile names the options as the command line does, with `_` for `-`
(`group_size = 128`). Each table accepts exactly the options below; anything else is an error
that names the file and the key.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.errors import ConfigError
from llmc.gate_rules import GATE_KEYS, gate_config
from llmc.quantized.scheme import quantize_option_types
from llmc.resources import profile_dir

PROFILE_DIR = profile_dir()      # the bundled profiles: profiles/ of the repository, package llmc.bundled_profiles

# table -> option -> accepted Python types
SECTIONS: dict[str, dict[str, tuple[type, ...]]] = {
    "quantize": {**quantize_option_types(), "calib": (str,), "format": (str,)},   # the recipe's, and the driver's
    "compile": {"target": (str,), "passes": (list,)},
    "runtime": {"max_num_seqs": (int,), "max_batched_tokens": (int,), "kv_blocks": (int,), "block_size": (int,),
                "prefix_cache": (bool,), "kernels": (str,), "threads": (int,), "max_queue": (int,),
                "request_timeout": (int, float), "drain_timeout": (int, float)},   # llmc serve
    "gate": GATE_KEYS,                                      # llmc gate; its metrics table: gate_config checks it
}


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str = ""
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def section(self, verb: str) -> dict[str, Any]:
        return dict(self.sections.get(verb, {}))


def available_profiles() -> list[str]:
    """The names of the bundled profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_path(name: str) -> Path:
    """A bundled profile's name, or the path of a .toml file."""
    if name.endswith(".toml") or "/" in name:
        p = Path(name)
        if not p.is_file():
            raise ConfigError(f"{p}: profile file not found")
        return p
    p = PROFILE_DIR / f"{name}.toml"
    if not p.is_file():
        known = ", ".join(available_profiles()) or "none"
        raise ConfigError(f"unknown profile {name!r}; bundled: {known} (or give a path to a .toml file)")
    return p


def load_profile(name: str) -> Profile:
    p = profile_path(name)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: profile is unreadable ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: profile is not valid TOML ({e})") from None
    description = data.pop("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{p}: 'description' must be a string")
    sections = {}
    for verb, table in data.items():
        if verb not in SECTIONS:
            raise ConfigError(f"{p}: unknown table [{verb}]; known: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: [{verb}] must be a table")
        for key, value in table.items():
            types = SECTIONS[verb].get(key)
            if types is None:
                raise ConfigError(f"{p}: [{verb}] has no option {key!r}; known: {', '.join(SECTIONS[verb])}")
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)) or \
                    (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
                kind = "a list of strings" if list in types else " or ".join(t.__name__ for t in types)
                raise ConfigError(f"{p}: [{verb}] {key} must be {kind}, got {value!r}")
        sections[verb] = dict(table)
    if "gate" in sections:
        gate_config(sections["gate"], where=f"{p}: [gate]")        # the rules' tables, checked now
    calib = sections.get("quantize", {}).get("calib")
    if calib is not None and not Path(calib).is_absolute():       # relative to the profile file
        sections["quantize"]["calib"] = str(p.parent / calib)
    return Profile(name=p.stem, path=p, description=description, sections=sections)


def resolve_options(verb: str, given: dict[str, Any], defaults: dict[str, Any], profile: str | None) -> dict[str, Any]:
    """The options of `verb`: what the command line gave (not None), else the profile's, else the default."""
    table = load_profile(profile).section(verb) if profile else {}
    return {k: given[k] if given.get(k) is not None else table.get(k, defaults.get(k)) for k in given}


def option_origins(verb: str, given: dict[str, Any], profile: str | None) -> dict[str, str]:
    """Where each option's value comes from: "command line", "profile NAME" or "default"."""
    table = load_profile(profile).section(verb) if profile else {}
    return {k: "command line" if given.get(k) is not None else f"profile {profile}" if k in table else "default"
            for k in given}
