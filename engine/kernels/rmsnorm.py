"""Fused (residual add +) RMSNorm: one pass over the row instead of the ~8 kernels plain torch launches.

Rounds where engine.model.layers.RMSNorm rounds (the sum to the activation dtype, the normalised row to
the activation dtype, then the product with the weight), so the two differ only by the order of the
float32 sum of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    eps,
    stride_x_row,
    stride_x_head,
    stride_r_row,
    stride_r_head,
    stride_o_row,
    stride_o_head,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # One program per (row, head): 3-D inputs such as q viewed as [tokens, heads, head_dim] out of the
    # packed qkv output are normalised in place of their strides, with no copy to make them contiguous.
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x_row + head * stride_x_head + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r_row + head * stride_r_head + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_o_row + head * stride_o_head + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    normed = (h * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + row * stride_o_row + head * stride_o_head + cols
    tl.store(dst, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as engine.model.layers.RMSNorm.forward: with a residual, returns
    ``(norm(x + residual), x + residual)``. x: [..., hidden] with a contiguous last dim; a 3-D x may be
    strided in its first two dims. Outputs are contiguous."""
    n = x.shape[-1]
    x3 = x if x.dim() == 3 else x.reshape(-1, 1, n)
    assert x3.stride(2) == 1
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x3.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        r3 = residual if residual.dim() == 3 else residual.reshape(-1, 1, n)
        assert r3.stride(2) == 1 and out_dtype == x.dtype  # residual_out shares out's strides
        residual_out = torch.empty_like(out)
    else:
        r3 = residual_out = x3  # unused placeholders
    rows, heads = x3.shape[0], x3.shape[1]
    if rows > 0:
        _rms_norm_kernel[(rows, heads)](
            x3,
            r3,
            weight,
            out,
            residual_out,
            eps,
            x3.stride(0),
            x3.stride(1),
            r3.stride(0),
            r3.stride(1),
            out.stride(0),
            out.stride(1),
            N=n,
            BLOCK=triton.next_power_of_2(n),
            HAS_RESIDUAL=residual is not None,
            num_warps=4 if n <= 4096 else 8,
        )
    out = out.view(x.shape)
    if residual is None:
        return out
    return out, residual_out.view(x.shape)
