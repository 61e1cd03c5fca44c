"""Graph passes (installed as `llmc.passes`): each is a pure function Graph -> Graph registered by
name with a frozen config class. Importing this package registers them all."""
from llmc.passes.registry import PASSES, NoConfig, PassManager, PassRecord, register_pass  # noqa: F401
from llmc.passes import fusion, kv_cache  # noqa: F401,E402  (registers)

DEFAULT_PIPELINE = ("fuse-qkv", "fuse-gate-up-silu", "fuse-add-rms-norm", "dce")
