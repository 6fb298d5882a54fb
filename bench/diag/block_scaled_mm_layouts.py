"""Which token counts cuBLAS's block-scaled torch._scaled_mm (1 x 128 activation and 128 x 128 weight scales)
takes, and whether padding the activation scales' leading dimension to a multiple of 4 helps, each against the
float32 product of the dequantized operands (Qwen3-30B-A3B's qkv_proj: 5120 x 2048; two small shapes).

    python3 bench/diag/block_scaled_mm_layouts.py

H100, torch 2.11.0+cu130 (2026-12-07), 5120 x 2048: multiples of 4 tokens (128, 132, 136, 144, 2,048) give
bfloat16's rounding (1.7e-3); every other count (129, 130, 257, 1,037) is refused (CUBLAS_STATUS_NOT_SUPPORTED),
and with a padded leading dimension torch refuses it ("Invalid scaling configuration"). The two small shapes
were added after that run (not yet run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine.kernels.fp8_quant import quantize_activations  # noqa: E402
from engine.model.fp8 import dequantize_rows  # noqa: E402


def m_major(scales: torch.Tensor) -> torch.Tensor:
    """[M, K/128] scales with M as the fastest dimension, as cuBLAS reads them."""
    return scales.t().contiguous().t()


def m_major_padded(scales: torch.Tensor) -> torch.Tensor:
    """The same, its leading dimension padded to a multiple of 4 (16 bytes)."""
    m = scales.shape[0]
    padded = F.pad(scales.t(), (0, -m % 4)).contiguous()
    return padded[:, :m].t()


def main() -> None:
    torch.manual_seed(0)
    # Qwen3-30B-A3B's qkv_proj, then the tiny test models' qkv (2 input blocks) and o/down (4): whether the weight
    # scales' leading dimension (in / 128) must be a multiple of 4 as the activations' is
    for k, n in ((2048, 5120), (256, 768), (512, 256)):
        blocks = (torch.randn(n, k, device="cuda") * 0.05).reshape(n // 128, 128, k // 128, 128)
        block_scales = blocks.abs().amax(dim=(1, 3)) / 448
        wq = (blocks / block_scales[:, None, :, None]).to(torch.float8_e4m3fn).reshape(n, k)
        w = (wq.float().reshape(n // 128, 128, k // 128, 128) * block_scales[:, None, :, None]).reshape(n, k)
        for m in (128, 129, 130, 132, 136, 144, 257, 1037, 2048) if k == 2048 else (128, 448):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_activations(x, 128)
            ref = dequantize_rows(xq, xs, torch.float32, 128) @ w.T
            results = []
            for layout in (m_major, m_major_padded):
                try:
                    out = torch._scaled_mm(
                        xq, wq.t(), scale_a=layout(xs), scale_b=block_scales.t(), out_dtype=torch.bfloat16
                    )
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    results.append(f"{layout.__name__} rel err {err:.2e}")
                except RuntimeError as exc:
                    results.append(f"{layout.__name__} refused: {str(exc).splitlines()[0][:120]}")
            print(f"{n} x {k}, {m} tokens:", " | ".join(results), flush=True)


if __name__ == "__main__":
    main()
