"""`kubellm serve` in a child process for the serving benchmarks: started with the given flags, output to a
log file, ready when /health answers, stopped (terminate, then kill) however the block ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from load_client import wait_until_ready

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    startup_s: float  # from starting the process to /health answering


@contextmanager
def kubellm_serve(
    serve_args: list[str],
    port: int,
    log_path: Path,
    timeout: float = 400,
    stop_timeout: float = 60,
    step_trace: Path | None = None,
) -> Iterator[RunningServer]:
    """`serve_args` are the `kubellm serve` flags (model, name, dtype...); --port is added here. `step_trace`: the
    server writes its step trace there as it exits (engine/step_trace.py); only the server, not this process."""
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "engine.cli", "serve", *serve_args, "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if step_trace is not None:
        # a server killed before its exit hook writes no trace: an old file must not pass for this server's
        step_trace.unlink(missing_ok=True)
        env["KUBELLM_STEP_TRACE"] = str(step_trace)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            wait_until_ready(url, process, timeout=timeout)
            server = RunningServer(url, process, time.perf_counter() - started)
            print(f"server ready in {server.startup_s:.0f}s", flush=True)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
