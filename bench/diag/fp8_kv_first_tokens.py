"""Is online FP8 (W8A8) + an FP8 KV cache missing bf16's first tokens quantization noise, or a fault?

The model and prompts of tests/gpu/test_fp8_engine_on_gpu.py::test_online_fp8_with_fp8_kv_cache (the
tiny random Llama of tests/gpu/test_engine_on_gpu.py, weights N(0, 0.1), seed 1234; prompts(8, seed=6,
hi=100)), all prompts in one engine at once as the test runs them. For each engine variant (bf16;
--quantization fp8 only; --kv-cache-dtype fp8 only; both; both with a simulated fault: K read back at 4x
the scale it was written with) and transformers float32 (the reference), the first token's logprobs
over the whole vocabulary. Per prompt it prints bf16's top-1 margin (top1 - top2 logprob), each
variant's greedy token, its largest |logprob - bf16 logprob| over bf16's top-5 and the same against
float32 over float32's top-5; then the test's verdict (tests/gpu/fp8_first_tokens.py) on the real
combination and on the faulty one.

Reading it: the combination's error about the sum of the parts' (ratio near 1 or below) and flips only
where bf16's margin is below that error: noise. The combination far above the sum: a fault (the 4x K
scale row shows what one looks like).

    python3 bench/diag/fp8_kv_first_tokens.py --out fp8_kv.json                      # CUDA, ~30 s
    python3 bench/diag/fp8_kv_first_tokens.py --device cpu --out /tmp/fp8_kv.json    # the plumbing
    python3 bench/diag/fp8_kv_first_tokens.py --device cpu --emulate-w8a8 --out /tmp/fp8_kv.json

On the CPU, --quantization fp8 runs dequantized weights with float activations (weight-only); with
--emulate-w8a8 each FP8 linear's input is also rounded to e4m3 per token first, as the GPU's FP8 GEMM
does (a swap for this diagnosis only), so the CPU approximates the GPU's numerics. The FP8 KV cache is
real e4m3 on both devices.

Needs torch, transformers and the repository (engine/, tests/gpu/'s helpers); run from the repo root.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "gpu")]

from fp8_first_tokens import (  # noqa: E402
    TOP,
    VARIANTS,
    FirstToken,
    combination_verdict,
    error_over_top,
    first_tokens,
    k_read_at_wrong_scale,
    margin,
    prompts,
)
from gpu_random_model import save_random_checkpoint  # noqa: E402
from small_engine import small_engine  # noqa: E402
from test_engine_on_gpu import FAMILIES  # noqa: E402

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model.fp8 import Fp8Linear, quantize_rows  # noqa: E402

FAULT_FACTOR = 4.0


def emulate_w8a8(eng: LLMEngine) -> None:
    """CPU only: each FP8 linear rounds its input to e4m3 per token (one scale per row, as
    Fp8Linear._forward_fp8 does) before its dequantized-weight matmul."""
    for module in eng.runner.model.modules():
        if isinstance(module, Fp8Linear):
            inner = module.forward

            def forward(x: torch.Tensor, inner: Callable = inner) -> torch.Tensor:
                q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
                return inner((q.float() * scale).to(x.dtype).view_as(x))

            module.forward = forward


def hf_first_tokens(path: Path, ps: list[list[int]], device: str) -> list[FirstToken]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    result = []
    with torch.no_grad():
        for p in ps:
            lp = model(torch.tensor([p], device=device)).logits[0, -1].float().log_softmax(-1).cpu()
            result.append(FirstToken(int(lp.argmax()), lp))
    return result


def run_variant(path, ps, device, vocab, overrides, emulate, fault: float | None) -> list[FirstToken]:
    """One engine's first tokens; `fault`: K read back at that many times its scale."""

    def build_and_run(after_load: Callable[[LLMEngine], None] | None) -> list[FirstToken]:
        eng = small_engine(path, device=device, **overrides)
        if emulate and "quantization" in overrides:
            emulate_w8a8(eng)
        if after_load is not None:
            after_load(eng)
        got = first_tokens(eng, ps, vocab)
        assert eng.kv.num_free_blocks == eng.kv.pool.num_blocks
        eng.close()
        return got

    if fault is None:
        return build_and_run(None)
    with k_read_at_wrong_scale(device, fault) as set_scales:
        return build_and_run(set_scales)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--fault-factor",
        type=float,
        default=FAULT_FACTOR,
        help="the simulated fault: K read at this x its scale",
    )
    parser.add_argument(
        "--emulate-w8a8",
        action="store_true",
        help="CPU only: round the FP8 linears' inputs to e4m3 per token",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu)")
    if args.emulate_w8a8 and args.device == "cuda":
        parser.error("--emulate-w8a8 is for the CPU: the GPU runs FP8 GEMMs")
    t0 = time.perf_counter()
    config = FAMILIES["llama"]()
    vocab = config.vocab_size
    ps = prompts(8, seed=6, hi=100)
    fault = f"both_k_read_{args.fault_factor:g}x"
    runs: dict[str, list[FirstToken]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_checkpoint(config, Path(tmp) / "float", weight_std=0.1)
        runs["float32_transformers"] = hf_first_tokens(path, ps, args.device)
        for name, overrides in VARIANTS.items():
            runs[name] = run_variant(path, ps, args.device, vocab, overrides, args.emulate_w8a8, None)
        runs[fault] = run_variant(
            path, ps, args.device, vocab, VARIANTS["both"], args.emulate_w8a8, args.fault_factor
        )

    bf16, f32 = runs["bf16"], runs["float32_transformers"]
    variants = [n for n in runs if n not in ("float32_transformers",)]
    linears = "FP8 GEMMs (W8A8)"
    if args.device == "cpu":
        linears = (
            "dequantized weights, inputs rounded to e4m3 (W8A8 emulated)"
            if args.emulate_w8a8
            else "dequantized weights, float inputs (weight-only)"
        )
    print(f"{len(ps)} prompts of {[len(p) for p in ps]} tokens on {args.device}; FP8 linears: {linears}")
    print(
        f"errors: max |logprob - ref| over ref's top-{TOP}; 'tok' the greedy token (* = differs from bf16's)"
    )
    header = f"{'prompt':>6} {'bf16 margin':>11} {'f32 margin':>10} |" + "".join(
        f" {n[:22]:>22} |" for n in variants
    )
    print(header)
    per_prompt = []
    for i in range(len(ps)):
        row = {
            "prompt": i,
            "length": len(ps[i]),
            "bf16_margin": margin(bf16[i].logprobs),
            "float32_margin": margin(f32[i].logprobs),
            "float32_token": f32[i].token,
            "variants": {},
        }
        cells = []
        for n in variants:
            r = runs[n][i]
            v = {
                "token": r.token,
                "flipped_vs_bf16": r.token != bf16[i].token,
                "flipped_vs_float32": r.token != f32[i].token,
                "max_err_vs_bf16_top5": error_over_top(r.logprobs, bf16[i].logprobs),
                "max_err_vs_float32_top5": error_over_top(r.logprobs, f32[i].logprobs),
            }
            row["variants"][n] = v
            star = "*" if v["flipped_vs_bf16"] else " "
            cells.append(
                f" tok{r.token:>4}{star} {v['max_err_vs_bf16_top5']:5.3f}/{v['max_err_vs_float32_top5']:5.3f}"
            )
        per_prompt.append(row)
        print(
            f"{i:>6} {row['bf16_margin']:>11.3f} {row['float32_margin']:>10.3f} |" + " |".join(cells) + " |"
        )
    print(f"{'':>30}(each cell: token, error vs bf16 / vs float32)")

    summary = {}
    for n in variants:
        vs = [row["variants"][n] for row in per_prompt]
        summary[n] = {
            "worst_err_vs_bf16": max(v["max_err_vs_bf16_top5"] for v in vs),
            "worst_err_vs_float32": max(v["max_err_vs_float32_top5"] for v in vs),
            "first_tokens_equal_bf16": sum(not v["flipped_vs_bf16"] for v in vs),
            "first_tokens_equal_float32": sum(not v["flipped_vs_float32"] for v in vs),
        }
        s = summary[n]
        print(
            f"  {n:22s} worst err vs bf16 {s['worst_err_vs_bf16']:.3f}, vs float32 {s['worst_err_vs_float32']:.3f};"
            f" first token = bf16's {s['first_tokens_equal_bf16']}/8, = float32's {s['first_tokens_equal_float32']}/8"
        )
    parts = summary["fp8_linears"]["worst_err_vs_bf16"] + summary["fp8_kv"]["worst_err_vs_bf16"]
    ratio = summary["both"]["worst_err_vs_bf16"] / parts if parts else float("inf")
    per_prompt_ratio = [
        row["variants"]["both"]["max_err_vs_bf16_top5"]
        / max(
            row["variants"]["fp8_linears"]["max_err_vs_bf16_top5"]
            + row["variants"]["fp8_kv"]["max_err_vs_bf16_top5"],
            1e-9,
        )
        for row in per_prompt
    ]
    flips_explained = [
        {
            "prompt": row["prompt"],
            "bf16_margin": row["bf16_margin"],
            "err_both": row["variants"]["both"]["max_err_vs_bf16_top5"],
            "margin_below_error": row["bf16_margin"] < 2 * row["variants"]["both"]["max_err_vs_bf16_top5"],
        }
        for row in per_prompt
        if row["variants"]["both"]["flipped_vs_bf16"]
    ]
    print(f" both / (linears + kv), worst over prompts: {ratio:.2f}; per prompt: "
          + " ".join(f"{r:.2f}" for r in per_prompt_ratio))  # fmt: skip
    print(" flips of 'both' against bf16: "
          + (", ".join(f"p{f['prompt']} (margin {f['bf16_margin']:.3f}, err {f['err_both']:.3f})"
                       for f in flips_explained) or "none"))  # fmt: skip

    verdicts = {}
    for name in ("both", fault):
        v = combination_verdict(bf16, runs["fp8_linears"], runs["fp8_kv"], runs[name])
        verdicts[name] = v.as_dict()
        print(f" the test on {name}: {'PASS' if v.passes else 'FAIL'}: {v.explain()}")

    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "fp8_linears": linears,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_lengths": [len(p) for p in ps],
        "per_prompt": per_prompt,
        "summary": summary,
        "both_over_sum_of_parts": ratio,
        "both_over_sum_of_parts_per_prompt": per_prompt_ratio,
        "flips_of_both": flips_explained,
        "test_verdicts": verdicts,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
