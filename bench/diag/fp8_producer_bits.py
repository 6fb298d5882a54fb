"""How often the FP8-writing RMSNorm (engine/kernels/fp8_producers.py) differs from the unfused norm then
quantization, and by how much (the norm's float32 sum may be reduced in another order)."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from engine.kernels.fp8_producers import rms_norm_fp8  # noqa: E402
from engine.kernels.fp8_quant import quantize_activations  # noqa: E402
from engine.kernels.rmsnorm import rms_norm  # noqa: E402

torch.manual_seed(0)
for t, group, res in [(2048, None, False), (2048, 128, False), (2048, None, True), (256, None, False)]:
    bad_q = bad_s = rows_bad = 0
    maxrel = maxdiff = 0.0
    for _ in range(5):
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16) * 3
        r = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16) if res else None
        w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
        out, _ = rms_norm_fp8(x, w, 1e-6, r, group)
        ref = rms_norm(x, w, 1e-6, r)
        ref = ref[0] if res else ref
        q, s = quantize_activations(ref, group)
        dq = out.q.view(torch.uint8) != q.view(torch.uint8)
        bad_q += int(dq.sum())
        rows_bad += int(dq.any(1).sum())
        bad_s += int((out.scale != s).sum())
        maxrel = max(maxrel, float(((out.scale - s).abs() / s).max()))
        maxdiff = max(
            maxdiff, float(((out.q.float() - q.float()).abs() / q.float().abs().clamp(min=2**-6)).max())
        )
    print(t, group, res, "q mismatches", bad_q, "rows", rows_bad, "scale mismatches", bad_s,
          "max scale rel", maxrel, "max q rel", maxdiff, flush=True)  # fmt: skip
