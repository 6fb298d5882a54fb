"""The fused MoE kernel's block configurations, timed: for each token count, engine.kernels.fused_moe's
default choice (choose_block_config) against a sweep, each as a CUDA graph replayed 20 times, and the
weight-read floor (the experts the tokens chose, read once, at the measured copy bandwidth).

    python3 bench/fused_moe_tune.py --out bench/results/fused_moe_tune_gpu.json     # Qwen3-30B-A3B layer
    python3 bench/fused_moe_tune.py --experts 8 --top-k 2 --hidden 4096 --inter 14336   # Mixtral 8x7B

Where the sweep's best beats the default by more than noise, choose_block_config is what to change
(then W5 says whether the engine felt it). About 5 minutes for the default shape on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append(str(Path(__file__).resolve().parent))  # w1_offline's copy_bandwidth

from w1_offline import copy_bandwidth  # noqa: E402

from engine.kernels.fused_moe import MoeBlockConfig, choose_block_config, fused_experts  # noqa: E402


def candidates(num_slots: int, num_experts: int) -> list[MoeBlockConfig]:
    per_expert = num_slots / num_experts
    block_ms = [16, 32] if per_expert <= 32 else [32, 64, 128]
    out = []
    for bm, bn, bk, warps, stages in itertools.product(block_ms, [32, 64, 128], [64, 128], [4, 8], [3, 4]):
        if bm * bn >= 128 * 128 and warps == 4:
            continue  # two fp32 accumulators of that size spill with 4 warps
        out.append(
            MoeBlockConfig(
                bm, bn, bk, group_m=1 if per_expert <= 16 else 8, num_warps=warps, num_stages=stages
            )
        )
    return out


def time_config(x, w13, w2, weights, ids, config: MoeBlockConfig) -> float | None:
    """Milliseconds per call, from a CUDA graph of the call (as decode steps run it)."""
    try:
        fused_experts(x, w13, w2, weights, ids, config)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_experts(x, w13, w2, weights, ids, config)
    except Exception:  # out of shared memory or registers for this tile shape
        return None
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/fused_moe_tune_gpu.json")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256, 512, 2048, 8192]
    )
    args = parser.parse_args()

    copy_bw = copy_bandwidth()
    e, k, h, inter = args.experts, args.top_k, args.hidden, args.inter
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device="cuda", generator=gen, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, inter, device="cuda", generator=gen, dtype=torch.bfloat16) * inter**-0.5
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, h, device="cuda", generator=gen, dtype=torch.bfloat16)
        logits = torch.randn(tokens, e, device="cuda", generator=gen)
        weights, ids = logits.softmax(-1).topk(k, dim=-1)
        active = ids.unique().numel()
        floor_ms = active * 3 * h * inter * 2 / copy_bw * 1e3
        default = choose_block_config(tokens * k, e)
        timed = [(time_config(x, w13, w2, weights, ids, c), c) for c in candidates(tokens * k, e)]
        timed = [(ms, c) for ms, c in timed if ms is not None]
        best_ms, best = min(timed, key=lambda t: t[0])
        default_ms = time_config(x, w13, w2, weights, ids, default)
        rows.append({"tokens": tokens, "active_experts": active, "floor_ms": floor_ms, "default": vars(default),
                     "default_ms": default_ms, "best": vars(best), "best_ms": best_ms})  # fmt: skip
        print(f"{tokens:5d} tokens: default {default_ms:.3f} ms ({100 * floor_ms / default_ms:.0f}% of floor), "
              f"best {best_ms:.3f} ms {vars(best)}", flush=True)  # fmt: skip
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "shape": {"experts": e, "top_k": k, "hidden": h, "inter": inter},
              "copy_bandwidth_TBps": copy_bw / 1e12, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
