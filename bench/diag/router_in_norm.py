"""The norm before FP8 experts computing the router's logits too, against the router's own product, timed.

A W5 decode layer runs the post-attention norm (ExpertInputRMSNorm: output as it is and in float8), then the
router's matrix product (cuBLAS, 5.4 µs a layer at 32 sequences on an H100, 2026-12-07,
`w5_step_kernels_h100_2026-12-07e.json`), then its top-k. With ``router`` the norm's kernel computes the
logits too (engine/kernels/fp8_producers.py: ROUTER_EXPERTS logits a program, the norm recomputed in each).
This times, per token count, the three launches (norm, F.linear, topk_softmax) against the two (norm with
logits, topk_softmax), 50 calls in one CUDA graph, for each experts-per-program in --experts-per-program, and
checks the logits against F.linear's within a bf16 step. It prints the largest token count at which the
fused pair wins at every smaller count: the value for KUBELLM_ROUTER_IN_NORM_TOKENS
(engine/kernels/fused_layers.py's router_in_norm_tokens).

    python3 bench/diag/router_in_norm.py --tokens 1 4 8 16 32 64 128 256 --out router_in_norm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/fp8_gemm_tune's CUDA-graph timer

from fp8_gemm_tune import graph_time_us  # noqa: E402

from engine.kernels import fp8_producers  # noqa: E402
from engine.kernels.fp8_producers import rms_norm_fp8_and_float  # noqa: E402
from engine.kernels.moe_router import topk_softmax  # noqa: E402

CALLS = 50  # in one graph: a single call's replay would be mostly the replay's own launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--group", type=int, default=128)  # the block-FP8 checkpoint's activation groups
    parser.add_argument("--experts-per-program", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf16 = torch.bfloat16
    n = args.hidden
    weight = (torch.rand(n, device="cuda", generator=gen) + 0.5).to(bf16)
    router = (torch.randn(args.experts, n, device="cuda", generator=gen) * n**-0.5).to(bf16)
    default_per_program = fp8_producers.ROUTER_EXPERTS
    rows = []
    print(f"{torch.cuda.get_device_name()}; hidden {n}, {args.experts} experts, top {args.top_k}; µs a call")
    for tokens in args.tokens:
        x = torch.randn(tokens, n, device="cuda", generator=gen).to(bf16) * 3
        residual = torch.randn(tokens, n, device="cuda", generator=gen).to(bf16)

        def separate(x: torch.Tensor = x, residual: torch.Tensor = residual) -> None:
            out, _, _, _ = rms_norm_fp8_and_float(x, weight, 1e-6, residual, args.group)
            topk_softmax(F.linear(out, router), args.top_k, True)

        def fused(x: torch.Tensor = x, residual: torch.Tensor = residual) -> None:
            _, _, _, logits = rms_norm_fp8_and_float(x, weight, 1e-6, residual, args.group, router)
            assert logits is not None
            topk_softmax(logits, args.top_k, True)

        row: dict = {"tokens": tokens, "separate_us": graph_time_us(separate, calls=CALLS), "fused_us": {}}
        for per_program in args.experts_per_program:
            fp8_producers.ROUTER_EXPERTS = per_program
            out, _, _, logits = rms_norm_fp8_and_float(x, weight, 1e-6, residual, args.group, router)
            torch.testing.assert_close(logits, F.linear(out, router), rtol=2**-7, atol=2**-7)
            row["fused_us"][per_program] = graph_time_us(fused, calls=CALLS)
        fp8_producers.ROUTER_EXPERTS = default_per_program
        row["best_per_program"] = min(row["fused_us"], key=row["fused_us"].get)
        rows.append(row)
        cells = "  ".join(f"{e}/program: {us:5.1f}" for e, us in row["fused_us"].items())
        print(f"{tokens:5d} tokens: separate {row['separate_us']:5.1f} | fused {cells}")
    wins = 0
    for row in rows:  # the token counts in the order given; the fused pair's best must win at each
        if row["fused_us"][row["best_per_program"]] >= row["separate_us"]:
            break
        wins = row["tokens"]
    print(f"fused wins up to {wins} tokens (KUBELLM_ROUTER_IN_NORM_TOKENS={wins})")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "args": vars(args) | {"out": str(args.out)},
                                        "rows": rows, "router_in_norm_tokens": wins}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
