"""One token per row from softmax(logits / T), in one read of the logits and one random number per row.

Inverse CDF over chunks: the first kernel reads each CHUNK of a row once (in the logits' own dtype) and
keeps the chunk's maximum of logit / T, its sum of exp(logit / T - that maximum), and its argmax. The
second kernel, one program per row, puts the chunks' masses on one scale, draws u (a hash of the row's
seed: a row's draw depends on its seed alone, never on its place in the batch, so seeded requests reproduce
in any batch), finds the chunk where the cumulative mass first passes u x total, and re-reads that one chunk
to find the token there. A row with T = 0 takes the plain argmax (lowest index among ties).

It replaced a Gumbel-max kernel whose V random numbers per row (Philox) bounded it at ~7x its read of the
logits: 175 us at 256 rows x 151,936 on an H100 (bench/diag/sampler_kernels.py compares them). The CPU path
(engine/sampling/sampler.py) draws by the same inverse CDF in float64 over the whole row; here float32 sums
within a chunk lose tokens below ~1e-7 of their chunk's mass, as 24-bit Gumbel draws would.
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
def _tempered(logits_row_ptr, first, t, vocab_size, CHUNK: tl.constexpr):
    """The chunk's logits / T as float32 (-inf past the vocabulary), and its raw logits."""
    idx = first + tl.arange(0, CHUNK)
    x = tl.load(logits_row_ptr + idx, mask=idx < vocab_size, other=float("-inf")).to(tl.float32)
    return x / tl.where(t > 0.0, t, 1.0), x


@triton.jit
def _chunk_stats_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,  # [B] float32; 0 = greedy
    chunk_max_ptr,  # [B, num_chunks] float32: max of logit / T (of logit when greedy)
    chunk_mass_ptr,  # [B, num_chunks] float32: sum of exp(logit / T - chunk max)
    chunk_argmax_ptr,  # [B, num_chunks] int64: the chunk's argmax, as a vocabulary index
    vocab_size,
    num_chunks,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(temperature_ptr + row)
    y, x = _tempered(logits_ptr + row.to(tl.int64) * stride_row, chunk * CHUNK, t, vocab_size, CHUNK)
    m = tl.max(y, axis=0)
    mass = tl.sum(tl.exp(y - tl.where(m > float("-inf"), m, 0.0)), axis=0)
    offset = row.to(tl.int64) * num_chunks + chunk
    tl.store(chunk_max_ptr + offset, m)
    tl.store(chunk_mass_ptr + offset, mass)
    tl.store(chunk_argmax_ptr + offset, (chunk * CHUNK + tl.argmax(x, axis=0)).to(tl.int64))


@triton.jit
def _pick_token_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,
    seed_ptr,  # [B] int64
    chunk_max_ptr,
    chunk_mass_ptr,
    chunk_argmax_ptr,
    out_ptr,  # [B] int64
    vocab_size,
    num_chunks,
    CHUNK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.load(temperature_ptr + row)
    c = tl.arange(0, CHUNKS_PAD)
    stats = row.to(tl.int64) * num_chunks + c
    valid = c < num_chunks
    m = tl.load(chunk_max_ptr + stats, mask=valid, other=float("-inf"))
    top = tl.max(m, axis=0)
    if t > 0.0:
        # Every chunk's mass on the scale of the row's maximum; empty chunks weigh 0
        scale = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        mass = tl.load(chunk_mass_ptr + stats, mask=valid, other=0.0) * scale
        cumulative = tl.cumsum(mass, axis=0)
        total = tl.sum(mass, axis=0)
        seed = tl.load(seed_ptr + row)
        key = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _mix32((seed >> 32).to(tl.uint32) + 0x9E3779B9))
        u = (_mix32(key + 0x632BE5AB) >> 8).to(tl.float32) * (1.0 / 16777216.0)  # [0, 1), 24 bits
        target = u * total
        # The first chunk with mass whose cumulative mass passes the target (not a count of sums <= target: a
        # GPU scan groups its additions by thread, so its prefix sums can dip by an ulp where nothing is
        # added); rounding can carry the target to the total, so at most the last chunk with mass
        last = tl.max(tl.where(mass > 0.0, c, 0), axis=0)
        chosen = tl.minimum(
            tl.min(tl.where((cumulative > target) & (mass > 0.0), c, CHUNKS_PAD), axis=0), last
        )
        before = tl.sum(tl.where(c < chosen, mass, 0.0), axis=0)
        chosen_max = tl.sum(tl.where(c == chosen, m, 0.0), axis=0)
        chosen_scale = tl.sum(tl.where(c == chosen, scale, 0.0), axis=0)
        # The rest of the target, on the chosen chunk's own scale (where its exps are <= 1)
        rest = tl.maximum(target - before, 0.0) / chosen_scale
        y, x = _tempered(logits_ptr + row.to(tl.int64) * stride_row, chosen * CHUNK, t, vocab_size, CHUNK)
        p = tl.exp(y - chosen_max)
        i = tl.arange(0, CHUNK)
        # Likewise the first token with mass whose cumulative mass passes `rest`; past the chunk's sum by
        # rounding, its last token with mass
        last_token = tl.max(tl.where(p > 0.0, i, 0), axis=0)
        passed = (tl.cumsum(p, axis=0) > rest) & (p > 0.0)
        token = tl.minimum(tl.min(tl.where(passed, i, CHUNK), axis=0), last_token)
        tl.store(out_ptr + row, (chosen * CHUNK + token).to(tl.int64))
    else:  # greedy: the chunk holding the row's maximum (the first such), and its argmax
        first = tl.min(tl.where(m == top, c, CHUNKS_PAD), axis=0)
        tl.store(out_ptr + row, tl.load(chunk_argmax_ptr + row.to(tl.int64) * num_chunks + first))


def categorical_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [B, V] (any float dtype): argmax where temperature is 0, a draw from
    softmax(logits / temperature) elsewhere. temperatures [B] float32, seeds [B] int64, on the logits'
    device. Returns int64 [B]."""
    assert logits.stride(1) == 1
    batch, vocab_size = logits.shape
    num_chunks = triton.cdiv(vocab_size, CHUNK)
    chunk_max = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    chunk_mass = torch.empty_like(chunk_max)
    chunk_argmax = torch.empty(batch, num_chunks, dtype=torch.int64, device=logits.device)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    _chunk_stats_kernel[(batch, num_chunks)](
        logits, logits.stride(0), temperatures, chunk_max, chunk_mass, chunk_argmax, vocab_size, num_chunks,
        CHUNK=CHUNK, num_warps=8,
    )  # fmt: skip
    _pick_token_kernel[(batch,)](
        logits, logits.stride(0), temperatures, seeds, chunk_max, chunk_mass, chunk_argmax, out, vocab_size,
        num_chunks, CHUNK=CHUNK, CHUNKS_PAD=max(16, triton.next_power_of_2(num_chunks)), num_warps=8,
    )  # fmt: skip
    return out
