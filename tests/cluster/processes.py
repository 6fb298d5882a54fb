"""One control-plane process: started in its own process group with its output in a log file, and
stopped by signalling that whole group (SIGTERM, then SIGKILL after a grace period)."""

import ctypes
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec: if the test process dies (even by SIGKILL), the kernel kills this
    # component too, so an aborted pytest never leaves a control plane behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None  # None: this process's environment
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, die_with_parent: bool) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: stop() reaches any children too
                preexec_fn=_die_with_parent if die_with_parent else None,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, errors="replace") as log:
            return "".join(deque(log, maxlen=lines))

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen is None:
            return
        popen = self.popen
        stop_process_group(popen.pid, grace_s, exited=lambda: popen.poll() is not None)
        popen.wait()


def _leader_gone(pid: int) -> bool:
    # A zombie (state Z) has exited; its parent (init, for a cluster started by an earlier `up`) reaps it later.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def stop_process_group(pgid: int, grace_s: float = 10.0, exited: Callable[[], bool] | None = None) -> None:
    """SIGTERM the group, wait up to `grace_s` for it to exit, then SIGKILL whatever is left of it.

    `exited` tells when the leader is gone (by default: read from /proc); the components never fork, so the
    leader's exit is the group's."""
    is_done = exited or (lambda: _leader_gone(pgid))
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while not is_done() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
