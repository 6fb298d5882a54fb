"""Block-FP8 activations quantized inside the GEMMs against a separate quantization kernel, one process, same
weights (issue 14's W5: its decode steps at few sequences are launch-bound). Qwen3-30B-A3B-FP8's layer: the
qkv and o linears (engine/kernels/fp8_gemm.py, a_scale None or quantize_activations first) and the fused MoE
call (engine/kernels/fused_moe.py, QUANTIZE_IN_GEMM_MAX_TOKENS set to the token count or 0), each timed in a CUDA graph, the
linears over weight copies spanning 4x the L2 cache. Prints µs per layer both ways and the difference over
48 layers.

    python3 bench/diag/quant_in_gemm.py [--tokens 1 8 16 64 256] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from bf16_decode_linears import rotating_time_us  # noqa: E402
from fused_moe_tune import make_experts  # noqa: E402

import engine.kernels.fused_moe as fused_moe  # noqa: E402
from engine.kernels.fp8_gemm import fp8_gemm  # noqa: E402
from engine.kernels.fp8_quant import quantize_activations  # noqa: E402
from engine.model.fp8 import quantize_rows  # noqa: E402

LINEARS = {"qkv_proj": (5120, 2048), "o_proj": (2048, 4096)}  # Qwen3-30B-A3B: 32 + 2 x 4 heads of 128
EXPERTS, TOP_K, HIDDEN, INTER, GROUP = 128, 8, 2048, 768, 128


def linear_us(m: int, n: int, k: int, inside: bool) -> float:
    copies = max(2, -(-4 * torch.cuda.get_device_properties(0).L2_cache_size // (n * k)))
    weights = [quantize_rows(torch.randn(n, k, device="cuda") * 0.02, GROUP) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def apart(wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_activations(x, GROUP)
        return fp8_gemm(xq, xs, wq, ws, torch.bfloat16, GROUP)

    calls = [partial(fp8_gemm, x, None, wq, ws, torch.bfloat16, GROUP) if inside else partial(apart, wq, ws)
             for wq, ws in weights]  # fmt: skip
    return rotating_time_us(calls)


def moe_us(m: int, experts, inside: bool) -> float:
    x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(m, EXPERTS, device="cuda")
    weights, ids = torch.softmax(logits, -1).topk(TOP_K, -1)
    saved = fused_moe.QUANTIZE_IN_GEMM_MAX_TOKENS
    fused_moe.QUANTIZE_IN_GEMM_MAX_TOKENS = m if inside else 0
    try:
        call = partial(
            fused_moe.fused_experts, x, experts.w13, experts.w2, weights, ids, None, **experts.scales
        )
        return rotating_time_us([call])
    finally:
        fused_moe.QUANTIZE_IN_GEMM_MAX_TOKENS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 64, 256])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", dtype=torch.bfloat16) * 0.02
    experts = make_experts("fp8-block", w13, w2)
    del w13, w2
    result = {"device": torch.cuda.get_device_name(0), "rows": []}
    for m in args.tokens:
        row: dict = {"tokens": m}
        for inside in (False, True):
            key = "inside" if inside else "apart"
            row[key] = {name: round(linear_us(m, n, k, inside), 2) for name, (n, k) in LINEARS.items()}
            row[key]["moe"] = round(moe_us(m, experts, inside), 2)
            row[key]["layer"] = round(sum(row[key].values()), 2)
        row["saved_ms_per_48_layers"] = round(48 * (row["apart"]["layer"] - row["inside"]["layer"]) / 1e3, 3)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
