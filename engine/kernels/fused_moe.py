"""The mixture-of-experts MLP on the GPU: two grouped GEMMs over token slots sorted by expert.

``fused_experts(x, w13, w2, topk_weights, topk_ids)`` computes, for every token t and each of its top_k
experts e with routing weight p, ``sum_j p * w2[e] @ (silu(gate) * up)`` where ``[gate; up] = w13[e] @ x[t]``:

1. slots (token, j) are sorted by expert and padded to whole blocks (engine.kernels.moe_align: Triton
   for decode batches, torch ops for prefill);
2. one launch computes gate and up for every slot block against its expert's ``w13`` rows and writes
   ``silu(gate) * up`` (two accumulators per program, so the [slots, 2I] product never reaches memory;
   a tuned configuration may split it in two passes instead, ``MoeBlockConfig.split_gate``);
3. one launch multiplies that by each slot's expert's ``w2`` and scales by the routing weight;
4. each token's top_k rows are summed (one more launch, ``sum_slots``).

Weights keep the Hugging Face orientation ([E, out, in], as nn.Linear), so the same tensors serve the
plain-torch path. Tensor parallelism shards each expert's intermediate dimension: a rank's ``w13`` holds
its gate shard then its up shard, its ``w2`` the matching columns, and the caller all-reduces the sum.

FP8 (W8A8, e4m3; ``w13_scale`` / ``w2_scale`` given): the weights are float8 with float32 scales, one per
(expert, weight row, group of ``group_k`` input features), per channel (``group_k`` None, G = 1) or as
block-scaled checkpoints store them (Qwen3-*-FP8: [128, 128] blocks, each row holding its block's
scale; engine.model.fp8's layout). x is quantized before step 2 and the SiLU-mul output before step 3
(engine.kernels.fp8_quant: per token or slot, and per ``group_k`` columns for block weights; with the gate split
off, by the SiLU-mul kernel itself where the groups divide the intermediate size: engine.kernels.fp8_producers).
The same kernel, switched by constexprs: with group scales each BLOCK_K-wide product (BLOCK_K = group_k) is
scaled by its row's and weight rows' group scales as it is added in float32; per channel the float32 sum is
scaled once at the end (gate and up by their own rows' scales, before the SiLU-mul). Half the bytes of bfloat16
experts, which is what a decode step's time is.

Shapes depend only on the number of tokens and no value is read back to the host, so decode steps are
CUDA-graph capturable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from engine.kernels.fp8_producers import fused_quantization_fits, silu_and_mul_fp8
from engine.kernels.fp8_quant import quantize_activations
from engine.kernels.moe_align import ExpertAlignment, align_slots, route_and_align
from engine.kernels.shared_memory import device_shared_memory, stages_that_fit
from engine.kernels.silu_mul import silu_and_mul
from engine.model.fp8 import FP8
from engine.model.quantization import kernel_group_width


# Per-step integers are not specialised on (divisibility by 16 would compile new variants mid-run).
@triton.jit(do_not_specialize=["num_slots", "max_padded"])
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: tokens (first GEMM, a slot reads row slot // TOP_K) or slots (second GEMM)
    b_ptr,  # [E, N or 2N, K]
    c_ptr,  # [num_slots, N]
    weight_ptr,  # [num_slots] float32 routing weights (read only when WEIGHTED)
    a_scale_ptr,  # FP8: [rows, G] float32, the activations' scales (row as a's row)
    b_scale_ptr,  # FP8: [E, N or 2N, G] float32, the weights' scales
    sorted_slots_ptr,
    block_expert_ptr,
    num_padded_ptr,
    N,
    K,
    num_slots,
    max_padded,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_bse,
    stride_bsn,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,  # b holds gate rows [0, N) and up rows [N, 2N): store silu(gate) * up
    WEIGHTED: tl.constexpr,  # scale each row by its slot's routing weight
    FP8: tl.constexpr,  # a and b are float8 e4m3 with scales: real value = float8 * scale
    PER_GROUP: tl.constexpr,  # FP8 scales per BLOCK_K columns of K (else one per row, G = 1)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M slot blocks walk the N tiles together, so an expert's weight tile
    # stays in L2 while the blocks that share it run.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's run: the grid is sized for the worst routing

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m).to(tl.int64)
    slot_mask = slots < num_slots
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_rows = slots // TOP_K
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    # FP8: the scales of each row of a (its token or slot) and of each weight row of the tile (gate; up
    # rows N further on)
    sa_ptrs = a_scale_ptr + a_rows * stride_asm
    sb_ptrs = b_scale_ptr + expert * stride_bse + offs_n.to(tl.int64) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP8:
            # each BLOCK_K-wide product lands in float32 on its own (Hopper's FP8 MMA accumulates with
            # fewer bits), scaled by its group's scales where the scales are per group
            if PER_GROUP:
                g = k0 // BLOCK_K
                sa = tl.load(sa_ptrs + g, mask=slot_mask, other=0.0)[:, None]
                acc += tl.dot(a, b) * sa * tl.load(sb_ptrs + g, mask=n_mask, other=0.0)[None, :]
                if GATED:
                    sb_up = tl.load(sb_ptrs + N * stride_bsn + g, mask=n_mask, other=0.0)
                    acc_up += tl.dot(a, b_up) * sa * sb_up[None, :]
            else:
                acc += tl.dot(a, b)
                if GATED:
                    acc_up += tl.dot(a, b_up)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if GATED:
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if FP8 and not PER_GROUP:  # one scale per row of a and per weight row: once, at the end
        sa = tl.load(sa_ptrs, mask=slot_mask, other=0.0)[:, None]
        acc = acc * sa * tl.load(sb_ptrs, mask=n_mask, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * sa * tl.load(sb_ptrs + N * stride_bsn, mask=n_mask, other=0.0)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + slots, mask=slot_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class MoeBlockConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    # The first GEMM writes gate and up ([slots, 2I]) and one more pass takes silu(gate) * up: a tile then
    # holds one float32 accumulator instead of two (three with block scales, whose per-step product is
    # a third), so 128 x 128 tiles fit in registers at prefill sizes, for a write and a read of
    # [slots, 2I]. Only a tuned file turns it on (bench/fused_moe_tune.py sweeps both ways).
    split_gate: bool = False


def choose_block_config(num_slots: int, num_experts: int) -> MoeBlockConfig:
    """By the average number of slots per expert. Decode batches give each active expert a handful of
    rows: the smallest tile tl.dot takes (16 rows) and long K steps, the GEMM being a stream of expert
    weights. Prefill gives experts hundreds of rows: large tiles, grouped for L2 reuse. The shapes
    follow the published H100 configurations of vLLM's fused MoE for 8-128 experts (not re-tuned here:
    bench/w5_moe.py is where a change would be measured)."""
    per_expert = num_slots / num_experts
    if per_expert <= 16:
        return MoeBlockConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if per_expert <= 96:
        return MoeBlockConfig(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)
    return MoeBlockConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def choose_fp8_block_config(num_slots: int, num_experts: int, group_k: int | None) -> MoeBlockConfig:
    """choose_block_config's three regimes (the same BLOCK_M, so the slots align alike) for float8
    operands, a byte an element: K steps of the scale group with block scales (each step's product is
    scaled by its group's scales), else of 256 while a block has few rows (half the loop trips, the
    stages still fit) and 128 for prefill; more stages: the direction vLLM's published FP8 configurations
    for 128 experts on H100/H200 take. Not tuned here: bench/fused_moe_tune.py --variants fp8-channel
    fp8-block sweeps them."""
    per_expert = num_slots / num_experts
    if per_expert <= 16:
        cfg = MoeBlockConfig(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4, num_stages=4)
    elif per_expert <= 96:
        cfg = MoeBlockConfig(block_m=32, block_n=64, block_k=256, group_m=8, num_warps=4, num_stages=3)
    else:
        cfg = MoeBlockConfig(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=4)
    return cfg if group_k is None else replace(cfg, block_k=group_k)


def fit_shared_memory(
    cfg: MoeBlockConfig, element_bytes: int, gated: bool, shared_memory: int
) -> MoeBlockConfig:
    """``cfg`` with as many of its stages as fit ``shared_memory`` bytes: a stage holds the activation tile
    and one weight tile (two for the gated GEMM: gate and up) of ``element_bytes`` each element (1 for
    float8, 2 for bfloat16)."""
    weight_tiles = 2 if gated else 1
    per_stage = element_bytes * (cfg.block_m * cfg.block_k + weight_tiles * cfg.block_k * cfg.block_n)
    return replace(cfg, num_stages=stages_that_fit(cfg.num_stages, per_stage, shared_memory))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 models get true float32 products (what the CPU path and transformers compute), not tf32
    return "ieee" if dtype == torch.float32 else "tf32"


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    align: ExpertAlignment,
    top_k: int,
    cfg: MoeBlockConfig,
    gated: bool,
    weights: torch.Tensor | None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8: a's [rows, G], b's [E, rows, G]
    group_k: int | None = None,
) -> None:
    n, k = out.shape[1], a.shape[1]
    max_padded = align.sorted_slots.numel()
    if a.is_cuda:  # a tile tuned on Hopper may need more shared memory than Ada has
        cfg = fit_shared_memory(cfg, a.element_size(), gated, device_shared_memory(a.device.index or 0))
    a_scale, b_scale = scales if scales is not None else (out, out)  # unread without FP8
    grid = (triton.cdiv(max_padded, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, a_scale, b_scale,
        align.sorted_slots, align.block_expert, align.num_padded,
        n, k, align.num_slots, max_padded,
        a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        a_scale.stride(0), b_scale.stride(0), b_scale.stride(1) if scales is not None else 0,
        TOP_K=top_k, GATED=gated, WEIGHTED=weights is not None,
        FP8=scales is not None, PER_GROUP=group_k is not None, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _gate_up(
    x: torch.Tensor,
    w13: torch.Tensor,
    align: ExpertAlignment,
    top_k: int,
    cfg: MoeBlockConfig,
    dtype: torch.dtype,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    group_k: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[slots, I]: silu(gate) * up of each slot against its expert's w13, in the GEMM's epilogue or, with
    ``cfg.split_gate``, as a second pass over the GEMM's [slots, 2I] output. FP8 experts (`scales` given):
    the second GEMM's input, float8 with its scales, written by that second pass itself where the groups
    divide I (engine/kernels/fp8_producers.py), else quantized after."""
    inter = w13.shape[1] // 2
    if not cfg.split_gate:
        activated = torch.empty((align.num_slots, inter), dtype=dtype, device=x.device)
        _grouped_gemm(x, w13, activated, align, top_k, cfg, True, None, scales, group_k)
        return activated if scales is None else quantize_activations(activated, group_k)
    gate_up = torch.empty((align.num_slots, 2 * inter), dtype=dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, align, top_k, cfg, False, None, scales, group_k)
    if scales is None:
        return silu_and_mul(gate_up)
    if fused_quantization_fits(inter, group_k):
        return silu_and_mul_fp8(gate_up, group_k)
    return quantize_activations(silu_and_mul(gate_up), group_k)


def check_fp8_operands(
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    group_k: int | None,
) -> bool:
    """Whether the experts are FP8 (their scales given), after checking that the weights and scales fit
    together (shapes only: nothing is read from the device). Raises ValueError where they do not."""
    if w13_scale is None and w2_scale is None:
        if group_k is not None:
            raise ValueError(f"group_k={group_k} without FP8 weight scales")
        return False
    if w13_scale is None or w2_scale is None:
        raise ValueError("FP8 experts need both w13_scale and w2_scale")
    if w13.dtype != FP8 or w2.dtype != FP8:
        raise ValueError(f"FP8 scales given for {w13.dtype} / {w2.dtype} expert weights (want {FP8})")
    if group_k is not None and not kernel_group_width(group_k):
        raise ValueError(f"FP8 scale groups of {group_k} columns: a power of two >= 16 is needed")
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    groups_h = 1 if group_k is None else -(-hidden // group_k)
    groups_i = 1 if group_k is None else -(-inter // group_k)
    for name, scale, shape in (
        ("w13_scale", w13_scale, (num_experts, two_inter, groups_h)),
        ("w2_scale", w2_scale, (num_experts, hidden, groups_i)),
    ):
        if tuple(scale.shape) != shape or scale.dtype != torch.float32 or scale.stride(-1) != 1:
            raise ValueError(
                f"{name}: float32 {list(shape)} with contiguous groups expected (one scale per expert, "
                f"weight row and group of {group_k or 'all'} input features), got {scale.dtype} "
                f"{list(scale.shape)} strides {scale.stride()}"
            )
    return True


def fused_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] float32
    topk_ids: torch.Tensor,  # [T, top_k] integer
    config: MoeBlockConfig | None = None,
    *,
    w13_scale: torch.Tensor | None = None,  # FP8: float32 [E, 2I, 1 or ceil(H / group_k)]
    w2_scale: torch.Tensor | None = None,  # FP8: float32 [E, H, 1 or ceil(I / group_k)]
    group_k: int | None = None,  # FP8: None, per-channel weights; else block-scaled, BLOCK_K = group_k
    x_quantized: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8: x already quantized, as below
) -> torch.Tensor:  # [T, H] in x's dtype
    """With scales, w13 and w2 are float8 e4m3 (real weight = float8 * scale, as engine.model.fp8 keeps
    it): x is quantized per token (and group_k columns) unless ``x_quantized`` brings it so (float8 [T, H],
    float32 scales [T, 1 or ceil(H / group_k)]), the SiLU-mul output per slot likewise, and the grouped
    GEMMs scale their float32 products (module docstring)."""
    num_experts = w13.shape[0]

    def route(block_m: int) -> tuple[torch.Tensor, ExpertAlignment]:
        return topk_weights, align_slots(topk_ids, num_experts, block_m)

    assert topk_ids.shape[0] == x.shape[0], (topk_ids.shape, x.shape)
    fp8 = _Fp8Operands(w13_scale, w2_scale, group_k, x_quantized)
    return _fused_experts(x, w13, w2, topk_ids.shape[1], route, config, fp8)


def fused_experts_from_logits(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,  # [T, E]: x's router product, any float dtype
    top_k: int,
    renormalize: bool,
    config: MoeBlockConfig | None = None,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    group_k: int | None = None,
    x_quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``fused_experts`` routed by the router's softmax and top-k of ``router_logits`` (renormalised if
    asked), which for decode batches the alignment's first launch computes itself (route_and_align): what
    ``topk_softmax`` then ``fused_experts`` give (the routing weights to the last bit), one launch fewer."""
    assert router_logits.shape == (x.shape[0], w13.shape[0]), (router_logits.shape, x.shape, w13.shape)

    def route(block_m: int) -> tuple[torch.Tensor, ExpertAlignment]:
        weights, _, align = route_and_align(router_logits, top_k, renormalize, block_m)
        return weights, align

    fp8 = _Fp8Operands(w13_scale, w2_scale, group_k, x_quantized)
    return _fused_experts(x, w13, w2, top_k, route, config, fp8)


# block_m -> (the routing weights [T, top_k] float32, the slots aligned to blocks of block_m)
_Route = Callable[[int], tuple[torch.Tensor, ExpertAlignment]]


@dataclass(frozen=True)
class _Fp8Operands:
    w13_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None
    group_k: int | None
    x_quantized: tuple[torch.Tensor, torch.Tensor] | None


def _fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    route: _Route,
    config: MoeBlockConfig | None,
    fp8_operands: _Fp8Operands,
) -> torch.Tensor:
    num_tokens = x.shape[0]
    num_experts, _, hidden = w13.shape
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    w13_scale, w2_scale, group_k = fp8_operands.w13_scale, fp8_operands.w2_scale, fp8_operands.group_k
    x_quantized = fp8_operands.x_quantized
    fp8 = check_fp8_operands(w13, w2, w13_scale, w2_scale, group_k)
    if x_quantized is not None:
        if not fp8:
            raise ValueError("x_quantized without FP8 weights: float experts take x as it is")
        groups = 1 if group_k is None else -(-hidden // group_k)
        xq, x_scale = x_quantized
        if xq.shape != x.shape or xq.dtype != FP8 or x_scale.shape != (num_tokens, groups):
            raise ValueError(
                f"x_quantized: float8 {tuple(x.shape)} with scales ({num_tokens}, {groups}) expected, got "
                f"{xq.dtype} {tuple(xq.shape)} and {tuple(x_scale.shape)}"
            )
    if num_tokens == 0:
        return torch.empty_like(x)
    num_slots = num_tokens * top_k
    if config is None:
        fp8_config = choose_fp8_block_config(num_slots, num_experts, group_k)
        cfg = fp8_config if fp8 else choose_block_config(num_slots, num_experts)
    else:
        cfg = config
    if fp8 and group_k is not None and cfg.block_k != group_k:
        raise ValueError(f"block-scaled FP8 needs block_k = group_k ({group_k}), not {cfg.block_k}")
    topk_weights, align = route(cfg.block_m)
    per_slot = torch.empty((num_slots, hidden), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32)
    if fp8:
        assert w13_scale is not None and w2_scale is not None
        xq, x_scale = x_quantized if x_quantized is not None else quantize_activations(x, group_k)
        aq, a_scale = _gate_up(xq, w13, align, top_k, cfg, x.dtype, (x_scale, w13_scale), group_k)
        _grouped_gemm(aq, w2, per_slot, align, 1, cfg, False, weights, (a_scale, w2_scale), group_k)
    else:
        activated = _gate_up(x, w13, align, top_k, cfg, x.dtype)
        _grouped_gemm(activated, w2, per_slot, align, 1, cfg, gated=False, weights=weights)
    if top_k == 1:
        return per_slot
    return sum_slots(per_slot, num_tokens, top_k)


@triton.jit(do_not_specialize=["hidden"])
def _sum_slots_kernel(slots_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # in slot order: the same sum whatever the batch
        acc += tl.load(slots_ptr + (token * TOP_K + j) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_slots(per_slot: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """[num_tokens * top_k, hidden] (contiguous; each token's top_k weighted rows together) -> [num_tokens,
    hidden]: the float32 sum of each token's rows, rounded once, as ``.view(T, top_k, H).sum(1)`` gives,
    in one launch where torch's reduction took 5.5 µs a decode step's layer on an H100 (W5's step profile)."""
    hidden = per_slot.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=per_slot.dtype, device=per_slot.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block))](
        per_slot, out, hidden, TOP_K=top_k, BLOCK=block, num_warps=4
    )
    return out
