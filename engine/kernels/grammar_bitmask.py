"""Grammar masking on the GPU: one kernel for the whole batch sets every token a row's grammar forbids
to -inf, in place.

The bitmask is compact: one int32 row of ceil(V / 32) words per *constrained* sequence (bit j of word
w allows token 32 * w + j), and `rows[g]` says which logits row bitmask row g belongs to. Rows without a
grammar are never read or written, and only the constrained rows' bits cross from the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # tokens per program (128 bitmask words)


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr,
    logits_stride,
    bitmask_ptr,
    bitmask_stride,
    rows_ptr,  # [G] int64: the logits row of each bitmask row
    vocab_size,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    row = tl.load(rows_ptr + g)
    words = tl.load(bitmask_ptr + g * bitmask_stride + tokens // 32, mask=in_vocab, other=-1)
    allowed = (words >> (tokens % 32)) & 1
    tl.store(logits_ptr + row * logits_stride + tokens, float("-inf"), mask=in_vocab & (allowed == 0))


def apply_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] (row-contiguous), bitmask [G, ceil(V/32)] int32, rows [G] int64; all on the device."""
    num_rows, vocab_size = bitmask.shape[0], logits.shape[1]
    if num_rows == 0:
        return
    grid = (num_rows, triton.cdiv(vocab_size, BLOCK))
    _apply_bitmask_kernel[grid](
        logits, logits.stride(0), bitmask, bitmask.stride(0), rows, vocab_size, BLOCK=BLOCK
    )
