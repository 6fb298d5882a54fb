"""FP8 (e4m3) GEMM for few tokens (decode): ``C = (A * sa) (B * sb)^T`` with per-token scales sa [M, 1] and
per-channel weight scales sb [N, 1], for M up to a few dozen rows.

Why: at decode batch sizes a linear is a read of its weights, and FP8 halves those bytes; but cuBLASLt's
row-scaled FP8 GEMM (torch._scaled_mm) reaches only a third of the H100's bandwidth at 16 tokens
(Llama-8B down_proj: 51 µs where 17 µs reads the weights; bench/fp8_gemm.py), slower than bfloat16. Here the
grid covers N in narrow column blocks and, where that leaves SMs idle, splits K (each split's float32
partial lands in its own slice of a workspace; a second small kernel sums the slices in a fixed order, so
the result does not depend on scheduling). Tile sizes come from engine.kernels.fp8_skinny_configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SkinnyConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _fp8_skinny_kernel(
    a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_bn,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K_PER_SPLIT, K multiples of BLOCK_K: no weight masks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + (k_start + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k0 + offs_k) < k_end
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(sa_ptr + offs_m, mask=m_ok, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    # split K: float32 partials in out[split, M, N] (summed by _sum_splits)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits(part_ptr, c_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # fixed order: the same sum every run
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=ok)


def fp8_skinny_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    config: SkinnyConfig,
) -> torch.Tensor:
    """a [M, K] float8, a_scale [M, 1] float32, b [N, K] float8, b_scale [N, 1] (or [N]) float32 -> [M, N]."""
    m, k = a.shape
    n = b.shape[0]
    assert b.shape[1] == k and a_scale.numel() == m and b_scale.numel() == n, (a.shape, b.shape)
    assert a.stride(1) == 1 and b.stride(1) == 1
    cfg = config
    k_blocks = triton.cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty split
    even = n % cfg.block_n == 0 and k % cfg.block_k == 0
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    out = c if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    _fp8_skinny_kernel[grid](
        a, b, out, a_scale, b_scale, m, n, k, k_per_split, a.stride(0), b.stride(0),
        EVEN=even, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _sum_splits[(triton.cdiv(m * n, block),)](out, c, m * n, SPLIT=split, BLOCK=block)
    return c


def skinny_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    """The tile for ``m`` tokens through an [n, k] weight, or None where torch._scaled_mm is as fast (more than
    128 tokens, or 65-128 through a wide layer). From bench/fp8_skinny_tune.py on an H100 (2026-12-05, Llama-8B
    linears): at 16 tokens qkv 8.1 / o 6.7 / gate_up 43 / down 24 µs against _scaled_mm's 17 / 12.5 / 50 / 42."""
    wide = n >= 16384  # enough column blocks to fill the GPU without splitting K
    if m <= 32:
        block_m = 16 if m <= 16 else 32
        if wide:
            return SkinnyConfig(block_m, 64, 256, split_k=1, num_stages=3)
        if k >= 8192:
            return SkinnyConfig(block_m, 32, 256, split_k=2, num_stages=5)
        return SkinnyConfig(block_m, 64, 128, split_k=4, num_stages=3)
    if m <= 64:
        if k >= 8192:
            return SkinnyConfig(64, 32, 256, split_k=1, num_stages=5)
        return SkinnyConfig(64, 64, 256, split_k=1, num_stages=3)
    if m <= 128 and not wide:
        return SkinnyConfig(64, 64, 256, split_k=1, num_stages=5)
    return None
