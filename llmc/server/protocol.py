"""The OpenAI API's request bodies, checked field by field, and its error body.

A request is a JSON object whose every field is known and in range, or it is refused with a 400 that
names the field (`param`) in the OpenAI error shape: {"error": {"message", "type", "param", "code"}}.
A JSON null is taken as the field not given. Fields llmc does not implement (n > 1, best_of, echo,
suffix, logit_bias) are refused when they ask for something, not silently ignored. Beyond the OpenAI
fields, the usual serving extensions are accepted: top_k, stop_token_ids, ignore_eos and
repetition_penalty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from llmc.runtime.sampler import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams

DEFAULT_COMPLETION_TOKENS = 16          # the OpenAI completions default for max_tokens


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- field checkers: (value, name) -> value, or RequestError ----------------------------------------
def _fail(name: str, what: str, value: Any) -> RequestError:
    shown = repr(value)
    return RequestError(f"'{name}' must be {what}, got {shown[:80]}", param=name, code="invalid_value")


def integer(lo: int | None = None, hi: int | None = None) -> Callable:
    def check(v, name):
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _fail(name, f"an integer{_range(lo, hi)}", v)
        return v
    return check


def number(lo: float, hi: float, open_lo: bool = False) -> Callable:
    def check(v, name):
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not ok or v > hi or v < lo or (open_lo and v == lo):
            raise _fail(name, f"a number in {'(' if open_lo else '['}{lo}, {hi}]", v)
        return float(v)
    return check


def boolean(v, name):
    if not isinstance(v, bool):
        raise _fail(name, "true or false", v)
    return v


def string(v, name):
    if not isinstance(v, str):
        raise _fail(name, "a string", v)
    return v


def stop_strings(v, name):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise _fail(name, f"a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", v)
    return tuple(stops)


def token_list(v, name):
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise _fail(name, "a list of token ids", v)
    return tuple(v)


def stream_options(v, name):
    if not isinstance(v, dict) or set(v) - {"include_usage", "continuous_usage_stats"}:
        raise _fail(name, "an object with 'include_usage'", v)
    return bool(boolean(v.get("include_usage", False), f"{name}.include_usage"))


def only(value: Any, what: str) -> Callable:
    """A field llmc takes only at its default: anything else is refused as unsupported."""
    def check(v, name):
        if v != value and not (value is None and v in ({}, "")):
            raise RequestError(f"'{name}' {what}", param=name, code="unsupported")
        return v
    return check


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    return f" >= {lo}" if lo is not None else ""


SAMPLING_FIELDS: dict[str, Callable] = {
    "model": string, "user": string,
    "max_tokens": integer(1), "temperature": number(0, 2), "top_p": number(0, 1, open_lo=True),
    "top_k": integer(-1), "seed": integer(0, 2 ** 63 - 1), "stop": stop_strings, "stop_token_ids": token_list,
    "ignore_eos": boolean, "presence_penalty": number(-2, 2), "frequency_penalty": number(-2, 2),
    "repetition_penalty": number(0, 10, open_lo=True), "stream": boolean, "stream_options": stream_options,
    "n": only(1, "must be 1: llmc returns one choice per prompt"),
    "logit_bias": only(None, "is not supported"),
}
COMPLETION_FIELDS = {**SAMPLING_FIELDS, "prompt": lambda v, n: v, "logprobs": integer(0, MAX_LOGPROBS),
                     "echo": only(False, "is not supported"), "suffix": only(None, "is not supported"),
                     "best_of": only(1, "must be 1")}
CHAT_FIELDS = {**SAMPLING_FIELDS, "messages": lambda v, n: v, "max_completion_tokens": integer(1),
               "logprobs": boolean, "top_logprobs": integer(0, MAX_LOGPROBS), "add_generation_prompt": boolean}


def check_fields(body: Any, fields: dict[str, Callable], required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"unknown field '{unknown[0]}'", param=unknown[0], code="unknown_parameter")
    for name in required:
        if body.get(name) is None:
            raise RequestError(f"'{name}' is required", param=name, code="missing_required_parameter")
    return {name: fields[name](v, name) for name, v in body.items() if v is not None}


def prompts_of(v: Any, vocab: int) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids or a list of lists of them."""
    def ids_ok(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in x)
    if isinstance(v, str):
        prompts = [v]
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        prompts = [v]
    elif isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
        prompts = v
    else:
        raise _fail("prompt", "a string, a list of strings, a list of token ids or a list of such lists", v)
    for p in prompts:
        if isinstance(p, list) and not ids_ok(p):
            raise _fail("prompt", f"token ids in [0, {vocab})", p)
        if isinstance(p, str) and not p:
            raise RequestError("'prompt' must not be empty", param="prompt", code="invalid_value")
    return prompts


def messages_of(v: Any) -> list[dict[str, Any]]:
    """`messages`: a non-empty list of {role, content}, content a string or a list of text parts
    (joined: llmc serves text models)."""
    if not isinstance(v, list) or not v:
        raise _fail("messages", "a non-empty list of messages", v)
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _fail(where, "an object with a string 'role'", m)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _fail(f"{where}.content", "a string or a list of text parts", content)
            content = "".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            raise _fail(f"{where}.content", "a string or a list of text parts", content)
        out.append({**m, "content": content})
    return out


@dataclass(frozen=True)
class GenerationRequest:
    """What both endpoints ask for, checked: the sampling options, less max_tokens (which depends on
    the prompt's length for chat) and logprobs."""
    fields: dict[str, Any]
    stream: bool
    include_usage: bool

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        f = self.fields
        top_k = f.get("top_k")
        return SamplingParams(max_tokens=max_tokens, temperature=f.get("temperature", 1.0),
                              top_p=f.get("top_p", 1.0), top_k=None if top_k in (None, -1, 0) else top_k,
                              seed=f.get("seed"), ignore_eos=f.get("ignore_eos", False),
                              stop=f.get("stop", ()), stop_token_ids=f.get("stop_token_ids", ()),
                              logprobs=logprobs, presence_penalty=f.get("presence_penalty", 0.0),
                              frequency_penalty=f.get("frequency_penalty", 0.0),
                              repetition_penalty=f.get("repetition_penalty", 1.0))


def parse_request(body: Any, fields: dict[str, Callable], required: tuple[str, ...]) -> GenerationRequest:
    f = check_fields(body, fields, required)
    if "stream_options" in f and not f.get("stream", False):
        raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options",
                           code="invalid_value")
    if f.get("top_logprobs") and not f.get("logprobs"):
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    return GenerationRequest(f, stream=f.get("stream", False), include_usage=f.get("stream_options", False))
