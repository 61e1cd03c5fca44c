"""The import structure DESIGN.md states: imports point down the layers only, and no module imports
itself back through others, but for the deliberate registration imports (a registry module importing
the modules that register into it).

    core <- kernels <- passes <- model / engine <- runtime <- backends <- drivers <- cli
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"llmc": ROOT / "llmc", "llmc.passes": ROOT / "passes", "llmc.kernels": ROOT / "kernels"}

LAYERS = [  # (layer, module-name prefixes), lowest first; a module belongs to the longest matching prefix
    ("core", ["llmc", "llmc.errors", "llmc.ir", "llmc.ops", "llmc.arch", "llmc.decoder", "llmc.checkpoint",
              "llmc.paths", "llmc.io", "llmc.signals", "llmc.allocator", "llmc.quantized", "llmc.targets",
              "llmc.resources", "llmc.data", "llmc.bundled_profiles"]),
    ("kernels", ["llmc.kernels"]),
    ("passes", ["llmc.passes"]),
    ("model", ["llmc.tokenizer", "llmc.model", "llmc.engine", "llmc.gptq_format", "llmc.loader"]),
    ("runtime", ["llmc.runtime"]),
    ("backends", ["llmc.backends"]),
    ("drivers", ["llmc.compiler", "llmc.quantizer", "llmc.calibration", "llmc.mixed_precision", "llmc.generation", "llmc.inspection",
                 "llmc.bench", "llmc.profiles", "llmc.server", "llmc.gate", "llmc.gate_rules", "llmc.junit"]),
    ("cli", ["llmc.cli", "llmc.cli_results", "llmc.__main__"]),
]
RANK = {layer: i for i, (layer, _) in enumerate(LAYERS)}

REGISTRATION = {           # registry module -> the modules it imports so that they register
    "llmc.ir": {"llmc.ops"},
    "llmc.kernels": {"llmc.kernels.reference", "llmc.kernels.cpu"},
    "llmc.passes": {"llmc.passes.fusion", "llmc.passes.kv_cache"},
    "llmc.cli": {"llmc.cli_results"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for f in directory.rglob("*.py"):
            parts = list(f.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if name.startswith("llmc.") and name.split(".")[1] in ("passes", "kernels") and package == "llmc":
                continue                       # not a real llmc/passes dir; mapped above
            found[name] = f
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every llmc module `name` imports, at module level or inside functions."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def layer_of(name: str) -> str:
    best = max(((p, layer) for layer, prefixes in LAYERS for p in prefixes
                if name == p or name.startswith(p + ".")), key=lambda t: len(t[0]))
    return best[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        assert layer_of(name) in RANK, name


def test_imports_point_down_the_layers(graph):
    upward = [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, deps in graph.items() for b in deps
              if RANK[layer_of(b)] > RANK[layer_of(a)] and b not in REGISTRATION.get(a, ())]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles_but_registration(graph):
    edges = {a: {b for b in deps if b not in REGISTRATION.get(a, ())} for a, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [])
    assert not cycles, "\n".join(cycles)


def test_kernels_and_ir_load_nothing_above_them():
    """In a fresh interpreter: importing the kernels and the IR loads no pass, model or engine module."""
    code = ("import sys, llmc.kernels, llmc.ir; "
            "print('\\n'.join(m for m in sys.modules if m.startswith('llmc.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.split()
    assert "llmc.kernels.cpu" in loaded and "llmc.ir" in loaded
    above = [m for m in loaded if m.startswith(("llmc.passes", "llmc.model", "llmc.engine", "llmc.runtime",
                                                 "llmc.backends", "llmc.loader"))]
    assert not above, above
