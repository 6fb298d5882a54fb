"""The router's softmax and top-k kernel on the GPU: Mixtral's 8 experts top 2, Qwen3-30B-A3B's 128 top 8,
expert counts no power of two, one token to a prefill's 8192, renormalised or not, and the most uneven
logits (one expert certain, the rest tied at probability 0)."""

from __future__ import annotations

import pytest
import torch
from check_moe_router import check_topk_softmax, check_topk_softmax_non_finite
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


def test_fused_router_module_matches_the_torch_router():
    """What LayerKit builds on CUDA (FusedTopKRouter) against the torch TopKRouter, same weight."""
    from engine.kernels.fused_moe_layer import FusedTopKRouter
    from engine.model.moe import MoeSpec, TopKRouter

    spec = MoeSpec(
        num_experts=128, top_k=8, intermediate_size=64, renormalize=True, sparse_layers=frozenset()
    )
    torch.manual_seed(0)
    plain = TopKRouter(256, spec).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(plain.weight, std=0.05)
    fused = FusedTopKRouter(256, spec).to("cuda", torch.bfloat16)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w_fused, ids_fused = fused(x)
    w_plain, ids_plain = plain(x)
    torch.testing.assert_close(w_fused, w_plain, rtol=1e-5, atol=1e-7)
    # The same (expert, weight) pairs per token. Their order may differ only among experts whose bfloat16
    # logits tie exactly (equal weights: 6 % of rows here on the H200), which the weighted sum ignores.
    ids_f, order_f = ids_fused.sort(dim=1)
    ids_p, order_p = ids_plain.sort(dim=1)
    assert torch.equal(ids_f, ids_p)
    torch.testing.assert_close(w_fused.gather(1, order_f), w_plain.gather(1, order_p), rtol=1e-5, atol=1e-7)
