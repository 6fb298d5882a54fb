"""RMSNorm and SiLU-and-mul that write float8 e4m3 (with dynamic scales) for the FP8 linear after them.

Under FP8 GEMMs every linear quantizes its input first (engine.kernels.fp8_quant): a launch, a read of the
bf16 activations and a write of them in float8, after the launch that wrote them. Three of a dense layer's
four linears take their input straight from a norm or SiLU-and-mul, so those kernels quantize what they
would have written instead (engine.model.layer_kit builds them where the consumer is an Fp8Linear that
quantizes dynamically). Before an FP8 mixture-of-experts block the norm writes both: its router reads the
output as it is, its experts the float8 (``rms_norm_fp8_and_float``), and in small steps the router's logits
too (a row's program per ROUTER_EXPERTS experts, each recomputing the norm: the router's product saved). The
arithmetic is the two kernels' one after the other: the output rounded to the activation dtype, then per row
(or per row and ``group`` columns) scale = max(amax / FP8_MAX, MIN_SCALE) and x / scale clamped and rounded
to nearest; so the float8 values and scales are the unfused pair's, but for the norm's float32 sum of
squares, whose reduction order the compiler picks per kernel: on an H100 two or three rows in 10,000 (4,096
wide) came out one bf16 step apart before quantizing, a few of their values one e4m3 step apart
(bench/diag/fp8_producer_bits.py).
SiLU-and-mul has no sum: its bits are the pair's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.model.fp8 import FP8, QuantizedActivation
from engine.model.quantization import FP8_MAX, FP8_MIN_SCALE

_MAX_SILU_BLOCK = 2048  # columns of SiLU-and-mul's per-row passes (intermediate sizes reach 28k)


@triton.jit
def _quantize_groups(y, scale_ptr, q_ptr, cols, mask, num_groups,
                     N_GROUPS: tl.constexpr, GROUP: tl.constexpr,
                     FP8_LIMIT: tl.constexpr, SCALE_FLOOR: tl.constexpr):  # fmt: skip
    # y: float32 [N_GROUPS * GROUP] with zeros where masked; one scale per GROUP consecutive values
    y2 = tl.reshape(y, (N_GROUPS, GROUP))
    scale = tl.maximum(tl.max(tl.abs(y2), axis=1) / FP8_LIMIT, SCALE_FLOOR)
    groups = tl.arange(0, N_GROUPS)
    tl.store(scale_ptr + groups, scale, mask=groups < num_groups)
    q = tl.minimum(tl.maximum(tl.math.div_rn(y2, scale[:, None]), -FP8_LIMIT), FP8_LIMIT)  # IEEE, as torch
    q = tl.reshape(q, (N_GROUPS * GROUP,))
    tl.store(q_ptr + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_sum(x_ptr, residual_ptr, row, stride_x, stride_r, cols, mask, HAS_RESIDUAL: tl.constexpr):
    # x at `cols` of `row`, plus the residual rounded back to x's dtype (what the residual stream keeps)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _normalized(x, inv_rms, weight_ptr, cols, mask, OUT_DTYPE: tl.constexpr):
    # the plain norm's output from _load_sum's x once inv_rms is known, with its element-wise rounding steps
    normed = (x.to(tl.float32) * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (normed * w).to(OUT_DTYPE)


@triton.jit
def _rms_norm_fp8_kernel(
    x_ptr, residual_ptr, weight_ptr, q_ptr, scale_ptr, residual_out_ptr, y_ptr, router_ptr, logits_ptr, eps,
    stride_x, stride_r, stride_q, stride_ro, stride_y, stride_router, stride_logits, num_groups, num_experts,
    N: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    WRITE_FLOAT: tl.constexpr,  # also store the norm's output as it is (a MoE router reads it)
    ROUTER: tl.constexpr,  # also the router's logits: EXPERTS of them a program (program_id(1))
    EXPERTS: tl.constexpr, ROUTER_CHUNK: tl.constexpr,
    OUT_DTYPE: tl.constexpr, FP8_LIMIT: tl.constexpr, SCALE_FLOOR: tl.constexpr,
):  # fmt: skip
    # The norm as engine/kernels/rmsnorm.py computes it (same loads, same float32 sum), then quantized.
    # With ROUTER a row has several programs, each computing the row's sum; the first writes the outputs.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = _load_sum(x_ptr, residual_ptr, row, stride_x, stride_r, cols, mask, HAS_RESIDUAL)
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    if tl.program_id(1) == 0:
        if HAS_RESIDUAL:
            tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
        y_out = _normalized(x, inv_rms, weight_ptr, cols, mask, OUT_DTYPE)  # what the plain norm writes
        if WRITE_FLOAT:
            tl.store(y_ptr + row * stride_y + cols, y_out, mask=mask)
        y = y_out.to(tl.float32)
        _quantize_groups(y, scale_ptr + row * num_groups, q_ptr + row * stride_q, cols, mask, num_groups,
                         BLOCK // GROUP, GROUP, FP8_LIMIT, SCALE_FLOOR)  # fmt: skip
    if ROUTER:
        # logits = output @ router.T for this program's experts, the output recomputed a chunk at a time
        # (the same two helpers, so the same values) against a [EXPERTS, ROUTER_CHUNK] weight tile
        experts = tl.program_id(1) * EXPERTS + tl.arange(0, EXPERTS)
        expert_ok = experts < num_experts
        acc = tl.zeros([EXPERTS], dtype=tl.float32)
        for start in tl.static_range(0, N, ROUTER_CHUNK):  # unrolled: 8 steps at 2,048 wide (as timed)
            chunk = start + tl.arange(0, ROUTER_CHUNK)
            chunk_ok = chunk < N
            xc = _load_sum(x_ptr, residual_ptr, row, stride_x, stride_r, chunk, chunk_ok, HAS_RESIDUAL)
            yc = _normalized(xc, inv_rms, weight_ptr, chunk, chunk_ok, OUT_DTYPE).to(tl.float32)
            wr = tl.load(router_ptr + experts[:, None] * stride_router + chunk[None, :],
                         mask=expert_ok[:, None] & chunk_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
            acc += tl.sum(wr * yc[None, :], axis=1)
        tl.store(logits_ptr + row * stride_logits + experts, acc.to(OUT_DTYPE), mask=expert_ok)


@triton.jit
def _silu_mul(x_row, cols, mask, D):
    gate = tl.load(x_row + cols, mask=mask, other=0.0)
    up = tl.load(x_row + D + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)  # as silu_mul.py rounds


@triton.jit
def _silu_mul_fp8_row_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, D,
                             BLOCK: tl.constexpr, FP8_LIMIT: tl.constexpr, SCALE_FLOOR: tl.constexpr):  # fmt: skip
    # One scale per row: a pass for the row's amax, a second (its inputs mostly from L2) to quantize
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_silu_mul(x_row, cols, cols < D, D)))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_LIMIT, SCALE_FLOOR)
    tl.store(scale_ptr + row, scale)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = _silu_mul(x_row, cols, cols < D, D)
        q = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -FP8_LIMIT), FP8_LIMIT)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def _silu_mul_fp8_groups_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, D, num_groups,
                                GROUP: tl.constexpr, GROUPS: tl.constexpr,
                                FP8_LIMIT: tl.constexpr, SCALE_FLOOR: tl.constexpr):  # fmt: skip
    # GROUPS whole groups of a row a program: each group's scale needs only its own values
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * GROUPS
    cols = first * GROUP + tl.arange(0, GROUPS * GROUP)
    mask = cols < D
    y = _silu_mul(x_ptr + row * stride_x, cols, mask, D)
    _quantize_groups(y, scale_ptr + row * num_groups + first, q_ptr + row * stride_q, cols, mask,
                     num_groups - first, GROUPS, GROUP, FP8_LIMIT, SCALE_FLOOR)  # fmt: skip


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def fused_quantization_fits(features: int, group: int | None) -> bool:
    """Whether these kernels take inputs of `features` columns quantized in groups of `group` (None: per
    row): a group is a power of two that divides the features (a ragged last group stays unfused)."""
    return group is None or (group & (group - 1) == 0 and features % group == 0)


def rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    group: int | None,
) -> tuple[QuantizedActivation, torch.Tensor | None]:
    """engine.kernels.rmsnorm.rms_norm then engine.kernels.fp8_quant.quantize_activations(out, group), in
    one kernel: x [T, hidden] (contiguous last dim) -> (the norm's output in float8 with its scales [T,
    groups], x + residual or None without a residual)."""
    quantized, residual_out, _, _ = _rms_norm_fp8(x, weight, eps, residual, group, also_float=False)
    return quantized, residual_out


def rms_norm_fp8_and_float(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    group: int | None,
    router: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QuantizedActivation, torch.Tensor | None, torch.Tensor | None]:
    """As rms_norm_fp8, the norm's output also written as it is: (output [T, hidden], its float8 and scales,
    x + residual or None, logits or None), for a reader of each (an FP8 MoE block: its router and its
    experts). With ``router`` [E, hidden] (the router's weight, in the output's dtype) the kernel also
    computes the router's logits [T, E] = output @ router.T (float32 sums rounded to the output's dtype, as
    F.linear's), ROUTER_EXPERTS of them a program: the router's matrix product without its own launch."""
    quantized, residual_out, out, logits = _rms_norm_fp8(x, weight, eps, residual, group, True, router)
    assert out is not None
    return out, quantized, residual_out, logits


ROUTER_EXPERTS = 8  # router logits a program computes (the router weight's rows it reads: 32 KB at 2,048)
_ROUTER_CHUNK = 256  # columns of the router weight a program multiplies at a time


def _rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    group: int | None,
    also_float: bool,
    router: torch.Tensor | None = None,
) -> tuple[QuantizedActivation, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    t, n = x.shape
    assert x.stride(1) == 1 and fused_quantization_fits(n, group)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    block = triton.next_power_of_2(n)
    group_cols = group or block  # per row: one group spanning the tile (the masked tail reads as 0)
    num_groups = 1 if group is None else n // group
    q = torch.empty((t, n), dtype=FP8, device=x.device)
    scales = torch.empty((t, num_groups), dtype=torch.float32, device=x.device)
    if residual is not None:
        assert residual.stride(-1) == 1 and out_dtype == x.dtype
        residual_out = torch.empty_like(x)
        r = residual
    else:
        residual_out = r = x  # unused placeholders
    y = torch.empty((t, n), dtype=out_dtype, device=x.device) if also_float else None
    logits = None
    num_experts = 0
    if router is not None:
        num_experts = router.shape[0]
        assert router.shape[1] == n and router.stride(1) == 1 and router.dtype == out_dtype, (
            "the router multiplies the norm's output: its weight [E, hidden] in the output's dtype"
        )
        logits = torch.empty((t, num_experts), dtype=out_dtype, device=x.device)
    if t > 0:
        programs_per_row = triton.cdiv(num_experts, ROUTER_EXPERTS) if router is not None else 1
        _rms_norm_fp8_kernel[(t, programs_per_row)](
            x, r, weight, q, scales, residual_out, y if y is not None else q,
            router if router is not None else weight, logits if logits is not None else q, eps,
            x.stride(0), r.stride(0), q.stride(0), residual_out.stride(0), n,
            router.stride(0) if router is not None else 0, logits.stride(0) if logits is not None else 0,
            num_groups, num_experts,
            N=n, BLOCK=block, GROUP=group_cols, HAS_RESIDUAL=residual is not None, WRITE_FLOAT=also_float,
            ROUTER=router is not None, EXPERTS=ROUTER_EXPERTS, ROUTER_CHUNK=min(_ROUTER_CHUNK, block),
            OUT_DTYPE=_TL_DTYPES[out_dtype], FP8_LIMIT=FP8_MAX, SCALE_FLOOR=FP8_MIN_SCALE,
            num_warps=4 if n <= 4096 else 8,
        )  # fmt: skip
    return QuantizedActivation(q, scales), (residual_out if residual is not None else None), y, logits


def silu_and_mul_fp8(x: torch.Tensor, group: int | None) -> QuantizedActivation:
    """engine.kernels.silu_mul.silu_and_mul then quantize_activations(out, group), in one kernel:
    x [T, 2 * d] (contiguous last dim) -> float8 [T, d] with its scales [T, groups]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    assert x2.stride(1) == 1 and fused_quantization_fits(d, group)
    t = x2.shape[0]
    num_groups = 1 if group is None else d // group
    q = torch.empty((t, d), dtype=FP8, device=x.device)
    scales = torch.empty((t, num_groups), dtype=torch.float32, device=x.device)
    if t == 0:
        return QuantizedActivation(q, scales)
    if group is None:
        block = min(_MAX_SILU_BLOCK, triton.next_power_of_2(d))
        _silu_mul_fp8_row_kernel[(t,)](
            x2, q, scales, x2.stride(0), q.stride(0), d,
            BLOCK=block, FP8_LIMIT=FP8_MAX, SCALE_FLOOR=FP8_MIN_SCALE, num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
    else:
        per_program = max(1, min(triton.next_power_of_2(num_groups), 1024 // group))
        _silu_mul_fp8_groups_kernel[(t, triton.cdiv(num_groups, per_program))](
            x2, q, scales, x2.stride(0), q.stride(0), d, num_groups,
            GROUP=group, GROUPS=per_program, FP8_LIMIT=FP8_MAX, SCALE_FLOOR=FP8_MIN_SCALE, num_warps=4,
        )  # fmt: skip
    return QuantizedActivation(q, scales)
