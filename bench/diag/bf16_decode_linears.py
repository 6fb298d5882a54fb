"""Would a Triton tile beat cuBLAS on Llama-3.1-8B's bfloat16 linears at few-sequence decode steps? (issue 13's
W2: two thirds of its decode steps run 1-32 sequences, each a read of the 16 GB of weights, at 6.3-7.5 ms on
an H100 against 5.3 of bytes.)

engine/kernels/fp8_gemm.py's kernel takes bfloat16 operands too (unit scales), so its tiles, split-K included,
are timed against F.linear on the same inputs. Unlike bench/diag/bf16_gemm_tiles.py, each timed call takes the
next of several copies of the weight, enough that they span four times the L2 cache (a decode step streams its
weights from memory; one weight replayed 50 times partly sits in L2: o_proj's 34 MB does in an H100's 50 MB).
Prints, per layer and token count, the weight-read floor at the measured copy bandwidth, cuBLAS and the best
tiles; then per token count the four linears of a layer summed, as a decode step runs them.

    python3 bench/diag/bf16_decode_linears.py [--tokens 1 8 16 32 64] [--out f.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# bench/ appended, not first: bench/kernels.py must not shadow the `kernels` package
sys.path.append(str(Path(__file__).resolve().parents[1]))

from fp8_gemm_tune import graph_time_us  # noqa: E402
from w1_offline import copy_bandwidth  # noqa: E402

from engine.kernels.fp8_gemm import GemmTile, fp8_gemm  # noqa: E402

SHAPES = {  # (out, in): Llama-3.1-8B's linears, as engine/model/llama.py packs them
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
}


def rotating_time_us(calls: list, reps: int = 10) -> float:
    """Mean µs of one call, each of `calls` (one per weight copy) run `reps` times round in one CUDA graph."""

    def one_round() -> None:
        for fn in calls:
            fn()

    return graph_time_us(one_round, reps) / len(calls)


def candidates(m: int) -> list[GemmTile]:
    block_m = max(16, min(64, 1 << (m - 1).bit_length()))
    return [
        GemmTile(block_m, bn, bk, split, 4, 4)
        for bn, bk, split in itertools.product((32, 64, 128), (128, 256), (1, 2, 4))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    result = {"device": props.name, "copy_bandwidth_TBps": round(bandwidth / 1e12, 3), "rows": []}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    for name in args.shapes:
        n, k = SHAPES[name]
        weight_bytes = 2 * n * k
        copies = max(2, -(-4 * props.L2_cache_size // weight_bytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        ones_n = torch.ones(n, 1, device="cuda")
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ones_m = torch.ones(m, 1, device="cuda")
            ref = F.linear(x, ws[0]).float()
            cublas = rotating_time_us([partial(F.linear, x, w) for w in ws])
            tiles = []
            for tile in candidates(m):
                try:
                    out = fp8_gemm(x, ones_m, ws[0], ones_n, torch.bfloat16, None, tile)
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    us = rotating_time_us(
                        [partial(fp8_gemm, x, ones_m, w, ones_n, torch.bfloat16, None, tile) for w in ws]
                    )
                except Exception as exc:  # noqa: BLE001 -- a tile that does not fit is skipped
                    print(f"skip {tile}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
                    continue
                tiles.append({"config": vars(tile), "us": round(us, 2), "max_rel_err": err})
            tiles.sort(key=lambda r: r["us"])
            row = {"layer": name, "tokens": m, "copies": copies, "floor_us": round(weight_bytes / bandwidth * 1e6, 2),
                   "cublas_us": round(cublas, 2), "best": tiles[0] if tiles else None, "top3": tiles[:3]}  # fmt: skip
            print(json.dumps({k: v for k, v in row.items() if k != "top3"}), flush=True)
            result["rows"].append(row)
            if args.out:  # after every row: a run cut short keeps what it measured
                args.out.write_text(json.dumps(result, indent=1) + "\n")
        del ws
        torch.cuda.empty_cache()
    for m in args.tokens:
        rows = [r for r in result["rows"] if r["tokens"] == m and r["best"]]
        if len(rows) == len(args.shapes):
            floor = sum(r["floor_us"] for r in rows)
            cublas = sum(r["cublas_us"] for r in rows)
            best = sum(min(r["cublas_us"], r["best"]["us"]) for r in rows)
            print(f"{m:>4} tokens, a layer's linears: floor {floor:.1f} µs, cuBLAS {cublas:.1f} "
                  f"({100 * floor / cublas:.0f} %), the faster of the two per linear {best:.1f} "
                  f"({100 * floor / best:.0f} %)")  # fmt: skip


if __name__ == "__main__":
    main()
