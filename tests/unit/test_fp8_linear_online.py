"""--quantization fp8 quantizes each float checkpoint part of a dense linear as it is read (Fp8Linear's
weight is float8 from construction), with exactly the numerics of the path it replaced: copy the float
checkpoint into a model-dtype weight, then quantize this rank's whole weight per row once loaded. The old
path is rebuilt here from a plain float Linear (the same slices in the model's dtype) and quantize_rows; the
float8 bytes and the scales must be identical for every layout (packed q/k/v and gate/up, column-parallel
rows, row-parallel columns, ranks beyond the KV heads) and the dequantized CPU paths must still serve."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.model.fp8 import FP8, Fp8Linear, dequantize_rows, quantize_rows
from engine.model.linear import Linear, MixedPrecisionLinear
from engine.model.quantization import ONLINE_FP8
from engine.model.sharding import InMemoryTensor, Parallel, Part, Shard

HIDDEN = 64
QKV = (Part("q", 128, heads=4), Part("k", 64, heads=2), Part("v", 64, heads=2))
GATE_UP = (Part("gate", 96), Part("up", 96))
# name: (in, out, parallel, parts); a ROW layer's 192 inputs are split over the ranks
LAYOUTS = {
    "qkv": (HIDDEN, 256, Parallel.COLUMN, QKV),
    "gate_up": (HIDDEN, 192, Parallel.COLUMN, GATE_UP),
    "down": (192, HIDDEN, Parallel.ROW, ()),
    "whole": (HIDDEN, 80, Parallel.REPLICATED, ()),
}
SHARDS = [Shard(), Shard(0, 2), Shard(1, 2), Shard(3, 4)]  # rank 3 of 4 holds a replicated KV head


def checkpoint(name: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The float checkpoint tensors of a layout, rows of very different magnitudes (distinct scales)."""
    in_features, _, _, parts = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in parts or (Part("", LAYOUTS[name][1]),):
        w = torch.randn(p.rows, in_features, generator=g) * torch.logspace(-3, 1, p.rows)[:, None]
        out[p.name] = w.to(dtype)
    return out


def old_path(name: str, shard: Shard, tensors: dict[str, torch.Tensor], model_dtype: torch.dtype):
    """Before: a model-dtype weight filled from the checkpoint, then quantize_rows over all of it."""
    in_features, out_features, parallel, parts = LAYOUTS[name]
    with_float = Linear(in_features, out_features, False, parallel, parts, shard, model_dtype)
    for part, w in tensors.items():
        with_float.load_weight("weight", InMemoryTensor(w), part)
    return quantize_rows(with_float.weight.data)


def online(
    name: str, shard: Shard, out_dtype: torch.dtype, scheme=ONLINE_FP8, matmul_dtype=None
) -> Fp8Linear:
    in_features, out_features, parallel, parts = LAYOUTS[name]
    return Fp8Linear(
        in_features, out_features, False, parallel, parts, shard, scheme, out_dtype, matmul_dtype
    )


@pytest.mark.parametrize("shard", SHARDS, ids=lambda s: f"rank{s.rank}of{s.size}")
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("checkpoint_dtype", "model_dtype"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
     (torch.float32, torch.float32)],
    ids=["f32-into-bf16", "bf16", "f32-into-f16", "f32"],
)  # fmt: skip
def test_each_part_quantized_on_arrival_is_bit_identical_to_quantizing_after_loading(
    name, shard, checkpoint_dtype, model_dtype
):
    tensors = checkpoint(name, checkpoint_dtype)
    want_q, want_scale = old_path(name, shard, tensors, model_dtype)
    layer = online(name, shard, model_dtype)
    assert layer.weight.dtype == FP8  # before anything is read
    for part in reversed(list(tensors)):  # order does not matter: each part's rows are its own
        layer.load_weight("weight", InMemoryTensor(tensors[part]), part)
    assert torch.equal(layer.weight.data.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(layer.row_scales, want_scale)
    layer.finish_loading()  # the FP8 GEMM path (not dequantized): nothing left to quantize
    assert torch.equal(layer.weight.data.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(layer.row_scales, want_scale)


def test_a_row_parallel_ranks_scales_are_over_its_own_input_columns():
    """Rank r of 2 holds columns [96 r, 96 r + 96) of every row, and each row's scale is that slice's amax."""
    (w,) = checkpoint("down", torch.float32).values()
    w[:, :96] *= 100  # rank 0's columns dominate: rank 1's scales must not see them
    for rank in range(2):
        layer = online("down", Shard(rank, 2), torch.float32)
        layer.load_weight("weight", InMemoryTensor(w), "")
        cols = w[:, 96 * rank : 96 * rank + 96]
        torch.testing.assert_close(layer.row_scales[:, 0], cols.abs().amax(dim=1) / 448, rtol=0, atol=0)


def test_one_part_is_quantized_as_it_arrives_the_others_untouched():
    tensors = checkpoint("qkv", torch.float32)
    layer = online("qkv", Shard(1, 2), torch.bfloat16)
    layer.weight.data.view(torch.uint8).zero_()
    layer.row_scales.zero_()
    layer.load_weight("weight", InMemoryTensor(tensors["k"]), "k")
    s = layer.slices["k"]  # rank 1's k rows: the second head
    q, scale = quantize_rows(tensors["k"][s.start : s.start + s.rows].bfloat16())
    assert torch.equal(layer.weight.data[s.offset : s.offset + s.rows].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.row_scales[s.offset : s.offset + s.rows], scale)
    others = torch.ones(layer.out_features, dtype=torch.bool)
    others[s.offset : s.offset + s.rows] = False
    assert not layer.weight.data.view(torch.uint8)[others].any() and not layer.row_scales[others].any()


def test_a_checkpoint_part_of_the_wrong_shape_is_a_clear_error():
    layer = online("gate_up", Shard(), torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"checkpoint shape \(96, 32\) gives a slice of \(96, 32\), expected \(96, 64\)"
    ):
        layer.load_weight("weight", InMemoryTensor(torch.randn(96, 32)), "gate")
    with pytest.raises(ValueError, match="has 95 rows, expected 96"):
        layer.load_weight("weight", InMemoryTensor(torch.randn(95, 64)), "up")


@pytest.mark.parametrize("shard", [Shard(), Shard(1, 2)], ids=["one-rank", "rank1of2"])
def test_the_cpu_emulation_dequantizes_the_same_float8(shard):
    """On the CPU the scheme dequantizes at finish_loading: float8 * scale in the model's dtype."""
    tensors = checkpoint("gate_up", torch.float32)
    want_q, want_scale = old_path("gate_up", shard, tensors, torch.float32)
    layer = online("gate_up", shard, torch.float32, replace(ONLINE_FP8, dequantize=True))
    for part, w in tensors.items():
        layer.load_weight("weight", InMemoryTensor(w), part)
    layer.finish_loading()
    expected = dequantize_rows(want_q, want_scale, torch.float32)
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, expected)
    x = torch.randn(3, HIDDEN)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, expected))


def test_cpu_mixed_precision_dequantizes_to_bfloat16_and_serves():
    """CPU mixed precision: the float8 weight becomes bfloat16 (oneDNN-packed where it can) and the layer
    computes what a bfloat16 MixedPrecisionLinear holding the old path's dequantized weight computes."""
    tensors = checkpoint("down", torch.float32)
    want_q, want_scale = old_path("down", Shard(), tensors, torch.float32)
    scheme = replace(ONLINE_FP8, dequantize=True)
    layer = online("down", Shard(), torch.float32, scheme, matmul_dtype=torch.bfloat16)
    layer.load_weight("weight", InMemoryTensor(tensors[""]), "")
    layer.finish_loading()
    expected = dequantize_rows(want_q, want_scale, torch.bfloat16)
    ref = MixedPrecisionLinear(192, HIDDEN, False, Parallel.ROW, (), Shard(), torch.bfloat16)
    ref.weight.data.copy_(expected)
    ref.finish_loading()
    if layer.packed_weight is None:
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, expected)
    x = torch.randn(5, 192)
    assert torch.equal(layer(x), ref(x))
