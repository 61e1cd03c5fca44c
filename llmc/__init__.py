"""llmc: make a Hugging Face causal LM fast and small, and run it.

The CLI verbs are thin layers over these functions:

    import llmc
    llmc.inspect("golden/stories260K")
    llmc.compile("golden/stories260K", "build/stories.engine")
    llmc.generate("build/stories.engine", ["Once upon a time"], llmc.SamplingParams(max_tokens=20))
    llmc.quantize("golden/stories260K", "build/q", llmc.QuantRecipe(...))   # see llmc.quantized.scheme

The names load lazily, so `import llmc` stays cheap and torch loads only when one is used. (The
modules holding them are named differently from the functions, so that importing a module never
replaces a function in this namespace.)
"""
__version__ = "0.1.0"

_EXPORTS = {
    "compile": ("llmc.compiler", "compile"),
    "generate": ("llmc.generation", "generate"),
    "inspect": ("llmc.inspection", "inspect"),
    "load_model": ("llmc.loader", "load_model"),
    "quantize": ("llmc.quantizer", "quantize"),
    "QuantRecipe": ("llmc.quantized.scheme", "QuantRecipe"),
    "recipe_from_options": ("llmc.quantized.scheme", "recipe_from_options"),
    "SamplingParams": ("llmc.runtime.sampler", "SamplingParams"),
    "RuntimeConfig": ("llmc.runtime.runner", "RuntimeConfig"),
    "LlmcError": ("llmc.errors", "LlmcError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmc' has no attribute {name!r}")
    import importlib
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value             # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
