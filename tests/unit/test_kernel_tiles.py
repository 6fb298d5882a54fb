"""Tile tables as plain data (engine/kernels/shared_memory.py): every tile the FP8 GEMM picks for the 8B
model's linears, and the fused MoE kernel's, keeps its tuned stages within Hopper's shared memory and is cut
to fit Ada's (L4 / L40S), never below two stages; group scales set BLOCK_K to the group; which GEMM
Fp8Linear takes per token count."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from engine.kernels.fp8_gemm import GemmTile, beats_scaled_mm, fit_shared_memory, tile_for  # noqa: E402
from engine.kernels.shared_memory import EPILOGUE_RESERVE, stages_that_fit  # noqa: E402

HOPPER = 232_448  # shared_memory_per_block_optin of an H100 / H200
ADA = 101_376  # of an L40S / L4
LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
QWEN3_30B_A3B_ATTENTION = [(5120, 2048), (2048, 4096)]  # block-scaled qkv and o_proj (W5)
TOKENS = [1, 16, 17, 32, 33, 64, 65, 96, 127, 128, 129, 256, 4096]


def buffers(tile: GemmTile) -> int:
    return tile.num_stages * (tile.block_m * tile.block_k + tile.block_k * tile.block_n)


@pytest.mark.parametrize("group", [None, 128])
def test_tiles_fit_hopper_as_tuned_and_ada_cut_down(group):
    cut = 0
    for n, k in LLAMA_8B + QWEN3_30B_A3B_ATTENTION:
        for m in TOKENS:
            tile = tile_for(m, n, k, group)
            assert tile.block_k == (group or tile.block_k)
            assert fit_shared_memory(tile, HOPPER) == tile  # the tuned table unchanged where it was tuned
            on_ada = fit_shared_memory(tile, ADA)
            assert on_ada.num_stages >= 2 and buffers(on_ada) <= ADA - EPILOGUE_RESERVE, (m, n, k, on_ada)
            assert on_ada.block_m == tile.block_m and on_ada.block_n == tile.block_n
            cut += on_ada != tile
    assert cut  # some tiles were too big for Ada: the check above is not vacuous


def test_two_stages_is_the_floor():
    huge = GemmTile(256, 256, 256, num_stages=4)
    assert fit_shared_memory(huge, ADA).num_stages == 2


def test_fp8_linear_leaves_large_batches_to_scaled_mm():
    assert beats_scaled_mm(64, 28672) and beats_scaled_mm(128, 4096)
    assert not beats_scaled_mm(128, 28672) and not beats_scaled_mm(129, 4096)


def test_fused_moe_configs_fit_ada_in_bfloat16():
    """The fused MoE kernel's tiles (gate and up weight tiles both staged) at every size choose_block_config
    gives: as tuned on Hopper, cut on Ada (the decode tile needs 144 KB at 4 stages)."""
    from engine.kernels.fused_moe import choose_block_config

    for slots in (8, 512, 4096, 65536):
        cfg = choose_block_config(slots, 128)
        per_stage = 2 * (cfg.block_m * cfg.block_k + 2 * cfg.block_k * cfg.block_n)
        assert stages_that_fit(cfg.num_stages, per_stage, HOPPER) == cfg.num_stages
        on_ada = stages_that_fit(cfg.num_stages, per_stage, ADA)
        assert 2 <= on_ada and on_ada * per_stage <= ADA - EPILOGUE_RESERVE, (slots, cfg, on_ada)


@pytest.mark.parametrize("group", [None, 128])
def test_fused_moe_fp8_configs_count_a_byte_an_element(group):
    """The FP8 configurations (float8 tiles, a byte an element) at every size: their stages as chosen fit
    Hopper, are cut to fit Ada, and with block scales each K step is one scale group. Counted at two bytes
    (as bfloat16) the decode tile would lose a stage on Hopper: the byte count is what lets it keep four."""
    from engine.kernels.fused_moe import choose_fp8_block_config, fit_shared_memory

    for slots in (8, 512, 4096, 65536):
        cfg = choose_fp8_block_config(slots, 128, group)
        assert cfg.block_k == (group or cfg.block_k)
        for gated in (True, False):
            assert fit_shared_memory(cfg, 1, gated, HOPPER) == cfg
            on_ada = fit_shared_memory(cfg, 1, gated, ADA)
            per_stage = cfg.block_m * cfg.block_k + (2 if gated else 1) * cfg.block_k * cfg.block_n
            assert 2 <= on_ada.num_stages and on_ada.num_stages * per_stage <= ADA - EPILOGUE_RESERVE
            assert on_ada.block_m == cfg.block_m and on_ada.block_k == cfg.block_k
    decode = choose_fp8_block_config(8, 128, None)
    assert fit_shared_memory(decode, 2, True, HOPPER).num_stages < decode.num_stages
