"""The OpenAI API as the official `openai` client sees it, on the golden model: completions and chat,
streamed and not, equal `generate`; every concurrent stream returns what it returns alone."""
from __future__ import annotations

import asyncio
import json
import random
import shutil

import httpx
import openai
import pytest

from llmc.generation import generate
from llmc.runtime.sampler import SamplingParams
from tests.helpers import STORIES
from tests.server.conftest import running

PROMPTS = ["Once upon a time", "Tom and his dog", "The little girl saw a big red ball and"]


@pytest.fixture(scope="module")
def server(stories_model):
    with running(STORIES, model=stories_model) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def alone(model, prompt, **params):
    return generate(None, [prompt], SamplingParams(**params), model=model).completions[0]


def test_greedy_completions_equal_generate(client, stories_model):
    for prompt in PROMPTS:
        want = alone(stories_model, prompt, max_tokens=40)
        r = client.completions.create(model="stories260K", prompt=prompt, max_tokens=40, temperature=0)
        c = r.choices[0]
        assert c.text == want.text and c.finish_reason == want.finish_reason
        assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == want.prompt_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_streamed_completions_equal_generate(client, stories_model):
    for prompt in PROMPTS:
        want = alone(stories_model, prompt, max_tokens=40)
        chunks = list(client.completions.create(model="stories260K", prompt=prompt, max_tokens=40, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == want.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_token_id_prompts_and_several_prompts_in_one_request(client, stories_model):
    ids = stories_model.tokenizer.encode(PROMPTS[0])
    r = client.completions.create(model="stories260K", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == alone(stories_model, PROMPTS[0], max_tokens=12).text
    r = client.completions.create(model="stories260K", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [alone(stories_model, p, max_tokens=12).text for p in PROMPTS]


def test_stop_strings_logprobs_and_seeded_sampling(client, stories_model):
    full = alone(stories_model, PROMPTS[0], max_tokens=40).text
    stop = full[10:14]
    r = client.completions.create(model="stories260K", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="stories260K", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    a = client.completions.create(model="stories260K", prompt=PROMPTS[1], max_tokens=20, temperature=1.0, seed=7)
    b = client.completions.create(model="stories260K", prompt=PROMPTS[1], max_tokens=20, temperature=1.0, seed=7)
    want = alone(stories_model, PROMPTS[1], max_tokens=20, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text == want.text


def test_models_lists_the_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["stories260K"]


def test_a_model_without_a_chat_template_answers_chat_with_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"] and e.value.body["param"] == "messages"


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_renders_the_checkpoint_template(tmp_path, stories_model):
    ckpt = tmp_path / "stories-chat"
    shutil.copytree(STORIES, ckpt)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]
    rendered = "<s>system: Tell a story.\nuser: Once upon a time\nassistant:"
    ids = stories_model.tokenizer.encode(rendered, add_special_tokens=False)
    want = generate(None, [ids], SamplingParams(max_tokens=30), model=stories_model).completions[0]
    with running(ckpt) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="stories-chat", messages=messages, max_tokens=30, temperature=0)
        assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"
        chunks = list(c.chat.completions.create(model="stories-chat", messages=messages, max_tokens=30,
                                                temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == want.finish_reason
        r = c.chat.completions.create(model="stories-chat", messages=messages, max_tokens=3, temperature=0,
                                      logprobs=True, top_logprobs=2)
        assert len(r.choices[0].logprobs.content) == 3
        assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)


async def stream_text(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[str, int, str]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, reason, usage = [], None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
                reason = chunk["choices"][0]["finish_reason"] or reason
            usage = chunk.get("usage") or usage
    return "".join(text), usage["completion_tokens"], reason


def test_64_concurrent_streams_each_return_what_they_return_alone(stories_model):
    r = random.Random(0)
    jobs = [([1] + [r.randrange(3, 512) for _ in range(r.randrange(1, 120))], r.randrange(1, 60)) for _ in range(64)]
    with running(STORIES, model=stories_model, runtime=_runtime(max_num_seqs=32, max_batched_tokens=256)) as s:
        async def all_at_once():
            async with httpx.AsyncClient(base_url=s.url, timeout=120,
                                         limits=httpx.Limits(max_connections=64)) as c:
                return await asyncio.gather(*(stream_text(c, p, n) for p, n in jobs))
        together = asyncio.run(all_at_once())
    for (prompt, n), got in zip(jobs, together):
        want = generate(None, [prompt], SamplingParams(max_tokens=n, ignore_eos=True), model=stories_model)
        c = want.completions[0]
        assert got == (c.text, len(c.token_ids), "length")


def _runtime(**kw):
    from llmc.runtime.runner import RuntimeConfig
    return RuntimeConfig(**kw)


def test_a_shared_200_token_prefix_hits_the_cache_and_changes_no_token(stories_model):
    r = random.Random(5)
    prefix = [1] + [r.randrange(3, 512) for _ in range(199)]
    prompts = [prefix + [r.randrange(3, 512) for _ in range(n)] for n in (10, 25)]

    def hits(url):
        text = httpx.get(f"{url}/metrics").text
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("llmc_prefix_cache_hit_tokens_total ")))

    def texts(**config):
        with running(STORIES, model=stories_model, **config) as s, httpx.Client(base_url=s.url, timeout=60) as c:
            out, seen = [], []
            for p in prompts:
                body = c.post("/v1/completions", json={"prompt": p, "max_tokens": 30, "temperature": 0,
                                                       "ignore_eos": True}).json()
                out.append(body["choices"][0]["text"])
                seen.append(hits(s.url))
                cached = body["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
            return out, seen, cached

    on, on_hits, cached = texts()
    off, off_hits, _ = texts(runtime=_runtime(prefix_caching=False))
    assert on == off
    assert on_hits == [0, 192] and cached == 192         # the prefix's 12 full blocks of 16
    assert off_hits == [0, 0]
