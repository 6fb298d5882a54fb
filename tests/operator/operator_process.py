"""`kubellm operator` run as a real subprocess against a cluster, the way a developer runs it."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubellm_executable() -> str:
    """The `kubellm` installed next to this Python (the CLI the operator image runs)."""
    found = shutil.which(
        "kubellm", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if not found:
        raise RuntimeError("`kubellm` is not installed: run `pip install -e .`")
    return found


class OperatorProcess:
    def __init__(self, env: dict[str, str], log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.log_path = log_path
        self.extra_args = extra_args
        self.liveness_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        argv = [kubellm_executable(), "operator", "--verbose", "--liveness-port", str(self.liveness_port)]
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts}: {' '.join(argv + list(self.extra_args))}\n".encode())
            self.process = subprocess.Popen(
                argv + list(self.extra_args), env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the operator's /healthz did not answer in {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2
            ) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (what Kubernetes sends), then wait for a graceful exit."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]


@contextlib.contextmanager
def running_operator(env: dict[str, str], log_dir: Path) -> Iterator[OperatorProcess]:
    """The operator for a test module: started, then stopped with its exit code and log tail printed
    (pytest shows them when a test fails)."""
    process = OperatorProcess(env, log_dir / "operator.log")
    process.start()
    try:
        yield process
    finally:
        code = process.stop()
        print(f"operator exit code {code}; log tail:\n{process.log_tail()}")
