"""W5, a mixture-of-experts model served through HTTP: `kubellm serve` with the Qwen3-30B-A3B shape
(48 layers, 128 experts of intermediate size 768, 8 active per token; random bf16 weights) and the W2
load client (500 ShareGPT-like requests, seed 0, at QPS=inf and 32 QPS). Then, in this process:
decode steps (captured CUDA graphs, CUDA-event timed) against their bandwidth floor, and transformers'
own MoE forward (`generate`, static batches; its default experts implementation) as the baseline.

    python3 bench/w5_moe.py --out bench/results/w5_moe_gpu.json
    python3 bench/w5_moe.py --quantization none fp8 --hf-requests 0    # bf16, then online FP8, one checkpoint

With `--quantization fp8` the same bf16 checkpoint is served with `kubellm serve --quantization fp8` (online
W8A8: every linear below the LM head, the experts included, in float8 with per-channel scales), and its
floor and ceiling count those weights at a byte each (bench/serving_floor.py's ModelCost.fp8). Several values
serve one after the other from one checkpoint, each with its own figures, so FP8 and its bf16 baseline come
from one call.

    python3 bench/w5_moe.py --checkpoint fp8-block --hf-requests 0     # the FP8 checkpoint as published

With `--checkpoint fp8-block` the checkpoint is written as Qwen/Qwen3-30B-A3B-FP8 publishes it (HF
`quant_method: fp8`: every attention and expert projection in float8 e4m3 with a float32 `weight_scale_inv`
per 128 x 128 block; router, embeddings, norms and LM head in bf16; 31 GB at 48 layers, so all 48 fit an
80 GB GPU) and served without `--quantization`: the engine reads the scheme from config.json. Its floor
and ceiling count the decoder layers' weights at a byte each, as online FP8's.

Needs one GPU that holds the 61 GB of weights plus a KV cache (an H200; an 80 GB H100 runs it with
`--num-layers 24`, which halves the model, and says so in the results). The checkpoint (61 GB) is
written to /dev/shm when it has room (the serving machines' disks are small), else to the temp dir.

The floor of a decode step of B sequences at context C reads, once: every non-expert weight (attention,
norms, routers, the LM head), the experts the step's tokens chose (counted: an eager forward of the same
inputs with the routers hooked; what uniform routing would choose, E * (1 - (1 - k/E)^B), is reported
beside it), and B * C tokens of K/V, at the measured device-to-device copy bandwidth. Served in FP8, the
decoder layers' weights count a byte each (their scales, under 2 %, are left out); the LM head and the
K/V stay bf16.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE))  # appended: bench/kernels.py must not shadow the `kernels` package
sys.path.append(str(HERE / "diag"))

from kubellm_server import kubellm_serve  # noqa: E402
from load_client import run_load, sharegpt_like_requests  # noqa: E402
from serving_floor import ModelCost, qwen3_30b_a3b, w2_load_ceiling  # noqa: E402
from step_trace_summary import step_floor_ms, summarize_runs  # noqa: E402
from w1_offline import copy_bandwidth, time_decode_forward, word_level_tokenizer  # noqa: E402

SERVED_NAME = "qwen3-30b-a3b"
DECODE_SHAPES = ((1, 1024), (16, 1024), (64, 1024), (256, 1024))  # batch, context


def qwen3_30b_a3b_config(num_layers: int = 48) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645,
    )  # fmt: skip


CHECKPOINTS = ("bf16", "fp8-block")
FP8_BLOCK = 128  # Qwen3-30B-A3B-FP8's weight_block_size: [128, 128]
FP8_MAX = 448.0  # engine/model/quantization.py's FP8_MAX and FP8_MIN_SCALE
FP8_MIN_SCALE = 1e-12


def quantize_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 weights and one float32 scale per [block, block] tile (the last ones may be short), on
    w's device: scale = amax / 448 (at least 1e-12), real weight = float8 * scale."""
    rows, cols = w.shape
    grid_r, grid_c = -(-rows // block), -(-cols // block)
    padded = torch.nn.functional.pad(w.float(), (0, grid_c * block - cols, 0, grid_r * block - rows))
    tiles = padded.view(grid_r, block, grid_c, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (tiles / scale[:, None, :, None]).view(grid_r * block, grid_c * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale


def fp8_block_quantization_config(config: transformers.Qwen3MoeConfig) -> dict:
    """Qwen/Qwen3-30B-A3B-FP8's quantization_config: the LM head and every router stay bf16."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            "modules_to_not_convert": ["lm_head", *(f"model.layers.{i}.mlp.gate"
                                                    for i in range(config.num_hidden_layers))]}  # fmt: skip


def write_random_checkpoint(
    config: transformers.Qwen3MoeConfig, path: Path, device: str = "cuda", checkpoint: str = "bf16"
) -> None:
    """Hugging Face-named bf16 tensors as the hub stores Qwen3-MoE (each expert apart), N(0, 0.02),
    norms at 1, one safetensors shard per 2 layers (2.5 GB of host memory at a time).

    checkpoint="fp8-block": the same random values, then as Qwen/Qwen3-30B-A3B-FP8 publishes them: every
    attention q/k/v/o and expert gate/up/down projection in float8 e4m3 with a float32 `weight_scale_inv`
    per 128 x 128 block (quantized on `device`), the router, embeddings, norms and LM head in bf16, and
    `quant_method: fp8` in config.json."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint {checkpoint!r}: one of {CHECKPOINTS}")
    h, inter, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen, dtype=torch.bfloat16) * 0.02).cpu()

    def rand_linear(tensors: dict[str, torch.Tensor], name: str, *shape: int) -> None:
        w = torch.randn(*shape, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
        if checkpoint == "bf16":
            tensors[name] = w.cpu()
            return
        weight, scale = quantize_fp8_blocks(w)
        tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = weight.cpu(), scale.cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(config.vocab_size, h), "model.norm.weight": ones(h),
         "lm_head.weight": rand(config.vocab_size, h)}
    ]  # fmt: skip
    weight_map: dict[str, str] = {}
    num_shards = 1 + -(-config.num_hidden_layers // 2)

    def save(n: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{n + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    save(0, shards.pop())
    for n, first in enumerate(range(0, config.num_hidden_layers, 2), start=1):
        tensors: dict[str, torch.Tensor] = {}
        for i in range(first, min(first + 2, config.num_hidden_layers)):
            p = f"model.layers.{i}."
            # drawn in the bf16 writer's order, so both checkpoints hold the same random values
            rand_linear(tensors, p + "self_attn.q_proj.weight", q, h)
            rand_linear(tensors, p + "self_attn.k_proj.weight", kv, h)
            rand_linear(tensors, p + "self_attn.v_proj.weight", kv, h)
            rand_linear(tensors, p + "self_attn.o_proj.weight", h, q)
            tensors.update({
                p + "self_attn.q_norm.weight": ones(config.head_dim), p + "self_attn.k_norm.weight": ones(config.head_dim),
                p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
                p + "mlp.gate.weight": rand(e, h),  # random routers: tokens spread about evenly
            })  # fmt: skip
            for x in range(e):
                rand_linear(tensors, p + f"mlp.experts.{x}.gate_proj.weight", inter, h)
                rand_linear(tensors, p + f"mlp.experts.{x}.up_proj.weight", inter, h)
                rand_linear(tensors, p + f"mlp.experts.{x}.down_proj.weight", h, inter)
        save(n, tensors)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)
    # the hub's quantization_config, written into config.json as is (no transformers round trip)
    if checkpoint == "fp8-block":
        saved = json.loads((path / "config.json").read_text())
        saved["quantization_config"] = fp8_block_quantization_config(config)
        (path / "config.json").write_text(json.dumps(saved, indent=2))
    word_level_tokenizer(config.vocab_size).save_pretrained(path)


def checkpoint_bytes(config: transformers.Qwen3MoeConfig, checkpoint: str = "bf16") -> int:
    """The weights' bytes on disk: bf16 throughout, or a byte per quantized weight plus its block scales."""
    total = parameter_counts(config)["total"]
    if checkpoint == "bf16":
        return 2 * total
    h, inter = config.hidden_size, config.moe_intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    blocks = lambda rows, cols: -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)  # noqa: E731
    shapes = [(q, h), (kv, h), (kv, h), (h, q)] + [(inter, h), (inter, h), (h, inter)] * config.num_experts
    quantized = config.num_hidden_layers * sum(r * c for r, c in shapes)
    scales = config.num_hidden_layers * sum(blocks(r, c) for r, c in shapes)
    return quantized + 4 * scales + 2 * (total - quantized)


def checkpoint_parent(config: transformers.Qwen3MoeConfig, checkpoint: str = "bf16") -> str | None:
    needed = checkpoint_bytes(config, checkpoint) * 1.05
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > needed else None


def parameter_counts(config: transformers.Qwen3MoeConfig) -> dict[str, int]:
    h, layers, e, k = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_experts,
        config.num_experts_per_tok,
    )
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = h * (q + 2 * kv) + q * h + 2 * config.head_dim + 2 * h + e * h  # with norms and router
    expert = 3 * h * config.moe_intermediate_size
    return {"non_expert_per_layer": attention, "per_expert": expert, "lm_head": config.vocab_size * h,
            "total": layers * (attention + e * expert) + 2 * config.vocab_size * h + h,
            "active": layers * (attention + k * expert) + 2 * config.vocab_size * h + h}  # fmt: skip


def decode_step_floor_ms(
    config: transformers.Qwen3MoeConfig,
    batch: int,
    context: int,
    copy_bw: float,
    distinct: float | None = None,
    layer_weight_bytes: int = 2,
    kv_bytes: int = 2,
) -> float:
    """distinct: experts the step's tokens chose, per layer on average (None: what uniform routing expects).
    layer_weight_bytes: per weight of each decoder layer (2 bf16, 1 FP8); the LM head stays bf16.
    kv_bytes: per K/V value (2 bf16, 1 with an FP8 KV cache)."""
    counts = parameter_counts(config)
    e, k, layers = config.num_experts, config.num_experts_per_tok, config.num_hidden_layers
    if distinct is None:
        distinct = e * (1 - (1 - k / e) ** batch)
    layer_params = layers * (counts["non_expert_per_layer"] + distinct * counts["per_expert"])
    weight_bytes = layer_weight_bytes * layer_params + 2 * counts["lm_head"]
    kv_read = batch * context * 2 * layers * config.num_key_value_heads * config.head_dim * kv_bytes
    return (weight_bytes + kv_read) / copy_bw * 1e3


def serve_and_load(
    path: Path,
    args,
    vocab_size: int,
    result: dict,
    quantization: str,
    extra: list[str],
    name: str,
    cost: ModelCost,
) -> None:
    """One server (the flags `extra` beside the run's own) under the load; its files are named by `name`.
    `cost` (the ceiling's): the step trace's steps against their floor."""
    serve_args = ["--model", str(path), "--served-model-name", SERVED_NAME, "--dtype", "bfloat16",
                  "--max-model-len", "4096", *quantization_args(quantization), *kv_cache_args(args.kv_cache_dtype),
                  *extra]  # fmt: skip
    log_path = Path(args.out).with_suffix(f".{name}.server.log")
    trace = Path(args.out).with_suffix(f".{name}.trace.jsonl") if args.step_trace else None
    serve(serve_args, args, log_path, vocab_size, result, trace)
    if trace and trace.exists():  # written as the server exits
        ceiling = result["ceiling"]
        floor = step_floor_ms(cost, ceiling["bandwidth"], ceiling["flops"])
        summaries = summarize_runs(trace, [r["started"] for r in result["runs"]], floor)
        for run, summary in zip(result["runs"], summaries, strict=True):
            run["step_trace"] = summary


def serve(
    serve_args: list[str], args, log_path: Path, vocab_size: int, result: dict, trace: Path | None = None
) -> None:
    with kubellm_serve(
        serve_args, args.port, log_path, timeout=900, stop_timeout=120, step_trace=trace
    ) as server:
        result["server_startup_s"] = server.startup_s
        warm = sharegpt_like_requests(16, vocab_size, seed=99)
        asyncio.run(
            run_load(server.url, SERVED_NAME, warm, math.inf)
        )  # first-request effects out of the numbers
        specs = sharegpt_like_requests(args.num_requests, vocab_size, seed=0)
        for qps in args.qps:
            started = time.perf_counter()
            summary = asyncio.run(run_load(server.url, SERVED_NAME, specs, qps, seed=0))
            result["runs"].append({**summary, "started": started})
            print(json.dumps(summary), flush=True)


def quantization_args(quantization: str) -> list[str]:
    return [] if quantization == "none" else ["--quantization", quantization]


def kv_cache_args(kv_cache_dtype: str) -> list[str]:
    return [] if kv_cache_dtype == "auto" else ["--kv-cache-dtype", kv_cache_dtype]


def served_in_fp8(quantization: str, checkpoint: str) -> bool:
    return quantization != "none" or checkpoint == "fp8-block"


def served_label(quantization: str, checkpoint: str, kv_cache_dtype: str = "auto") -> str:
    """What ran, for the summary: bf16, fp8 (online, from the bf16 checkpoint) or the FP8 checkpoint, and
    whether the KV cache was FP8."""
    if checkpoint == "fp8-block":
        label = "fp8-block checkpoint"
    else:
        label = "bf16" if quantization == "none" else f"{quantization} (online, bf16 checkpoint)"
    return label + (", FP8 KV" if kv_cache_dtype == "fp8" else "")


def routed_experts_per_layer(engine, batch: int) -> float:
    """Distinct experts per layer (mean) that the last time_decode_forward's inputs route to, from one eager
    forward of the same captured bucket (its padding rows included: the graph computes them too)."""
    from engine.model.moe import TopKRouter

    graphs = engine.runner.cuda_graphs
    bs = next(b for b in graphs.buckets if b >= batch)
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(int(out[1].unique().numel())))
             for m in engine.runner.model.modules() if isinstance(m, TopKRouter)]  # fmt: skip
    try:
        with torch.inference_mode():
            graphs._forward(bs)
        torch.cuda.synchronize()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(seen) / len(seen)


def decode_steps_against_floor(
    path: Path,
    config,
    copy_bw: float,
    quantization: str,
    checkpoint: str = "bf16",
    kv_cache_dtype: str = "auto",
) -> list[dict]:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.model.loader import load_model

    engine_config = EngineConfig(model=str(path), device="cuda", dtype="bfloat16", max_model_len=4096,
                                 max_num_seqs=256, gpu_memory_utilization=0.9,
                                 quantization=None if quantization == "none" else quantization,
                                 kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    engine = LLMEngine(engine_config, load_model(engine_config))
    weight_bytes = 1 if served_in_fp8(quantization, checkpoint) else 2
    kv_bytes = 1 if kv_cache_dtype == "fp8" else 2
    rows = []
    for batch, context in DECODE_SHAPES:
        measured = time_decode_forward(engine, batch, context)
        uniform = decode_step_floor_ms(config, batch, context, copy_bw, None, weight_bytes, kv_bytes)
        distinct = None if measured is None else routed_experts_per_layer(engine, batch)
        floor = decode_step_floor_ms(config, batch, context, copy_bw, distinct, weight_bytes, kv_bytes)
        rows.append({"batch": batch, "context": context, "measured_ms": measured, "floor_ms": floor,
                     "routed_experts_per_layer": distinct, "floor_ms_uniform_routing": uniform,
                     "pct_of_floor": None if measured is None else 100 * floor / measured})  # fmt: skip
        print(rows[-1], flush=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def tuned_config_files() -> list[str]:
    """The fused MoE configuration files the engine can read on this run (engine/kernels/moe_tuned_configs.py:
    $KUBELLM_MOE_CONFIG_DIR, then the repo's); the server log says which one each layer took."""
    from engine.kernels.moe_tuned_configs import search_dirs

    return sorted(str(p) for d in search_dirs() if d.is_dir() for p in d.glob("*.json"))


def hf_static_generate(
    path: Path, num_requests: int, vocab_size: int, batch_size: int = 64, checkpoint: str = "bf16"
) -> dict:
    """transformers `generate` over the first requests of the same workload, left-padded static batches
    of 64, each batch decoding to its longest output (greedy, no eos). An FP8 checkpoint loads through
    transformers' own fine-grained FP8 path, straight onto the GPU (a quantized model is not moved)."""
    model, forward = load_hf_model(path, checkpoint)
    model.generation_config.eos_token_id = None
    specs = sharegpt_like_requests(num_requests, vocab_size, seed=0)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(0, len(specs), batch_size):
        batch = specs[i : i + batch_size]
        width = max(len(s.prompt_token_ids) for s in batch)
        ids = torch.tensor(
            [[0] * (width - len(s.prompt_token_ids)) + s.prompt_token_ids for s in batch], device="cuda"
        )
        mask = (torch.arange(width, device="cuda")[None, :] >= width - torch.tensor(
            [len(s.prompt_token_ids) for s in batch], device="cuda")[:, None]).long()  # fmt: skip
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(s.max_tokens for s in batch),
                           do_sample=False, pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    output_tokens = sum(s.max_tokens for s in specs)  # what the requests asked for (padding rows not counted)
    implementation = getattr(model.config, "_experts_implementation", None)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"requests": len(specs), "seconds": seconds, "request_throughput": len(specs) / seconds,
            "output_token_throughput": output_tokens / seconds, "experts_implementation": implementation,
            "forward": forward}  # fmt: skip


def load_hf_model(path: Path, checkpoint: str, device: str = "cuda") -> tuple[torch.nn.Module, str]:
    """The checkpoint in transformers on ``device``, and in words which forward it runs. transformers' FP8
    matmuls come from the Hugging Face hub through the `kernels` package, fetched on the first forward,
    which a machine without network cannot do (an ImportError then): the FP8 checkpoint is then
    dequantized to bfloat16 at load (transformers' own `dequantize=True`), so the baseline is
    transformers' MoE forward on the same weights in bfloat16, and the result says so."""
    if checkpoint == "bf16":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
        return model.eval(), "bfloat16"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=device
        )
        with torch.no_grad():
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
        return model.eval(), "FP8 (transformers' fine-grained FP8 kernels)"
    except ImportError as exc:  # "finegrained-fp8 kernel unavailable: `kernels` is either not installed ..."
        reason = str(exc).splitlines()[0][:120]
    model = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map=device,
        quantization_config=transformers.FineGrainedFP8Config(dequantize=True),
    )  # fmt: skip
    return model.eval(), f"bfloat16, dequantized from the FP8 checkpoint at load ({reason})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/w5_moe_gpu.json")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--qps", type=float, nargs="+", default=[math.inf, 32.0])
    parser.add_argument("--num-layers", type=int, default=48, help="fewer layers for GPUs under ~100 GB")
    parser.add_argument(
        "--quantization", nargs="+", choices=["none", "fp8"], default=["none"],
        help="serve the bf16 checkpoint as is (none) and/or with `kubellm serve --quantization fp8`, in turn",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", choices=CHECKPOINTS, default="bf16",
        help="bf16, or fp8-block: float8 weights with 128x128 block scales as Qwen3-30B-A3B-FP8 (served as is)",
    )  # fmt: skip
    parser.add_argument(
        "--hf-requests", type=int, default=64, help="requests for the transformers baseline (0: skip)"
    )
    parser.add_argument(
        "--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
        help="fp8: serve (and time decode steps) with an e4m3 KV cache; floors and ceiling count K/V at a byte",
    )  # fmt: skip
    parser.add_argument(
        "--step-trace", action="store_true",
        help="record the server's step trace beside --out and summarise it in the JSON (bench/diag/step_trace_summary.py)",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=8325)
    parser.add_argument(
        "--also-serve", action="append", default=[], metavar="FLAGS",
        help="serve the checkpoint again with these `kubellm serve` flags instead of --serve-args' (one string, "
             "e.g. '--max-piecewise-graph-tokens 0'; repeatable): a baseline under the same load in the same call",
    )  # fmt: skip
    parser.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `kubellm serve` flags"
    )
    args = parser.parse_args()
    if args.checkpoint == "fp8-block" and args.quantization != ["none"]:
        parser.error("--checkpoint fp8-block is served as written (the engine reads its FP8 scheme from "
                     "config.json): leave --quantization out")  # fmt: skip

    config = qwen3_30b_a3b_config(args.num_layers)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    counts = parameter_counts(config)
    result: dict = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "copy_bandwidth_TBps": copy_bw / 1e12,
                    "model": f"Qwen3-30B-A3B shape ({args.num_layers} layers), random weights, "
                             + ("bf16 checkpoint" if args.checkpoint == "bf16"
                                else "block-FP8 checkpoint (as Qwen3-30B-A3B-FP8)"),
                    "checkpoint": args.checkpoint, "checkpoint_bytes": checkpoint_bytes(config, args.checkpoint),
                    "parameters": counts, "served": {}, "moe_configs": tuned_config_files(),
                    "environment": {k: v for k, v in os.environ.items() if k.startswith("KUBELLM_")}}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a later failure keeps the earlier numbers
        out.write_text(json.dumps(result, indent=1))

    print(f"{props.name}; copy bandwidth {copy_bw / 1e12:.2f} TB/s; {counts['total'] / 1e9:.1f}B parameters, "
          f"{counts['active'] / 1e9:.1f}B active", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=checkpoint_parent(config, args.checkpoint)) as tmp:
        path = Path(tmp)
        started = time.perf_counter()
        write_random_checkpoint(config, path, checkpoint=args.checkpoint)
        torch.cuda.empty_cache()
        result["checkpoint_write_s"] = time.perf_counter() - started
        for quantization in args.quantization:
            cost = qwen3_30b_a3b(args.num_layers)
            # what an ideal server could reach on this GPU with evenly spread routing (bench/serving_floor.py)
            fp8 = served_in_fp8(quantization, args.checkpoint)
            cost = cost.fp8() if fp8 else cost
            cost = cost.fp8_kv() if args.kv_cache_dtype == "fp8" else cost
            ceiling = w2_load_ceiling(cost, copy_bw, args.num_requests)
            served = result["served"][quantization] = {"serve_flags": quantization_args(quantization)
                                                                       + kv_cache_args(args.kv_cache_dtype)
                                                                       + args.serve_args,
                                                       "checkpoint": args.checkpoint,
                                                       "label": served_label(quantization, args.checkpoint,
                                                                             args.kv_cache_dtype),
                                                       "ceiling": ceiling, "runs": []}  # fmt: skip
            serve_and_load(
                path, args, config.vocab_size, served, quantization, args.serve_args, quantization, cost
            )
            save()
            for i, flags in enumerate(args.also_serve):
                extra = shlex.split(flags)
                other = result["served"][f"{quantization} {flags}"] = {
                    **served, "label": f"{served['label']}, {flags}", "runs": [],
                    "serve_flags": quantization_args(quantization) + kv_cache_args(args.kv_cache_dtype) + extra,
                }  # fmt: skip
                serve_and_load(
                    path, args, config.vocab_size, other, quantization, extra, f"{quantization}.also{i}", cost
                )
                save()
            served["decode_steps"] = decode_steps_against_floor(
                path, config, copy_bw, quantization, args.checkpoint, args.kv_cache_dtype
            )
            save()
        if args.hf_requests:
            try:
                result["hf_static_generate"] = hf_static_generate(
                    path, args.hf_requests, config.vocab_size, checkpoint=args.checkpoint
                )
            except Exception as exc:  # a baseline failing must not lose our own numbers
                result["hf_static_generate"] = {"error": repr(exc)[:500]}
            result["hf_static_generate"]["checkpoint"] = args.checkpoint
            save()

    print(f"\nW5 on {props.name}, {result['model']}, {args.num_requests} requests:")
    for served in result["served"].values():
        print(f" {served['label']}:")
        for r in served["runs"]:
            print(
                f"  QPS={r['qps']}: {r['request_throughput']:.1f} req/s, {r['output_token_throughput']:.0f} output tok/s, "
                f"TTFT p50/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms, "
                f"TPOT p50/p99 {r['tpot_ms']['p50']:.1f}/{r['tpot_ms']['p99']:.1f} ms, errors {r['errors']}"
            )
            if "step_trace" in r:
                print(
                    f"   step trace: {json.dumps({k: v for k, v in r['step_trace'].items() if k != 'file'})}"
                )
        print(
            f"  ceiling at QPS=inf on this GPU, uniform routing: {served['ceiling']['req_per_s']:.1f} req/s"
        )
        for row in served.get("decode_steps", []):  # the --also-serve baselines time none
            pct = "" if row["pct_of_floor"] is None else f" ({row['pct_of_floor']:.0f} % of it)"
            print(
                f"  decode step {row['batch']} x {row['context']}: {row['measured_ms']} ms, "
                f"floor {row['floor_ms']:.2f} ms{pct}"
            )
    hf = result.get("hf_static_generate", {})
    if "request_throughput" in hf:
        print(
            f"  transformers generate, {args.checkpoint} checkpoint (first {hf['requests']}): "
            f"{hf['request_throughput']:.2f} req/s; forward: {hf['forward']}"
        )
    elif "error" in hf:
        print(f"  transformers generate, {args.checkpoint} checkpoint: failed ({hf['error'][:200]})")


if __name__ == "__main__":
    main()
