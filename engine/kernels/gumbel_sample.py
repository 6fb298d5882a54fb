"""Sampling from softmax(logits / T) in one read of the logits: the Gumbel-max trick.

argmax_i(logit_i / T + g_i), with g_i = -log(-log(u_i)) and u_i uniform, picks token i with
probability softmax(logits / T)_i. A row with T = 0 takes the plain argmax. Done in torch this is
several passes over a [B, V] float32 tensor (convert, divide, softmax, draw, divide, argmax); here
each program reads one CHUNK of a row once, in the logits' own dtype, and keeps its best candidate;
a second tiny step picks each row's best chunk. Splitting rows into chunks keeps the GPU busy when
the batch is small.

The uniforms come from an integer hash of the row's seed and the token index (two rounds of a
two-multiply avalanche mix), so a row's draw depends only on its seed, never on its position in the
batch (seeded requests reproduce in any batch). It replaced Philox (tl.rand4x), which bounded this
kernel at ~7x its read of the logits (175 us at 256 rows x 151,936 on an H100; bench/diag/gumbel_rng.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def _mix32(x):
    """lowbias32 (C. Wellons' hash prospector): a bijection of uint32 with near-ideal avalanche."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


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
    t = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    # The row's key: both halves of its seed mixed (consecutive seeds give unrelated keys)
    key = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _mix32((seed >> 32).to(tl.uint32) + 0x9E3779B9))
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = idx < vocab_size
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + idx, mask=mask, other=float("-inf")).to(
        tl.float32
    )
    # 24 random bits per token, centred in their bin: u in (0, 1), never 0 or 1
    bits = _mix32(_mix32(idx.to(tl.uint32) ^ key) + key)
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    gumbel = -tl.log(-tl.log(u))
    z = tl.where(t > 0.0, x / tl.where(t > 0.0, t, 1.0) + gumbel, x)
    z = tl.where(mask, z, float("-inf"))
    # Ties keep the lower index, as argmax does.
    offset = row.to(tl.int64) * num_chunks + chunk
    tl.store(best_val_ptr + offset, tl.max(z, axis=0))
    tl.store(best_idx_ptr + offset, (chunk * CHUNK + tl.argmax(z, axis=0)).to(tl.int64))


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
