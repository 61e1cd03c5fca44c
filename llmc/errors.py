"""User-facing errors: one line of message plus an optional hint. The CLI prints them and exits 2."""
from __future__ import annotations


class LlmcError(Exception):
    """A problem the user can fix (bad path, bad option, corrupt file). Never a bug in llmc."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = self.message if self.hint is None else f"{self.message} (hint: {self.hint})"
        return " ".join(text.split())


class ConfigError(LlmcError):
    """An option, profile or config value is invalid."""


class OptionError(ConfigError):
    """A bad value of one named option. `option` is its Python name (`group_size`); the library
    says `group_size=...`, the CLI names it as typed (`--group-size`) and where the value came from."""

    def __init__(self, option: str, reason: str, hint: str | None = None) -> None:
        super().__init__(f"{option}: {reason}", hint)
        self.option, self.reason = option, reason


class ModelFormatError(LlmcError):
    """A checkpoint directory or file cannot be read as a model."""


class UnsupportedModelError(LlmcError):
    """The checkpoint is readable but its architecture or a feature of it is not supported."""


class EngineError(LlmcError):
    """An engine directory is incomplete, altered or of an unknown schema."""


class GraphError(Exception):
    """The IR is malformed: an internal invariant, raised by the verifier (a bug, not a user error)."""

