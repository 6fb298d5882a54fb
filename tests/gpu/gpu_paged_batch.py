"""Random paged-attention batches for the kernel tests, and a float32 reference to check them against.

Every batch is built to expose the usual paged-kernel bugs: blocks are scattered in random order,
the unused tail of each sequence's last block and every block no sequence owns hold NaN (a kernel
that reads past a sequence's length, or follows a stale block-table entry, produces NaN), and unused
block-table entries point at those NaN blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from engine.model.attention import AttentionMetadata

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], the new tokens' keys (not yet cached)
    v: torch.Tensor
    kv_cache: torch.Tensor  # prefix already cached; NaN wherever no token lives
    meta: AttentionMetadata
    scale: float


def make_paged_batch(
    query_lens: list[int],
    prefix_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    spare_blocks: int = 4,
) -> PagedBatch:
    assert spare_blocks >= 1, "unused block-table entries point at spare (NaN) blocks"
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=cpu_gen).tolist()
    spare = order[sum(blocks_per_seq) :]
    max_blocks = max(blocks_per_seq) + 2
    tables: list[list[int]] = []
    slots: list[int] = []
    poisoned: list[int] = []  # slots that hold no token yet: NaN
    used = 0
    for n_blocks, seq_len, q_len in zip(blocks_per_seq, seq_lens, query_lens, strict=True):
        own = order[used : used + n_blocks]
        used += n_blocks
        tables.append(own + [spare[j % len(spare)] for j in range(max_blocks - n_blocks)])
        new = [own[t // block_size] * block_size + t % block_size for t in range(seq_len - q_len, seq_len)]
        slots.extend(new)
        tail = [own[-1] * block_size + t for t in range(seq_len - (n_blocks - 1) * block_size, block_size)]
        poisoned.extend(new + tail)
    poisoned.extend(b * block_size + t for b in spare for t in range(block_size))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=dev_gen, device=device).to(dtype)

    kv_cache = rand(2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache.view(2, -1, num_kv_heads, head_dim)[:, torch.tensor(poisoned, device=device)] = float("nan")

    num_tokens = sum(query_lens)
    query_start_loc = [0]
    for n in query_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
    )
    return PagedBatch(
        q=rand(num_tokens, num_heads, head_dim),
        k=rand(num_tokens, num_kv_heads, head_dim),
        v=rand(num_tokens, num_kv_heads, head_dim),
        kv_cache=kv_cache,
        meta=meta,
        scale=head_dim**-0.5,
    )


def write_new_kv_float32(batch: PagedBatch) -> torch.Tensor:
    """A float32 copy of the cache with the new tokens' K/V written in (what the kernels must produce)."""
    cache = batch.kv_cache.float().clone()
    flat = cache.view(2, -1, *cache.shape[3:])
    flat[0, batch.meta.slot_mapping] = batch.k.float()
    flat[1, batch.meta.slot_mapping] = batch.v.float()
    return cache


@torch.no_grad()
def reference_attention(batch: PagedBatch) -> torch.Tensor:
    """Float32 causal attention of each sequence's new tokens over its whole context, computed from
    contiguous gathered K/V (independent of any kernel's paging logic). Returns [num_tokens, H, D]."""
    cache = write_new_kv_float32(batch)
    meta = batch.meta
    num_heads, block_size = batch.q.shape[1], cache.shape[2]
    group = num_heads // cache.shape[3]
    out = torch.empty(batch.q.shape, dtype=torch.float32, device=batch.q.device)
    tables = meta.block_tables.long()
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        blocks = tables[i, : math.ceil(seq_len / block_size)]
        k = cache[0, blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)  # [L, H, D]
        v = cache[1, blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        q = batch.q[start : start + q_len].float()  # [q_len, H, D]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        allowed = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, L]
        for h0 in range(0, num_heads, 8):  # bounded memory for 8k x 8k scores
            scores = torch.einsum("qhd,khd->hqk", q[:, h0 : h0 + 8], k[:, h0 : h0 + 8]) * batch.scale
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[start : start + q_len, h0 : h0 + 8] = torch.einsum("hqk,khd->qhd", probs, v[:, h0 : h0 + 8])
        start += q_len
    return out


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, rel_tol: float = 1e-2) -> None:
    """bf16 tolerance: whole-tensor relative error under rel_tol, and no single (token, head) row far off
    (a wrong row would hide in the whole-tensor norm of a large batch). NaN never passes."""
    assert not out.isnan().any(), "NaN in output (unwritten element or read past the context)"
    out = out.float()
    err = (out - ref).norm() / ref.norm()
    assert err < rel_tol, f"relative error {err:.2e} >= {rel_tol}"
    row_err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-3)
    worst = row_err.max()
    assert worst < 8 * rel_tol, f"worst (token, head) row relative error {worst:.2e}"


def fp8_round_trip(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an FP8 (e4m3) KV cache with this scale gives back for x, in float32."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale


def as_fp8_kv_batch(
    batch: PagedBatch, k_scale: float, v_scale: float
) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
    """(the batch over a float8 cache holding its cached K / k_scale and V / v_scale, the [2] float32
    scales, the float32 reference output: attention over K/V rounded through FP8)."""
    cache = batch.kv_cache.float()
    fp8_cache = (
        torch.stack([cache[0] / k_scale, cache[1] / v_scale]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    )
    rounded = PagedBatch(
        q=batch.q,
        k=fp8_round_trip(batch.k, k_scale).to(batch.k.dtype),
        v=fp8_round_trip(batch.v, v_scale).to(batch.v.dtype),
        kv_cache=torch.stack([fp8_cache[0].float() * k_scale, fp8_cache[1].float() * v_scale]),
        meta=batch.meta,
        scale=batch.scale,
    )
    fp8 = PagedBatch(batch.q, batch.k, batch.v, fp8_cache, batch.meta, batch.scale)
    scales = torch.tensor([k_scale, v_scale], dtype=torch.float32, device=batch.q.device)
    return fp8, scales, reference_attention(rounded)
