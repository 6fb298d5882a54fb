"""Block-scaled FP8 layers keep one scale per (row, 128 columns); cuBLAS's block-scaled kernel takes one per
128 x 128 block. weight_blocks recovers the blocks where every row of a block holds the same scales, and
refuses (None: the Triton GEMM serves) where a slice or per-row scales break that."""

from __future__ import annotations

import torch

from engine.model.fp8 import weight_blocks


def test_block_scales_repeated_per_row_come_back_as_blocks() -> None:
    blocks = torch.rand(3, 5) + 0.1
    rows = blocks.repeat_interleave(128, dim=0)
    assert torch.equal(weight_blocks(rows, 128), blocks)


def test_rows_of_one_block_with_different_scales_are_refused() -> None:
    rows = (torch.rand(2, 4) + 0.1).repeat_interleave(128, dim=0)
    rows[130, 1] *= 2
    assert weight_blocks(rows, 128) is None


def test_a_row_count_that_splits_a_block_is_refused() -> None:
    rows = (torch.rand(3, 4) + 0.1).repeat_interleave(128, dim=0)[:320]
    assert weight_blocks(rows, 128) is None
