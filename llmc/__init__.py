"""llmc: make a Hugging Face causal LM fast and small, and run it.

The CLI verbs are thin layers over these functions: `inspect`, `compile`, `generate`.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "compile", "generate", "inspect", "load_model"]


def __getattr__(name: str):  # lazy, so `import llmc` stays cheap and torch loads only when needed
    if name == "generate":
        from llmc.generate import generate
        return generate
    if name == "compile":
        from llmc.compiler import compile
        return compile
    if name == "inspect":
        from llmc.inspection import inspect
        return inspect
    if name == "load_model":
        from llmc.model import load_model
        return load_model
    raise AttributeError(name)
