"""The official `openai` package against a live `kubellm serve` process, as a user would run it.

Most tests share one server serving a tiny random Llama (SmolLM2's real tokenizer and chat template),
so outputs are gibberish but deterministic under greedy decoding; the last test checks the embedded
SmolLM2 gives a sensible answer. Servers with special flags (--api-key, --max-queue) and the SIGTERM
test start their own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

# Fixtures from conftest.py: tiny_llama_server (serves the tiny Llama as MODEL), launch_tiny_llama,
# launch_kubellm.
MODEL = "tiny-llama"
TINY_MODEL_MAX_LEN = 1024  # the tiny Llama's max_position_embeddings (checked in the first test)
USER = [{"role": "user", "content": "Tell me a story about a cat."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama_server):
    return tiny_llama_server


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0)


def metrics(server) -> dict[str, float]:
    """Sample name -> value (summed over labels) from /metrics."""
    status, text = server.get("/metrics")
    assert status == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def wait_until_idle(server, timeout: float = 10) -> dict[str, float]:
    """Polls /metrics until nothing runs or waits and every KV block is back in the pool."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
        if idle and m["kubellm:kv_cache_blocks_free"] == m["kubellm:kv_cache_blocks_total"]:
            return m
        assert time.monotonic() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


def tokenize(server, body: dict) -> list[int]:
    status, resp = server.post("/tokenize", body)
    assert status == 200, resp
    return resp["tokens"]


# ---------------------------------------------------------------- chat


def test_models_lists_the_served_name(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == TINY_MODEL_MAX_LEN


def test_chat_completion(client: OpenAI, server) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, **GREEDY)
    choice = resp.choices[0]
    assert resp.id.startswith("chatcmpl-") and resp.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tokenize(server, {"model": MODEL, "messages": USER}))
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


def test_streaming_chat_equals_non_streaming(client: OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_n2_counts_the_prompt_once(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices)
    single = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens
    assert resp.usage.completion_tokens == 12
    again = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]  # seeded


def test_chat_logprobs(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and isinstance(entry.bytes, list)
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)


# ---------------------------------------------------------------- completions


def test_completion_prompt_forms_agree(client: OpenAI, server) -> None:
    prompt = "The capital of France is"
    ids = tokenize(server, {"prompt": prompt})
    as_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **GREEDY)
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, **GREEDY)
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Hello"], max_tokens=8, **GREEDY)
    id_batch = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=8, **GREEDY)
    assert as_text.id.startswith("cmpl-") and as_text.object == "text_completion"
    assert (
        as_text.choices[0].text == as_ids.choices[0].text == batch.choices[0].text == id_batch.choices[0].text
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert as_ids.usage.prompt_tokens == len(ids)
    assert id_batch.usage.prompt_tokens == len(ids) + 2 and id_batch.usage.completion_tokens == 16


def test_prefix_cache_is_shared_only_within_a_cache_salt(client: OpenAI) -> None:
    """vLLM's `cache_salt`: a tenant's cached prompt blocks serve its own later requests, never another
    tenant's (nor unsalted requests); the answer is the same either way."""
    system = "You are a terse assistant for the accounting team. Answer in one short sentence. " * 3

    def ask(question: str, salt: str | None) -> tuple[str, int, int]:
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4, extra_body={} if salt is None else {"cache_salt": salt}, **GREEDY,
        )  # fmt: skip
        usage = chat.usage
        return chat.choices[0].message.content, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens

    answer, cached, prompt_tokens = ask("What is a ledger?", "team-a")
    assert cached == 0 and prompt_tokens > 48  # several full blocks of 16
    assert ask("What is a ledger?", "team-b") == (answer, 0, prompt_tokens)
    assert ask("What is a ledger?", None) == (answer, 0, prompt_tokens)
    again, cached, _ = ask("What is a ledger?", "team-a")
    assert again == answer and cached == (prompt_tokens - 1) // 16 * 16
    _, cached, _ = ask("What is an invoice?", "team-b")  # the shared system prompt, in team-b's cache
    assert cached >= 48
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        ask("What is a ledger?", "")  # an empty salt is refused, as vLLM does


def test_completion_n2_streamed(client: OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_strings(client: OpenAI) -> None:
    base = (
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, **GREEDY)
        .choices[0]
        .text
    )
    # A stop string from the middle of the greedy text, at its first occurrence.
    start = next(
        k for k in range(8, len(base) - 4) if base.find(base[k : k + 4]) == k and base[k : k + 4].strip()
    )
    stop = base[start : start + 4]
    cut = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=30, stop=[stop], **GREEDY
    )
    assert cut.choices[0].text == base[:start] and cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop
    kept = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=30,
        stop=stop,
        extra_body={"include_stop_str_in_output": True},
        **GREEDY,
    )
    assert kept.choices[0].text == base[: start + 4]
    streamed = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=30, stop=[stop], stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == base[:start]


def test_completion_logprobs(client: OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, logprobs=2, **GREEDY)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 2 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()), abs=1e-4)


def test_tokenize_detokenize_roundtrip(server) -> None:
    ids = tokenize(server, {"prompt": "héllo wörld"})
    assert server.post("/detokenize", {"tokens": ids}) == (200, {"prompt": "héllo wörld"})


# ---------------------------------------------------------------- errors


def test_invalid_field_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)
    assert exc.value.status_code == 400 and "temperature" in exc.value.body["message"]


def test_too_long_prompt_is_400_with_both_numbers(client: OpenAI, server) -> None:
    prompt = [100] * (TINY_MODEL_MAX_LEN - 5)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=10)
    message = exc.value.body["message"]
    assert f"maximum context length is {TINY_MODEL_MAX_LEN} tokens" in message
    assert (
        f"{TINY_MODEL_MAX_LEN + 5} tokens ({TINY_MODEL_MAX_LEN - 5} in the prompt, 10 in the completion)"
        in message
    )
    ok = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)  # exactly fills the context
    assert ok.usage.completion_tokens == 5


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert exc.value.body["message"] == "The model 'no-such-model' does not exist."


def test_api_key_is_required_when_set(launch_tiny_llama) -> None:
    srv = launch_tiny_llama("--api-key", "sk-test")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=srv.api_url, api_key="wrong", max_retries=0).models.list()
    good = OpenAI(base_url=srv.api_url, api_key="sk-test", max_retries=0)
    assert good.completions.create(prompt="Hi", max_tokens=2, model=MODEL).choices
    assert srv.get("/health")[0] == 200 and srv.get("/metrics")[0] == 200  # probes stay open


async def test_full_queue_is_429(launch_tiny_llama) -> None:
    srv = launch_tiny_llama("--max-queue", "1", "--max-num-seqs", "1")
    aclient = AsyncOpenAI(base_url=srv.api_url, api_key="x", max_retries=0)

    async def one() -> str:
        try:
            resp = await aclient.completions.create(
                model=MODEL, prompt="Hi", max_tokens=200, extra_body={"ignore_eos": True}
            )
        except openai.RateLimitError:
            return "429"
        assert resp.usage.completion_tokens == 200
        return "ok"

    results = await asyncio.gather(*(one() for _ in range(12)))
    assert results.count("429") >= 1 and results.count("ok") >= 1, results


def test_stream_interval_groups_tokens_per_chunk(launch_tiny_llama) -> None:
    srv = launch_tiny_llama("--stream-interval", "4")
    client = OpenAI(base_url=srv.api_url, api_key="x", max_retries=0)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.0, "logprobs": 0,
            "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = client.completions.create(**body).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**body, stream=True) if c.choices]
    # The first token at once, then 4 a chunk ([1, 4, 4, 1]); the text and tokens are the unstreamed
    # answer's. Outputs that pile up while the event loop is busy (a loaded CI box) go out merged, so a
    # chunk may hold more: never fewer than 4 between the first and the last, never more chunks.
    sizes = [len(c.logprobs.tokens) for c in chunks]
    assert sum(sizes) == 10 and len(sizes) <= 4 and all(n >= 4 for n in sizes[1:-1]), sizes
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert chunks[-1].finish_reason == "length"


# ---------------------------------------------------------------- load, disconnects, metrics


async def test_32_concurrent_streaming_clients_all_finish(server) -> None:
    aclient = AsyncOpenAI(base_url=server.api_url, api_key="x", max_retries=0)

    async def one(i: int) -> tuple[str | None, int]:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Client {i} says hello " * (1 + i % 5)}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        finish, usage = None, 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return finish, usage

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), timeout=300)
    assert results == [("length", 24)] * 32
    wait_until_idle(server)


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnected_client_frees_its_blocks(server, stream: bool) -> None:
    before = wait_until_idle(server)
    max_tokens = TINY_MODEL_MAX_LEN - 50
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
    async with aiohttp.ClientSession(server.base_url) as http:
        if stream:
            resp = await http.post("/v1/completions", json=body)
            first = await resp.content.readline()
            assert first.startswith(b"data: ") and json.loads(first[6:])["choices"]
            resp.close()  # hang up mid-stream
        else:
            with pytest.raises(asyncio.TimeoutError):  # the client gives up and hangs up
                await asyncio.wait_for(http.post("/v1/completions", json=body), timeout=0.5)
    after = wait_until_idle(server)
    counter = "vllm:generation_tokens_total"  # absent until the first token is generated
    generated = after.get(counter, 0.0) - before.get(counter, 0.0)
    print(f"stream={stream}: {generated} of {max_tokens} tokens generated before the abort")
    assert generated < max_tokens, "the request ran to completion instead of being aborted"


def test_metrics_have_vllm_names(client: OpenAI, server) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    m = metrics(server)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert name in m, name
    assert m["vllm:generation_tokens_total"] >= 3 and m["vllm:e2e_request_latency_seconds_count"] >= 1
    # Every token after a request's first is one inter-token gap (observed once per step, in a batch).
    assert m["vllm:inter_token_latency_seconds_count"] >= 2
    # The KV cache's shape, where Gateway API inference endpoint pickers look for it.
    (info,) = [
        sample
        for family in text_string_to_metric_families(server.get("/metrics")[1])
        for sample in family.samples
        if sample.name == "vllm:cache_config_info"
    ]
    assert info.value == 1 and info.labels["block_size"] == "16"
    assert int(info.labels["num_gpu_blocks"]) == m["kubellm:kv_cache_blocks_total"]
    assert int(info.labels["kv_cache_size_tokens"]) == 16 * int(info.labels["num_gpu_blocks"])


# ---------------------------------------------------------------- shutdown


def test_sigterm_drains_in_flight_requests_then_exits_0(launch_tiny_llama) -> None:
    srv = launch_tiny_llama()
    client = OpenAI(base_url=srv.api_url, api_key="x", max_retries=0)
    stream = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=300, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks)  # in flight now
    srv.proc.send_signal(signal.SIGTERM)
    health_after: list[int | str] = []

    def probe() -> None:  # after SIGTERM: refused (listener closed) or 503, never accepted
        time.sleep(0.3)
        try:
            health_after.append(srv.get("/health", timeout=2)[0])
        except OSError as exc:
            health_after.append(type(exc).__name__)

    prober = threading.Thread(target=probe)
    prober.start()
    rest = list(chunks)
    prober.join()
    assert rest[-1].usage.completion_tokens == 300, srv.log_tail()
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert srv.proc.wait(timeout=60) == 0, srv.log_tail()
    assert health_after and health_after[0] != 200


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_smollm2_answers_sensibly(launch_kubellm) -> None:
    srv = launch_kubellm(
        "--device", "cpu", "--max-model-len", "2048", "--kv-cache-memory", "256MiB", startup_timeout=600
    )
    client = OpenAI(base_url=srv.api_url, api_key="not-needed", max_retries=0)
    name = client.models.list().data[0].id
    resp = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30,
        temperature=0,
    )
    assert "Paris" in resp.choices[0].message.content
