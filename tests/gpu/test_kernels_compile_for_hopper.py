"""Every Triton kernel of engine/kernels compiles for Hopper (sm_90), called through its wrapper as the engine
calls it, at the shapes of the models the benchmarks serve (Llama-8B, Qwen3-0.6B, Qwen3-30B-A3B, a Mixtral-like
8 x top 2, SmolLM2-135M's 64-wide heads), in bfloat16 and FP8, decode and prompt token counts, with the tiles
the engine would pick (tests/gpu/hopper_compile.py: compiled, not run; CPU only). The interpreter tests check
the kernels' arithmetic; this checks what only the GPU session used to find out: that they compile. A kernel
added to engine/kernels without a case here fails the last test."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from hopper_compile import CompiledKernel, compiled_for_hopper, hopper_compiler_available

pytestmark = pytest.mark.skipif(
    hopper_compiler_available() is not None, reason=str(hopper_compiler_available())
)

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
KERNELS = Path(__file__).resolve().parents[2] / "engine" / "kernels"


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    experts: int = 0
    top_k: int = 0


LLAMA_8B = Shape(4096, 32, 8, 128, 14336, 128256)
QWEN3_06B = Shape(1024, 16, 8, 128, 3072, 151936)
QWEN3_30B_A3B = Shape(2048, 32, 4, 128, 768, 151936, experts=128, top_k=8)
MIXTRAL_LIKE = Shape(1024, 16, 4, 128, 1024, 32000, experts=8, top_k=2)
SMOLLM2 = Shape(576, 9, 3, 64, 1536, 49152)
DENSE = [LLAMA_8B, QWEN3_06B, SMOLLM2]
TOKENS = [1, 16, 64, 256, 2048]  # decode batches, then a prompt step


def empty(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def norms() -> None:
    from engine.kernels.fp8_producers import rms_norm_fp8, rms_norm_fp8_and_float
    from engine.kernels.rmsnorm import rms_norm

    for s in DENSE + [QWEN3_30B_A3B]:
        for t in (1, 256):
            x, w = empty(t, s.hidden), empty(s.hidden)
            rms_norm(x, w, 1e-6)
            rms_norm(x, w, 1e-6, empty(t, s.hidden))
            rms_norm(empty(t, s.heads, s.head_dim), empty(s.head_dim), 1e-6)  # Qwen3's q/k norms
            for group in (None, 128) if s.hidden % 128 == 0 else (None,):  # whole groups only (fp8_producers)
                rms_norm_fp8(x, w, 1e-6, empty(t, s.hidden), group)
        router = empty(QWEN3_30B_A3B.experts, QWEN3_30B_A3B.hidden)
        x = empty(8, QWEN3_30B_A3B.hidden)
        rms_norm_fp8_and_float(
            x, empty(QWEN3_30B_A3B.hidden), 1e-6, empty(8, QWEN3_30B_A3B.hidden), 128, router
        )


def rotary_and_cache() -> None:
    from engine.kernels.reshape_and_cache import reshape_and_cache
    from engine.kernels.rotary import rotary_embedding, rotary_embedding_and_cache

    for s in DENSE + [QWEN3_30B_A3B]:
        t = 64
        q, k, v = empty(t, s.heads + 2 * s.kv_heads, s.head_dim).split(
            [s.heads, s.kv_heads, s.kv_heads], dim=1
        )
        positions, slots = empty(t, dtype=torch.int64), empty(t, dtype=torch.int64)
        cos_sin = empty(4096, s.head_dim, dtype=torch.float32)
        rotary_embedding(positions, q, k, cos_sin)
        for cache_dtype, scales in ((BF16, None), (FP8, torch.ones(2))):
            cache = empty(2, 32, 16, s.kv_heads, s.head_dim, dtype=cache_dtype)
            reshape_and_cache(k, v, cache, slots, scales)
            rotary_embedding_and_cache(positions, q, k, v, cache, slots, cos_sin, kv_scales=scales)
            norm_w = empty(s.head_dim)
            rotary_embedding_and_cache(
                positions, q, k, v, cache, slots, cos_sin, norm_w, norm_w, 1e-6, kv_scales=scales
            )


def attention() -> None:
    from engine.kernels.decode_attention import decode_attention
    from engine.kernels.decode_tiles import DECODE_TILES, DEFAULT_FP8_TILE, FP8_DECODE_TILES, DecodeTile
    from engine.kernels.prefill_attention import prefill_attention

    tiles = {DecodeTile(), *DECODE_TILES.values()}
    fp8_tiles = {DEFAULT_FP8_TILE, *FP8_DECODE_TILES.values()}
    for s in DENSE + [QWEN3_30B_A3B]:
        seqs, blocks = 16, 64
        q, out = empty(seqs, s.heads, s.head_dim), empty(seqs, s.heads, s.head_dim)
        tables, lens = empty(seqs, blocks, dtype=torch.int32), empty(seqs, dtype=torch.int32)
        order = empty(seqs, dtype=torch.int32)
        for cache_dtype, scales, cache_tiles in ((BF16, None, tiles), (FP8, torch.ones(2), fp8_tiles)):
            cache = empty(2, 128, 16, s.kv_heads, s.head_dim, dtype=cache_dtype)
            for tile in cache_tiles:
                for splits, seq_order in ((1, None), (4, order)):
                    decode_attention(q, cache, tables, lens, 0.1, out, splits, tile, scales, seq_order)
            t = 512
            starts = empty(seqs + 1, dtype=torch.int32)
            qp, outp = empty(t, s.heads, s.head_dim), empty(t, s.heads, s.head_dim)
            prefill_attention(qp, cache, tables, lens, starts, 128, 0.1, outp, first_seq=2, kv_scales=scales)


def mlp_activations() -> None:
    from engine.kernels.fp8_producers import silu_and_mul_fp8
    from engine.kernels.fp8_quant import quantize_activations
    from engine.kernels.silu_mul import silu_and_mul

    for s in DENSE + [QWEN3_30B_A3B]:
        for t in (1, 256):
            gate_up = empty(t, 2 * s.inter)
            silu_and_mul(gate_up)
            for group in (None, 128):
                silu_and_mul_fp8(gate_up, group)
                quantize_activations(empty(t, s.hidden), group)
            quantize_activations(empty(t, s.hidden), static_scale=torch.ones(1))
        quantize_activations(empty(64, s.heads * s.head_dim), 128)  # from 64 rows: a row's groups a program


def fp8_gemms() -> None:
    from engine.kernels.fp8_gemm import fp8_gemm, tile_for

    for s in DENSE + [QWEN3_30B_A3B]:
        linears = [(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim), (s.heads * s.head_dim, s.hidden)]
        if not s.experts:
            linears += [(s.hidden, 2 * s.inter), (s.inter, s.hidden)]
        for k, n in linears:
            w = empty(n, k, dtype=FP8)
            for m in TOKENS[:-1]:
                a = empty(m, k, dtype=FP8)
                fp8_gemm(a, empty(m, 1, dtype=torch.float32), w, empty(n, 1, dtype=torch.float32), BF16)
                if k % 128 == 0:
                    groups = k // 128
                    a_scale, w_scale = (
                        empty(m, groups, dtype=torch.float32),
                        empty(n, groups, dtype=torch.float32),
                    )
                    fp8_gemm(a, a_scale, w, w_scale, BF16, group_k=128)
                    tile = tile_for(m, n, k, 128)
                    if tile.split_k > 1:  # the opt-in fused split sum
                        fp8_gemm(a, a_scale, w, w_scale, BF16, 128, replace(tile, fused_sum=True))


def moe() -> None:
    from engine.kernels.fused_moe import (
        choose_block_config,
        choose_fp8_block_config,
        fused_experts,
        fused_experts_from_logits,
    )
    from engine.kernels.moe_align import align_slots_by_expert_small, route_and_align
    from engine.kernels.moe_router import topk_softmax
    from engine.kernels.moe_tuned_configs import load_tuned_configs

    for s in (QWEN3_30B_A3B, MIXTRAL_LIKE):
        e, k, h, i = s.experts, s.top_k, s.hidden, s.inter
        w13, w2 = empty(e, 2 * i, h), empty(e, h, i)
        w13_8, w2_8 = empty(e, 2 * i, h, dtype=FP8), empty(e, h, i, dtype=FP8)
        per_channel = {"w13_scale": empty(e, 2 * i, 1, dtype=torch.float32),
                       "w2_scale": empty(e, h, 1, dtype=torch.float32)}  # fmt: skip
        block = {"w13_scale": empty(e, 2 * i, h // 128, dtype=torch.float32),
                 "w2_scale": empty(e, h, i // 128, dtype=torch.float32), "group_k": 128}  # fmt: skip
        tuned = load_tuned_configs("NVIDIA H100 80GB HBM3", e, i, h, "fp8-block128", 128)
        for t in TOKENS:
            x, logits = empty(t, h), empty(t, e)
            weights, ids = empty(t, k, dtype=torch.float32), empty(t, k, dtype=torch.int64)
            topk_softmax(logits, k, True)
            align_slots_by_expert_small(ids, e, 16)
            route_and_align(logits, k, False, 16)
            fused_experts(x, w13, w2, weights, ids)
            fused_experts_from_logits(x, w13, w2, logits, k, True)
            fused_experts(x, w13_8, w2_8, weights, ids, **per_channel)
            fused_experts_from_logits(x, w13_8, w2_8, logits, k, False, **block)
            quantized = (empty(t, h, dtype=FP8), empty(t, h // 128, dtype=torch.float32))
            fused_experts(x, w13_8, w2_8, weights, ids, x_quantized=quantized, **block)
            split_float = replace(choose_block_config(t * k, e), split_gate=True)
            fused_experts(x, w13, w2, weights, ids, split_float)
            split_fp8 = replace(choose_fp8_block_config(t * k, e, 128), split_gate=True)
            fused_experts(x, w13_8, w2_8, weights, ids, split_fp8, **block)
            if tuned is not None and s is QWEN3_30B_A3B:
                fused_experts(x, w13_8, w2_8, weights, ids, tuned.pick(t), **block)


def sampling() -> None:
    from engine.kernels.categorical_sample import categorical_sample
    from engine.kernels.grammar_bitmask import apply_bitmask_triton

    for vocab in (LLAMA_8B.vocab, QWEN3_06B.vocab, SMOLLM2.vocab):
        for dtype in (BF16, torch.float32):
            logits = empty(4, vocab, dtype=dtype)
            categorical_sample(logits, empty(4, dtype=torch.float32), empty(4, dtype=torch.int64))
            apply_bitmask_triton(
                logits, empty(2, -(-vocab // 32), dtype=torch.int32), empty(2, dtype=torch.int64)
            )


CASES: dict[str, Callable[[], None]] = {
    "norms": norms,
    "rotary_and_cache": rotary_and_cache,
    "attention": attention,
    "mlp_activations": mlp_activations,
    "fp8_gemms": fp8_gemms,
    "moe": moe,
    "sampling": sampling,
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_hopper(case: str) -> None:
    with compiled_for_hopper() as compiled:
        CASES[case]()
    assert compiled, f"{case} launched no Triton kernel"


def launched_kernels() -> set[str]:
    """Names of the @triton.jit functions engine/kernels launches (``name[grid](``), device helpers excluded."""
    launch = re.compile(r"\b(_\w+)\[(?:[^\[\]]|\[[^\]]*\])*\]\(")  # a grid may hold one level of [...]
    return {name for path in KERNELS.glob("*.py") for name in launch.findall(path.read_text())}


def test_every_launched_kernel_has_a_compile_case() -> None:
    """All the cases again (Triton's cache has the kernels the test above compiled: seconds)."""
    compiled: list[CompiledKernel] = []
    for run_case in CASES.values():
        with compiled_for_hopper() as kernels:
            run_case()
        compiled += kernels
    missing = launched_kernels() - {k.name for k in compiled}
    assert not missing, f"kernels no case compiles (add one above): {sorted(missing)}"
