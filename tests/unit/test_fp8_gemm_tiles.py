"""The FP8 GEMM's tile table (engine/kernels/fp8_gemm.py) as plain data: every tile it picks for the 8B
model's linears keeps its tuned stages within Hopper's shared memory and is cut to fit Ada's (L4 / L40S,
which run FP8 too), never below two stages; group scales set BLOCK_K to the group; which GEMM Fp8Linear
takes per token count."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from engine.kernels.fp8_gemm import GemmTile, beats_scaled_mm, fit_shared_memory, tile_for  # noqa: E402

HOPPER = 232_448  # shared_memory_per_block_optin of an H100 / H200
ADA = 101_376  # of an L40S / L4
LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
TOKENS = [1, 16, 17, 32, 33, 64, 65, 128, 129, 256, 4096]


def buffers(tile: GemmTile) -> int:
    return tile.num_stages * (tile.block_m * tile.block_k + tile.block_k * tile.block_n)


@pytest.mark.parametrize("group", [None, 128])
def test_tiles_fit_hopper_as_tuned_and_ada_cut_down(group):
    cut = 0
    for n, k in LLAMA_8B:
        for m in TOKENS:
            tile = tile_for(m, n, k, group)
            assert tile.block_k == (group or tile.block_k)
            assert fit_shared_memory(tile, HOPPER) == tile  # the tuned table unchanged where it was tuned
            on_ada = fit_shared_memory(tile, ADA)
            assert on_ada.num_stages >= 2 and buffers(on_ada) <= ADA - 16 * 1024, (m, n, k, on_ada)
            assert on_ada.block_m == tile.block_m and on_ada.block_n == tile.block_n
            cut += on_ada != tile
    assert cut  # some tiles were too big for Ada: the check above is not vacuous


def test_two_stages_is_the_floor():
    huge = GemmTile(256, 256, 256, num_stages=4)
    assert fit_shared_memory(huge, ADA).num_stages == 2


def test_fp8_linear_leaves_large_batches_to_scaled_mm():
    assert beats_scaled_mm(64, 28672) and beats_scaled_mm(128, 4096)
    assert not beats_scaled_mm(128, 28672) and not beats_scaled_mm(129, 4096)
