"""CUDA graphs for steps with prompt tokens (and decode-only steps past the decode graphs' largest batch):
the forward captured in pieces between attention calls, one set of pieces per padded token count.

Why pieces: a decode-only step's attention launches the same grid whatever the contexts (cuda_graphs.py),
but prefill attention's grid is (sequences, heads, query blocks) and its first prefill sequence a scalar,
which change every step. Everything else in a layer depends only on the number of tokens. So a step of T
tokens is padded to the smallest bucket >= T and runs piece 0 (embedding; layer 0's norm, q/k/v), layer 0's
rotary, K/V write and attention on the T real tokens (eager), piece 1 (layer 0's o_proj, norm and MLP or
experts; layer 1's norm, q/k/v), ..., and the last piece (the last layer's o_proj and MLP, the final norm):
one replay per piece instead of ~25 kernel launches from Python per layer. (A 2,048-token prompt step of
Qwen3-30B-A3B, 48 layers, was 38 ms of kernels and 56 ms of wall time eagerly on an H100.)

Padded tokens take whatever id and position their rows last held (always valid ones) through the pieces and
are dropped: every layer but attention treats tokens independently (FP8 activation scales are per token),
and attention sees only the real tokens, so padding reaches neither a real token nor the KV cache.

Pieces pass q, k, v, attention's output and the residual stream through static buffers allocated outside
the graphs' memory pool, so nothing a graph allocates outlives its replay: all pieces of all buckets share
one pool (the decode graphs' too) and each bucket's pool use is that of its largest piece.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from engine.model.attention import AttentionMetadata
from engine.model.cuda_graphs import no_garbage_collection
from engine.model.moe import SparseMoeBlock

log = logging.getLogger(__name__)

# Where an eager step stops being bound by its kernel launches, for the default largest bucket (H100 hosts,
# 2026-12-06, docs/BENCHMARKS.md): launching one decoder layer eagerly took ~1.2 ms of host time (W2's
# Llama-8B shape: 37 ms for 32 layers beside 54 ms of GPU time, a 2,049-token step; W5's Qwen3-30B-A3B: 56 ms
# for 48 layers beside 38 ms), and an H100 multiplies ~500 TFLOP/s in bfloat16 (twice that in float8). Above
# that token count the graphs only add their padding (W2 with graphs to 3,072 tokens: 41.0 req/s against 42.9
# without them, its 2,048-token chunks padded by up to 255 tokens). NEEDS GPU CALIBRATION per GPU and host.
HOST_LAUNCH_S_PER_LAYER = 1.2e-3
GPU_BF16_FLOPS = 500e12


def matmul_flops_per_token(model: nn.Module) -> float:
    """Twice the decoder weights one token multiplies by (each MoE layer's experts counted at top_k of
    num_experts), a float8 weight counting half (the GPU multiplies float8 twice as fast): bfloat16 FLOPs."""
    expert_share: dict[int, float] = {}
    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            share = block.gate.top_k / block.experts.num_experts
            expert_share.update((id(p), share) for p in block.experts.parameters())
    flops = 0.0
    for p in model.model.layers.parameters():
        cost = 0.5 if p.dtype.itemsize == 1 and p.dtype.is_floating_point else 1.0
        flops += 2 * p.numel() * cost * expert_share.get(id(p), 1.0)
    return flops


def host_bound_tokens(model: nn.Module, num_layers: int) -> int:
    """The largest step (a multiple of 64) whose arithmetic takes less GPU time than launching its layers
    eagerly takes the host: the steps piecewise graphs speed up."""
    seconds = HOST_LAUNCH_S_PER_LAYER * num_layers
    tokens = int(seconds * GPU_BF16_FLOPS / max(matmul_flops_per_token(model), 1.0))
    return tokens // 64 * 64


def token_count_buckets(max_tokens: int) -> list[int]:
    """64, 128, every 128 to 1,024, every 256 beyond; max_tokens itself last. Padding costs at most a
    bucket's step (a few per cent of a step this size); more buckets cost capture time and graph memory."""
    steps = [64, *range(128, 1025, 128), *range(1280, max_tokens, 256)]
    return [b for b in steps if b < max_tokens] + [max_tokens]


class PiecewiseCudaGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        decoder = model.model  # LlamaModel: embed_tokens, layers (LlamaDecoderLayer), norm
        self.decoder = decoder
        self.layers = list(decoder.layers)
        self.kv_caches = kv_caches  # captured by address: the runner must never reallocate them
        self.max_tokens = max_tokens
        self.buckets = token_count_buckets(max_tokens)
        attn = self.layers[0].self_attn
        hidden_size = model.config.hidden_size
        n = max_tokens
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        # q, k and v packed as the projection writes them: one copy a layer into the buffer, not three
        self.qkv = torch.zeros(n, attn.q_size + 2 * attn.kv_size, dtype=dtype, device=device)
        self.attended = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
        self.residual = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # bucket -> one graph per piece

    @property
    def num_pieces(self) -> int:
        return len(self.layers) + 1

    def _piece(self, index: int, n: int) -> None:
        """Piece `index` on the leading n rows of the static buffers."""
        if index == 0:
            x, residual = self.decoder.embed_tokens(self.input_ids[:n]), None
        else:
            x, residual = self.layers[index - 1].after_attention(
                self.attended[:n].view(n, -1), self.residual[:n]
            )
        if index == len(self.layers):
            out, _ = self.decoder.norm(x, residual)
            self.hidden[:n].copy_(out)
            return
        qkv, residual = self.layers[index].before_attention(x, residual)
        self.qkv[:n].copy_(qkv)
        self.residual[:n].copy_(residual)

    def _attend(self, index: int, n: int, meta: AttentionMetadata) -> None:
        """Layer `index`'s attention for the step's n real tokens, into the static output."""
        self.layers[index].self_attn.attend(
            self.positions[:n], self.qkv[:n], self.kv_caches[index], meta, out=self.attended[:n]
        )

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Largest bucket first, so the smaller ones fit in the memory it leaves in the pool."""
        started = time.monotonic()
        with no_garbage_collection():  # one collection for all the captures, not one each
            for n in reversed(self.buckets):
                # warm-up: Triton compiles and cuBLAS picks kernels outside the capture
                for index in range(self.num_pieces):
                    self._piece(index, n)
                torch.cuda.synchronize()
                graphs = []
                for index in range(self.num_pieces):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        self._piece(index, n)
                    pool = graph.pool() if pool is None else pool
                    graphs.append(graph)
                self.graphs[n] = graphs
        torch.cuda.synchronize()
        log.info("captured piecewise CUDA graphs for %d token counts (up to %d), %d pieces each, in %.1fs",
                 len(self.graphs), self.max_tokens, self.num_pieces, time.monotonic() - started)  # fmt: skip

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The forward of any step of at most max_tokens tokens; returns hidden [T, hidden] (a view of the
        static output: use it before the next step runs). Without captured graphs (tests on the CPU) the
        same pieces run eagerly on the same padded buffers."""
        t = input_ids.shape[0]
        n = next(b for b in self.buckets if b >= t)
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        graphs = self.graphs.get(n)
        for index in range(self.num_pieces):
            if graphs is not None:
                graphs[index].replay()
            else:
                self._piece(index, n)
            if index < len(self.layers):
                self._attend(index, t, meta)
        return self.hidden[:t]
