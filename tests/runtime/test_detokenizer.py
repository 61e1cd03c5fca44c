"""IncrementalDetokenizer against Tokenizer.decode_continuation: the streamed text is exactly the decoded
continuation, nothing is shown that a later token could change, stop strings cut at their earliest
occurrence, and each token decodes only a short window."""
import time

import pytest
from hypothesis import given, strategies as st

from llmc.errors import OptionError
from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.tokenizer import Tokenizer
from tests.helpers import GOLDEN, STORIES

STORIES_TOK = Tokenizer(STORIES)                   # SentencePiece-style: byte fallback, leading-space strip
STDLIB_TOK = Tokenizer(GOLDEN / "stdlib-llama")    # SentencePiece-style: byte fallback, no strip
STORY_TEXT = (GOLDEN / "tinystories_valid_head.txt").read_text()
BOS, EOS = 1, 2
THE = STORIES_TOK.encode("the")[1]                 # the piece "▁the"


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    """A byte-level BPE with few merges, so that single tokens are parts of multi-byte characters."""
    from tokenizers import ByteLevelBPETokenizer
    tk = ByteLevelBPETokenizer()
    tk.train_from_iterator(["héllo wörld 日本語 🎉", "hello world END", "日本 🎉🎉 wörld"] * 3,
                           vocab_size=275, min_frequency=1, special_tokens=["<|endoftext|>"])
    directory = tmp_path_factory.mktemp("byte-bpe")
    tk.save(str(directory / "tokenizer.json"))
    return Tokenizer(directory)


def vocab(tok: Tokenizer) -> int:
    return tok._tk.get_vocab_size(with_added_tokens=True)


def byte_id(tok: Tokenizer, b: int) -> int:
    return tok._tk.token_to_id(f"<0x{b:02X}>")


def stream(tok, prompt, ids, stop=()):
    """(detokenizer, [each add() result..., flush()])."""
    d = IncrementalDetokenizer(tok, prompt, stop)
    chunks = [d.add(i) for i in ids]
    return d, chunks + [d.flush()]


def text_ids(tok: Tokenizer, text: str) -> list[int]:
    """The ids of `text` without the BOS that encode() adds."""
    ids = tok.encode(text)
    return ids[1:] if ids[:1] == [tok.info.bos_token_id] else ids


def token_lists(tok, max_len=30):
    """Random ids over the whole vocabulary (special and byte pieces included, and ids past the end,
    as a padded model vocabulary can sample), mixed with encoded text."""
    ids = st.lists(st.integers(0, vocab(tok) + 2), max_size=max_len)
    text = st.text(st.sampled_from("ab éü日本🎉\n."), max_size=12).map(lambda s: text_ids(tok, s))
    return st.one_of(ids, text, st.tuples(text, ids).map(lambda t: t[0] + t[1]))


@pytest.mark.parametrize("name", ["stories", "stdlib", "byte_bpe"])
@given(data=st.data())
def test_stream_is_decode_continuation_and_never_shows_what_may_change(name, data, request):
    tok = {"stories": STORIES_TOK, "stdlib": STDLIB_TOK}.get(name) or request.getfixturevalue("byte_bpe")
    prompt = data.draw(st.one_of(token_lists(tok, 8), st.just([BOS]), st.just([])), "prompt")
    head, a, b = (data.draw(token_lists(tok), n) for n in ("head", "tail a", "tail b"))
    d, chunks = stream(tok, prompt, head + a)
    assert "".join(chunks) == d.text == tok.decode_continuation(prompt, head + a)
    # What was shown after `head` is final: also the start of the text of any other continuation.
    assert tok.decode_continuation(prompt, head + b).startswith("".join(chunks[:len(head)]))
    assert not d.stopped and d.stop_reason is None


def test_text_is_released_as_soon_as_it_is_final():
    prompt, ids = STORIES_TOK.encode("Once upon"), text_ids(STORIES_TOK, STORY_TEXT[9:400])
    d = IncrementalDetokenizer(STORIES_TOK, prompt)
    for k, i in enumerate(ids, 1):
        d.add(i)
        # Held only after a byte piece or a token with no text of its own (here "▁", whose space
        # the leading-space strip removes when it is decoded alone).
        if STORIES_TOK._tk.id_to_token(i)[:3] != "<0x" and STORIES_TOK.decode([i]):
            assert d.text == STORIES_TOK.decode_continuation(prompt, ids[:k])


def test_characters_split_across_tokens_wait_for_their_last_byte(byte_bpe):
    ids = byte_bpe.encode("日本語 🎉")
    assert "\ufffd" in "".join(byte_bpe.decode([i]) for i in ids)        # the tokens do split characters
    d, chunks = stream(byte_bpe, [], ids)
    assert "".join(chunks) == "日本語 🎉" and not any("\ufffd" in c for c in chunks)
    # Byte fallback: "é" as two byte pieces; a special token inside the run does not end it.
    e = [byte_id(STORIES_TOK, 0xC3), EOS, byte_id(STORIES_TOK, 0xA9)]
    assert stream(STORIES_TOK, [BOS], e + [THE])[1] == ["", "", "", "é the", ""]


def test_invalid_and_incomplete_bytes_come_out_as_decode_gives_them():
    a, e6 = byte_id(STORIES_TOK, 0x41), byte_id(STORIES_TOK, 0xE6)
    # "A" as a byte piece is valid until the invalid byte after it turns the whole run into U+FFFD.
    assert stream(STORIES_TOK, [BOS], [a, e6, THE])[1] == ["", "", "\ufffd\ufffd the", ""]
    # A generation that ends inside a character: flush() gives what decode() gives.
    assert stream(STORIES_TOK, [BOS], [THE, e6])[1] == ["the", "", "\ufffd"]
    # A prompt of ids that ends inside a character the generation completes: decoded without the
    # prompt, as decode_continuation does.
    ids = [byte_id(STORIES_TOK, 0x97), byte_id(STORIES_TOK, 0xA5), THE]
    want = STORIES_TOK.decode_continuation([BOS, e6], ids)
    assert want == "\ufffd\ufffd the" and "".join(stream(STORIES_TOK, [BOS, e6], ids)[1]) == want


def test_special_tokens_make_no_text():
    ids = STORIES_TOK.encode("Once upon a time")
    d, chunks = stream(STORIES_TOK, [BOS], [EOS, ids[1], BOS, EOS, ids[2], 0])
    assert d.text == "Once upon" == STORIES_TOK.decode_continuation([BOS], [EOS, ids[1], BOS, EOS, ids[2], 0])


@pytest.mark.parametrize("stop", [["a"] * 5, [""], ["ok", 3], "END", [None]])
def test_bad_stop_strings_are_refused(stop):
    with pytest.raises(OptionError) as e:
        IncrementalDetokenizer(STORIES_TOK, [BOS], stop)
    assert e.value.option == "stop"


def char_ids(tok: Tokenizer, text: str) -> list[int]:
    """One byte-level token per ASCII character."""
    return [tok._tk.token_to_id("Ġ" if c == " " else c) for c in text]


def test_a_possible_stop_string_is_held_back_until_disproved(byte_bpe):
    d = IncrementalDetokenizer(byte_bpe, char_ids(byte_bpe, "say"), ["END"])
    assert [d.add(i) for i in char_ids(byte_bpe, "aENxEND")] == ["a", "", "", "ENx", "", "", ""]
    assert d.stopped and d.stop_reason == "END" and d.text == "aENx"
    assert d.add(char_ids(byte_bpe, "b")[0]) == "" and d.flush() == "" and d.text == "aENx"
    d, chunks = stream(byte_bpe, [], char_ids(byte_bpe, "aEN"), ["END"])        # never completed
    assert chunks == ["a", "", "", "EN"] and not d.stopped


def test_stop_strings_count_after_the_prompt_only(byte_bpe):
    d, chunks = stream(byte_bpe, char_ids(byte_bpe, "the EN"), char_ids(byte_bpe, "D, END"), ["END"])
    assert d.text == "D, " and d.stop_reason == "END"                # not the one across the boundary
    prompt = STORIES_TOK.encode("Once upon a time")
    d, _ = stream(STORIES_TOK, prompt, text_ids(STORIES_TOK, "Once"), ["time"])
    assert d.text == " Once" and not d.stopped


@pytest.mark.parametrize("text, want, reason", [
    ("xABCE", "xA", "BC"),       # "BC" is complete first but waits until "ABCD" is ruled out
    ("xABC", "xA", "BC"),        # ... or the generation ends: then flush() accepts it
    ("xABCD", "x", "ABCD"),      # the earliest occurrence wins, however the text was split
    ("xBCD", "x", "BC"),         # same start: the shorter string
])
def test_the_earliest_stop_string_wins(byte_bpe, text, want, reason):
    d, chunks = stream(byte_bpe, [], char_ids(byte_bpe, text), ["ABCD", "BCD", "BC"])
    assert "".join(chunks) == d.text == want and d.stop_reason == reason
    d, chunks = stream(byte_bpe, [], byte_bpe.encode(text), ["ABCD", "BCD", "BC"])
    assert d.text == want and d.stop_reason == reason


@given(data=st.data())
def test_stop_strings_cut_the_continuation_at_the_earliest_occurrence(data):
    prompt = STORIES_TOK.encode(data.draw(st.sampled_from(["", "Once upon", "She said"])))
    start = data.draw(st.integers(0, len(STORY_TEXT) - 200))
    ids = data.draw(st.one_of(st.just(text_ids(STORIES_TOK, STORY_TEXT[start:start + 150])),
                              token_lists(STORIES_TOK, 40)))
    full = STORIES_TOK.decode_continuation(prompt, ids)
    pieces = st.integers(0, max(0, len(full) - 1)).flatmap(
        lambda i: st.integers(1, 8).map(lambda n: full[i:i + n]))             # strings that do occur
    stop = data.draw(st.lists(st.one_of(pieces, st.text("eat .", min_size=1, max_size=4)), max_size=4)
                     .filter(lambda s: all(s)))
    d, chunks = stream(STORIES_TOK, prompt, ids, stop)
    hits = sorted((full.find(s), len(s), s) for s in stop if s in full)
    assert "".join(chunks) == d.text == (full[:hits[0][0]] if hits else full)
    assert d.stop_reason == (hits[0][2] if hits else None)


class CountingTokenizer:
    """Forwards to a Tokenizer and records the longest id list given to decode()."""
    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.longest = tok, 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("kind", ["text", "random"])
def test_a_long_generation_decodes_short_windows(kind):
    import random
    prompt = STORIES_TOK.encode(STORY_TEXT[:2000])                    # a long prompt: only its tail is read
    ids = (text_ids(STORIES_TOK, STORY_TEXT[2000:])[:2000] if kind == "text"
           else random.Random(0).choices(range(vocab(STORIES_TOK)), k=2000))
    assert len(ids) == 2000
    tok = CountingTokenizer(STORIES_TOK)
    t0 = time.perf_counter()
    d, chunks = stream(tok, prompt, ids)
    assert time.perf_counter() - t0 < 1.0                              # generous: about 0.05 s here
    assert "".join(chunks) == STORIES_TOK.decode_continuation(prompt, ids)
    assert tok.longest <= (16 if kind == "text" else 64)               # a window, never the whole output
