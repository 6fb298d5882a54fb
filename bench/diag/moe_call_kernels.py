"""Where one fused MoE call's GPU time goes, kernel by kernel (torch profiler, 10 calls after warm-up), at
decode and prefill token counts: the alignment, the activation quantization, both grouped GEMMs, the
top-k sum. Qwen3-30B-A3B's layer (128 experts, top 8, hidden 2048, intermediate 768) by default.

    python3 bench/diag/moe_call_kernels.py --variant fp8-block --tokens 1 64 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/fused_moe_tune's Experts

from fused_moe_tune import VARIANTS, make_experts  # noqa: E402

from engine.kernels.fused_moe import fused_experts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="fp8-block")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 512, 1024, 2048])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    args = parser.parse_args()
    e, k, h, inter = args.experts, args.top_k, args.hidden, args.inter
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device="cuda", generator=gen, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, inter, device="cuda", generator=gen, dtype=torch.bfloat16) * inter**-0.5
    experts = make_experts(args.variant, w13, w2)
    print(f"{torch.cuda.get_device_name()}; {args.variant}; µs per call by kernel (launches per call)")
    for tokens in args.tokens:
        x = torch.randn(tokens, h, device="cuda", generator=gen, dtype=torch.bfloat16)
        weights, ids = torch.randn(tokens, e, device="cuda", generator=gen).softmax(-1).topk(k, dim=-1)

        def call(x=x, weights=weights, ids=ids) -> torch.Tensor:
            return fused_experts(x, experts.w13, experts.w2, weights, ids, **experts.scales)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        rows = [ev for ev in prof.key_averages() if ev.device_time_total > 0]
        total = sum(ev.device_time_total for ev in rows) / 10
        print(f"{tokens:6d} tokens: {total:8.1f} µs")
        for ev in sorted(rows, key=lambda ev: -ev.device_time_total):
            print(f"        {ev.device_time_total / 10:8.1f} µs x{ev.count // 10} {ev.key[:80]}")


if __name__ == "__main__":
    main()
