"""The HTTP layer against a scripted fake engine: shapes, streaming, n>1, logprobs, errors, auth,
disconnects, draining. The live-server tests with the real engine are in tests/integration/.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI, BadRequestError, NotFoundError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.api.server import build_app
from engine.api.state import STATE
from tests.unit.fake_engine import FakeEngine

MODEL = "fake-model"
REPLY = "The quick brown fox jumps over the lazy dog."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A real (tiny) byte-level BPE tokenizer with a chat template, trained in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([REPLY, "hello world, how are you today? héllo wörld"], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def fake_engine(tokenizer: PreTrainedTokenizerFast) -> FakeEngine:
    """Replies REPLY's tokens one per step, again and again until max_tokens (or a stop token)."""
    return FakeEngine(
        tokenizer, REPLY, repeat=True, served_model_name=MODEL, max_model_len=64, vocab_size=400
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def engine(tokenizer: PreTrainedTokenizerFast) -> FakeEngine:
    return fake_engine(tokenizer)


async def serve(app: web.Application) -> TestClient:
    # aiohttp's TestServer always runs with handler_cancellation=True, as `kubellm serve` does.
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[TestClient]:
    client = await serve(build_app(engine))
    yield client
    await client.close()


@pytest.fixture
async def trusting_client(engine: FakeEngine) -> AsyncIterator[TestClient]:
    """A server started with --trust-request-chat-template."""
    client = await serve(build_app(engine, trust_request_chat_template=True))
    yield client
    await client.close()


@pytest.fixture
def openai_client(client: TestClient) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)


def reply_prefix(tokenizer: PreTrainedTokenizerFast, num_tokens: int) -> str:
    return tokenizer.decode(tokenizer.encode(REPLY, add_special_tokens=False)[:num_tokens])


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e.removeprefix("data: ") for e in events[:-2]]


# ---------------------------------------------------------------- happy paths


async def test_chat_completion_shape_and_usage(
    openai_client: AsyncOpenAI, engine: FakeEngine, tokenizer
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    resp = await openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == reply_prefix(tokenizer, 5)
    assert resp.choices[0].finish_reason == "length"
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert engine.submitted[0].prompt_token_ids == prompt_ids
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt_ids), 5)
    assert resp.usage.total_tokens == len(prompt_ids) + 5


async def test_chat_content_parts_are_joined(
    openai_client: AsyncOpenAI, engine: FakeEngine, tokenizer
) -> None:
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=1
    )
    assert "hello\nworld" in tokenizer.decode(engine.submitted[0].prompt_token_ids)


async def test_chat_max_tokens_defaults_to_remaining_context(openai_client, engine: FakeEngine) -> None:
    resp = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == engine.max_model_len


async def test_chat_stream_events_role_content_usage_done(client: TestClient, tokenizer) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    chunks = [json.loads(e) for e in sse_events(await resp.text())]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == reply_prefix(tokenizer, 4)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_completion_stream_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}
    chunks = [
        json.loads(e) for e in sse_events(await (await client.post("/v1/completions", json=body)).text())
    ]
    assert len(chunks) == 3 and all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)


async def test_completion_batch_of_prompts_with_n2(
    openai_client: AsyncOpenAI, engine: FakeEngine, tokenizer
) -> None:
    prompts = ["hello world", "how are you today"]
    resp = await openai_client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, seed=7)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.text == reply_prefix(tokenizer, 3) and c.finish_reason == "length" for c in resp.choices)
    assert sorted(s.request_id for s in engine.submitted) == [f"{resp.id}-{i}" for i in range(4)]
    by_id = {s.request_id: s for s in engine.submitted}
    assert [by_id[f"{resp.id}-{i}"].params.seed for i in range(4)] == [7, 8, 7, 8]
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)  # each prompt counted once
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, 12)


async def test_completion_token_id_prompts(openai_client: AsyncOpenAI, engine: FakeEngine) -> None:
    await openai_client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8]], max_tokens=1)
    assert sorted(s.prompt_token_ids for s in engine.submitted) == [[5, 6, 7], [8]]
    await openai_client.completions.create(model=MODEL, prompt=[9, 10], max_tokens=1)
    assert engine.submitted[-1].prompt_token_ids == [9, 10]


async def test_stream_n2_interleaves_both_choices(client: TestClient, engine: FakeEngine) -> None:
    body = {
        "prompt": "hello",
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = [
        json.loads(e) for e in sse_events(await (await client.post("/v1/completions", json=body)).text())
    ]
    finishes = {
        c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
        for c in chunks[:-1]
        if c["choices"][0]["finish_reason"]
    }
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-1]["usage"]["prompt_tokens"] == len(engine.submitted[0].prompt_token_ids)


async def test_echo_returns_prompt_then_completion(openai_client: AsyncOpenAI, tokenizer) -> None:
    resp = await openai_client.completions.create(model=MODEL, prompt="hello world", max_tokens=2, echo=True)
    assert resp.choices[0].text == "hello world" + reply_prefix(tokenizer, 2)


async def test_echo_of_token_ids_is_decoded_off_the_event_loop(
    openai_client: AsyncOpenAI, tokenizer, monkeypatch
) -> None:
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    threads: list[threading.Thread] = []
    original = tokenizer.decode

    def decode(token_ids, *args, **kwargs):
        if list(token_ids) == ids:
            threads.append(threading.current_thread())
        return original(token_ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", decode)
    resp = await openai_client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True)
    assert resp.choices[0].text == "hello world" + reply_prefix(tokenizer, 2)
    assert threads and threading.main_thread() not in threads  # the event loop runs on the main thread


async def test_stop_token_finishes_with_stop_reason(openai_client: AsyncOpenAI, tokenizer) -> None:
    third = tokenizer.encode(REPLY, add_special_tokens=False)[2]
    resp = await openai_client.completions.create(
        model=MODEL, prompt="hi", max_tokens=10, extra_body={"stop_token_ids": [third]}
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == third
    assert resp.usage.completion_tokens == 3


async def test_sampling_fields_reach_the_engine(openai_client: AsyncOpenAI, engine: FakeEngine) -> None:
    await openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3,
        temperature=0.5,
        top_p=0.9,
        stop=["x", "y"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "min_tokens": 2,
            "ignore_eos": True,
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        },
    )
    p = engine.submitted[0].params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.top_k, p.min_p) == (
        3,
        0.5,
        0.9,
        ["x", "y"],
        5,
        0.1,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (
        0.5,
        -0.5,
        1.2,
        2,
    )
    assert p.ignore_eos and p.include_stop_str_in_output and not p.skip_special_tokens and p.logprobs is None


async def test_cache_salt_reaches_the_engine_for_every_choice(
    openai_client: AsyncOpenAI, engine: FakeEngine
) -> None:
    await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2,
        extra_body={"cache_salt": "tenant-a"},
    )  # fmt: skip
    await openai_client.completions.create(
        model=MODEL, prompt=["one", "two"], max_tokens=2, extra_body={"cache_salt": "tenant-b"}
    )
    await openai_client.completions.create(model=MODEL, prompt="unsalted", max_tokens=2)
    assert [s.cache_salt for s in engine.submitted] == ["tenant-a"] * 2 + ["tenant-b"] * 2 + [None]


# ---------------------------------------------------------------- logprobs


async def test_completion_logprobs_shape(openai_client: AsyncOpenAI, tokenizer) -> None:
    resp = await openai_client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.token_logprobs == [-0.25] * 4
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


async def test_chat_logprobs_shape(openai_client: AsyncOpenAI) -> None:
    resp = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and "".join(c.token for c in content) == resp.choices[0].message.content
    for entry in content:
        assert entry.logprob == -0.25 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token


async def test_chat_without_logprobs_has_null_logprobs(
    openai_client: AsyncOpenAI, engine: FakeEngine
) -> None:
    resp = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert resp.choices[0].logprobs is None and engine.submitted[0].params.logprobs is None


# ---------------------------------------------------------------- errors


async def error_of(resp) -> tuple[int, dict]:
    body = await resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return resp.status, body["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "hi", "temperature": 3}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "cache_salt": ""}, "cache_salt"),
        ({"prompt": "hi", "cache_salt": 7}, "cache_salt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, None),
    ],
)
async def test_invalid_fields_are_400_naming_the_field(
    client: TestClient, body: dict, field: str | None
) -> None:
    status, err = await error_of(await client.post("/v1/completions", json=body))
    assert status == 400 and err["type"] == "invalid_request_error"
    if field:
        assert err["param"] == field and err["message"].startswith(f"{field}: ")
    assert "Traceback" not in err["message"]


async def test_invalid_json_and_non_object_are_400(client: TestClient) -> None:
    status, err = await error_of(await client.post("/v1/completions", data=b"{not json"))
    assert status == 400 and "not valid JSON" in err["message"]
    status, err = await error_of(await client.post("/v1/chat/completions", json=[1, 2]))
    assert status == 400 and "JSON object" in err["message"]


async def test_image_content_part_is_400(client: TestClient) -> None:
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    status, err = await error_of(await client.post("/v1/chat/completions", json={"messages": [msg]}))
    assert status == 400 and err["param"] == "messages[0].content" and "image_url" in err["message"]


async def test_a_chat_template_in_the_request_is_refused_unless_trusted(
    client: TestClient, trusting_client: TestClient, engine: FakeEngine
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages[0].content }}"}
    for path in ("/v1/chat/completions", "/tokenize"):
        status, err = await error_of(await client.post(path, json=body))
        assert status == 400 and err["param"] == "chat_template"
        assert "--trust-request-chat-template" in err["message"]
    assert engine.submitted == []
    resp = await trusting_client.post("/tokenize", json=body)
    assert resp.status == 200 and (await resp.json())["count"] > 0


async def test_chat_template_errors_are_400(trusting_client: TestClient, engine: FakeEngine) -> None:
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": template}
    status, err = await error_of(await trusting_client.post("/v1/chat/completions", json=body))
    assert status == 400 and "Conversation roles must alternate" in err["message"] and engine.submitted == []


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("{{ 1/0 }}", "ZeroDivisionError: division by zero"),
        ("{{ messages | no_such_filter }}", "No filter named 'no_such_filter'"),
        ("{% for m in messages %}{{ m.content }}", "syntax error on line 1"),
        ("{{ range(10**9) | list }}", "OverflowError"),
        ("{{ '%d' % 'text' }}", "TypeError"),
    ],
)
async def test_broken_request_chat_template_is_400_naming_the_problem(
    trusting_client: TestClient, engine: FakeEngine, template: str, named: str
) -> None:
    client = trusting_client
    openai_client = AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(BadRequestError) as exc:
        await openai_client.chat.completions.create(
            model=MODEL, messages=messages, extra_body={"chat_template": template}
        )
    err = exc.value.body
    assert exc.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == "chat_template"
    assert err["message"].startswith("The chat_template given in the request") and named in err["message"]
    assert engine.submitted == []
    resp = await client.post("/tokenize", json={"messages": messages, "chat_template": template})
    status, tokenize_err = await error_of(resp)
    assert status == 400 and tokenize_err["message"] == err["message"]


async def test_prompt_longer_than_context_says_both_numbers(
    openai_client: AsyncOpenAI, engine: FakeEngine
) -> None:
    with pytest.raises(BadRequestError) as exc:
        await openai_client.completions.create(model=MODEL, prompt=list(range(60)), max_tokens=10)
    assert exc.value.status_code == 400
    message = exc.value.body["message"]
    assert (
        "maximum context length is 64 tokens" in message
        and "70 tokens (60 in the prompt, 10 in the completion)" in message
    )
    with pytest.raises(BadRequestError) as exc:
        await openai_client.completions.create(model=MODEL, prompt=list(range(64)), max_tokens=None)
    assert "64" in exc.value.body["message"]
    assert engine.submitted == []


async def test_out_of_vocabulary_token_ids_are_400(client: TestClient, tokenizer) -> None:
    status, err = await error_of(await client.post("/v1/completions", json={"prompt": [1, len(tokenizer)]}))
    assert status == 400 and "out of vocabulary" in err["message"]


async def test_unknown_model_is_404(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(NotFoundError) as exc:
        await openai_client.chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]
        )
    assert exc.value.body["message"] == "The model 'gpt-9' does not exist."


async def test_unknown_route_is_openai_shaped_404(client: TestClient) -> None:
    status, err = await error_of(await client.get("/v1/nothing"))
    assert status == 404 and "/v1/nothing" in err["message"]


async def test_queue_full_is_429(client: TestClient, engine: FakeEngine) -> None:
    engine.full_after = 0
    for stream in (False, True):
        status, err = await error_of(
            await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
        )
        assert status == 429 and err["code"] == "queue_full"


async def test_queue_full_on_second_choice_aborts_the_first(client: TestClient, engine: FakeEngine) -> None:
    engine.full_after, engine.delay = 1, 0.01
    status, _ = await error_of(
        await client.post("/v1/completions", json={"prompt": "hi", "n": 2, "max_tokens": 50})
    )
    assert status == 429
    assert [s.request_id for s in engine.submitted] == list(engine.aborted)


async def test_engine_crash_is_500_without_details(client: TestClient, engine: FakeEngine) -> None:
    engine.crash = RuntimeError("secret internal detail")
    status, err = await error_of(await client.post("/v1/completions", json={"prompt": "hi"}))
    assert status == 500 and "secret" not in err["message"] and "Traceback" not in err["message"]
    resp = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    events = sse_events(await resp.text())  # headers were out: the error comes in the stream, then [DONE]
    assert json.loads(events[-1])["error"]["code"] == 500 and "secret" not in events[-1]


# ---------------------------------------------------------------- disconnects, auth, draining


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_the_request(
    client: TestClient, engine: FakeEngine, stream: bool
) -> None:
    engine.delay, engine.max_model_len = 0.02, 2048
    body = {"prompt": "hi", "max_tokens": 1000, "stream": stream}
    if stream:
        resp = await client.post("/v1/completions", json=body)
        await resp.content.readline()  # the first event arrived: the request is running
        resp.close()
    else:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=0.2)
    for _ in range(100):
        if engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert engine.aborted == {engine.submitted[0].request_id}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_tokenizing_a_long_prompt_does_not_stall_the_server(path: str) -> None:
    """While one request's prompt is tokenized, others (here /health) are still answered."""
    tokenizer = make_tokenizer()
    encode, events = tokenizer.encode, []

    def slow_encode(*args, **kwargs):
        if not events:  # the prompt (the fake engine encodes its reply later)
            events.append("encode started")
            time.sleep(1.0)  # stands in for a very long prompt
            events.append("encode finished")
        return encode(*args, **kwargs)

    tokenizer.encode = slow_encode
    engine = fake_engine(tokenizer)
    client = await serve(build_app(engine))
    try:
        body = {"messages": [{"role": "user", "content": "hello"}], "prompt": "hello", "max_tokens": 1}
        body.pop("prompt" if path.endswith("chat/completions") else "messages")
        slow = asyncio.create_task(client.post(path, json=body))
        while "encode started" not in events:
            await asyncio.sleep(0.01)
        assert (await client.get("/health")).status == 200
        events.append("health answered")
        resp = await slow
        assert resp.status == 200
        assert events == ["encode started", "health answered", "encode finished"]
        expected = (
            encode(
                tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            )
            if "messages" in body
            else encode("hello")
        )
        assert engine.submitted[0].prompt_token_ids == expected  # the same tokens as on the loop
    finally:
        await client.close()


async def test_api_key(engine: FakeEngine) -> None:
    client = await serve(build_app(engine, api_key="s3cret"))
    try:
        body = {"prompt": "hi", "max_tokens": 1}
        status, err = await error_of(await client.post("/v1/completions", json=body))
        assert status == 401 and err["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.post("/v1/completions", json=body, headers=wrong)).status == 401
        assert (await client.get("/v1/models", headers=wrong)).status == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/v1/completions", json=body, headers=ok)).status == 200
        for open_path in ("/health", "/metrics", "/version"):
            assert (await client.get(open_path)).status == 200
    finally:
        await client.close()


async def test_draining_fails_health_and_refuses_new_requests(client: TestClient) -> None:
    assert (await client.get("/health")).status == 200
    client.server.app[STATE].draining = True
    assert (await client.get("/health")).status == 503
    status, err = await error_of(await client.post("/v1/completions", json={"prompt": "hi"}))
    assert status == 503 and err["code"] == "shutting_down"


async def test_health_fails_when_engine_is_dead(client: TestClient, engine: FakeEngine) -> None:
    engine.healthy = False
    assert (await client.get("/health")).status == 503


# ---------------------------------------------------------------- misc endpoints


async def test_models_version_metrics(
    openai_client: AsyncOpenAI, client: TestClient, engine: FakeEngine
) -> None:
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert models.data[0].model_extra["max_model_len"] == 64
    assert (await (await client.get("/version")).json())["version"]
    engine.metrics.labels(engine.metrics.num_requests_running).set(3)
    text = await (await client.get("/metrics")).text()
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 3.0' in text


async def test_served_model_aliases(engine: FakeEngine) -> None:
    client = await serve(build_app(engine, served_model_names=["primary", "alias"]))
    try:
        resp = await client.post("/v1/completions", json={"model": "alias", "prompt": "hi", "max_tokens": 1})
        assert resp.status == 200 and (await resp.json())["model"] == "primary"
    finally:
        await client.close()


async def test_models_retrieve_hf_style_names(engine: FakeEngine) -> None:
    client = await serve(build_app(engine, served_model_names=["org/model-1b", "alias"]))
    try:
        sdk = AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        card = await sdk.models.retrieve("org/model-1b")
        assert (card.id, card.object) == ("org/model-1b", "model")
        assert (await sdk.models.retrieve("alias")).id == "alias"
        with pytest.raises(NotFoundError) as info:
            await sdk.models.retrieve("org/other")
        assert info.value.code == "model_not_found" and info.value.param == "model"
    finally:
        await client.close()


async def test_every_route_but_probes_and_scrapes_needs_the_key(engine: FakeEngine) -> None:
    app = build_app(engine, api_key="s3cret")
    client = await serve(app)
    checked = set()
    try:
        for route in app.router.routes():
            path = route.resource.canonical.replace("{id}", MODEL) if route.resource else ""
            if route.method == "HEAD" or path in ("/health", "/metrics", "/version"):
                continue
            for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cret\u00e9"}):
                resp = await client.request(route.method, path, json={}, headers=headers)
                status, err = await error_of(resp)
                assert status == 401 and err["code"] == "invalid_api_key", (route.method, path, headers)
            checked.add(path)
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models", f"/v1/models/{MODEL}"} <= checked
    finally:
        await client.close()


async def test_tokenize_and_detokenize(client: TestClient, tokenizer) -> None:
    body = await (
        await client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})
    ).json()
    assert body["tokens"] == tokenizer.encode("hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 64 and len(body["token_strs"]) == body["count"]
    chat = await (
        await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    ).json()
    assert tokenizer.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")
    back = await (await client.post("/detokenize", json={"tokens": body["tokens"]})).json()
    assert back == {"prompt": "hello world"}
    status, _ = await error_of(await client.post("/detokenize", json={"tokens": [-1]}))
    assert status == 400
