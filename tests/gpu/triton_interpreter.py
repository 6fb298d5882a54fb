"""Running a script of Triton kernel checks on the CPU under Triton's interpreter (TRITON_INTERPRET=1).

The interpreter must be on before a kernel is defined, so each check runs in a fresh process; the
script imports the helpers beside this file and prints "ok" at its end. Triton 3.6's interpreter cannot
take loop bounds loaded from memory (seen on the GPU machine); the CI's Triton (3.9) runs the kernels as
they are, hence ``needs_interpreter``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def _triton_version() -> tuple[int, ...]:
    try:
        import triton
    except ImportError:
        return (0,)
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


needs_interpreter = pytest.mark.skipif(_triton_version() < (3, 9), reason="needs Triton >= 3.9's interpreter")


def run_under_interpreter(script: str, timeout: int = 600) -> None:
    """Run `script` in a fresh interpreter-mode process from the repository root; fail with its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(HERE), "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok"), proc.stdout[-2000:]
