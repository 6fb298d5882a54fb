"""The MoE router's top-k computed by the alignment's first launch (engine.kernels.moe_align.route_and_align)
against the router's own kernel then the alignment, timed at decode token counts.

A W5 decode layer ran the router's top-k (4.6 µs a layer on an H100, 2026-12-07) and then the alignment
(one launch up to 32 slots, count + place beyond): the top-k's tokens are the alignment's, so its first launch
can pick them. Each way 50 calls in one CUDA graph (as decode steps replay them), bf16 logits as the router's
product gives them; each result checked against the other's (the same experts and alignment).

    python3 bench/diag/route_in_alignment.py --tokens 1 2 4 8 16 32 64 128 256 512 --out route.json
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

from engine.kernels.fused_moe import choose_fp8_block_config  # noqa: E402
from engine.kernels.moe_align import align_slots_by_expert_small, route_and_align  # noqa: E402
from engine.kernels.moe_router import topk_softmax  # noqa: E402

CALLS = 50  # in one graph: a single call's replay would be mostly the replay's own launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--renormalize", action="store_true", help="as Mixtral (Qwen3-30B-A3B does not)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts, top_k, renormalize = args.experts, args.top_k, args.renormalize
    print(f"{torch.cuda.get_device_name()}; {experts} experts, top {top_k}; µs a call")
    rows = []
    for tokens in args.tokens:
        logits = torch.randn(tokens, experts, device="cuda", generator=gen).to(torch.bfloat16)
        block_m = choose_fp8_block_config(tokens * top_k, experts, 128).block_m

        def two_launches(lg: torch.Tensor = logits, bm: int = block_m) -> tuple:
            weights, ids = topk_softmax(lg, top_k, renormalize)
            return weights, ids, align_slots_by_expert_small(ids, experts, bm)

        def routed(lg: torch.Tensor = logits, bm: int = block_m) -> tuple:
            return route_and_align(lg, top_k, renormalize, bm)

        w0, i0, a0 = two_launches()
        w1, i1, a1 = routed()
        n = int(a0.num_padded)
        assert torch.equal(i0, i1), tokens  # the same experts; weights to the last bit (route_tokens)
        torch.testing.assert_close(w0, w1, rtol=1e-6, atol=1e-9)
        assert n == int(a1.num_padded) and torch.equal(a0.sorted_slots[:n], a1.sorted_slots[:n]), tokens
        row = {
            "tokens": tokens,
            "router_then_alignment_us": graph_time_us(two_launches, calls=CALLS),
            "routed_in_alignment_us": graph_time_us(routed, calls=CALLS),
        }
        rows.append(row)
        print(f"{tokens:5d} tokens: router then alignment {row['router_then_alignment_us']:5.1f}, "
              f"routed in the alignment {row['routed_in_alignment_us']:5.1f}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "args": vars(args) | {"out": str(args.out)},
                                        "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
