"""Where a step's GPU time goes, kernel by kernel: bf16 against FP8 (W8A8) and FP8 + an FP8 KV cache, for
issue 13's W2-FP8 bar (>= 1.3x bf16's req/s; 1.15x on an H100 on 2026-12-05, while the FP8 GEMMs alone
were ~1.5x faster on the MLP shapes).

For each variant, one engine over the same random checkpoint (W2's Llama-3.1-8B shape), then under
torch.profiler:
- decode: for each `--batch` size (W2's long tail runs under 30 sequences, its crowded middle at 200-500),
  that many sequences at `--context` tokens of context, `--steps` steady decode steps (CUDA graphs as
  served, unless --eager; the graphs' kernels are reported one by one);
- prefill: `--prefill-seqs` fresh prompts of `--prefill-len` tokens, one token each (eager, as served).
Kernels are summed by category (GEMM, FP8 quantization, attention, norms, rotary, activation, KV write,
sampling, other), per step, with the top kernels by time.

    python3 bench/diag/step_kernels.py --out step_kernels.json                 # CUDA, ~4 min
    python3 bench/diag/step_kernels.py --device cpu --tiny --out /tmp/sk.json  # the plumbing, on the CPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model.loader import load_model  # noqa: E402
from engine.sampling.params import SamplingParams  # noqa: E402

VARIANTS = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8_fp8kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}
# First match wins; names as CUDA, cuBLAS(Lt), CUTLASS and our Triton kernels report them.
CATEGORIES = [
    ("moe", r"_moe_gemm_kernel|_place_chunk_kernel|_count_chunk_kernel|_align|_topk_softmax|moe"),
    ("fp8_quant", r"_quantize"),
    ("attention", r"attention|attn|flash|_fwd_kernel|decode_kernel|prefill_kernel|reduce_splits"),
    # Since 2026-12-08 the GPU's K/V write runs inside the rotary's launch (counted as rotary); this category
    # holds it only for code before that (or write_kv=True callers).
    ("kv_write", r"reshape_and_cache|index_copy"),
    (
        "gemm",
        r"gemm|gemv|nvjet|xmma|cutlass|cublas|sm90_|sm80_|_fp8_gemm|matmul|splitk|aten::mm|aten::addmm|_linear",
    ),
    ("norm", r"rms_norm|rmsnorm|layer_norm"),
    ("rotary", r"rotary|rope"),
    ("activation", r"silu|gelu|act_and_mul"),
    ("sampling", r"gumbel|chunk_stats|pick_token|argmax|softmax|topk|sort|exponential|bitmask"),
]


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_checkpoint(shape: str, tiny: bool) -> Path:
    """W2's Llama-3.1-8B (Llama tensors written directly), W1's Qwen3-0.6B (transformers' own init) or W5's
    Qwen3-30B-A3B as its block-FP8 checkpoint (bench/w5_moe.py's writer; served as published, so the
    variant to ask for is `bf16`: no --quantization)."""
    path = Path(tempfile.mkdtemp(prefix="step-kernels-"))
    if shape == "qwen3-30b-a3b-fp8":
        w5 = load_bench_module("w5_moe")
        config = w5.qwen3_30b_a3b_config(2 if tiny else 48)
        if tiny:
            config.vocab_size, config.num_experts, config.hidden_size, config.moe_intermediate_size = (
                1000,
                8,
                256,
                128,
            )
        w5.write_random_checkpoint(config, path, device="cuda" if torch.cuda.is_available() else "cpu",
                                   checkpoint="fp8-block")  # fmt: skip
        return path
    if shape == "qwen3-0.6b":
        w1 = load_bench_module("w1_offline")
        config = w1.qwen3_0_6b_config()
        if tiny:
            config = transformers.Qwen3Config(
                **(config.to_dict() | {"num_hidden_layers": 2, "vocab_size": 1000, "layer_types": None})
            )
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        w1.word_level_tokenizer(config.vocab_size).save_pretrained(path)
        return path
    w2 = load_bench_module("w2_serving")
    config = w2.llama_3_1_8b_config()
    if tiny:
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 2
        config.num_attention_heads, config.num_key_value_heads, config.vocab_size = 4, 2, 1000
    w2.write_random_checkpoint(config, path, device="cuda" if torch.cuda.is_available() else "cpu")
    return path


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def summarize(prof, steps: int, device: str) -> dict:
    by_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if us <= 0 or (device == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        by_kernel[event.key] += us
    by_category: dict[str, float] = defaultdict(float)
    for name, us in by_kernel.items():
        by_category[category(name)] += us
    total = sum(by_category.values())
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "ms_per_step": round(total / steps / 1e3, 3),
        "ms_per_step_by_category": {k: round(v / steps / 1e3, 3) for k, v in sorted(by_category.items())},
        "top_kernels_ms_per_step": [(name[:120], round(us / steps / 1e3, 3)) for name, us in top],
    }


def measure(path: Path, variant: dict, args) -> dict:
    budget = max(args.prefill_seqs * args.prefill_len, *args.batch, 2048)
    # The batch's prompts take ceil(batch x context / budget) steps to prefill, and the sequences prefilled
    # first decode a token in each of them (steps without a prefill cap: fewest): every sequence must still
    # be running when the profiled steps come, so each may produce that many more tokens.
    setup_tokens = -(-max(args.batch) * args.context // budget) + 8
    max_tokens = setup_tokens + 2 * args.steps + 16
    config = EngineConfig(
        model=str(path), device=args.device, max_model_len=args.context + max_tokens + 16,
        max_num_seqs=max(*args.batch, args.prefill_seqs), enforce_eager=args.eager,
        max_num_batched_tokens=budget, max_prefill_tokens_while_decoding=0,
        **({"gpu_memory_utilization": 0.85} if args.device == "cuda" else {"dtype": "float32"}), **variant,
    )  # fmt: skip
    engine = LLMEngine(config, load_model(config))
    rng = random.Random(0)
    vocab = engine.vocab_size
    activity = [ProfilerActivity.CUDA] if args.device == "cuda" else [ProfilerActivity.CPU]
    result: dict = {}
    try:
        for batch in args.batch:  # decode: every sequence prefilled first (not profiled), then steady steps
            for i in range(batch):
                prompt = [rng.randrange(10, vocab) for _ in range(args.context)]
                params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=args.temperature)
                engine.add_request(f"d{i}", prompt, params)
            while engine.scheduler.num_waiting or any(
                s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
            ):
                engine.step()
            for _ in range(3):
                engine.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            # Wall time first, unprofiled: above the kernels' sum, the step waits on the host
            started = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - started) * 1e3 / args.steps
            with profile(activities=activity) as prof:
                for _ in range(args.steps):
                    engine.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            running = engine.scheduler.running  # what the profiled steps decoded (a check on the set-up)
            if len(running) != batch:
                raise RuntimeError(f"{len(running)} of {batch} sequences still decoding: the set-up is wrong")
            result[f"decode_b{batch}"] = summarize(prof, args.steps, args.device) | {
                "wall_ms_per_step": round(wall_ms, 3),
                "sequences_decoding": len(running),
                "mean_context_tokens": round(
                    sum(s.num_computed_tokens for s in running) / max(1, len(running))
                ),
            }
            for i in range(batch):
                engine.abort_request(f"d{i}")
            while engine.has_unfinished():
                engine.step()
        # prefill: fresh prompts, one output token each, in one step where the budget allows
        # fresh prompts each time (a repeated one would be a prefix-cache hit): to warm the prefill shapes,
        # for the wall time unprofiled (against the kernels' sum: what launching eagerly costs), profiled
        warm, timed, prompts = (
            [[rng.randrange(10, vocab) for _ in range(args.prefill_len)] for _ in range(args.prefill_seqs)]
            for _ in range(3)
        )
        engine.generate(warm, SamplingParams(max_tokens=1))
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        engine.generate(timed, SamplingParams(max_tokens=1))
        if args.device == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3
        with profile(activities=activity) as prof:
            engine.generate(prompts, SamplingParams(max_tokens=1))
            if args.device == "cuda":
                torch.cuda.synchronize()
        result["prefill"] = summarize(prof, 1, args.device) | {"wall_ms": round(wall_ms, 3)}
    finally:
        engine.close()
        del engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=["llama-3.1-8b", "qwen3-0.6b", "qwen3-30b-a3b-fp8"],
                        help="W2's model, W1's or W5's (its block-FP8 checkpoint: with --variants bf16)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0, help="W1 samples at 0.6")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (the CPU's plumbing check)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 16])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prefill-seqs", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs in decode")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    path = write_checkpoint(args.shape, args.tiny)
    results = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "args": vars(args),
        "variants": {},
    }
    for name in args.variants:
        results["variants"][name] = measure(path, VARIANTS[name], args)
        for phase, r in results["variants"][name].items():
            print(json.dumps({"variant": name, "phase": phase, "ms_per_step": r["ms_per_step"],
                              "wall_ms_per_step": r.get("wall_ms_per_step", r.get("wall_ms")),
                              **r["ms_per_step_by_category"]}))  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
