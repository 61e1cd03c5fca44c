"""Tokenization through the `tokenizers` library (tokenizer.json), with BOS/EOS handling that
follows the checkpoint: an explicit `add_bos_token` / `add_eos_token` in tokenizer_config.json
replaces the post-processor (as transformers does); otherwise tokenizer.json's own post-processor
decides. Stop ids come from generation_config.json, then config.json, then the EOS token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.checkpoint import read_json
from llmc.errors import ModelFormatError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, list) else [x])]


@dataclass(frozen=True)
class TokenizerInfo:
    """What the engine records about tokenization."""
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool | None          # None: tokenizer.json's post-processor decides
    add_eos: bool | None


class Tokenizer:
    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        self._tk = None                 # no tokenizer.json: token ids only (encode/decode raise)
        if path.exists():
            try:
                self._tk = HFTokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ModelFormatError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None
        self.directory = directory
        tcfg = read_json(directory / "tokenizer_config.json", "tokenizer_config.json") \
            if (directory / "tokenizer_config.json").exists() else {}
        gcfg = read_json(directory / "generation_config.json", "generation_config.json") \
            if (directory / "generation_config.json").exists() else {}
        mcfg = read_json(directory / "config.json", "config.json") if (directory / "config.json").exists() else {}

        bos = self._id_of(_token_text(tcfg.get("bos_token")))
        if bos is None:
            bos = gcfg.get("bos_token_id", mcfg.get("bos_token_id"))
        # Stop ids as transformers' generate finds them: generation_config.json, else config.json;
        # the tokenizer's EOS token only when neither says anything.
        if "eos_token_id" in gcfg:
            eos = _as_list(gcfg["eos_token_id"])
        elif mcfg.get("eos_token_id") is not None:
            eos = _as_list(mcfg["eos_token_id"])
        else:
            e = self._id_of(_token_text(tcfg.get("eos_token")))
            eos = [] if e is None else [e]
        self.info = TokenizerInfo(
            bos_token_id=bos,
            eos_token_ids=tuple(eos),
            add_bos=tcfg["add_bos_token"] if "add_bos_token" in tcfg else None,
            add_eos=tcfg["add_eos_token"] if "add_eos_token" in tcfg else None,
        )
        self._eos_token_id = self._id_of(_token_text(tcfg.get("eos_token")))

    def _id_of(self, text: str | None) -> int | None:
        return None if text is None or self._tk is None else self._tk.token_to_id(text)

    @property
    def available(self) -> bool:
        return self._tk is not None

    def _need(self):
        if self._tk is None:
            raise ModelFormatError(f"{self.directory}: has no tokenizer.json, so it takes token ids, not text")
        return self._tk

    def encode(self, text: str) -> list[int]:
        self._need()
        info = self.info
        if info.add_bos is None and info.add_eos is None:
            return self._tk.encode(text, add_special_tokens=True).ids
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if info.add_bos and info.bos_token_id is not None:
            ids = [info.bos_token_id] + ids
        if info.add_eos and self._eos_token_id is not None:
            ids = ids + [self._eos_token_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._need().decode(ids, skip_special_tokens=True)

    def decode_continuation(self, prompt_ids: list[int], ids: list[int]) -> str:
        """The text `ids` add after the prompt, with the spacing they have in context (a
        SentencePiece decoder drops the leading space of a piece decoded on its own)."""
        head = self.decode(prompt_ids)
        full = self.decode(prompt_ids + ids)
        return full[len(head):] if full.startswith(head) else self.decode(ids)
