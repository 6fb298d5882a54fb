"""The Triton kernels' indexing and masking, checked on the CPU through Triton's interpreter
(TRITON_INTERPRET=1) so CI covers them without a GPU. Small shapes, float16/float32 (the interpreter
mishandles bf16 tl.dot). The interpreter must be switched on before the kernels are defined, hence a
fresh process."""

from __future__ import annotations

from triton_interpreter import needs_interpreter, run_under_interpreter

# Triton 3.6's interpreter cannot take loop bounds loaded from memory (seen on the GPU machine);
# the CI's Triton (3.9) runs these kernels as they are.
pytestmark = needs_interpreter

SCRIPT = r"""
import random, torch
import numpy as np
from engine.model.attention import longest_first
from gpu_paged_batch import make_paged_batch, reference_attention, write_new_kv_float32
from engine.kernels.triton_attention import TritonAttention
from engine.kernels.decode_tiles import DecodeTile
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.silu_mul import silu_and_mul
from engine.kernels.rotary import rotary_embedding
from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul

f16, f32 = torch.float16, torch.float32
cases = [  # head_dim, block_size, kv_heads, group, query_lens, prefix_lens, decode splits, dtype
    (64, 16, 1, 4, [1, 1, 1, 5, 17, 70], [3, 40, 130, 0, 20, 9], None, f16),
    (128, 32, 2, 4, [1, 1, 33], [1, 300, 40], 5, f16),
    (32, 8, 4, 1, [1, 40], [700, 0], 64, f32),
    (80, 16, 3, 2, [1, 65, 64], [63, 63, 0], 3, f16),  # head_dim not a power of two
]
for head_dim, block_size, kvh, group, q_lens, prefix, splits, dtype in cases:
    b = make_paged_batch(q_lens, prefix, kvh * group, kvh, head_dim, block_size, seed=head_dim,
                         dtype=dtype, device="cpu")
    expected_cache = write_new_kv_float32(b)
    out = torch.full_like(b.q, float("nan"))
    TritonAttention(num_sms=4, decode_num_splits=splits).forward(b.q, b.k, b.v, b.kv_cache, b.meta, b.scale, out=out)
    ref = reference_attention(b)
    assert not out.isnan().any(), (dtype, head_dim)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (2e-3 if dtype == f16 else 1e-5), (dtype, head_dim, err)
    written = ~expected_cache.isnan()
    assert torch.equal(b.kv_cache.float()[written], expected_cache[written])
    # the decode programs dispatched longest context first (and in an arbitrary order): the same bits
    nd = b.meta.num_decodes
    lens = np.asarray(b.meta.seq_lens_cpu[:nd])
    for order in (longest_first(lens), np.random.default_rng(nd).permutation(nd).astype(np.int32)):
        b.meta.decode_order = torch.from_numpy(order)
        again = torch.full_like(b.q, float("nan"))
        TritonAttention(num_sms=4, decode_num_splits=splits).forward(b.q, b.k, b.v, b.kv_cache, b.meta, b.scale,
                                                                     out=again)
        assert torch.equal(again, out), (head_dim, order)
    b.meta.decode_order = None
    # every tile a card's table may choose gives the same attention (other sums' order: not the same bits)
    for tile in (DecodeTile(32, 2, 3), DecodeTile(128, 8, 2)):
        tiled = torch.full_like(b.q, float("nan"))
        TritonAttention(num_sms=4, decode_num_splits=splits, decode_tile=tile).forward(
            b.q, b.k, b.v, b.kv_cache, b.meta, b.scale, out=tiled)
        err = ((tiled.float() - ref).norm() / ref.norm()).item()
        assert err < (2e-3 if dtype == f16 else 1e-5), (tile, head_dim, err)

torch.manual_seed(0)
dt = torch.float16
norm = RMSNorm(96, 1e-6).to(dt)
norm.weight.data = torch.randn(96).to(dt)
x, r = torch.randn(7, 96).to(dt), torch.randn(7, 96).to(dt)
for ours, theirs in zip(rms_norm(x, norm.weight, 1e-6, r), norm(x, r)):
    assert torch.equal(ours, theirs)
x = torch.randn(5, 400).to(dt)
assert torch.equal(silu_and_mul(x), SiluAndMul()(x))
T, H, KVH, D = 6, 4, 2, 64
rot = RotaryEmbedding(D, {"rope_theta": 1e6}, 100, 100, torch.device("cpu"))
pos = torch.tensor([0, 5, 9, 50, 99, 3])
qkv = torch.randn(T, (H + 2 * KVH) * D).to(dt)
q, k, _ = qkv.clone().split([H * D, KVH * D, KVH * D], -1)
unit_norm = RMSNorm(D, 1e-6).to(dt)
q_ref, k_ref = rot(pos, unit_norm(q.view(T, H, D)), unit_norm(k.view(T, KVH, D)))
q, k, _ = qkv.clone().split([H * D, KVH * D, KVH * D], -1)
w = torch.ones(D, dtype=dt)
q_out, k_out = rotary_embedding(pos, q.view(T, H, D), k.view(T, KVH, D), rot.cos_sin_cache, w, w, 1e-6)
assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
# what Qwen3's attention calls: the fused module with its own q/k norms (weights not 1) equals the plain one
from engine.kernels.fused_layers import FusedRotaryEmbedding
q_norm, k_norm = RMSNorm(D, 1e-6).to(dt), RMSNorm(D, 1e-6).to(dt)
q_norm.weight.data, k_norm.weight.data = (1 + 0.3 * torch.randn(D)).to(dt), (1 + 0.3 * torch.randn(D)).to(dt)
fused_rot = FusedRotaryEmbedding(D, {"rope_theta": 1e6}, 100, 100, torch.device("cpu"))
q, k, _ = qkv.clone().split([H * D, KVH * D, KVH * D], -1)
q_ref, k_ref = rot(pos, q.view(T, H, D), k.view(T, KVH, D), q_norm, k_norm)
q, k, _ = qkv.clone().split([H * D, KVH * D, KVH * D], -1)
q_out, k_out = fused_rot(pos, q.view(T, H, D), k.view(T, KVH, D), q_norm, k_norm)
assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
# the fused rotary writing K/V into the paged cache (what attention calls on the GPU): the cache the plain
# rotary + write_kv_cache leave, bit for bit; a float8 one as reshape_and_cache writes it (the interpreter's
# e4m3 rounding is not torch's: tests/gpu checks it against torch on a GPU); a padding slot (-1) written nowhere
from engine.kernels.reshape_and_cache import reshape_and_cache
from engine.model.attention import write_kv_cache
slots = torch.tensor([3, -1, 17, 0, 19, 8])
real = slots >= 0
for cache_dtype, kv_scales in ((dt, None), (torch.float8_e4m3fn, torch.tensor([0.02, 0.01]))):
    before = (torch.randn(2, 5, 4, KVH, D) * 0.1).to(cache_dtype)
    q, k, v = qkv.clone().split([H * D, KVH * D, KVH * D], -1)
    q_ref, k_ref = rot(pos, q.view(T, H, D), k.view(T, KVH, D), q_norm, k_norm)
    plain = before.clone()
    if kv_scales is None:
        write_kv_cache(k_ref[real], v.view(T, KVH, D)[real], plain, slots[real])
    else:
        reshape_and_cache(k_ref, v.view(T, KVH, D), plain, slots, kv_scales)
    fused = before.clone()
    q, k, v = qkv.clone().split([H * D, KVH * D, KVH * D], -1)
    q_out, k_out = fused_rot.rotate_and_cache(pos, q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D),
                                              fused, slots, kv_scales, q_norm, k_norm)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(fused.view(torch.uint8), plain.view(torch.uint8)), cache_dtype
    assert not torch.equal(fused.view(torch.uint8), before.view(torch.uint8))
# head_dim and kv heads not powers of two (the kernel's padded halves and heads masked): the same cache
H3, KVH3, D3 = 6, 3, 96
rot3 = RotaryEmbedding(D3, {"rope_theta": 1e6}, 100, 100, torch.device("cpu"))
fused3 = FusedRotaryEmbedding(D3, {"rope_theta": 1e6}, 100, 100, torch.device("cpu"))
q3, k3, v3 = torch.randn(T, (H3 + 2 * KVH3) * D3).to(dt).split([H3 * D3, KVH3 * D3, KVH3 * D3], -1)
q3, k3, v3 = q3.reshape(T, H3, D3), k3.reshape(T, KVH3, D3), v3.reshape(T, KVH3, D3)
before = (torch.randn(2, 5, 4, KVH3, D3) * 0.1).to(dt)
plain, fused = before.clone(), before.clone()
q_ref, k_ref = rot3(pos, q3.clone(), k3.clone())
write_kv_cache(k_ref[real], v3[real], plain, slots[real])
q_out, k_out = fused3.rotate_and_cache(pos, q3.clone(), k3.clone(), v3, fused, slots)
assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref) and torch.equal(fused, plain)
assert not torch.equal(fused, before)

from engine.kernels.categorical_sample import categorical_sample
V = 9000  # three chunks of 4096
logits = torch.randn(6, V).to(dt)
logits[:, 5000] = float("-inf")
logits[0, 100] = logits[0, 8500] = 9.0  # a tie across chunks: the lower index, as argmax
greedy = categorical_sample(logits, torch.zeros(6), torch.arange(6))
assert torch.equal(greedy, logits.float().argmax(dim=1)) and greedy[0] == 100
flat = torch.zeros(6, V)
flat[:, 8999] = float("-inf")
drawn = categorical_sample(flat, torch.ones(6), torch.tensor([7, 7, 8, 9, 10, 11]))
assert drawn[0] == drawn[1] and len(set(drawn.tolist())) > 3 and 8999 not in drawn.tolist()
# Mass spread over three chunks, the middle one masked but for one token, at T = 0.5 (p ** 2 renormalised);
# a row mixing greedy and sampled rows
probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
where = torch.tensor([3, 4100, 4095, 8999, 0])
row = torch.full((V,), float("-inf"))
row[where] = probs.log() / 2  # logit / 0.5 = log p
n = 3000
temps = torch.full((n,), 0.5)
temps[7] = 0.0
tokens = categorical_sample(row.repeat(n, 1).to(dt), temps, torch.arange(n) * 1000 + 5)
assert tokens[7] == 3
tokens = torch.cat([tokens[:7], tokens[8:]])
assert set(tokens.tolist()) <= set(where.tolist())
counts = torch.stack([(tokens == w).sum() for w in where]).float()
expected = (n - 1) * probs
chi2 = ((counts - expected) ** 2 / expected).sum().item()
assert chi2 < 18.5, chi2  # 4 dof, p = 0.001
# each row's token is the float64 inverse CDF's for the row's uniform (reference from the seed on the host)
from sampling_reference import reference_tokens
n, V = 60, 9000
logits = torch.randn(n, V) * 3
logits[::4, 4096:8192] = float("-inf")
temps = [(0.0, 0.7, 1.3)[i % 3] for i in range(n)]
seeds = [i * 7919 + 11 for i in range(n)]
drawn = categorical_sample(logits, torch.tensor(temps), torch.tensor(seeds)).tolist()
agree = sum(a == b for a, b in zip(drawn, reference_tokens(logits, temps, seeds)))
assert agree >= n - 1, agree  # a float32 chunk sum may move a boundary by ~1e-7 of the row's mass
# a flat row: consecutive seeds (as unseeded rows get) draw tokens spread evenly over the vocabulary
n, V = 1600, 4096
tokens = categorical_sample(torch.zeros(n, V), torch.ones(n), torch.arange(n) + 12345)
counts = torch.bincount(tokens // 256, minlength=16).float()
chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum().item()
assert chi2 < 37.7, chi2  # 15 dof, p = 0.001
print("ok")
"""


def test_kernels_match_references_under_the_interpreter():
    run_under_interpreter(SCRIPT)
