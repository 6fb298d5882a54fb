"""`kubellm serve --engine-process`: the engine loop in a process of its own, the HTTP server in another
(vLLM V1's layout), checked through the OpenAI SDK against a live server: the same answers as the
one-process server, streaming, structured outputs (grammars compile in the engine process), metrics
(kept there too), aborts that free blocks, 429 at --max-queue, SIGTERM that stops both processes, and
an engine process that dies taking the server down with an error instead of leaving it hanging."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess

import aiohttp
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI, RateLimitError
from test_openai_server import metrics, wait_until_idle
from test_tensor_parallel_server import alive, kill_mid_stream, wait_gone, worker_pids

MODEL = "tiny-llama"
TINY_SERVER_FLAGS = ["--device", "cpu", "--kv-cache-memory", "64MiB"]  # as conftest's
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def split_args(model_dir, *extra: str) -> list[str]:
    return [str(model_dir), "--served-model-name", MODEL, "--engine-process", *TINY_SERVER_FLAGS, *extra]


def engine_pid(server) -> int:
    match = re.search(r"engine process started \(pid (\d+)\)", server.log_path.read_text())
    assert match, server.log_tail()
    return int(match.group(1))


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory, server_tools):
    args = split_args(tiny_llama_dir, "--max-num-seqs", "64")
    with server_tools.running_kubellm(args, tmp_path_factory.mktemp("split-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0)


def test_the_engine_runs_in_another_process(server) -> None:
    pid = engine_pid(server)
    assert pid != server.proc.pid and alive(pid)
    status = open(f"/proc/{pid}/status").read()
    assert f"PPid:\t{server.proc.pid}\n" in status


def test_chat_full_streamed_and_n2(client: OpenAI, server) -> None:
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    assert full.choices[0].message.content and full.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == full.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 12
    two = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 12
    m = metrics(server)  # rendered by the engine process, where the counters live
    assert m["kubellm:kv_cache_blocks_total"] > 0 and m["vllm:generation_tokens_total"] >= 36


def test_greedy_answers_equal_the_one_process_server(client: OpenAI, launch_kubellm, tiny_llama_dir) -> None:
    prompts = ["Once upon a time", "The capital of France is", "def fib(n):"]
    ours = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0) for p in prompts]
    single = launch_kubellm(str(tiny_llama_dir), "--served-model-name", MODEL, *TINY_SERVER_FLAGS)
    one = OpenAI(base_url=single.api_url, api_key="x", max_retries=0)
    theirs = [one.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0) for p in prompts]
    assert [c.choices[0].text for c in ours] == [c.choices[0].text for c in theirs]
    assert [c.usage.prompt_tokens for c in ours] == [c.usage.prompt_tokens for c in theirs]


def test_json_schema_output_and_a_bad_schema(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    out = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=60, temperature=0, response_format=fmt
    )
    data = json.loads(out.choices[0].message.content)
    assert set(data) == {"name", "age"} and isinstance(data["age"], int)
    # compiled in the engine process: its error comes back as a 400 naming the problem
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=5, extra_body={"guided_grammar": "root ::= foo"}
        )
    assert 'Rule "foo" is not defined' in err.value.body["message"]  # type: ignore[index]


async def test_a_stream_the_client_leaves_frees_its_blocks(server) -> None:
    before = wait_until_idle(server)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 900, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(server.base_url) as http:
        resp = await http.post("/v1/completions", json=body)
        first = await resp.content.readline()
        assert first.startswith(b"data: ") and json.loads(first[6:])["choices"]
        resp.close()  # hang up mid-stream
    after = wait_until_idle(server)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 900


async def test_a_burst_beyond_max_queue_gets_429(launch_kubellm, tiny_llama_dir) -> None:
    srv = launch_kubellm(*split_args(tiny_llama_dir, "--max-num-seqs", "1", "--max-queue", "1"))
    aclient = AsyncOpenAI(base_url=srv.api_url, api_key="x", max_retries=0)

    async def one() -> str:
        try:
            resp = await aclient.completions.create(
                model=MODEL, prompt="Hi", max_tokens=200, extra_body={"ignore_eos": True}
            )
        except RateLimitError:
            return "429"
        assert resp.usage.completion_tokens == 200
        return "ok"

    # The queue-full check counts the engine's queue as last reported plus the requests on their way.
    results = await asyncio.gather(*(one() for _ in range(12)))
    assert results.count("429") >= 1 and results.count("ok") >= 1, results
    wait_until_idle(srv)


def test_sigterm_stops_both_processes(launch_kubellm, tiny_llama_dir) -> None:
    srv = launch_kubellm(*split_args(tiny_llama_dir))
    pid = engine_pid(srv)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.log_tail()
    wait_gone([pid])
    assert "shutdown complete" in srv.log_tail()


def test_signals_to_the_process_group_leave_the_draining_to_the_server(
    launch_kubellm, tiny_llama_dir
) -> None:
    """Ctrl-C (SIGINT) reaches the whole process group, engine process included: it ignores that and SIGTERM,
    keeps serving, and stops when the server has drained and tells it to."""
    srv = launch_kubellm(*split_args(tiny_llama_dir))
    pid = engine_pid(srv)
    client = OpenAI(base_url=srv.api_url, api_key="x", max_retries=0)
    stream = iter(client.completions.create(model=MODEL, prompt="Hi", max_tokens=40, stream=True,
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    next(stream)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    srv.proc.send_signal(signal.SIGINT)  # the server drains the stream in flight, then stops the engine
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text and srv.proc.wait(timeout=60) == 0, srv.log_tail()
    wait_gone([pid])
    assert "Traceback" not in srv.log_tail(20000) and "shutdown complete" in srv.log_tail()


def test_an_engine_process_that_dies_ends_the_server_with_an_error(launch_kubellm, tiny_llama_dir) -> None:
    srv = launch_kubellm(*split_args(tiny_llama_dir))
    pid = engine_pid(srv)
    kill_mid_stream(srv, pid)
    assert srv.proc.wait(timeout=60) == 1, srv.log_tail()
    assert "the engine process exited with code -9" in srv.log_tail(20000)
    wait_gone([pid, srv.proc.pid])


def test_a_model_that_cannot_load_is_one_startup_line(tmp_path, server_tools) -> None:
    proc = subprocess.run(
        [*server_tools.kubellm_command(), "serve", str(tmp_path / "nope"), "--engine-process", "--device", "cpu",
         "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot load the model" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_tensor_parallel_ranks_under_the_engine_process(
    client: OpenAI, launch_kubellm, tiny_llama_dir
) -> None:
    """The engine process is rank 0 and starts the other ranks itself; SIGTERM stops them all."""
    ours = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
    srv = launch_kubellm(*split_args(tiny_llama_dir, "--tensor-parallel-size", "2"))
    pid = engine_pid(srv)
    [worker] = worker_pids(srv)
    status = open(f"/proc/{worker}/status").read()
    assert f"PPid:\t{pid}\n" in status  # rank 1 is the engine process's child, not the server's
    two = OpenAI(base_url=srv.api_url, api_key="x", max_retries=0).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0
    )
    assert two.choices[0].text == ours.choices[0].text
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.log_tail()
    wait_gone([pid, worker])
