"""FP8 (e4m3) GEMM with per-row scales on both sides, in Triton: ``C = (A * sa) (B * sb)^T``.

A [M, K] float8 activations with scales sa [M, groups]; B [N, K] float8 weights with scales sb [N,
groups]; each scale covers ``ceil(K / groups)`` consecutive K elements of its row. One group
(per-token activations times per-channel weights) scales the float32 accumulator once at the end;
several groups (block-scaled weights, activations per token and 128-wide group, as DeepSeek /
Qwen3-FP8 checkpoints run) scale each BLOCK_K-wide partial product, so BLOCK_K equals the group.

Per-channel shapes that torch._scaled_mm takes run there instead (engine.model.fp8.Fp8Linear); this
kernel covers block scales and the shapes _scaled_mm refuses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr,
    M, N, K,
    stride_am, stride_bn, stride_cm, stride_sam, stride_sbn,
    PER_GROUP: tl.constexpr,  # one scale per BLOCK_K columns (else one per row, applied at the end)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + (k0 + offs_k)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # fmt: skip
        partial = tl.dot(a, b)
        if PER_GROUP:
            g = k0 // BLOCK_K
            sa = tl.load(sa_ptr + offs_m * stride_sam + g, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptr + offs_n * stride_sbn + g, mask=n_ok, other=0.0)
            acc += partial * sa[:, None] * sb[None, :]
        else:
            acc += partial
    if not PER_GROUP:
        sa = tl.load(sa_ptr + offs_m * stride_sam, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + offs_n * stride_sbn, mask=n_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    group_k: int | None = None,
) -> torch.Tensor:
    """a [M, K] float8, a_scale [M, G] float32, b [N, K] float8, b_scale [N, G] float32 -> [M, N]; G is
    1 (group_k None) or ceil(K / group_k)."""
    m, k = a.shape
    n = b.shape[0]
    groups = a_scale.shape[1]
    assert b.shape[1] == k and b_scale.shape == (n, groups), (a.shape, b.shape, a_scale.shape, b_scale.shape)
    assert a.stride(1) == 1 and b.stride(1) == 1 and a_scale.stride(1) == 1 and b_scale.stride(1) == 1
    per_group = group_k is not None
    if per_group:
        block_k = group_k
        assert groups == -(-k // block_k), (groups, k, block_k)
        assert block_k >= 16 and block_k & (block_k - 1) == 0, f"scale groups of {block_k} columns"
    else:
        block_k = 128 if k >= 128 else max(16, triton.next_power_of_2(k))
    block_m = 16 if m <= 16 else (64 if m <= 64 else 128)
    block_n = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        a, b, c, a_scale, b_scale, m, n, k,
        a.stride(0), b.stride(0), c.stride(0), a_scale.stride(0), b_scale.stride(0),
        PER_GROUP=per_group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return c
