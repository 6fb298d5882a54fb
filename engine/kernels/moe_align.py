"""Token slots sorted by expert and padded to whole GEMM blocks, for the fused MoE kernel.

Each token routed to top_k experts occupies top_k *slots* (slot = token * top_k + j). The grouped GEMM
runs blocks of BLOCK_M slots that all belong to one expert, so the slots are sorted by expert and each
expert's run is padded up to a multiple of BLOCK_M with a sentinel slot (``num_slots``), which the
kernel masks out.

Output shapes depend only on the number of tokens (never on the routing) and nothing is copied to the
host, so a decode step that aligns can be captured in a CUDA graph. Two ways to the same result:
``align_slots_by_expert`` (about 25 torch ops: sort, counts, prefix sums, scatter), for prefill-sized
batches, and ``align_slots_by_expert_small`` (Triton: a program per chunk of slots, one launch to count
and one to place), for decode batches, where 25 launches in each of 48 layers would cost as much as the
step's weight reads. (It was one program walking every slot: 122 µs at 256 tokens of top 8 of 128
experts on an H100, a third of the layer's MoE time, growing with the slots.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.moe_router import route_tokens, topk_softmax

SMALL_MAX_SLOTS = 16384  # the Triton alignment up to here (2,048 tokens x top 8); torch ops beyond


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


@triton.jit
def _chunk_ids(
    ids_ptr, slots, num_slots, chunk, logits_ptr, weights_ptr, stride_logits, num_experts,
    BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROUTE: tl.constexpr,
):  # fmt: skip
    """The expert of each of the chunk's slots (-1 past the last), read from ids_ptr, or (ROUTE) chosen here
    from the router's logits, the chunk's CHUNK // TOP_K tokens' top_k weights and ids written as
    engine.kernels.moe_router.topk_softmax writes them."""
    if ROUTE:
        rows = chunk * (CHUNK // TOP_K) + tl.arange(0, CHUNK // TOP_K)
        num_tokens = num_slots // TOP_K
        top_weights, top_ids = route_tokens(
            logits_ptr, rows, num_tokens, num_experts, stride_logits, TOP_K, TOP_K, BLOCK_E, CHUNK // TOP_K,
            RENORMALIZE,
        )  # fmt: skip
        picks = tl.arange(0, TOP_K)
        out = rows.to(tl.int64)[:, None] * TOP_K + picks[None, :]
        row_ok = (rows < num_tokens)[:, None]
        tl.store(weights_ptr + out, top_weights, mask=row_ok)
        tl.store(ids_ptr + out, top_ids.to(ids_ptr.dtype.element_ty), mask=row_ok)
        ids = tl.where(slots < num_slots, tl.reshape(top_ids, CHUNK), -1)  # row-major: slot order
    else:
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
    return ids


@triton.jit(do_not_specialize=["num_slots"])
def _count_chunk_kernel(
    ids_ptr, chunk_counts_ptr, num_slots, logits_ptr, weights_ptr, stride_logits, num_experts,
    BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROUTE: tl.constexpr,
):  # fmt: skip
    # chunk_counts[c, e]: how many of chunk c's slots chose expert e (ROUTE: choosing them first)
    chunk = tl.program_id(0)
    slots = chunk * CHUNK + tl.arange(0, CHUNK)
    experts = tl.arange(0, BLOCK_E)
    ids = _chunk_ids(ids_ptr, slots, num_slots, chunk, logits_ptr, weights_ptr, stride_logits, num_experts,
                     BLOCK_E, CHUNK, TOP_K, RENORMALIZE, ROUTE)  # fmt: skip
    counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + chunk * BLOCK_E + experts, counts)


# block_m is a run-time value: a GEMM tile chosen for a step size no CUDA graph captured (a tuned file's, a
# prompt step's) must not compile a new variant mid-run; COUNTED's two variants both come with the captures.
@triton.jit(do_not_specialize=["num_slots", "num_chunks", "num_blocks", "block_m"])
def _place_chunk_kernel(
    ids_ptr, chunk_counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_slots, num_chunks, num_blocks,
    block_m, logits_ptr, weights_ptr, stride_logits, NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr, PAD_TILE: tl.constexpr, COUNT_ROWS: tl.constexpr, COUNTED: tl.constexpr,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, ROUTE: tl.constexpr,
):  # fmt: skip
    # One program per chunk of CHUNK slots, every expert at once (a [CHUNK, experts] one-hot). From all
    # chunks' counts (_count_chunk_kernel; COUNTED False: one chunk, its own) each program knows every
    # expert's padded run and how many of the expert's slots earlier chunks hold, so it places its own
    # slots with no other program's help, keeping token order. Entries past num_padded stay unwritten.
    # ROUTE (one chunk only): the program routes the tokens itself first (_chunk_ids).
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    rows = tl.arange(0, CHUNK)
    slots = chunk * CHUNK + rows
    ids = _chunk_ids(ids_ptr, slots, num_slots, chunk, logits_ptr, weights_ptr, stride_logits, NUM_EXPERTS,
                     BLOCK_E, CHUNK, TOP_K, RENORMALIZE, ROUTE)  # fmt: skip
    hit = (ids[:, None] == experts[None, :]).to(tl.int32)
    if COUNTED:
        totals = tl.zeros([BLOCK_E], dtype=tl.int32)  # slots per expert
        before = tl.zeros([BLOCK_E], dtype=tl.int32)  # ... in the chunks before this one
        count_rows = tl.arange(0, COUNT_ROWS)
        for first in range(0, num_chunks, COUNT_ROWS):
            c = first + count_rows
            counts = tl.load(chunk_counts_ptr + c[:, None] * BLOCK_E + experts[None, :],
                             mask=(c < num_chunks)[:, None], other=0)  # fmt: skip
            totals += tl.sum(counts, axis=0)
            before += tl.sum(tl.where((c < chunk)[:, None], counts, 0), axis=0)
    else:
        totals = tl.sum(hit, axis=0)
        before = tl.zeros([BLOCK_E], dtype=tl.int32)
    padded = (totals + block_m - 1) // block_m * block_m
    run_end = tl.cumsum(padded, axis=0)  # each expert's run, padded to whole blocks, ends here
    run_start = run_end - padded

    # each slot goes to its expert's run start + the number of earlier slots that chose that expert
    earlier = tl.cumsum(hit, axis=0) - hit + before[None, :]
    destination = tl.sum(hit * (run_start[None, :] + earlier), axis=1)
    tl.store(sorted_ptr + destination, slots, mask=slots < num_slots)

    if chunk == 0:  # the total and the sentinel in each run's padding (under block_m entries a run)
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))
        sentinel = tl.zeros([BLOCK_E, PAD_TILE], dtype=tl.int32) + num_slots
        for p0 in range(0, block_m, PAD_TILE):
            pad = p0 + tl.arange(0, PAD_TILE)
            tl.store(sorted_ptr + (run_start + totals)[:, None] + pad[None, :], sentinel,
                     mask=pad[None, :] < (padded - totals)[:, None])  # fmt: skip

    # block b belongs to the expert whose run holds b * block_m: the number of runs ending at or before it
    # (the programs share the blocks, CHUNK at a time)
    for first in range(chunk * CHUNK, num_blocks, num_chunks * CHUNK):
        blocks = first + rows
        owner = tl.sum((run_end[None, :] <= blocks[:, None] * block_m).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.minimum(owner, NUM_EXPERTS - 1), mask=blocks < num_blocks)


def _experts_tile(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def chunk_fits(chunk: int, num_experts: int) -> bool:
    """Whether a program can take `chunk` slots' [chunk, experts] one-hot (a power of two, at least 16)."""
    return chunk >= 16 and chunk & (chunk - 1) == 0 and chunk * _experts_tile(num_experts) <= 32768


def align_chunk(num_slots: int, num_experts: int) -> int:
    """Slots a program takes (each a [chunk, experts] one-hot), as timed on an H200 for 128 experts
    (bench/diag/moe_align_chunks.py, 2026-12-07; µs a call): one launch sized to the slots while the tile
    stays small (up to 32 slots: 2.6-3.5, where a 128-slot tile took 7.8); then many programs of a
    2,048-entry tile, counted then placed (16 slots: 4.7-5.1 up to 1,024 slots, where 128-slot chunks took
    7.8-12.9); twice that to 4,096 slots (7.5, against 13.1), where every program's reading of all the
    chunks' counts starts to show; the widest tile (16,384 entries) beyond, for prompt steps. A power of
    two, so few variants: the decode graphs' batch sizes reach the small ones and the piecewise graphs' token
    counts (to 3,072 tokens for W5's 30B-A3B) the prompt steps', so none compiles mid-run where graphs are on."""
    tile = _experts_tile(num_experts)
    one = max(16, triton.next_power_of_2(num_slots))
    if one * tile <= 4096:
        return one
    if num_slots * tile <= 2048 * 128:
        return max(16, 2048 // tile)
    if num_slots * tile <= 4096 * 128:
        return max(16, 4096 // tile)
    return max(16, min(256, 16384 // tile))


def align_slots_by_expert_small(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, chunk: int | None = None
) -> ExpertAlignment:
    """What align_slots_by_expert computes, in one launch up to a chunk of slots (``align_chunk``; 16 tokens
    of top 8 of 128 experts) and two beyond, for at most SMALL_MAX_SLOTS slots; entries past num_padded are
    unset. ``chunk``: another chunk size (``chunk_fits``), for bench/diag/moe_align_chunks.py's sweep."""
    ids = topk_ids.reshape(-1).contiguous()  # a column slice of a wider top-k reshapes to a strided view
    return _align_small(ids, topk_ids.shape[1], num_experts, block_m, chunk, None)


def align_slots(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """The alignment for any token count: the Triton one up to SMALL_MAX_SLOTS slots, torch ops beyond."""
    small = topk_ids.numel() <= SMALL_MAX_SLOTS
    return (align_slots_by_expert_small if small else align_slots_by_expert)(topk_ids, num_experts, block_m)


@dataclass(frozen=True)
class _Routing:
    """The router's logits [T, E] for the alignment to route itself, and where it writes the result."""

    logits: torch.Tensor
    weights: torch.Tensor  # [T, top_k] float32, written
    renormalize: bool


def routes_in_alignment(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether the Triton alignment can take the router's top-k too: each chunk of slots must hold whole
    tokens (top_k a power of two, as Qwen3-MoE's 8 and Mixtral's 2 are)."""
    num_slots = num_tokens * top_k
    return (
        0 < num_slots <= SMALL_MAX_SLOTS
        and top_k & (top_k - 1) == 0
        and align_chunk(num_slots, num_experts) % top_k == 0
    )


def route_and_align(
    logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, ExpertAlignment]:
    """The router's logits [T, E] (last dim contiguous) -> (weights [T, top_k] float32, expert ids [T, top_k]
    int64, the alignment): ``topk_softmax`` then the alignment, as one launch fewer where
    ``routes_in_alignment`` (decode batches: the alignment's first launch picks its chunk's tokens' experts
    with topk_softmax's code). The same experts, so the same alignment; the weights may differ from
    topk_softmax's in the last bit (their float32 sums follow each kernel's tile: route_tokens)."""
    num_tokens, num_experts = logits.shape
    assert logits.stride(1) == 1, logits.stride()
    if not routes_in_alignment(num_tokens, num_experts, top_k):
        weights, ids = topk_softmax(logits, top_k, renormalize)
        return weights, ids, align_slots(ids, num_experts, block_m)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)  # as topk_softmax's
    routing = _Routing(logits, weights, renormalize)
    return weights, ids, _align_small(ids.view(-1), top_k, num_experts, block_m, None, routing)


def _align_small(
    ids: torch.Tensor,  # [slots] contiguous: read, or written when routing
    top_k: int,
    num_experts: int,
    block_m: int,
    chunk: int | None,
    routing: _Routing | None,
) -> ExpertAlignment:
    num_slots = ids.numel()
    assert num_slots <= SMALL_MAX_SLOTS
    max_padded = max_padded_slots(num_slots, num_experts, block_m)
    device = ids.device
    sorted_slots = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    block_e = _experts_tile(num_experts)
    chunk = align_chunk(num_slots, num_experts) if chunk is None else chunk  # [chunk, experts] a program
    assert chunk_fits(chunk, num_experts), (chunk, num_experts)
    num_chunks = triton.cdiv(num_slots, chunk)
    warps = 4 if chunk * block_e < 8192 else 8 if chunk * block_e < 32768 else 16
    route = routing is not None
    assert not route or chunk % top_k == 0, (chunk, top_k)
    # unread without routing (any tensor will do)
    logits, weights = (routing.logits, routing.weights) if routing is not None else (ids, ids)
    stride_logits = logits.stride(0) if route else 0
    renormalize = routing.renormalize if routing is not None else False
    chunk_counts = ids  # unread with one chunk
    if num_chunks > 1:  # counted (and routed, if asked) chunk by chunk, then placed
        chunk_counts = torch.empty((num_chunks, block_e), dtype=torch.int32, device=device)
        _count_chunk_kernel[(num_chunks,)](
            ids, chunk_counts, num_slots, logits, weights, stride_logits, num_experts, BLOCK_E=block_e,
            CHUNK=chunk, TOP_K=top_k, RENORMALIZE=renormalize, ROUTE=route, num_warps=warps,
        )  # fmt: skip
    _place_chunk_kernel[(num_chunks,)](
        ids, chunk_counts, sorted_slots, block_expert, num_padded, num_slots, num_chunks, max_padded // block_m,
        block_m, logits, weights, stride_logits, NUM_EXPERTS=num_experts, BLOCK_E=block_e, CHUNK=chunk,
        PAD_TILE=16, COUNT_ROWS=max(1, 8192 // block_e), COUNTED=num_chunks > 1, TOP_K=top_k,
        RENORMALIZE=renormalize, ROUTE=route and num_chunks == 1, num_warps=warps,
    )  # fmt: skip
    return ExpertAlignment(sorted_slots, block_expert, num_padded, num_slots, block_m)
