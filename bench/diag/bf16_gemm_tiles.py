"""Would a Triton tile beat cuBLAS on a small model's bfloat16 linears at decode batch sizes? (issue 13's W1:
Qwen3-0.6B at 256 to 16 sequences, where a 128x128 tile over 1,024 outputs leaves most SMs idle.)

engine/kernels/fp8_gemm.py's kernel takes bfloat16 operands too (tl.dot on whatever it loads; unit scales), so
its tiles, split-K included, are timed against F.linear on the same inputs, each inside one CUDA graph of
50 calls (bench/fp8_gemm_tune.py's timing). Prints, per shape and token count, cuBLAS and the best tile.

    python3 bench/diag/bf16_gemm_tiles.py [--tokens 16 64 128 256] [--out f.json]
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

from fp8_gemm_tune import graph_time_us, time_tiles  # noqa: E402

from engine.kernels.fp8_gemm import GemmTile  # noqa: E402

SHAPES = {  # (out, in): Qwen3-0.6B's linears (W1) and its LM head
    "qkv_proj": (4096, 1024),
    "o_proj": (1024, 2048),
    "gate_up_proj": (6144, 1024),
    "down_proj": (1024, 3072),
    "lm_head": (151936, 1024),
}


def candidates(m: int, split_k: tuple[int, ...] = (1, 2, 4)) -> list[GemmTile]:
    """About 50 tiles at 256 tokens, 18 at 64 (each one compile): 3-stage pipelines; 8 warps tried on 128-row
    tiles only."""
    smallest = max(16, min(64, 1 << (m - 1).bit_length()))
    out = []
    for bm, bn, bk, split in itertools.product(
        sorted({smallest, 64, 128}), (32, 64, 128), (64, 128), split_k
    ):
        if bm > max(16, 1 << (m - 1).bit_length()):
            continue
        for warps in (4, 8) if bm == 128 else (4,):
            out.append(GemmTile(bm, bn, bk, split, warps, 3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ones_n = torch.ones(n, 1, device="cuda")
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ones_m = torch.ones(m, 1, device="cuda")
            ref = F.linear(x, w).float()
            cublas = graph_time_us(partial(F.linear, x, w))
            # the LM head is wide enough to fill the GPU without splitting K
            tiles = candidates(m, split_k=(1,)) if name == "lm_head" else candidates(m)
            timings = time_tiles(tiles, x, ones_m, w, ones_n, ref)
            row = {"layer": name, "tokens": m, "cublas_us": round(cublas, 2), "best": timings[0] if timings else None,
                   "top3": timings[:3]}  # fmt: skip
            print(json.dumps({k: v for k, v in row.items() if k != "top3"}), flush=True)
            rows.append(row)
            if args.out:  # after every row: a run cut short by its time limit keeps what it measured
                args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
