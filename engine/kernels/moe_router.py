"""A mixture-of-experts router's softmax and top-k in one kernel (after the router's matrix product).

engine.model.moe.TopKRouter in torch is softmax, topk, and for renormalising models a sum and a division:
four or five launches per MoE layer, about 200 in a 48-layer decode step of Qwen3-30B-A3B, where the step's
weight reads take a few milliseconds. Here each program takes a block of tokens' expert logits, does the
softmax in float32 and picks the top_k largest one after another (ties to the lower expert id), then
renormalises if asked. Same arithmetic as the torch router (float32 softmax of the logits as they are, the
weights divided by their sum); the exponential may differ from torch's in the last bit, so two experts
whose probabilities are that close can come out in the other order. A row with a NaN or infinite logit
is NaN, as torch's is; its ids are still top_k distinct experts (the lowest), never one past the last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def route_tokens(
    logits_ptr, rows, num_tokens, num_experts, stride_logits,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):  # fmt: skip
    """rows [BLOCK_T] (token ids; past num_tokens ignored) -> (weights [BLOCK_T, K_PAD] float32, expert ids
    [BLOCK_T, K_PAD] int32), picks past TOP_K zero. Shared with engine.kernels.moe_align, whose decode
    alignment routes its own chunk's tokens (one launch fewer a MoE layer): the same experts whatever the
    tile; the weights' float32 sums (the softmax's, the renormalisation's) follow the tile's layout, so two
    tiles' weights may differ in the last bit."""
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    mask = row_ok[:, None] & (experts[None, :] < num_experts)
    x = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + experts[None, :],
        mask=mask,
        other=float("-inf"),
    ).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past the end: finite, never stored
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = p / tl.sum(p, axis=1)[:, None]  # padded experts: exactly 0

    # Picked by the exponentials, not the probabilities: the same order (a division by one positive sum),
    # but free of the sum, whose float32 rounding depends on the tile's layout (this kernel's and the MoE
    # alignment's differ), so the experts chosen never depend on which kernel routed. The key has no NaN in
    # it: a NaN or infinite logit makes the row's weights NaN (as torch's softmax does), and NaN equals
    # nothing, so picking by NaN would name expert BLOCK_E, past the weights the MoE kernel indexes with the
    # ids. NaN ranks above every number (as in torch.topk); padded and already picked experts rank below
    # every exponential: top_k distinct experts < num_experts.
    key = tl.where(p >= 0.0, p, 2.0)  # false only for NaN (no x != x for a compiler to fold)
    key = tl.where(experts[None, :] < num_experts, key, -1.0)
    picks = tl.arange(0, K_PAD)
    top_weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best_key = tl.max(key, axis=1)
        best_id = tl.min(tl.where(key == best_key[:, None], experts[None, :], BLOCK_E), axis=1)
        chosen = experts[None, :] == best_id[:, None]
        best = tl.sum(tl.where(chosen, probs, 0.0), axis=1)  # the chosen expert's probability (or NaN)
        top_weights = tl.where(picks[None, :] == j, best[:, None], top_weights)
        top_ids = tl.where(picks[None, :] == j, best_id[:, None], top_ids)
        key = tl.where(chosen, -1.0, key)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]
    return top_weights, top_ids


# The token count changes every step: not specialised on (new variants would compile mid-run).
@triton.jit(do_not_specialize=["num_tokens"])
def _topk_softmax_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_logits,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    top_weights, top_ids = route_tokens(
        logits_ptr, rows, num_tokens, num_experts, stride_logits, TOP_K, K_PAD, BLOCK_E, BLOCK_T, RENORMALIZE
    )
    picks = tl.arange(0, K_PAD)
    out = rows.to(tl.int64)[:, None] * TOP_K + picks[None, :]
    out_mask = (rows < num_tokens)[:, None] & (picks[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_weights, mask=out_mask)
    tl.store(ids_ptr + out, top_ids.to(ids_ptr.dtype.element_ty), mask=out_mask)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype, last dim contiguous) -> (weights [T, top_k] float32, expert ids
    [T, top_k] int64), as ``logits.softmax(-1, dtype=float32).topk(top_k)`` (renormalised to sum to one
    when asked)."""
    num_tokens, num_experts = logits.shape
    assert 0 < top_k <= num_experts and logits.stride(1) == 1, (logits.shape, top_k)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))  # a [BLOCK_T, BLOCK_E] tile of float32 per program
    _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, weights, ids, num_tokens, num_experts, logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_E=block_e, BLOCK_T=block_t,
        RENORMALIZE=renormalize, num_warps=4,
    )  # fmt: skip
    return weights, ids
