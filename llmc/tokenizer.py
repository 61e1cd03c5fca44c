"""Tokenization through the `tokenizers` library (tokenizer.json), with BOS/EOS handling that
follows the checkpoint: an explicit `add_bos_token` / `add_eos_token` in tokenizer_config.json
replaces the post-processor (as transformers does); otherwise tokenizer.json's own post-processor
decides. Stop ids come from generation_config.json, then config.json, then the EOS token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.arch import MAX_VOCAB, Flag, Int, ListOf, Maybe, show_value
from llmc.checkpoint import read_json
from llmc.errors import ModelFormatError
from llmc.paths import check_regular

MAX_STOP_IDS = 1024               # stop ids one file may list; real ones list a handful


def _token_text(tok: Any, name: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken object, or null."""
    text = tok.get("content") if isinstance(tok, dict) else tok
    if text is not None and not (isinstance(text, str) and _is_utf8(text)):
        raise ModelFormatError(f"{name} must be a token string or an object with a string 'content', "
                               f"got {show_value(tok)}")
    return text


def _is_utf8(text: str) -> bool:
    """False for a string JSON can hold but a tokenizer cannot look up (a lone surrogate, "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _token_ids(x: Any, name: str, vocab: int) -> list[int]:
    """eos_token_id as generation_config.json / config.json write it: null, one id or a list of ids."""
    if x is None:
        return []
    if isinstance(x, list):
        return list(ListOf(Int(0, vocab - 1), MAX_STOP_IDS).check(x, name))
    return [Int(0, vocab - 1).check(x, name)]


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
        if os.path.lexists(path):
            check_regular(path, "tokenizer.json")    # the tokenizers library would block on a FIFO
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

        # Token ids must name tokens: below the tokenizer's size (added tokens included), if it has one.
        # Both files are checked, also where one is not used, so a bad value never goes unnoticed.
        vocab = MAX_VOCAB if self._tk is None else self._tk.get_vocab_size(with_added_tokens=True)
        bos_ids, eos_ids = {}, {}
        for source, cfg in (("generation_config.json", gcfg), ("config.json", mcfg)):
            where = directory / source
            bos_ids[source] = Maybe(Int(0, vocab - 1)).check(cfg.get("bos_token_id"), f"{where}: bos_token_id")
            eos_ids[source] = _token_ids(cfg.get("eos_token_id"), f"{where}: eos_token_id", vocab)
        where = directory / "tokenizer_config.json"
        bos_text = _token_text(tcfg.get("bos_token"), f"{where}: bos_token")
        eos_text = _token_text(tcfg.get("eos_token"), f"{where}: eos_token")
        bos = self._id_of(bos_text)
        if bos is None:
            bos = bos_ids["generation_config.json" if "bos_token_id" in gcfg else "config.json"]
        # Stop ids as transformers' generate finds them: generation_config.json, else config.json;
        # the tokenizer's EOS token only when neither says anything.
        if "eos_token_id" in gcfg:
            eos = eos_ids["generation_config.json"]
        elif mcfg.get("eos_token_id") is not None:
            eos = eos_ids["config.json"]
        else:
            e = self._id_of(eos_text)
            eos = [] if e is None else [e]
        flag = Maybe(Flag())              # null: as if absent, the post-processor decides
        self.info = TokenizerInfo(
            bos_token_id=bos,
            eos_token_ids=tuple(eos),
            add_bos=flag.check(tcfg.get("add_bos_token"), f"{where}: add_bos_token"),
            add_eos=flag.check(tcfg.get("add_eos_token"), f"{where}: add_eos_token"),
        )
        self._eos_token_id = self._id_of(eos_text)

    def _id_of(self, text: str | None) -> int | None:
        return None if text is None or self._tk is None else self._tk.token_to_id(text)

    @property
    def available(self) -> bool:
        return self._tk is not None

    def _need(self):
        if self._tk is None:
            raise ModelFormatError(f"{self.directory}: has no tokenizer.json, so it takes token ids, not text")
        return self._tk

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; without special tokens for text that already holds them (a rendered
        chat template writes its own BOS)."""
        self._need()
        if not add_special_tokens:
            return self._tk.encode(text, add_special_tokens=False).ids
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

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's piece for an id ("▁the", "<0x0A>"), None for an id it does not have."""
        return self._need().id_to_token(token_id)

    def token_text(self, token_id: int) -> str:
        """One token as text on its own (log-probability listings); special tokens by their name."""
        return self._need().decode([token_id], skip_special_tokens=False)

    def decode_continuation(self, prompt_ids: list[int], ids: list[int]) -> str:
        """The text `ids` add after the prompt, with the spacing they have in context (a
        SentencePiece decoder drops the leading space of a piece decoded on its own)."""
        head = self.decode(prompt_ids)
        full = self.decode(prompt_ids + ids)
        return full[len(head):] if full.startswith(head) else self.decode(ids)
