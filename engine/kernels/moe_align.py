"""Token slots sorted by expert and padded to whole GEMM blocks, for the fused MoE kernel.

Each token routed to top_k experts occupies top_k *slots* (slot = token * top_k + j). The grouped GEMM
runs blocks of BLOCK_M slots that all belong to one expert, so the slots are sorted by expert and each
expert's run is padded up to a multiple of BLOCK_M with a sentinel slot (``num_slots``), which the
kernel masks out.

Built from torch ops whose output shapes depend only on the number of tokens (never on the routing),
and without a device-to-host copy, so a decode step that uses it can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertAlignment:
    sorted_slots: torch.Tensor  # [max_padded] int32: slot ids grouped by expert; num_slots = padding
    block_expert: torch.Tensor  # [max_padded // block_m] int32: the expert of each block of block_m
    num_padded: torch.Tensor  # [1] int32: how many entries of sorted_slots are in use (blocks after: none)
    num_slots: int  # tokens * top_k
    block_m: int


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """At most min(experts, slots) experts receive slots, each padding fewer than block_m; rounded up to
    whole blocks."""
    worst = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return -(-worst // block_m) * block_m


def align_slots_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """topk_ids [T, top_k] (any integer dtype) -> the slots grouped by expert, each group padded to
    whole blocks of block_m; slots of one expert keep their order (token order)."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_slots = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # slots sorted by expert, token order within one expert
    expert_of_sorted = flat[order]
    rank_in_expert = torch.arange(num_slots, device=device) - (counts.cumsum(0) - counts)[expert_of_sorted]
    destination = (padded_end - padded)[expert_of_sorted] + rank_in_expert

    max_padded = max_padded_slots(num_slots, num_experts, block_m)
    sorted_slots = torch.full((max_padded,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[destination] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    # the expert whose padded run holds each block's first entry; blocks past the last run get no work
    # (the kernel stops at num_padded), clamped so they still name a real expert
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return ExpertAlignment(
        sorted_slots=sorted_slots,
        block_expert=block_expert.to(torch.int32),
        num_padded=padded_end[-1:].to(torch.int32),
        num_slots=num_slots,
        block_m=block_m,
    )
