"""FP8 (e4m3) GEMM in Triton: ``C = (A * sa) (B * sb)^T``, A [M, K] float8 activations, B [N, K] float8
weights, with per-token / per-channel scales (sa [M, 1], sb [N, 1]) or per 128-wide group of K on both
sides (sa [M, K/g], sb [N, K/g]: the block-scaled checkpoints, Qwen3-*-FP8 and DeepSeek, whose 128x128 weight
blocks engine.model.fp8 stores as one scale per row and group).

Why our own: at decode batch sizes a linear is a read of its weights, which FP8 halves, but cuBLASLt's
row-scaled FP8 GEMM (torch._scaled_mm) reaches about a third of the H100's bandwidth at 16 tokens
(Llama-8B down_proj: 42 µs where 17.5 µs reads the weights; bench/fp8_gemm_tune.py), slower than bfloat16;
and block scales have no cuBLAS path in this torch. The grid covers N in narrow column tiles and, where
those alone leave SMs idle, splits K: each split's float32 partial lands in its own slice of a workspace and
a second small kernel sums the slices in split order, so a result never depends on scheduling. With
``GemmTile.fused_sum`` the last split of a tile to finish (an atomic count per tile) sums them instead, the
same bits without the second launch; not the tiles' default: on an H100 (2026-12-07, bench/fp8_gemm_tune.py,
bench/results/fp8_{block,channel}_tune_h100_2026-12-07f.json) it tied or lost at every split shape but W5's
o_proj at 8 tokens (6.1 against 6.4 µs): W5's qkv at 32 tokens 8.8 against 7.8, the 8B's qkv 10.9 against 9.9;
the last split's wait and second read cost about what the launch it saves does. With group scales each
BLOCK_K-wide partial product is scaled as it is accumulated (BLOCK_K = the group).

Tiles (``tile_for``) come from bench/fp8_gemm_tune.py on an H100; ``beats_scaled_mm`` says where this
kernel is the faster of the two for per-channel weights (engine.model.fp8.Fp8Linear asks it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from engine.kernels.shared_memory import device_shared_memory, stages_that_fit


@dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    fused_sum: bool = False  # split K: the tile's last split sums the partials (else a second kernel does)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, c_ptr, counter_ptr,
    M, N, K, K_PER_SPLIT, num_splits,
    stride_am, stride_bn, stride_sam, stride_sbn,
    PER_GROUP: tl.constexpr,  # one scale per BLOCK_K columns (else one per row, applied at the end)
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K_PER_SPLIT, K multiples of BLOCK_K: no weight masks
    FUSED_SUM: tl.constexpr,  # out_ptr holds the splits' partials; the last split of a tile sums them into c_ptr
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
        if PER_GROUP:
            g = k0 // BLOCK_K
            sa = tl.load(sa_ptr + offs_m * stride_sam + g, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptr + offs_n * stride_sbn + g, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if not PER_GROUP:
        sa = tl.load(sa_ptr + offs_m * stride_sam, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + offs_n * stride_sbn, mask=n_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    # split K: float32 partials in out[split, M, N], summed by the tile's last split or by _sum_splits
    tile_mask = m_ok[:, None] & n_ok[None, :]
    tile_offs = offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + pid_k * M * N + tile_offs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
    if FUSED_SUM:
        tile = pid_m * tl.num_programs(0) + pid_n
        # Every thread's partial is stored before one thread counts it (a CTA barrier, then a gpu-scope
        # release); the split that counts last has seen every other count (acquire) and so their partials.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, num_splits):  # split order, as _sum_splits: the same bits every run
                # .cg: from L2, where the other SMs' partials are (never a stale line of this SM's L1)
                total += tl.load(
                    out_ptr + s * M * N + tile_offs, mask=tile_mask, other=0.0, cache_modifier=".cg"
                )
            tl.store(c_ptr + tile_offs, total.to(c_ptr.dtype.element_ty), mask=tile_mask)
            tl.atomic_xchg(counter_ptr + tile, 0)  # zero again for the next call (or graph replay)


@triton.jit
def _sum_splits(part_ptr, c_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # fixed order: the same sum every run
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=ok)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    group_k: int | None = None,
    tile: GemmTile | None = None,
) -> torch.Tensor:
    """a [M, K] float8, a_scale [M, G] float32, b [N, K] float8, b_scale [N, G] float32 (per channel: any
    contiguous N scales, [N, 1] or [1, N]) -> [M, N] in out_dtype; G is 1 (group_k None) or
    ceil(K / group_k). ``tile``: None takes ``tile_for``'s."""
    m, k = a.shape
    n = b.shape[0]
    per_group = group_k is not None
    assert b.shape[1] == k and a.stride(1) == 1 and b.stride(1) == 1, (a.shape, b.shape)
    if per_group:
        groups = -(-k // group_k)
        assert a_scale.shape == (m, groups) and b_scale.shape == (n, groups), (a_scale.shape, b_scale.shape)
        assert a_scale.stride(1) == 1 and b_scale.stride(1) == 1
        assert group_k >= 16 and group_k & (group_k - 1) == 0, f"scale groups of {group_k} columns"
    else:
        assert a_scale.numel() == m and b_scale.numel() == n, (a_scale.shape, b_scale.shape)
        assert a_scale.is_contiguous() and b_scale.is_contiguous()
    t = tile or tile_for(m, n, k, group_k)
    if a.is_cuda:
        t = fit_shared_memory(t, device_shared_memory(a.device.index or 0))
    assert not per_group or t.block_k == group_k, (t, group_k)
    k_blocks = triton.cdiv(k, t.block_k)
    k_per_split = triton.cdiv(k_blocks, max(1, min(t.split_k, k_blocks))) * t.block_k
    split = triton.cdiv(k, k_per_split)  # no empty split
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    out = c if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n, t.block_n), split, triton.cdiv(m, t.block_m))
    counters = split_counters(a.device, grid[0] * grid[2]) if split > 1 and t.fused_sum else None
    _fp8_gemm_kernel[grid](
        a, b, out, a_scale, b_scale, c, counters if counters is not None else c,
        m, n, k, k_per_split, split, a.stride(0), b.stride(0),
        a_scale.stride(0) if per_group else 1, b_scale.stride(0) if per_group else 1,
        PER_GROUP=per_group, EVEN=n % t.block_n == 0 and k % t.block_k == 0, FUSED_SUM=counters is not None,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    if split > 1 and counters is None:
        block = 1024
        _sum_splits[(triton.cdiv(m * n, block),)](out, c, m * n, SPLIT=split, BLOCK=block)
    return c


# Per device: one int32 count per output tile of a split-K call, zero between calls (each call's last split
# zeroes its tile's again). One set serves every call because the engine runs a device's GEMMs in one stream,
# one after another: two fused calls overlapping (another stream, programmatic dependent launch) or a launch
# killed mid-way would leave wrong counts, hence opt-in. Made outside any CUDA graph capture (the first call is
# always a warm-up) on the current device, large enough for any tile grid split K is chosen for (a few thousand).
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
SPLIT_COUNTER_TILES = 16384


def split_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's tile counts for a fused split-K sum; None (the separate summing kernel) where there are
    more tiles than counts, or where they would first be made inside a graph capture."""
    if tiles > SPLIT_COUNTER_TILES:
        return None
    counters = _SPLIT_COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _SPLIT_COUNTERS[device] = torch.zeros(
            SPLIT_COUNTER_TILES, dtype=torch.int32, device=device
        )
    return counters


def fit_shared_memory(tile: GemmTile, shared_memory: int) -> GemmTile:
    """``tile`` with fewer pipeline stages where its buffers would not fit ``shared_memory`` bytes per block
    (engine/kernels/shared_memory.py: a 64x64x256 tile at 5 stages needs 160 KB, Ada has 99 KB)."""
    per_stage = tile.block_m * tile.block_k + tile.block_k * tile.block_n  # float8: a byte per element
    stages = stages_that_fit(tile.num_stages, per_stage, shared_memory)
    return tile if stages == tile.num_stages else replace(tile, num_stages=stages)


def _wide(n: int) -> bool:
    return n >= 16384  # enough column tiles to fill the GPU without splitting K


def beats_scaled_mm(m: int, n: int) -> bool:
    """Per-channel weights: this kernel is faster than torch._scaled_mm for ``m`` tokens through ``n``
    outputs (H100, Llama-8B linears: up to 64 tokens everywhere, up to 128 under 16,384 outputs)."""
    return m <= 64 or (m <= 128 and not _wide(n))


BLOCK_SCALED_MM_MIN_TOKENS = 128


def block_scaled_mm_wins(m: int) -> bool:
    """128 x 128-block weights (Qwen3-*-FP8): cuBLAS's block-scaled torch._scaled_mm is faster than this kernel
    for ``m`` tokens (H100, Qwen3-30B-A3B's qkv / o, quantization included: this kernel 9.4 / 15.2 µs against
    11.9 / 16.8 at 64 tokens; 23.6 / 43.9 against 12.4 / 17.8 at 256; 110 / 98 against 50 / 42 at 2,048).
    cuBLAS refuses token counts that are not a multiple of 4 (CUBLAS_STATUS_NOT_SUPPORTED; torch 2.11, H100:
    the scales' leading dimension must be 16-byte aligned): those stay here (CUDA graphs' padded batches are
    multiples of 4 from 128). Fp8Linear asks the same of the weight's input blocks (in_features % 512)."""
    return m >= BLOCK_SCALED_MM_MIN_TOKENS and m % 4 == 0


def tile_for(m: int, n: int, k: int, group_k: int | None = None) -> GemmTile:
    """The tile for ``m`` tokens through an [n, k] weight. Up to 128 tokens from bench/fp8_gemm_tune.py on an
    H100 (2026-12-05; at 16 tokens qkv 8.1 / o 6.7 / gate_up 43 / down 25 µs against _scaled_mm's 17 /
    12.5 / 50 / 42); above, the sweep's best at 256 tokens. With group scales BLOCK_K is the group, and from
    33 to 128 tokens the block-scaled sweep's own tiles (``_block_scaled_mid_tile``)."""
    if group_k is not None and 32 < m <= 128 and k < 8192:
        return _block_scaled_mid_tile(m, n, group_k)
    if m <= 32:
        block_m = 16 if m <= 16 else 32
        if _wide(n):
            tile = GemmTile(block_m, 64, 256, split_k=1, num_stages=3)
        elif k >= 8192:
            tile = GemmTile(block_m, 32, 256, split_k=2, num_stages=5)
        else:
            tile = GemmTile(block_m, 64, 128, split_k=4, num_stages=3)
    elif m <= 64:
        tile = GemmTile(64, 32, 256, num_stages=5) if k >= 8192 else GemmTile(64, 64, 256, num_stages=3)
    elif m <= 128:
        tile = GemmTile(64, 64, 256, num_stages=5)
    else:
        tile = GemmTile(128, 128, 128, num_warps=8, num_stages=4)
    return tile if group_k is None else replace(tile, block_k=group_k)


def _block_scaled_mid_tile(m: int, n: int, group_k: int) -> GemmTile:
    """33-128 tokens through block-scaled weights, from bench/fp8_gemm_tune.py --group 128 on an H100
    (2026-12-07, Qwen3-30B-A3B's qkv 5120 x 2048 and o 2048 x 4096, µs): the tiles above gave o_proj 32
    programs (12.7-13.8 against 8.0-8.2 with 16-wide columns at 48-64 tokens, 9.7-9.9 split in two from 80)
    and both five stages from 65 tokens (qkv 12.5-12.8 against 9.0 with 128-wide columns and three stages).
    Only those two shapes were swept; wider ones (a dense 8B's, n >= 4096) take the qkv rule, unmeasured."""
    if n >= 4096:
        return GemmTile(64, 64 if m <= 64 else 128, group_k, num_stages=3)
    if m <= 64:
        return GemmTile(64, 16, group_k, num_stages=3)
    return GemmTile(64, 64, group_k, split_k=2, num_stages=3)
