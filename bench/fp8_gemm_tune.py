"""Tile sweep for engine/kernels/fp8_gemm.py on the 8B model's linears at decode token counts, against
bfloat16 F.linear and torch._scaled_mm (the GEMMs alone: both FP8 paths take the same quantized activations).
Each timing is the mean of 50 calls replayed inside one CUDA graph (min of 3 replays). Prints, per shape and
token count, the best tile and its time; --out writes each shape's five best tiles as JSON
(bench/results/fp8_skinny_tune_*: the sweep of 2026-12-05, when the kernel was the
"few-token" GEMM).

    python bench/fp8_gemm_tune.py [--tokens 1 16 32 64 128] [--out f.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kernels.fp8_gemm import GemmTile, fp8_gemm  # noqa: E402
from engine.kernels.fp8_quant import quantize_activations  # noqa: E402
from engine.model.fp8 import quantize_rows  # noqa: E402

SHAPES = {
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
}


def graph_time_us(fn: Callable[[], object], calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def candidates(m: int) -> list[GemmTile]:
    block_ms = [max(16, min(64, 1 << (m - 1).bit_length()))]
    if m > 64:
        block_ms.append(128)
    out = []
    for bm, bn, bk, split, stages in itertools.product(
        block_ms, (32, 64, 128), (128, 256, 512), (1, 2, 4, 8), (3, 5)
    ):
        if stages * (bm * bk + bk * bn) > 200 * 1024:  # shared memory of the pipeline
            continue
        for warps in (4, 8) if bm == 128 else (4,):
            out.append(GemmTile(bm, bn, bk, split, warps, stages))
    return out


def time_tiles(
    tiles: list[GemmTile], a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    ref: torch.Tensor,
) -> list[dict]:  # fmt: skip
    """Each tile's fp8_gemm (bfloat16 out) timed and checked against `ref` (float32), fastest first; a tile
    that does not fit the device is skipped."""
    timings = []
    for tile in tiles:
        try:
            out = fp8_gemm(a, a_scale, b, b_scale, torch.bfloat16, None, tile)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            us = graph_time_us(partial(fp8_gemm, a, a_scale, b, b_scale, torch.bfloat16, None, tile))
        except Exception as exc:  # noqa: BLE001 -- a tile that does not fit is skipped
            print(f"skip {tile}: {type(exc).__name__}", file=sys.stderr)
            continue
        timings.append({"config": tile.__dict__, "us": round(us, 2), "max_rel_err": err})
    return sorted(timings, key=lambda r: r["us"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda") * 0.02
        w_bf16 = w.bfloat16()
        wq, ws = quantize_rows(w)
        ws_row = ws.reshape(1, n).contiguous()
        floor_us = n * k / 3.35e12 * 1e6  # FP8 weight bytes at the H100's bandwidth
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_activations(x)
            ref = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.float32)
            base = {
                "bf16": graph_time_us(partial(F.linear, x, w_bf16)),
                "scaled_mm": graph_time_us(
                    partial(
                        torch._scaled_mm, xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16
                    )
                ),
            }
            timings = time_tiles(candidates(m), xq, xs, wq, ws, ref)
            best = timings[0]
            row = {
                "layer": name,
                "tokens": m,
                "floor_us": round(floor_us, 1),
                **{f"{k}_us": round(v, 1) for k, v in base.items()},
                "best": best,
                "top5": timings[:5],
            }
            print(json.dumps({k: v for k, v in row.items() if k != "top5"}), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
