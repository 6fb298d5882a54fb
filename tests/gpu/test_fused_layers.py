"""Fused RMSNorm(+residual), rotary(+Qwen3 q/k norm, +the K/V cache write) and SiLU-mul kernels give what
the plain-torch modules in engine.model.layers give, on bf16 activations of model-like shapes."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.kernels.reshape_and_cache import reshape_and_cache
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.rotary import rotary_embedding, rotary_embedding_and_cache
from engine.kernels.silu_mul import silu_and_mul
from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul

pytestmark = [requires_cuda, pytest.mark.gpu]


def assert_bf16_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """A bf16 rounding step or two apart (float32 sums in another order), never NaN. The absolute term
    covers cancellation (rotary's x1*cos - x2*sin) after an intermediate rounded the other way."""
    assert not ours.isnan().any()
    theirs = theirs.float()
    diff = (ours.float() - theirs).abs()
    bound = theirs.abs() * 2**-6 + theirs.pow(2).mean().sqrt() * 2**-7
    assert (diff <= bound).all(), f"max diff {diff.max():.3e}"


@pytest.mark.parametrize("rows,hidden", [(1, 1024), (256, 4096), (3000, 576), (7, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch_module(rows, hidden, with_residual):
    norm = RMSNorm(hidden, 1e-6).cuda().bfloat16()
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = torch.randn(rows, hidden, device="cuda").bfloat16() * 3
    residual = torch.randn(rows, hidden, device="cuda").bfloat16() if with_residual else None
    with torch.no_grad():
        theirs = norm(x, residual)
    ours = rms_norm(x, norm.weight, 1e-6, residual)
    if with_residual:
        assert torch.equal(ours[1], theirs[1])  # x + residual: one rounding, identical
        assert_bf16_close(ours[0], theirs[0])
    else:
        assert_bf16_close(ours, theirs)


@pytest.mark.parametrize("rows,inter", [(1, 3072), (512, 14336), (33, 1000)])
def test_silu_and_mul_matches_torch_module(rows, inter):
    x = torch.randn(rows, 2 * inter, device="cuda").bfloat16() * 2
    assert_bf16_close(silu_and_mul(x), SiluAndMul()(x))


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,qk_norm",
    [(16, 8, 128, True), (32, 8, 128, False), (9, 3, 64, False), (14, 2, 64, True)],
)
def test_rotary_in_place_matches_torch_module(num_heads, num_kv_heads, head_dim, qk_norm):
    num_tokens, max_pos = 300, 8192
    rotary = RotaryEmbedding(head_dim, {"rope_theta": 1e6}, max_pos, max_pos, torch.device("cuda"))
    positions = torch.randint(0, max_pos, (num_tokens,), device="cuda")
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").bfloat16()
    q_norm = RMSNorm(head_dim, 1e-6).cuda().bfloat16()
    k_norm = RMSNorm(head_dim, 1e-6).cuda().bfloat16()
    torch.nn.init.normal_(q_norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(k_norm.weight, 1.0, 0.3)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = t.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        return q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim), v

    q, k, _ = split(qkv.clone())
    with torch.no_grad():
        if qk_norm:
            q, k = q_norm(q), k_norm(k)
        q_ref, k_ref = rotary(positions, q, k)

    packed = qkv.clone()
    q, k, v = split(packed)
    weights = (q_norm.weight, k_norm.weight) if qk_norm else (None, None)
    rotary_embedding(positions, q, k, rotary.cos_sin_cache, *weights, eps=1e-6)
    assert_bf16_close(q, q_ref)
    assert_bf16_close(k, k_ref)
    assert torch.equal(v, split(qkv)[2])  # v untouched


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,qk_norm,fp8_cache",
    [
        (16, 8, 128, True, False),
        (32, 8, 128, False, True),
        (9, 3, 64, False, False),
        (32, 4, 128, True, True),
        (15, 3, 96, True, True),  # head_dim and kv heads not powers of two: the masks
    ],
)
def test_rotary_with_cache_write_equals_rotary_then_reshape_and_cache(
    num_heads, num_kv_heads, head_dim, qk_norm, fp8_cache
):
    """One launch, the same bits as the two it replaces: q and k rotated in place, the cache as
    reshape_and_cache leaves it from the rotated k (float8 too), padding slots (-1) untouched."""
    num_tokens, max_pos, block_size, num_blocks = 300, 8192, 16, 40
    rotary = RotaryEmbedding(head_dim, {"rope_theta": 1e6}, max_pos, max_pos, torch.device("cuda"))
    positions = torch.randint(0, max_pos, (num_tokens,), device="cuda")
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").bfloat16()
    weights = [torch.empty(head_dim, device="cuda").normal_(1.0, 0.3).bfloat16() for _ in range(2)]
    weights = weights if qk_norm else [None, None]
    dtype = torch.float8_e4m3fn if fp8_cache else torch.bfloat16
    scales = torch.tensor([0.05, 0.02], device="cuda") if fp8_cache else None
    before = (torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device="cuda") * 0.1).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::7] = -1

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = t.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        shape = (num_tokens, -1, head_dim)
        return q.view(shape), k.view(shape), v.view(shape)

    q_ref, k_ref, v = split(qkv.clone())
    rotary_embedding(positions, q_ref, k_ref, rotary.cos_sin_cache, *weights, eps=1e-6)
    expected = before.clone()
    reshape_and_cache(k_ref, v, expected, slots, scales)

    q, k, v = split(qkv.clone())
    cache = before.clone()
    rotary_embedding_and_cache(
        positions, q, k, v, cache, slots, rotary.cos_sin_cache, *weights, eps=1e-6, kv_scales=scales
    )
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


def test_rms_norm_on_strided_heads_matches_torch_module():
    """Qwen3's q_norm: RMSNorm over each head of q, a strided view of the packed qkv output."""
    num_tokens, num_heads, num_kv_heads, head_dim = 77, 16, 8, 128
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").bfloat16()
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    norm = RMSNorm(head_dim, 1e-6).cuda().bfloat16()
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    with torch.no_grad():
        theirs = norm(q)
    assert_bf16_close(rms_norm(q, norm.weight, 1e-6), theirs)
