"""`load_model(PATH)`: a Hugging Face checkpoint directory (plain, llmc-quantized or GPTQ) or an
engine directory, as one Model."""
from __future__ import annotations

import os
from pathlib import Path

from llmc.checkpoint import check_path
from llmc.engine import ENGINE_FILE, load_engine
from llmc.errors import ModelFormatError
from llmc.model import Model, load_checkpoint


def load_model(path: Path | str, passes: tuple[str, ...] | None = None) -> Model:
    """Load a checkpoint or engine directory. `passes` (checkpoints only) overrides the default pipeline."""
    p = check_path(path)
    if os.path.lexists(p / ENGINE_FILE):
        return load_engine(p)
    if os.path.lexists(p / "config.json"):
        return load_checkpoint(p, passes)
    raise ModelFormatError(f"{p}: not a model directory (no config.json or engine.json)")
