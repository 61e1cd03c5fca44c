"""Chat templates: the Jinja template in the checkpoint's tokenizer_config.json (`chat_template`), or
one given in a file, rendered in a sandbox.

The environment is Jinja's ImmutableSandboxedEnvironment, as transformers renders chat templates: a
template cannot reach Python internals or change the objects it is given. It has the conventions
templates rely on: trim_blocks and lstrip_blocks, `raise_exception(message)` (a 400 for the client),
`strftime_now(format)`, the `tojson` filter, and the variables messages, add_generation_prompt,
bos_token and eos_token.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from llmc.errors import ConfigError, ModelFormatError


class TemplateError(ConfigError):
    """The template refused the conversation (raise_exception) or failed to render it."""


def _raise(message: str) -> None:
    raise TemplateError(str(message))


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 where: str = "the chat template") -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ModelFormatError(f"{where}: not a valid Jinja template ({e})") from None
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise TemplateError(f"the chat template could not render these messages: {e}") from None


def _token_text(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok if isinstance(tok, str) else None


def load_chat_template(model_dir: Path, template_file: Path | None = None) -> ChatTemplate | None:
    """The template of `template_file`, else of model_dir/tokenizer_config.json; None when there is none.
    A tokenizer_config.json that lists named templates gives its "default" one."""
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    cfg = {}
    if cfg_path.is_file():
        from llmc.checkpoint import read_json
        cfg = read_json(cfg_path, "tokenizer_config.json")
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    if template_file is not None:
        try:
            source = Path(template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template {template_file}: cannot be read ({e})") from None
        return ChatTemplate(source, bos, eos, where=str(template_file))
    source = cfg.get("chat_template")
    if isinstance(source, list):           # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ModelFormatError(f"{cfg_path}: chat_template must be a string or a list of named templates")
    return ChatTemplate(source, bos, eos, where=f"{cfg_path}: chat_template")
