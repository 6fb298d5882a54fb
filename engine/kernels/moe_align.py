"""Token slots sorted by expert and padded to whole GEMM blocks, for the fused MoE kernel.

Each token routed to top_k experts occupies top_k *slots* (slot = token * top_k + j). The grouped GEMM
runs blocks of BLOCK_M slots that all belong to one expert, so the slots are sorted by expert and each
expert's run is padded up to a multiple of BLOCK_M with a sentinel slot (``num_slots``), which the
kernel masks out.

Output shapes depend only on the number of tokens (never on the routing) and nothing is copied to the
host, so a decode step that aligns can be captured in a CUDA graph. Two ways to the same result:
``align_slots_by_expert`` (about 25 torch ops: sort, counts, prefix sums, scatter), for prefill-sized
batches, and ``align_slots_by_expert_small`` (one Triton program that walks the experts), for decode
batches, where 25 launches in each of 48 layers would cost as much as the step's weight reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SMALL_MAX_SLOTS = 4096  # one program holds every slot id in registers up to here (512 tokens x top 8)


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


@triton.jit(do_not_specialize=["num_slots", "num_blocks"])
def _align_small_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_slots, num_blocks,
    NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    # One program, every expert at once (a [CHUNK slots, experts] one-hot per chunk of slots): a loop
    # over the experts would serialise one reduction per expert. Entries past num_padded are left
    # unwritten: nothing reads them.
    experts = tl.arange(0, BLOCK_E)
    rows = tl.arange(0, CHUNK)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)  # slots per expert
    for first in range(0, num_slots, CHUNK):
        ids = tl.load(ids_ptr + first + rows, mask=first + rows < num_slots, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_end = tl.cumsum(padded, axis=0)  # each expert's run, padded to whole blocks, ends here
    run_start = run_end - padded
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))

    # each slot goes to its expert's run start + the number of earlier slots that chose that expert
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)
    for first in range(0, num_slots, CHUNK):
        ids = tl.load(ids_ptr + first + rows, mask=first + rows < num_slots, other=-1)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)
        earlier = tl.cumsum(hit, axis=0) - hit + seen[None, :]
        destination = tl.sum(hit * (run_start[None, :] + earlier), axis=1)
        tl.store(sorted_ptr + destination, first + rows, mask=first + rows < num_slots)
        seen += tl.sum(hit, axis=0)

    # the sentinel in each run's padding
    pad = tl.arange(0, BLOCK_M)
    sentinel = tl.zeros([BLOCK_E, BLOCK_M], dtype=tl.int32) + num_slots
    tl.store(sorted_ptr + (run_start + counts)[:, None] + pad[None, :], sentinel,
             mask=pad[None, :] < (padded - counts)[:, None])  # fmt: skip

    # block b belongs to the expert whose run holds b * BLOCK_M: the number of runs ending at or before it
    for first in range(0, num_blocks, CHUNK):
        blocks = first + rows
        owner = tl.sum((run_end[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.minimum(owner, NUM_EXPERTS - 1), mask=blocks < num_blocks)


def align_slots_by_expert_small(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """What align_slots_by_expert computes, in one launch, for at most SMALL_MAX_SLOTS slots; entries
    past num_padded are unset."""
    num_slots = topk_ids.numel()
    assert num_slots <= SMALL_MAX_SLOTS
    max_padded = max_padded_slots(num_slots, num_experts, block_m)
    device = topk_ids.device
    sorted_slots = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    _align_small_kernel[(1,)](
        topk_ids.reshape(-1), sorted_slots, block_expert, num_padded, num_slots, max_padded // block_m,
        NUM_EXPERTS=num_experts, BLOCK_E=block_e, BLOCK_M=block_m, CHUNK=max(16, 8192 // block_e),
        num_warps=8 if num_slots > 256 else 4,
    )  # fmt: skip
    return ExpertAlignment(sorted_slots, block_expert, num_padded, num_slots, block_m)
