"""Tile sweep for engine/kernels/fp8_gemm.py on a model's linears at decode token counts, against
bfloat16 F.linear and torch._scaled_mm (the GEMMs alone: both FP8 paths take the same quantized activations).
Each timing is the mean of 50 calls replayed inside one CUDA graph (min of 3 replays). Prints, per shape and
token count, the best tile, its time, the current choice's (``tile_for``) and the weight bytes' floor at this
card's measured copy bandwidth; --out writes each shape's five best tiles as JSON
(bench/results/fp8_skinny_tune_*: the sweep of 2026-12-05, when the kernel was the "few-token" GEMM).

``--group 128`` sweeps the block-scaled layout (Qwen3-*-FP8: 128 x 128 weight blocks, activations per 128
columns; BLOCK_K is the group), e.g. W5's attention projections: ``--model qwen3-30b-a3b --group 128``.

    python bench/fp8_gemm_tune.py [--model llama-3-8b] [--group 128] [--tokens 1 16 32 64 128] [--out f.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8_gemm import MODELS  # noqa: E402

from engine.kernels.fp8_gemm import GemmTile, fp8_gemm, tile_for  # noqa: E402
from engine.kernels.fp8_quant import quantize_activations  # noqa: E402
from engine.model.fp8 import quantize_rows  # noqa: E402


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


def copy_bandwidth() -> float:
    """Bytes per second this card copies (read + write of 1 GiB), the weight read's floor."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us(partial(dst.copy_, src), calls=5)
    return 2 * src.numel() / (us * 1e-6)


def candidates(m: int, group: int | None = None) -> list[GemmTile]:
    block_ms = [max(16, min(64, 1 << (m - 1).bit_length()))]
    if m > 64:
        block_ms.append(128)
    if group is not None and m > 16:
        block_ms.append(16)  # several row tiles reading each weight tile from L2
    # block-scaled: BLOCK_K is the group; narrow column tiles and deep splits fill 132 SMs on small layers
    block_ks = (128, 256, 512) if group is None else (group,)
    block_ns = (32, 64, 128) if group is None else (16, 32, 64, 128)
    splits = (1, 2, 4, 8) if group is None else (1, 2, 4, 8, 16)
    stage_counts = (3, 5) if group is None else (3, 4)
    out = []
    for bm, bn, bk, split, stages in itertools.product(
        sorted(set(block_ms)), block_ns, block_ks, splits, stage_counts
    ):
        if stages * (bm * bk + bk * bn) > 200 * 1024:  # shared memory of the pipeline
            continue
        for warps in (4, 8) if bm == 128 else (4,):
            # split K summed by the tile's last split (its separate-kernel time is reported for the best)
            out.append(GemmTile(bm, bn, bk, split, warps, stages, fused_sum=split > 1))
    return out


def time_tiles(
    tiles: list[GemmTile], a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    ref: torch.Tensor, group: int | None = None,
) -> list[dict]:  # fmt: skip
    """Each tile's fp8_gemm (bfloat16 out) timed and checked against `ref` (float32), fastest first; a tile
    that does not fit the device, or whose product is wrong (beyond bfloat16's rounding of the output: a split-K
    sum that raced, say), is skipped and named on stderr."""
    timings = []
    for tile in tiles:
        try:
            out = fp8_gemm(a, a_scale, b, b_scale, torch.bfloat16, group, tile)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            us = graph_time_us(partial(fp8_gemm, a, a_scale, b, b_scale, torch.bfloat16, group, tile))
        except Exception as exc:  # noqa: BLE001 -- a tile that does not fit is skipped
            print(f"skip {tile}: {type(exc).__name__}", file=sys.stderr)
            continue
        if err > MAX_REL_ERR:
            print(f"WRONG {tile}: max relative error {err:.3g}", file=sys.stderr)
            continue
        timings.append({"config": tile.__dict__, "us": round(us, 2), "max_rel_err": err})
    return sorted(timings, key=lambda r: r["us"])


MAX_REL_ERR = 1e-2  # bfloat16 output against float32: ~4e-3 of the largest value at worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3-8b")
    parser.add_argument("--group", type=int, choices=[128], help="block-scaled weights (128 x 128 blocks)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    parser.add_argument("--shapes", nargs="+", help="layers of --model (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shapes = MODELS[args.model]
    bandwidth = copy_bandwidth()
    print(
        json.dumps(
            {"device": torch.cuda.get_device_name(), "copy_bandwidth_TBps": round(bandwidth / 1e12, 3)}
        )
    )
    rows = []
    for name in args.shapes or list(shapes):
        n, k = shapes[name]
        w = torch.randn(n, k, device="cuda") * 0.02
        w_bf16 = w.bfloat16()
        wq, ws = quantize_rows(w, args.group)  # per row, or per row and group (a block's scale on each row)
        ws_row = ws.reshape(1, n).contiguous() if args.group is None else None
        floor_us = n * k / bandwidth * 1e6  # the FP8 weight's bytes
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_activations(x, args.group)
            base = {"bf16": graph_time_us(partial(F.linear, x, w_bf16))}
            if args.group is None:
                ref = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.float32)
                base["scaled_mm"] = graph_time_us(
                    partial(
                        torch._scaled_mm, xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16
                    )
                )
            else:  # float32 of the dequantized operands
                g = args.group
                ref = (xq.float().view(m, -1, g) * xs[:, :, None]).view(m, k) @ (
                    wq.float().view(n, -1, g) * ws[:, :, None]
                ).view(n, k).t()

            def time_one(tile: GemmTile) -> float:
                timed = time_tiles([tile], xq, xs, wq, ws, ref, args.group)  # noqa: B023 -- called at once
                return timed[0]["us"] if timed else float("nan")

            chosen = tile_for(m, n, k, args.group)
            base["chosen"] = time_one(chosen)
            if chosen.split_k > 1:
                base["chosen_fused_sum"] = time_one(replace(chosen, fused_sum=True))
            timings = time_tiles(candidates(m, args.group), xq, xs, wq, ws, ref, args.group)
            if not timings:
                print(json.dumps({"layer": name, "tokens": m, "error": "no tile ran"}), flush=True)
                continue
            best = timings[0]
            if best["config"]["split_k"] > 1:  # the same tile with the partials summed by a second kernel
                base["best_separate_sum"] = time_one(replace(GemmTile(**best["config"]), fused_sum=False))
            row = {
                "layer": name,
                "tokens": m,
                "floor_us": round(floor_us, 1),
                **{f"{k}_us": round(v, 1) for k, v in base.items()},
                "chosen": chosen.__dict__,
                "best": best,
                "top5": timings[:5],
            }
            print(json.dumps({k: v for k, v in row.items() if k != "top5"}), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
