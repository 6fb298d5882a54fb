"""What fused_experts checks on the host before an FP8 launch (shapes and dtypes only: nothing is read back
from the device, so the checks cost a decode step's CUDA graph nothing): both scales or none, float8 weights
with scales, one float32 scale per (expert, weight row, group) with the group count of group_k, a K step
equal to the group with block scales; and the block configuration FP8 takes by the slots per expert."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.fused_moe import (  # noqa: E402
    MoeBlockConfig,
    check_fp8_operands,
    choose_block_config,
    choose_fp8_block_config,
    fused_experts,
)

FP8 = torch.float8_e4m3fn
E, H, INTER, T, TOP_K = 4, 200, 136, 3, 2  # hidden and intermediate no multiple of 128: 2 groups each


def operands(group: int | None, dtype: torch.dtype = FP8) -> dict:
    g13, g2 = (1, 1) if group is None else (2, 2)
    return {
        "x": torch.randn(T, H),
        "w13": torch.zeros(E, 2 * INTER, H, dtype=dtype),
        "w2": torch.zeros(E, H, INTER, dtype=dtype),
        "topk_weights": torch.full((T, TOP_K), 0.5),
        "topk_ids": torch.tensor([[0, 1], [2, 3], [1, 0]]),
        "w13_scale": torch.ones(E, 2 * INTER, g13),
        "w2_scale": torch.ones(E, H, g2),
        "group_k": group,
    }


@pytest.mark.parametrize("group", [None, 128])
def test_matching_fp8_operands_are_fp8(group):
    args = operands(group)
    assert check_fp8_operands(args["w13"], args["w2"], args["w13_scale"], args["w2_scale"], group)
    assert not check_fp8_operands(args["w13"].float(), args["w2"].float(), None, None, None)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"w2_scale": None}, "both w13_scale and w2_scale"),
        ({"w13_scale": None}, "both w13_scale and w2_scale"),
        ({"w13_scale": None, "w2_scale": None}, "group_k=128 without FP8 weight scales"),
        ({"w13": torch.zeros(E, 2 * INTER, H, dtype=torch.bfloat16)}, "FP8 scales given for torch.bfloat16"),
        (
            {"w13_scale": torch.ones(E, 2 * INTER, 1)},
            r"w13_scale: float32 \[4, 272, 2\]",
        ),  # per channel, blocks said
        ({"w2_scale": torch.ones(E, H, 1)}, r"w2_scale: float32 \[4, 200, 2\]"),
        ({"w2_scale": torch.ones(E, INTER, 2)}, r"w2_scale: float32 \[4, 200, 2\]"),  # [E, I, G]: transposed
        ({"w13_scale": torch.ones(E, 2 * INTER, 2, dtype=torch.bfloat16)}, "got torch.bfloat16"),
        ({"w13_scale": torch.ones(E, 2, 2 * INTER).transpose(1, 2)}, "contiguous groups"),
        ({"group_k": 96}, "groups of 96 columns"),
    ],
)
def test_mismatched_fp8_operands_are_refused_before_any_launch(change, message):
    args = {**operands(128), **change}
    with pytest.raises(ValueError, match=message):
        fused_experts(**args)


def test_per_channel_scales_are_one_per_weight_row():
    args = {**operands(None), "w13_scale": torch.ones(E, 2 * INTER, 2)}
    with pytest.raises(ValueError, match=r"w13_scale: float32 \[4, 272, 1\]"):
        fused_experts(**args)


def test_block_scales_refuse_a_config_whose_k_step_is_not_the_group():
    config = MoeBlockConfig(block_m=16, block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=3)
    with pytest.raises(ValueError, match=r"block_k = group_k \(128\), not 64"):
        fused_experts(**operands(128), config=config)


@pytest.mark.parametrize("slots", [1, 8, 16 * 128, 16 * 128 + 8, 96 * 128, 96 * 128 + 8, 65536])
@pytest.mark.parametrize("group", [None, 128])
def test_fp8_configs_align_slots_as_bfloat16_does(slots, group):
    """The same BLOCK_M as the bfloat16 choice at every size (decode, middle, prefill), so the slot
    alignment is the same; block scales step K by the group."""
    fp8, bf16 = choose_fp8_block_config(slots, 128, group), choose_block_config(slots, 128)
    assert fp8.block_m == bf16.block_m
    if group is not None:
        assert fp8.block_k == group
