"""The router's kernels on the GPU. The softmax and top-k kernel: Mixtral's 8 experts top 2, Qwen3-30B-A3B's 128
top 8, expert counts no power of two, one token to a prefill's 8192, renormalised or not, and the most uneven
logits (one expert certain, the rest tied at probability 0). The fused router (its matrix product too) against
the torch TopKRouter, in bfloat16 where the interpreter cannot run it (test_moe_router_on_cpu_interpreter.py)."""

from __future__ import annotations

import pytest
import torch
from check_moe_router import (
    check_router_topk,
    check_router_topk_special_rows,
    check_topk_softmax,
    check_topk_softmax_non_finite,
)
from gpu_paged_batch import requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.mark.parametrize("num_tokens", [1, 7, 256, 8192])
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (60, 4), (128, 8), (512, 10), (16, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_matches_torch(num_tokens, num_experts, top_k, renormalize):
    check_topk_softmax(num_tokens, num_experts, top_k, renormalize, torch.bfloat16, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_softmax_other_dtypes(dtype):
    check_topk_softmax(100, 128, 8, True, dtype, "cuda")


def test_topk_softmax_one_certain_expert():
    check_topk_softmax(33, 128, 8, True, torch.bfloat16, "cuda", skew_to=77)


@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (60, 4), (128, 8), (6, 6)])
def test_topk_softmax_non_finite_logits_name_distinct_experts_in_range(num_experts, top_k):
    check_topk_softmax_non_finite(num_experts, top_k, True, "cuda")


# one token to a prefill's 2048 (FusedTopKRouter: the fused kernel up to FUSED_ROUTER_MAX_TOKENS, then cuBLAS)
@pytest.mark.parametrize("num_tokens", [1, 2, 15, 16, 17, 64, 100, 128, 129, 256, 511, 512, 513, 2048])
@pytest.mark.parametrize("exact_sums", [True, False])
def test_fused_router_matches_the_torch_router(num_tokens, exact_sums):
    """The fused kernel and what LayerKit builds on CUDA against the torch TopKRouter, Qwen3-30B-A3B's router."""
    check_router_topk(num_tokens, 128, 2048, 8, True, torch.bfloat16, "cuda", exact_sums)


@pytest.mark.parametrize(
    "num_experts, hidden, top_k, renormalize, dtype, row_pad",
    [(8, 4096, 2, True, torch.bfloat16, 0), (60, 2048, 4, False, torch.bfloat16, 64), (256, 4096, 8, True, torch.bfloat16, 0),
     (128, 2048, 8, True, torch.float16, 0), (128, 2048, 8, False, torch.float32, 8)],
)  # fmt: skip
def test_fused_router_other_shapes(num_experts, hidden, top_k, renormalize, dtype, row_pad):
    """Mixtral's 8 experts top 2, 60 (a padded tile) of a view's rows, 256, float16 and float32 models."""
    for num_tokens in (3, 77):
        check_router_topk(num_tokens, num_experts, hidden, top_k, renormalize, dtype, "cuda", True, row_pad)


@pytest.mark.parametrize("num_experts, top_k, dtype", [(128, 8, torch.bfloat16), (8, 2, torch.float32)])
def test_fused_router_special_rows(num_experts, top_k, dtype):
    check_router_topk_special_rows(num_experts, top_k, dtype, "cuda")
