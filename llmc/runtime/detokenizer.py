"""Incremental (streaming) detokenization with stop strings: the text each generated token adds,
released as soon as it is final, and never a stop string or what may still become one.

Window. Decoding the whole output again for every token costs O(n^2) over a long generation. As in
vLLM's `detokenize_incrementally`, two offsets into the token list bound what is decoded: the text of
tokens[start:read] has been accounted for (returned, or it is prompt), and each step decodes only the
window tokens[start:] and keeps what it adds after that text. The tokens before `read` are context: a
SentencePiece decoder drops the leading space of a piece that begins the text, and would drop the space
of the new token without them. When text is released, `start` moves to the old `read` and `read` to
the end, so the window stays a few tokens long; the prompt contributes its last CONTEXT_TOKENS.

Settled. Text is released only when no later token can change it:
- not while the window's text ends in U+FFFD: a multi-byte character may be cut between tokens;
- not while the last token is a byte-fallback piece "<0xNN>" or has no text (special tokens): the
  byte-fallback decoder decodes a whole run of byte pieces (special tokens in it skipped) as one UTF-8
  string, or as one U+FFFD per byte if any of it is invalid, so a later byte can still turn earlier
  characters of the run into U+FFFD.
`start` only ever lands right after a settling token, so no character or byte run crosses it. Text the
full decode holds as U+FFFD (invalid bytes; a generation that ends inside a character) is released as
U+FFFD, by add() once settled or by flush().

Hold-back. Settled text is searched for the stop strings, after the prompt only. Characters from which
a stop string may still start are held back until disproved; a complete stop string is accepted only if
no earlier one can still complete, so the cut is at the earliest occurrence however the text was split
into tokens (ties: the shorter string). flush() releases what is held and accepts a stop string that was
waiting only on such an earlier candidate.
"""
from __future__ import annotations

import re
from typing import Sequence

from llmc.errors import OptionError
from llmc.runtime.sampler import MAX_STOP_STRINGS
from llmc.tokenizer import Tokenizer

CONTEXT_TOKENS = 4                     # prompt tokens with text kept before the first generated one
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")   # what the `tokenizers` ByteFallback decoder decodes


def _checked_stop(stop: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop, str):
        raise OptionError("stop", f"must be a list of strings, got the single string {stop!r}",
                          hint=f"pass [{stop!r}]")
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise OptionError("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings, got {stop!r}")
    return stop


class IncrementalDetokenizer:
    """The text of one request's generated tokens, fed one at a time (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = _checked_stop(stop)
        p, need = len(prompt_ids), CONTEXT_TOKENS          # back over CONTEXT_TOKENS settling tokens,
        while p > 0 and (need > 0 or not self._settles(prompt_ids[p - 1])):   # to just after one
            need -= self._settles(prompt_ids[p - 1])
            p -= 1
        self._ids = list(prompt_ids[p:])
        self._start, self._read = 0, len(self._ids)
        self._read_text = tokenizer.decode(self._ids)
        self._open_prompt = len(self._ids)   # prompt tokens in _ids until the first text settles
        self._held = ""                      # settled text a stop string may still claim
        self._text = ""
        self.stop_reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def text(self) -> str:
        return self._text

    def _settles(self, token_id: int) -> bool:
        """Whether text that ends with this token can be final: it has text and is not a byte piece."""
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None or _BYTE_PIECE.fullmatch(piece):
            return False                                      # an id past the vocabulary, or a byte
        return self._tokenizer.decode([token_id]) != ""      # special tokens have no text

    def add(self, token_id: int) -> str:
        """Feeds one generated token; returns the text that is now final and cannot start a stop string."""
        self._ids.append(token_id)
        if self.stopped or not self._settles(token_id):
            return ""
        text = self._tokenizer.decode(self._ids[self._start:])
        if self._open_prompt and not text.startswith(self._read_text):
            # The generated tokens changed the prompt's last character (a prompt of ids that ends
            # inside one): as Tokenizer.decode_continuation does, decode them without the prompt.
            del self._ids[:self._open_prompt]
            self._start = self._read = self._open_prompt = 0
            self._read_text, text = "", self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self._read_text):]
        if self._read and self._settles(self._ids[self._read - 1]):
            self._start, self._read = self._read, len(self._ids)
            self._read_text = self._tokenizer.decode(self._ids[self._start:])
        else:       # nothing settling before `read`: no prompt, or one ending in a byte or special token
            self._read, self._read_text = len(self._ids), text
        self._open_prompt = 0
        return self._release(new, final=False)

    def flush(self) -> str:
        """At the end of generation: the text still held back (a stop string that never completed,
        a character left incomplete: decoded as decode() does). "" once stopped. Call it once."""
        if self.stopped:
            return ""
        text = self._tokenizer.decode(self._ids[self._start:])
        if self._open_prompt and not text.startswith(self._read_text):
            text, self._read_text = self._tokenizer.decode(self._ids[self._open_prompt:]), ""
        return self._release(text[len(self._read_text):], final=True)

    def _release(self, new: str, final: bool) -> str:
        """Adds settled text after what is held; returns the part no stop string can claim any more."""
        buf = self._held + new
        hold = len(buf)
        if not final:                         # the first place a stop string may have begun
            longest = max(map(len, self._stop), default=0)
            hold = next((i for i in range(max(0, len(buf) - longest + 1), len(buf))
                         if any(len(s) > len(buf) - i and s.startswith(buf[i:]) for s in self._stop)), hold)
        hits = [(buf.find(s), len(s), s) for s in self._stop if s in buf]
        if hits and min(hits)[0] <= hold:
            cut, _, self.stop_reason = min(hits)
            out, self._held = buf[:cut], ""
        else:
            out, self._held = buf[:hold], buf[hold:]
        self._text += out
        return out
