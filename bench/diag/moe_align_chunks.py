"""The Triton MoE alignment (engine/kernels/moe_align.py) timed per chunk size at decode token counts.

The alignment is the heaviest of a W5 decode layer's small kernels (10.6 µs a layer at 32 sequences on an
H100, 2026-12-07, `w5_step_kernels_h100_2026-12-07e.json`; 7.5 µs at one token, 2026-12-06): each program
works on a [chunk, experts] one-hot, and the chunk was fixed at 128 slots for 128 experts whatever the
batch. This times every chunk size the kernel takes (one launch up to a chunk of slots, count + place
beyond) at each token count, 50 calls in one CUDA graph (as decode steps replay them), against the
default rule (``align_chunk``), and checks each result against the torch alignment.

    python3 bench/diag/moe_align_chunks.py --tokens 1 2 4 8 16 32 64 128 256 512 --out align.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/fp8_gemm_tune's CUDA-graph timer

from fp8_gemm_tune import graph_time_us  # noqa: E402

from engine.kernels.moe_align import (  # noqa: E402
    align_chunk,
    align_slots_by_expert,
    align_slots_by_expert_small,
    chunk_fits,
)

CALLS = 50  # in one graph: a single call's replay would be mostly the replay's own launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--block-m", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(
        f"{torch.cuda.get_device_name()}; {args.experts} experts, top {args.top_k}, block_m {args.block_m}; µs a call"
    )
    for tokens in args.tokens:
        logits = torch.randn(tokens, args.experts, device="cuda", generator=gen)
        ids = logits.topk(args.top_k, dim=-1).indices
        slots = ids.numel()
        want = align_slots_by_expert(ids, args.experts, args.block_m)
        n = int(want.num_padded)
        row: dict = {
            "tokens": tokens,
            "slots": slots,
            "default_chunk": align_chunk(slots, args.experts),
            "us": {},
        }
        chunk = 16
        while chunk <= 1024:
            if chunk_fits(chunk, args.experts):
                got = align_slots_by_expert_small(ids, args.experts, args.block_m, chunk=chunk)
                assert int(got.num_padded) == n and torch.equal(got.sorted_slots[:n], want.sorted_slots[:n])
                assert torch.equal(
                    got.block_expert[: n // args.block_m], want.block_expert[: n // args.block_m]
                )
                row["us"][chunk] = graph_time_us(
                    lambda c=chunk, i=ids: align_slots_by_expert_small(
                        i, args.experts, args.block_m, chunk=c
                    ),
                    calls=CALLS,
                )
            chunk *= 2
        best = min(row["us"], key=row["us"].get)
        row["best_chunk"] = best
        rows.append(row)
        cells = "  ".join(f"{c}: {us:5.1f}" for c, us in row["us"].items())
        print(
            f"{tokens:5d} tokens ({slots:5d} slots): default {row['default_chunk']:4d}, best {best:4d} | {cells}"
        )
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "args": vars(args) | {"out": str(args.out)},
                                        "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
