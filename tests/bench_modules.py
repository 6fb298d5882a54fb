"""Loading a bench/ script as a module in a test, by path: bench/ on sys.path would shadow packages
(bench/kernels.py), and the scripts append it for their own imports, so sys.path is put back as it was."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_module(name: str) -> ModuleType:
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pydantic resolve the module's annotations through it
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved
