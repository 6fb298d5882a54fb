"""Compiling Triton kernels for Hopper (sm_90: H100, H200) on a machine without a GPU.

Triton compiles ahead of time for any target it knows, with the ptxas its wheel ships; only a launch needs
a driver. Inside ``compiled_for_hopper()`` every kernel launch compiles the kernel for sm_90 with the
launch's own arguments (their dtypes, alignments and constexprs, as a real launch would specialise them)
and returns without running it. The engine's kernel wrappers can then be called on CPU tensors at real
model shapes: a kernel that would not compile on the GPU fails here, in CI, instead of in a scarce GPU
session (the interpreter runs the kernels' arithmetic, not the compiler). Outputs stay unwritten.

Uses Triton's internals (the binder and argument packing its JIT launcher uses; written against Triton 3.9):
``hopper_compiler_available`` says whether this Triton has them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

HOPPER = ("cuda", 90, 32)  # backend, compute capability, warp size


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    num_warps: int
    # shared memory the compiled kernel needs; reported, not checked: on the GPU the wrappers cut a tile's
    # stages to the card's 227 KB (fit_shared_memory), which they skip for CPU tensors
    shared_bytes: int


def hopper_compiler_available() -> str | None:
    """None where this Triton can compile for sm_90 here, else why not."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"this Triton lacks the ahead-of-time compile path: {exc}"
    if not hasattr(JITFunction, "_pack_args"):
        return "this Triton's JITFunction has no _pack_args"
    return None


def _compile(kernel: Any, args: tuple, kwargs: dict) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget(*HOPPER)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    return CompiledKernel(compiled.metadata.name, compiled.metadata.num_warps, compiled.metadata.shared)


@contextmanager
def compiled_for_hopper() -> Iterator[list[CompiledKernel]]:
    """Within: each Triton launch compiles its kernel for sm_90 and launches nothing; yields the list the
    compiled kernels are appended to, in launch order."""
    from triton.runtime.jit import JITFunction

    compiled: list[CompiledKernel] = []
    launch = JITFunction.run

    def compile_instead(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        compiled.append(_compile(self, args, kwargs))

    JITFunction.run = compile_instead  # type: ignore[method-assign]
    try:
        yield compiled
    finally:
        JITFunction.run = launch  # type: ignore[method-assign]
