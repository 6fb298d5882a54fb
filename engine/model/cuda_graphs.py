"""CUDA graphs for decode steps: one captured forward per batch-size bucket, replayed with the step's
inputs copied into static buffers.

A decode step of a small model launches hundreds of short kernels; replaying a graph costs one launch
from the host. A batch of n decodes runs the smallest bucket >= n; the padding rows have slot -1
(the cache write skips them) and context length 1, and their outputs are dropped.

The decode attention kernel derives each program's share of the context from the sequence length at
run time, so a graph captured once stays right for every context length (see decode_attention.py).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from engine.model.attention import AttentionMetadata

log = logging.getLogger(__name__)


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """For a capture: an object Python's collector frees meanwhile (an earlier engine's pinned host buffers,
    say) may make a CUDA call that invalidates it ("operation failed due to a previous error during capture")."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch_size (as nano-vllm and vLLM do)."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    return small + list(range(16, max_batch_size, 16)) + [max_batch_size]


class DecodeCudaGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        max_batch_size: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches  # captured by address: the runner must never reallocate them
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        # Static inputs and output, shared by every bucket (a bucket uses the leading rows).
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch_size,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch_size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch_size, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device)
        # The decode kernel's program order (longest context first); padding rows keep their own indices.
        self.batch_order = torch.arange(max_batch_size, dtype=torch.int32, device=device)
        self.decode_order = self.batch_order.clone()
        self.hidden = torch.zeros(max_batch_size, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.buckets = batch_size_buckets(max_batch_size)
        self.pool = None  # the graphs' memory pool, once captured (piecewise graphs share it)

    def _meta(self, batch_size: int) -> AttentionMetadata:
        # max_seq_len = max_model_len: the split heuristic sizes each bucket for the longest context.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            num_decodes=batch_size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[self.max_model_len] * batch_size,
            decode_order=self.decode_order[:batch_size],
        )

    def _forward(self, batch_size: int) -> None:
        bs = batch_size
        self.hidden[:bs] = self.model(
            self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs)
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, so the smaller ones fit in the memory pool it leaves behind."""
        started = time.monotonic()
        pool = None
        with no_garbage_collection():  # one collection for all the captures, not one each
            for bs in reversed(self.buckets):
                self._forward(bs)  # warm-up: Triton compiles and cuBLAS picks kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self._forward(bs)
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = graph
        self.pool = pool
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch sizes 1..%d) in %.1fs",
                 len(self.graphs), self.max_batch_size, time.monotonic() - started)  # fmt: skip

    def can_run(self, meta: AttentionMetadata) -> bool:
        n = meta.num_seqs
        return (
            0 < n <= self.max_batch_size and meta.num_decodes == n and meta.max_seq_len <= self.max_model_len
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the smallest bucket that holds this all-decode batch; returns hidden [n, hidden]
        (a view of the static output: use it before the next replay)."""
        n = meta.num_seqs
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        order = meta.decode_order if meta.decode_order is not None else self.batch_order[:n]
        self.decode_order[:n].copy_(order)
        if bs > n:  # padding rows: no cache write, a one-token context, dispatched last
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.decode_order[n:bs].copy_(self.batch_order[n:bs])
        self.graphs[bs].replay()
        return self.hidden[:n]
