"""Can a decode step hide its GEMMs behind its attention (two half-batches on two streams)?

W1's decode step at 256 sequences is ~85 % attention, which reads K/V at ~96 % of the copy bandwidth, and
~15 % small GEMMs and their norms, which run at M = 256 far from either the bandwidth or the compute peak
(docs/BENCHMARKS.md: ~1 ms a step against ~0.3 ms of weight bytes, on every step, full or tail). On an H200
that fixed part is what keeps W1 under 80 % of its floor. NanoFlow's answer is nano-batches: split the batch
in two and run one half's attention (memory-bound) while the other half runs its GEMMs (latency- and
compute-bound), so the GEMMs cost little more than the SMs they borrow. This measures whether a card
overlaps them. On an H100 (2026-12-07, docs/BENCHMARKS.md) none of the two-stream schedules beat one stream,
and the engine's halves built on the idea lost 4 % on W1: they were removed.

The layer is W1's Qwen3-0.6B decoder without rotary and the KV write: RMSNorm (with residual), the qkv GEMM,
decode attention over a ragged paged K/V cache (the engine's kernel, longest context first), o GEMM, RMSNorm,
gate_up GEMM, SiLU-mul, down GEMM; a distinct K/V cache and weights per layer. Each schedule is captured in
one CUDA graph and replayed; µs per step (all layers):
- ``serial``: the whole batch, one stream (what the engine does);
- ``serial_halves``: the two halves one after the other on one stream (the cost of splitting alone);
- ``phased``: two streams, each layer in two phases, half A's attention beside half B's GEMMs, then the
  other way round (an event barrier between phases);
- ``free``: two streams, each half its whole forward, B started one GEMM block behind A, no barriers;
- ``pipelined``: a GEMM stream and an attention stream, each half waiting only for its own previous piece
  (the layout an engine would build), and ``pipelined_gemm_priority`` with the GEMM stream at high priority
  (both also launched eagerly: a captured graph may not keep stream priorities);
- ``attention_only`` and ``gemms_only`` (whole batch, and halves): the parts alone.

    python3 bench/diag/overlap_probe.py --seqs 256 128 64 --out overlap_probe.json
    python3 bench/diag/overlap_probe.py --shape llama-8b --seqs 256 64 --ctx-min 100 --ctx-max 1500  # W2's shape
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.kernels.decode_attention import choose_num_splits, decode_attention  # noqa: E402
from engine.kernels.rmsnorm import rms_norm  # noqa: E402
from engine.kernels.silu_mul import silu_and_mul  # noqa: E402

BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    layers: int


SHAPES = {
    "qwen3-0.6b": Shape(1024, 16, 8, 128, 3072, 28),  # W1
    "llama-8b": Shape(4096, 32, 8, 128, 14336, 32),  # W2
}


class Half:
    """One group of sequences: its queries, paged K/V tables, lengths (longest first) and buffers."""

    def __init__(self, lens: list[int], shape: Shape, device: torch.device) -> None:
        n = len(lens)
        self.shape = shape
        self.n = n
        blocks = [(x + BLOCK - 1) // BLOCK for x in lens]
        total = sum(blocks)
        # a distinct cache per layer, blocks shuffled as a long-running server's would be
        self.caches = [
            torch.randn(2, total, BLOCK, shape.kv_heads, shape.head_dim, device=device, dtype=torch.bfloat16)
            for _ in range(shape.layers)
        ]
        perm = torch.randperm(total).tolist()
        table = torch.zeros(n, max(blocks), dtype=torch.int32)
        at = 0
        for i, b in enumerate(blocks):
            table[i, :b] = torch.tensor(perm[at : at + b], dtype=torch.int32)
            at += b
        self.block_tables = table.to(device)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.order = torch.argsort(self.seq_lens, descending=True).to(torch.int32)
        self.max_len = max(lens)
        self.x = torch.randn(n, shape.hidden, device=device, dtype=torch.bfloat16)
        self.residual = torch.randn(n, shape.hidden, device=device, dtype=torch.bfloat16)
        self.q = torch.randn(n, shape.heads, shape.head_dim, device=device, dtype=torch.bfloat16)
        self.attn_out = torch.empty(n, shape.heads, shape.head_dim, device=device, dtype=torch.bfloat16)
        self.kv_bytes = sum(lens) * 2 * shape.kv_heads * shape.head_dim * 2 * shape.layers


class Layer:
    def __init__(self, shape: Shape, device: torch.device) -> None:
        hidden, inter = shape.hidden, shape.inter

        def w(out_f: int, in_f: int) -> torch.Tensor:
            return torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02

        self.qkv = w((shape.heads + 2 * shape.kv_heads) * shape.head_dim, hidden)
        self.o = w(hidden, shape.heads * shape.head_dim)
        self.gate_up = w(2 * inter, hidden)
        self.down = w(hidden, inter)
        self.norm1 = torch.ones(hidden, device=device, dtype=torch.bfloat16)
        self.norm2 = torch.ones(hidden, device=device, dtype=torch.bfloat16)


def pre(layer: Layer, h: Half) -> None:
    """Norm and qkv GEMM (the query buffer stays the half's own: rotary is left out)."""
    x, h.residual = rms_norm(h.x, layer.norm1, 1e-6, h.residual)
    F.linear(x, layer.qkv)


def attend(h: Half, index: int, num_sms: int) -> None:
    splits = choose_num_splits(h.n, h.shape.kv_heads, h.max_len, num_sms)
    decode_attention(h.q, h.caches[index], h.block_tables, h.seq_lens, h.shape.head_dim**-0.5, h.attn_out,
                     num_splits=splits, seq_order=h.order)  # fmt: skip


def post(layer: Layer, h: Half) -> None:
    o = F.linear(h.attn_out.view(h.n, -1), layer.o)
    x, h.residual = rms_norm(o, layer.norm2, 1e-6, h.residual)
    h.x = F.linear(silu_and_mul(F.linear(x, layer.gate_up)), layer.down)


def time_graph(body: Callable[[], None], iters: int) -> float:
    """µs per replay of ``body`` captured in one CUDA graph (warmed up eagerly first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def time_eager(body: Callable[[], None], iters: int) -> float:
    """µs per call of ``body`` launched eagerly (the host runs ahead while the GPU is the limit)."""
    for _ in range(3):
        body()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        body()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def schedules(
    layers: list[Layer], whole: Half, a: Half, b: Half, num_sms: int
) -> dict[str, Callable[[], None]]:
    def serial_of(*halves: Half, attention: bool = True, gemms: bool = True) -> Callable[[], None]:
        def body() -> None:
            for h in halves:
                for i, layer in enumerate(layers):
                    if gemms:
                        pre(layer, h)
                    if attention:
                        attend(h, i, num_sms)
                    if gemms:
                        post(layer, h)

        return body

    def phased() -> None:
        # phase 1 of layer i: A attends while B finishes layer i-1 and starts layer i; phase 2 the other way
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        pre(layers[0], a)
        with torch.cuda.stream(side):
            pre(layers[0], b)
        for i, layer in enumerate(layers):
            main.wait_stream(side)
            side.wait_stream(main)
            attend(a, i, num_sms)
            if i > 0:
                with torch.cuda.stream(side):
                    post(layers[i - 1], b)
                    pre(layer, b)
            main.wait_stream(side)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                attend(b, i, num_sms)
            post(layer, a)
            if i + 1 < len(layers):
                pre(layers[i + 1], a)
        with torch.cuda.stream(side):
            post(layers[-1], b)
        main.wait_stream(side)

    def free() -> None:
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        pre(layers[0], a)
        side.wait_stream(main)  # B one GEMM block behind A, then each on its own
        with torch.cuda.stream(side):
            for i, layer in enumerate(layers):
                pre(layer, b)
                attend(b, i, num_sms)
                post(layer, b)
        for i, layer in enumerate(layers):
            if i > 0:
                pre(layer, a)
            attend(a, i, num_sms)
            post(layer, a)
        main.wait_stream(side)

    def pipelined(gemm_priority: int) -> Callable[[], None]:
        """Role streams: every GEMM block on one (optionally high priority), every attention on the other;
        each half waits only for its own previous piece, so B's attention runs beside A's GEMMs and back."""

        def body() -> None:
            origin = torch.cuda.current_stream()
            gemm, attn = torch.cuda.Stream(priority=gemm_priority), torch.cuda.Stream()
            gemm.wait_stream(origin)
            attn.wait_stream(origin)

            def mark(stream: torch.cuda.Stream) -> torch.cuda.Event:
                event = torch.cuda.Event()
                event.record(stream)
                return event

            with torch.cuda.stream(gemm):
                pre(layers[0], a)
                pre_done = {"a": mark(gemm)}
                pre(layers[0], b)
                pre_done["b"] = mark(gemm)
            for i, layer in enumerate(layers):
                attn_done = {}
                with torch.cuda.stream(attn):
                    for key, h in (("a", a), ("b", b)):
                        attn.wait_event(pre_done[key])
                        attend(h, i, num_sms)
                        attn_done[key] = mark(attn)
                with torch.cuda.stream(gemm):
                    for key, h in (("a", a), ("b", b)):
                        gemm.wait_event(attn_done[key])
                        post(layer, h)
                        if i + 1 < len(layers):
                            pre(layers[i + 1], h)
                            pre_done[key] = mark(gemm)
            origin.wait_stream(gemm)
            origin.wait_stream(attn)

        return body

    low, high = torch.cuda.Stream.priority_range() if torch.cuda.is_available() else (0, 0)
    return {
        "serial": serial_of(whole),
        "pipelined": pipelined(low),
        "pipelined_gemm_priority": pipelined(high),
        "serial_halves": serial_of(a, b),
        "phased": phased,
        "free": free,
        "attention_only": serial_of(whole, gemms=False),
        "gemms_only": serial_of(whole, attention=False),
        "gemms_only_halves": serial_of(a, b, attention=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 128, 64])
    parser.add_argument("--ctx-min", type=int, default=100)
    parser.add_argument("--ctx-max", type=int, default=2048)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's (memory)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    if args.layers:
        shape = dataclasses.replace(shape, layers=args.layers)
    layers = [Layer(shape, device) for _ in range(shape.layers)]
    weight_bytes = sum(
        t.numel() * 2 for layer in layers for t in (layer.qkv, layer.o, layer.gate_up, layer.down)
    )
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(0),
        "args": vars(args) | {"out": str(args.out)},
    }
    rng = random.Random(0)
    for n in args.seqs:
        lens = sorted((rng.randint(args.ctx_min, args.ctx_max) for _ in range(n)), reverse=True)
        # halves with equal K/V: alternate down the longest-first order
        a, b = Half(lens[0::2], shape, device), Half(lens[1::2], shape, device)
        whole = Half(lens, shape, device)
        row: dict[str, float] = {}
        bodies = schedules(layers, whole, a, b, num_sms)
        for name, body in bodies.items():
            row[name] = round(time_graph(body, args.iters), 1)
        for name in (
            "serial",
            "pipelined",
            "pipelined_gemm_priority",
        ):  # stream priority may not survive capture
            row[f"{name}_eager"] = round(time_eager(bodies[name], args.iters), 1)
        kv_us = whole.kv_bytes / 4.23e12 * 1e6  # at the H200's measured copy bandwidth, for scale only
        row["kv_plus_weights_floor_us_at_4.23TBps"] = round(kv_us + weight_bytes / 4.23e12 * 1e6, 1)
        overlapped = ("phased", "free", "pipelined", "pipelined_gemm_priority")
        row["best_overlap_vs_serial"] = round(min(row[k] for k in overlapped) / row["serial"], 3)
        results[f"seqs_{n}"] = row
        print(f"{n} sequences: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        del a, b, whole, bodies  # the schedules' closures hold the halves' caches too
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
