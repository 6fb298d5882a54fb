"""FP8 GEMM shapes of the 8B model: bfloat16 F.linear against Fp8Linear's FP8 paths (torch._scaled_mm
with row-wise scales; the Triton kernel of engine/kernels/fp8_gemm.py per channel and with 128-wide group
scales, at its chosen tiles; `fp8_linear`: whichever of the two Fp8Linear takes for per-channel weights)
and one candidate (torch._scaled_mm with DeepSeek-style block scales, 1x128 activations and
128x128 weights, which cuBLAS offers on Hopper: `scaled_mm_block_us`, -1 where this torch refuses it),
activation quantization included (the one-kernel quantize_activations the layer uses; the
torch reference quantize_rows alone as `quant_torch_us` beside it as `quant_us`), per token count. Timed
inside a CUDA graph (as decode steps run; eager timings of small shapes measure the host's kernel launches,
not the GPU), or eagerly with --eager (as prefill runs). Decides which path a shape takes
(engine/model/fp8.py uses _scaled_mm for per-channel weights); needs a GPU of compute capability 8.9+.

    python bench/fp8_gemm.py [--tokens 1 16 64 256 1024 4096] [--model qwen3-30b-a3b]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kernels.fp8_gemm import beats_scaled_mm, fp8_gemm  # noqa: E402
from engine.kernels.fp8_quant import quantize_activations  # noqa: E402
from engine.model.fp8 import quantize_rows  # noqa: E402

MODELS = {  # the linears' (out, in)
    "llama-3-8b": {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
                   "down_proj": (4096, 14336)},
    # W5: Qwen3-30B-A3B's attention projections, block FP8 in Qwen3-30B-A3B-FP8 (its experts run the fused MoE)
    "qwen3-30b-a3b": {"qkv_proj": (5120, 2048), "o_proj": (2048, 4096)},
}  # fmt: skip


def scaled_mm(x: torch.Tensor, wq: torch.Tensor, ws_row: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_activations(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16)


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, ws_row: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_activations(x)
    if not beats_scaled_mm(x.shape[0], wq.shape[0]):
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16)
    return fp8_gemm(xq, xs, wq, ws_row, torch.bfloat16)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (multiples of 128) -> float8 and one scale per 128x128 block [N/128, K/128] (as Qwen3-FP8)."""
    n, k = w.shape
    blocks = w.float().reshape(n // 128, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).reshape(n, k)
    return q, scale


def scaled_mm_block(x: torch.Tensor, wq: torch.Tensor, block_scales_t: torch.Tensor) -> torch.Tensor:
    """block_scales_t: the weight's [out/128, in/128] scales transposed, as _scaled_mm takes them."""
    xq, xs = quantize_activations(x, 128)
    xs = xs.t().contiguous().t()  # cuBLAS wants the activation scales M-major
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=block_scales_t, out_dtype=torch.bfloat16)


def time_or_refused(bench, fn) -> float:
    try:
        fn()
        torch.cuda.synchronize()
    except RuntimeError as exc:  # this torch / cuBLAS does not take the recipe
        print(f"refused: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return -1.0
    return round(bench(fn) * 1e3, 1)


def triton_gemm(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, group: int | None) -> torch.Tensor:
    xq, xs = quantize_activations(x, group)
    return fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    parser.add_argument(
        "--eager", action="store_true", help="time without a CUDA graph (host launches included)"
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3-8b")
    args = parser.parse_args()
    bench = do_bench if args.eager else do_bench_cudagraph
    for name, (n, k) in MODELS[args.model].items():
        w = torch.randn(n, k, device="cuda") * 0.02
        w_bf16 = w.bfloat16()
        wq, ws = quantize_rows(w)
        wq_block, ws_block = quantize_rows(w, 128)
        wq_blocks, block_scales = quantize_blocks(w)
        w_blocks = (
            wq_blocks.float().reshape(n // 128, 128, k // 128, 128) * block_scales[:, None, :, None]
        ).reshape(n, k)
        ws_row = ws.reshape(1, n).contiguous()
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            paths = {
                "bf16": partial(F.linear, x, w_bf16),
                "scaled_mm": partial(scaled_mm, x, wq, ws_row),
                "fp8_linear": partial(fp8_linear, x, wq, ws_row),  # what Fp8Linear runs (per-channel)
                "scaled_mm_block": partial(scaled_mm_block, x, wq_blocks, block_scales.t()),
                "triton_channel": partial(triton_gemm, x, wq, ws, None),
                "triton_block": partial(triton_gemm, x, wq_block, ws_block, 128),
                "quant": partial(quantize_activations, x),
                "quant_torch": partial(quantize_rows, x),
            }
            row: dict[str, object] = {
                "model": args.model,
                "layer": name,
                "tokens": m,
                "timing": "eager" if args.eager else "cuda_graph",
            }
            row.update({f"{label}_us": time_or_refused(bench, fn) for label, fn in paths.items()})
            if row["scaled_mm_block_us"] >= 0:  # right numbers, not only accepted shapes: against float32
                xq, xs = quantize_activations(x, 128)
                ref = (xq.float().reshape(m, -1, 128) * xs[:, :, None]).reshape(m, k) @ w_blocks.T
                out = scaled_mm_block(x, wq_blocks, block_scales.t()).float()
                row["scaled_mm_block_rel_err"] = round(((out - ref).norm() / ref.norm()).item(), 5)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
