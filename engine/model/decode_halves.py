"""A decode step as two half-batches, one half's attention running beside the other half's GEMMs.

At a large batch a small model's decode step is mostly attention, which reads the K/V cache at about the
copy bandwidth, plus small GEMMs, norms and rotary that fill neither the bandwidth nor the tensor cores
(W1's Qwen3-0.6B at 256 sequences: ~1.2 ms of a ~7.5 ms step on an H200, docs/BENCHMARKS.md). NanoFlow's
nano-batches: split the batch in two and put every attention on a side stream, so that while half B
attends, half A runs its o_proj, MLP and next layer's q/k/v on the main stream, and the other way round.
Each half waits only for its own previous piece; nothing waits for both. Each half reads every weight
again, so it can pay only where K/V reads dwarf weight reads (a small model, long contexts, many sequences):
not for an 8B model's or a mixture of experts' decode steps, whose weights are most of their bytes.

Every layer but attention treats rows independently and attention is per sequence, so each row gets the
arithmetic of the whole-batch forward (up to the GEMM kernel cuBLAS picks for half the rows). Used by the
decode CUDA graphs (engine.model.cuda_graphs) for batches of at least ``--decode-overlap-min-batch``;
without a side stream (the CPU, tests) the halves run one after the other. bench/diag/overlap_probe.py
measures whether a card overlaps the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from engine.model.attention import AttentionMetadata


def split_decode_metadata(meta: AttentionMetadata, split: int) -> tuple[AttentionMetadata, AttentionMetadata]:
    """An all-decode step's metadata as its first ``split`` sequences and the rest. Each half's decode
    order (longest context first) is sorted on the device, so a captured graph keeps it right."""
    n = meta.num_seqs
    if meta.num_decodes != n or not 0 < split < n:
        raise ValueError(f"cannot split {n} sequences ({meta.num_decodes} decoding) at {split}")

    def half(lo: int, hi: int) -> AttentionMetadata:
        seq_lens = meta.seq_lens[lo:hi]
        order = None
        if meta.decode_order is not None:
            order = torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32)
        return AttentionMetadata(
            slot_mapping=meta.slot_mapping[lo:hi],
            query_start_loc=meta.query_start_loc[: hi - lo + 1],  # one token a sequence: 0, 1, ..., k
            seq_lens=seq_lens,
            block_tables=meta.block_tables[lo:hi],
            num_decodes=hi - lo,
            max_query_len=1,
            max_seq_len=meta.max_seq_len,
            query_lens_cpu=meta.query_lens_cpu[lo:hi],
            seq_lens_cpu=meta.seq_lens_cpu[lo:hi],
            decode_order=order,
        )

    return half(0, split), half(split, n)


class _Half:
    def __init__(self, rows: slice, meta: AttentionMetadata) -> None:
        self.rows = rows
        self.meta = meta
        self.qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.residual: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.qkv_ready: torch.cuda.Event | None = None  # on the main stream
        self.attended: torch.Tensor | None = None
        self.attended_ready: torch.cuda.Event | None = None  # on the side stream


def _mark(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _hand_over(
    tensors: Sequence[torch.Tensor], event: torch.cuda.Event | None, to: torch.cuda.Stream | None
) -> None:
    """`to` waits for the tensors' producer, and the allocator keeps their memory until `to` is done with them
    (without it, the producing stream could reuse it while `to` still reads it)."""
    if to is None:
        return
    assert event is not None
    to.wait_event(event)
    for t in tensors:
        t.record_stream(to)


def forward_in_halves(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_caches: list[torch.Tensor],
    meta: AttentionMetadata,
    split: int,
    side: torch.cuda.Stream | None,
) -> torch.Tensor:
    """``decoder`` (a LlamaModel: embed_tokens, layers, norm) over an all-decode step, rows [0, split) and
    [split, n) as two halves, attention on ``side`` (None: the current stream) -> hidden [n, hidden]."""
    layers = list(decoder.layers)
    main = torch.cuda.current_stream() if side is not None else None
    halves = [
        _Half(rows, m)
        for rows, m in zip(
            (slice(0, split), slice(split, None)), split_decode_metadata(meta, split), strict=True
        )
    ]
    embedded = decoder.embed_tokens(input_ids)
    for h in halves:
        h.qkv, h.residual = layers[0].before_attention(positions[h.rows], embedded[h.rows], None)
        h.qkv_ready = _mark(main)
    for index, layer in enumerate(layers):
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for h in halves:
                assert h.qkv is not None
                _hand_over(h.qkv, h.qkv_ready, side)
                h.attended = layer.self_attn.attend(*h.qkv, kv_caches[index], h.meta)
                h.attended_ready = _mark(side)
        for h in halves:
            assert h.attended is not None and h.residual is not None
            _hand_over([h.attended], h.attended_ready, main)
            x, h.residual = layer.after_attention(h.attended, h.residual)
            if index + 1 < len(layers):
                h.qkv, h.residual = layers[index + 1].before_attention(positions[h.rows], x, h.residual)
                h.qkv_ready = _mark(main)
            else:
                h.hidden = x
    if main is not None:
        main.wait_stream(side)  # a captured graph's side stream must join the capturing one
    return torch.cat([decoder.norm(h.hidden, h.residual)[0] for h in halves])
