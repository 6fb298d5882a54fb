"""What every process kubellm starts for itself (tensor-parallel ranks, the engine process) does first."""

from __future__ import annotations

import ctypes
import os
import signal


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies, however it dies (Linux; elsewhere the pipe's or
    socket's end does): a server killed outright must not leave a process holding the GPU."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
