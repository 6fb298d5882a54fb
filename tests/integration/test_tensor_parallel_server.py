"""`kubellm serve --tensor-parallel-size 2 --device cpu`: two processes (gloo) serving the OpenAI API as
one; SIGTERM stops both; a rank that dies takes the server down with an error, leaving no process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from openai import APIError, OpenAI
from test_openai_server import metrics, wait_until_idle

MODEL = "tiny-llama"
TINY_SERVER_FLAGS = ["--device", "cpu", "--kv-cache-memory", "64MiB"]  # as conftest's
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def tp_args(model_dir: Path) -> list[str]:
    return [str(model_dir), "--served-model-name", MODEL, "--tensor-parallel-size", "2", *TINY_SERVER_FLAGS]


def worker_pids(server) -> list[int]:
    match = re.search(
        r"tensor parallel: 2 ranks \(gloo\), worker pids \[(\d+)\]", server.log_path.read_text()
    )
    assert match, server.log_tail()
    return [int(match.group(1))]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited; only its parent's wait is missing


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory, server_tools):
    with server_tools.running_kubellm(tp_args(tiny_llama_dir), tmp_path_factory.mktemp("tp-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0)


def test_chat_streaming_and_n2_over_two_ranks(client: OpenAI, server) -> None:
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    assert full.choices[0].message.content and full.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content
    two = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 12
    assert metrics(server)["kubellm:kv_cache_blocks_total"] > 0


def test_greedy_answer_equals_one_rank(client: OpenAI, launch_kubellm, tiny_llama_dir) -> None:
    ours = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
    single = launch_kubellm(str(tiny_llama_dir), "--served-model-name", MODEL, *TINY_SERVER_FLAGS)
    reference = OpenAI(base_url=single.api_url, api_key="x", max_retries=0).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0
    )
    assert ours.choices[0].text == reference.choices[0].text


async def test_aborted_stream_frees_its_blocks(server) -> None:
    before = wait_until_idle(server)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 900, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(server.base_url) as http:
        resp = await http.post("/v1/completions", json=body)
        first = await resp.content.readline()
        assert first.startswith(b"data: ") and json.loads(first[6:])["choices"]
        resp.close()  # hang up mid-stream
    after = wait_until_idle(server)  # every block back in rank 0's pool, which owns them for every rank
    generated = after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0.0)
    assert generated < 900


def test_sigterm_stops_every_rank(launch_kubellm, tiny_llama_dir) -> None:
    srv = launch_kubellm(*tp_args(tiny_llama_dir))
    pids = worker_pids(srv)
    assert all(alive(p) for p in pids)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.log_tail()
    wait_gone(pids)
    assert "tensor-parallel ranks stopped" in srv.log_tail()


def kill_mid_stream(server, pid: int) -> None:
    """SIGKILL `pid` (a process the server's engine needs) while a stream is in flight: the stream must
    end with an error event, not a clean end."""
    client = OpenAI(base_url=server.api_url, api_key="x", max_retries=0)
    stream = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)  # in flight now
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(APIError, match="engine has stopped"):
        for _ in chunks:
            pass


def test_a_rank_that_dies_ends_the_server_with_an_error(launch_kubellm, tiny_llama_dir) -> None:
    srv = launch_kubellm(*tp_args(tiny_llama_dir))
    [worker] = worker_pids(srv)
    kill_mid_stream(srv, worker)
    assert srv.proc.wait(timeout=60) != 0, srv.log_tail()
    log = srv.log_tail(20000)
    assert f"tensor-parallel rank 1 (pid {worker}) exited with code -9" in log, log
    wait_gone([worker, srv.proc.pid])


def test_a_size_that_does_not_divide_the_heads_is_one_startup_line(tmp_path, server_tools) -> None:
    # the embedded SmolLM2 has 9 attention heads
    proc = subprocess.run(
        [*server_tools.kubellm_command(), "serve", "--device", "cpu", "-tp", "2", "--port", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert (
        len(lines) == 1 and "--tensor-parallel-size 2 must divide the model's 9 attention heads" in lines[0]
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_smollm2_over_three_ranks_answers_like_one(launch_kubellm) -> None:
    """SmolLM2-135M (9 heads, 3 KV heads) split three ways, from the GGUF's cached conversion."""
    flags = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-model-len", "2048"]  # fmt: skip
    chat = [{"role": "user", "content": "What is Kubernetes?"}]

    def answer(server) -> str:
        client = OpenAI(base_url=server.api_url, api_key="x", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(model=model, messages=chat, max_tokens=24, temperature=0)
        return resp.choices[0].message.content

    three = answer(launch_kubellm("--tensor-parallel-size", "3", *flags, startup_timeout=600))
    assert three == answer(launch_kubellm(*flags, startup_timeout=600))
    assert "Kubernetes" in three
