"""Activations to float8 e4m3 in one kernel: per token (one scale per row) or per token and 128-column group
(block-scaled checkpoints), or with a static scale (checkpoints with `input_scale`).

The torch version (engine.model.fp8.quantize_rows: pad, float, abs, amax, divide, clamp, cast) is about nine
kernels and several float32 copies of the activations per linear layer; in a CUDA-graphed decode step of
an 8B model that was ~1,100 extra small kernels, and in prefill the copies cost more than the FP8 GEMM
saved. Same arithmetic as quantize_rows (float32, scale = max(amax / FP8_MAX, MIN_SCALE), x / scale
clamped, round to nearest), so both give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.model.fp8 import FP8
from engine.model.quantization import FP8_MAX, FP8_MIN_SCALE

_MAX_BLOCK = 2048  # columns per pass: a row is read twice (amax, then quantize), the second from L2


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, num_groups,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, STATIC: tl.constexpr,
    FP8_LIMIT: tl.constexpr, SCALE_FLOOR: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    start = group * GROUP
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(scale_ptr)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, GROUP, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            mask = (off + tl.arange(0, BLOCK) < GROUP) & (cols < K)
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / FP8_LIMIT, SCALE_FLOOR)
        tl.store(scale_ptr + row * num_groups + group, scale)
    for off in range(0, GROUP, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mask = (off + tl.arange(0, BLOCK) < GROUP) & (cols < K)
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_LIMIT), FP8_LIMIT)  # IEEE division, as torch
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_groups"])
def _quantize_groups_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, num_groups,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, FP8_LIMIT: tl.constexpr, SCALE_FLOOR: tl.constexpr,
):  # fmt: skip
    # GROUPS groups of a row in one [GROUPS, GROUP] tile (GROUP a power of two): a program per 128 values
    # was mostly launch and set-up at prefill sizes (82 µs for an MoE layer's two at 2,048 tokens on an H100)
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (groups < num_groups)[:, None] & (cols < K)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / FP8_LIMIT, SCALE_FLOOR)
    tl.store(scale_ptr + row * num_groups + groups, scale, mask=groups < num_groups)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_LIMIT), FP8_LIMIT)  # as torch
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_activations(
    x: torch.Tensor, group: int | None = None, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (float8 [M, K], float32 scales [M, groups]): one scale per row
    (group None) or per row and `group` columns; with `static_scale` (float32, one element) every row uses
    it and the scales returned are it expanded to [M, 1]."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    if static_scale is not None:
        group_cols, num_groups = k, 1
        scales = static_scale.reshape(1, 1).float().expand(m, 1).contiguous()
    else:
        group_cols = group or k
        num_groups = triton.cdiv(k, group_cols)
        scales = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales
    if static_scale is None and group and group & (group - 1) == 0 and group <= _MAX_BLOCK:
        # few rows: a group a program (one row's 16 groups in one program took 4.1 µs against 2.7 as 16
        # programs on an H100); from 64 rows, a row's groups in one tile. Two variants only, both compiled
        # before serving (the CUDA-graph captures, the memory-profiling step): none mid-run.
        per_program = 1 if m < 64 else min(triton.next_power_of_2(num_groups), _MAX_BLOCK // group)
        _quantize_groups_kernel[(m, triton.cdiv(num_groups, per_program))](
            x, q, scales, k, x.stride(0), q.stride(0), num_groups,
            GROUP=group, GROUPS=per_program, FP8_LIMIT=FP8_MAX, SCALE_FLOOR=FP8_MIN_SCALE,
            num_warps=4 if per_program * group <= 1024 else 8,
        )  # fmt: skip
        return q, scales
    block = min(_MAX_BLOCK, triton.next_power_of_2(group_cols))
    _quantize_kernel[(m, num_groups)](
        x, q, static_scale if static_scale is not None else scales, k, x.stride(0), q.stride(0), num_groups,
        GROUP=group_cols, BLOCK=block, STATIC=static_scale is not None,
        FP8_LIMIT=FP8_MAX, SCALE_FLOOR=FP8_MIN_SCALE,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return q, scales
