"""A mixture-of-experts router's softmax and top-k in one kernel, and with its matrix product in one kernel.

engine.model.moe.TopKRouter in torch is a matrix product, softmax, topk, and for renormalising models a sum
and a division: five or six launches per MoE layer. ``topk_softmax`` does all but the product in one Triton
kernel, on logits in memory. ``fused_router_topk`` does the product too: each program takes a block of 16
tokens, accumulates their logits x @ W^T over the hidden dimension in float32, rounds them to the model's
dtype (as F.linear's output is, which the torch router's softmax reads), then picks as ``topk_softmax``
does. ``router_topk`` (what the fused MoE layer calls) takes it up to FUSED_ROUTER_MAX_TOKENS tokens, which
is 0 for now (measured slower, see there), and cuBLAS's product and ``topk_softmax`` past it.

The top-k part, shared: the softmax in float32, the top_k largest picked one after another (ties to the
lower expert id), renormalised if asked. Same arithmetic as the torch router (float32 softmax of the
logits as they are, the weights divided by their sum); the exponential may differ from torch's in the last
bit, so two experts whose probabilities are that close can come out in the other order, and the fused
product sums in another order than cuBLAS, so a logit may now and then round to the neighbouring value.
A row with a NaN or infinite logit is NaN, as torch's is; its ids are still top_k distinct experts (the
lowest), never one past the last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels.decode_attention import dot_precision

# Off: each program of the fused kernel reads the whole router weight (512 KB for Qwen3-30B-A3B's 128 x 2048
# in bfloat16) for its 16 tokens, one SM alone (~50 GB/s here). On an H100 (2026-12-06, that
# router, 1 to 1024 tokens) the fused kernel took 12.1-12.5 us replayed in a CUDA graph, cuBLAS's product and
# topk_softmax 9.0-10.0 (L2 flushed first: 15.1-16.1 against 13.3-15.6); its time does not grow with the
# tokens, theirs hardly does. It pays once the weight's read is spread over SMs (the product split over H,
# the last program of a token block summing the partial logits in order and picking the top-k).
FUSED_ROUTER_MAX_TOKENS = 0
# a program holds [BLOCK_T, padded E] float32 logits: 256 experts (DeepSeek's count) is the most it takes
FUSED_ROUTER_MAX_EXPERTS = 256


@triton.jit
def _softmax_top_k(
    logits, rows, num_tokens, num_experts, weights_ptr, ids_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):  # fmt: skip
    """logits [BLOCK_T, BLOCK_E] float32 of tokens `rows` (-inf past num_experts) -> their softmax's top_k
    weights and expert ids, stored in rows of weights_ptr and ids_ptr [num_tokens, TOP_K]."""
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    x = tl.where(row_ok[:, None], logits, 0.0)  # rows past the end: finite, never stored
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = p / tl.sum(p, axis=1)[:, None]  # padded experts: exactly 0

    # Picked by a key with no NaN in it: a NaN or infinite logit makes the whole row NaN (as torch's softmax
    # does), and NaN equals nothing, so picking by the probabilities would name expert BLOCK_E, past the
    # weights the MoE kernel indexes with the ids. NaN ranks above every number (as in torch.topk); padded
    # and already picked experts rank below every probability: top_k distinct experts < num_experts.
    key = tl.where(probs >= 0.0, probs, 2.0)  # false only for NaN (no x != x for a compiler to fold)
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
    out = rows.to(tl.int64)[:, None] * TOP_K + picks[None, :]
    out_mask = row_ok[:, None] & (picks[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_weights, mask=out_mask)
    tl.store(ids_ptr + out, top_ids.to(ids_ptr.dtype.element_ty), mask=out_mask)


# The token count changes every step: not specialised on (new variants would compile mid-run).
@triton.jit(do_not_specialize=["num_tokens"])
def _topk_softmax_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_logits,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    mask = (rows < num_tokens)[:, None] & (experts[None, :] < num_experts)
    logits = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + experts[None, :],
        mask=mask,
        other=float("-inf"),
    ).to(tl.float32)
    _softmax_top_k(
        logits, rows, num_tokens, num_experts, weights_ptr, ids_ptr,
        TOP_K, K_PAD, BLOCK_E, BLOCK_T, RENORMALIZE,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens"])
def _router_topk_kernel(
    x_ptr, w_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, hidden, stride_x, stride_w,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, RENORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    expert_ok = experts < num_experts
    cols = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
    w_ptrs = w_ptr + experts.to(tl.int64)[:, None] * stride_w + cols[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for start in range(0, hidden, BLOCK_H):
        col_ok = (start + cols < hidden)[None, :]
        x = tl.load(x_ptrs, mask=row_ok[:, None] & col_ok, other=0.0)
        w = tl.load(w_ptrs, mask=expert_ok[:, None] & col_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    # rounded as F.linear's output is: the torch router's softmax reads the logits in the model's dtype
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    _softmax_top_k(
        logits, rows, num_tokens, num_experts, weights_ptr, ids_ptr,
        TOP_K, K_PAD, BLOCK_E, BLOCK_T, RENORMALIZE,
    )  # fmt: skip


def _empty_outputs(num_tokens: int, top_k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    return weights, torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype, last dim contiguous) -> (weights [T, top_k] float32, expert ids
    [T, top_k] int64), as ``logits.softmax(-1, dtype=float32).topk(top_k)`` (renormalised to sum to one
    when asked)."""
    num_tokens, num_experts = logits.shape
    assert 0 < top_k <= num_experts and logits.stride(1) == 1, (logits.shape, top_k)
    weights, ids = _empty_outputs(num_tokens, top_k, logits.device)
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


def router_topk(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] and the router's weight [E, H] -> (weights [T, top_k] float32, expert ids [T, top_k] int64), as
    ``topk_softmax(F.linear(x, weight), top_k, renormalize)``: in one kernel where that pays."""
    if x.shape[0] <= FUSED_ROUTER_MAX_TOKENS and weight.shape[0] <= FUSED_ROUTER_MAX_EXPERTS:
        return fused_router_topk(x, weight, top_k, renormalize)
    return topk_softmax(F.linear(x, weight), top_k, renormalize)


def fused_router_topk(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_topk`` in one kernel, any token count: x [T, H] and weight [E, H] in the model's dtype (last dims
    contiguous), E <= FUSED_ROUTER_MAX_EXPERTS."""
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    assert weight.shape[1] == hidden and x.dtype == weight.dtype, (x.shape, weight.shape, x.dtype)
    assert 0 < top_k <= num_experts <= FUSED_ROUTER_MAX_EXPERTS, (top_k, num_experts)
    assert x.stride(1) == weight.stride(1) == 1, (x.stride(), weight.stride())
    weights, ids = _empty_outputs(num_tokens, top_k, x.device)
    if num_tokens == 0:
        return weights, ids
    block_e = max(16, triton.next_power_of_2(num_experts))  # tl.dot takes no dimension under 16
    # The fastest of 16-64 tokens, 64-256 columns, 4 or 8 warps, 3 or 4 stages on an H100 (E = 128, H = 2048,
    # bfloat16, 1-1024 tokens): 16 tokens (more programs, and each one's time is reading the weight), weight
    # tiles of 64 KB in bfloat16, 4 warps, 3 stages (216 KB of shared memory: a Hopper's)
    block_h = max(16, min(256, 65536 // (block_e * x.element_size())))
    _router_topk_kernel[(triton.cdiv(num_tokens, 16),)](
        x, weight, weights, ids, num_tokens, num_experts, hidden, x.stride(0), weight.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_E=block_e, BLOCK_T=16, BLOCK_H=block_h,
        RENORMALIZE=renormalize, DOT_PRECISION=dot_precision(x.dtype), num_warps=4, num_stages=3,
    )  # fmt: skip
    return weights, ids
