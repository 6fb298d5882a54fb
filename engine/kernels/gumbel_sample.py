"""Sampling from softmax(logits / T) in one read of the logits: the Gumbel-max trick.

argmax_i(logit_i / T + g_i), with g_i = -log(-log(u_i)) and u_i uniform, picks token i with
probability softmax(logits / T)_i. A row with T = 0 takes the plain argmax. Done in torch this is
several passes over a [B, V] float32 tensor (convert, divide, softmax, draw, divide, argmax); here
each program reads one CHUNK of a row once, in the logits' own dtype, and keeps its best candidate;
a second tiny step picks each row's best chunk. Splitting rows into chunks keeps the GPU busy when
the batch is small.

The uniforms come from Philox keyed by the row's seed and the token index, so a row's draw depends
only on its seed, never on its position in the batch (seeded requests reproduce in any batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def _gumbel_part(logits_row_ptr, first, u, t, vocab_size, QUARTER: tl.constexpr):
    """Best (value, index) of QUARTER consecutive tokens starting at `first`, given their uniforms."""
    idx = first + tl.arange(0, QUARTER)
    mask = idx < vocab_size
    x = tl.load(logits_row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
    gumbel = -tl.log(-tl.log(u))  # u == 0 gives -inf: that token is simply not picked this time
    z = tl.where(t > 0.0, x / tl.where(t > 0.0, t, 1.0) + gumbel, x)
    z = tl.where(mask, z, float("-inf"))
    return tl.max(z, axis=0), first + tl.argmax(z, axis=0)


@triton.jit
def _gumbel_max_chunk_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,  # [B] float32; 0 = greedy
    seed_ptr,  # [B] int64
    best_val_ptr,  # [B, num_chunks] float32
    best_idx_ptr,  # [B, num_chunks] int64
    vocab_size,
    num_chunks,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    QUARTER: tl.constexpr = CHUNK // 4
    t = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    # Philox makes four uniforms per call: one call per four tokens (it, not memory, bounds this kernel).
    u0, u1, u2, u3 = tl.rand4x(seed, chunk * QUARTER + tl.arange(0, QUARTER))
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    base = chunk * CHUNK
    v0, i0 = _gumbel_part(row_ptr, base, u0, t, vocab_size, QUARTER)
    v1, i1 = _gumbel_part(row_ptr, base + QUARTER, u1, t, vocab_size, QUARTER)
    v2, i2 = _gumbel_part(row_ptr, base + 2 * QUARTER, u2, t, vocab_size, QUARTER)
    v3, i3 = _gumbel_part(row_ptr, base + 3 * QUARTER, u3, t, vocab_size, QUARTER)
    # Ties keep the lower index, as argmax does.
    i01 = tl.where(v1 > v0, i1, i0)
    v01 = tl.maximum(v0, v1)
    i23 = tl.where(v3 > v2, i3, i2)
    v23 = tl.maximum(v2, v3)
    offset = row.to(tl.int64) * num_chunks + chunk
    tl.store(best_val_ptr + offset, tl.maximum(v01, v23))
    tl.store(best_idx_ptr + offset, tl.where(v23 > v01, i23, i01).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [B, V] (any float dtype): argmax where temperature is 0, a draw
    from softmax(logits / temperature) elsewhere. temperatures [B] float32, seeds [B] int64, on the
    logits' device. Returns int64 [B]."""
    assert logits.stride(1) == 1
    batch, vocab_size = logits.shape
    num_chunks = triton.cdiv(vocab_size, CHUNK)
    best_val = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(batch, num_chunks, dtype=torch.int64, device=logits.device)
    _gumbel_max_chunk_kernel[(batch, num_chunks)](
        logits, logits.stride(0), temperatures, seeds, best_val, best_idx, vocab_size, num_chunks,
        CHUNK=CHUNK, num_warps=8,
    )  # fmt: skip
    if num_chunks == 1:
        return best_idx[:, 0]
    return best_idx.gather(1, best_val.argmax(dim=1, keepdim=True))[:, 0]
