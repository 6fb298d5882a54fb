"""W2, serving through HTTP: `kubellm serve` with a Llama-3.1-8B-shaped model (random weights) and the
load client in this folder: 500 ShareGPT-like requests (lognormal lengths, mean ~202 prompt / ~179
output tokens, seed 0) at QPS=inf and at 32 QPS. Reports req/s, output tok/s, TTFT, TPOT and ITL p50/p99.

    python3 bench/w2_serving.py --out bench/results/w2_serving_gpu.json

`--sweep FLAG=V1,V2,...` starts one server per value of a `kubellm serve` flag against the same
checkpoint, in one call (e.g. `--sweep max-prefill-tokens-while-decoding=0,2048,auto`: 0 is no cap, auto learns the
step's cost as it serves; `engine-process=off,on`);
every run in the JSON carries the flags its server had.

The checkpoint is written straight from random tensors (no transformers model is built: 8B parameters
initialised on the CPU would take minutes), then served by the real CLI in a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import subprocess
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
from serving_floor import ModelCost, llama_3_1_8b, w2_load_ceiling  # noqa: E402
from step_trace_summary import step_floor_ms, summarize_runs  # noqa: E402
from w1_offline import copy_bandwidth, word_level_tokenizer  # noqa: E402

from engine.cli import build_parser, engine_config  # noqa: E402  (w1_offline put the repo root on the path)


def llama_3_1_8b_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )  # fmt: skip


def write_random_checkpoint(
    config: transformers.LlamaConfig, path: Path, device: str = "cuda", tokenizer=None
) -> None:
    """Hugging Face-named bf16 tensors, N(0, 0.02) (norms at 1), one safetensors shard per 4 layers; the
    tokenizer given, else a word-level one over the whole vocabulary."""
    h, inter = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen, dtype=torch.bfloat16) * 0.02).cpu()

    ones = torch.ones(h, dtype=torch.bfloat16)
    shards = [["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]]
    shards += [
        list(range(i, min(i + 4, config.num_hidden_layers))) for i in range(0, config.num_hidden_layers, 4)
    ]
    weight_map = {}
    for n, content in enumerate(shards):
        if n == 0:
            tensors = {"model.embed_tokens.weight": rand(config.vocab_size, h), "model.norm.weight": ones.clone(),
                       "lm_head.weight": rand(config.vocab_size, h)}  # fmt: skip
        else:
            tensors = {}
            for i in content:
                p = f"model.layers.{i}."
                tensors.update({
                    p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                    p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                    p + "mlp.down_proj.weight": rand(h, inter),
                    p + "input_layernorm.weight": ones.clone(), p + "post_attention_layernorm.weight": ones.clone(),
                })  # fmt: skip
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})  # one shard in host memory at a time
        weight_map.update(dict.fromkeys(tensors, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)
    (tokenizer or word_level_tokenizer(config.vocab_size)).save_pretrained(path)


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """Where the server's threads spend their time (engine loop vs HTTP), without stopping them."""
    import shutil

    exe = shutil.which("py-spy")
    if not seconds or exe is None:
        return None
    target = out.with_suffix(".py-spy.txt")
    command = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
               "--format", "raw", "--threads", "--nonblocking", "--output", str(target)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def sweep_configs(sweep: str | None) -> list[list[str]]:
    """`FLAG=V1,V2` -> [["--FLAG", "V1"], ["--FLAG", "V2"]]; no sweep -> one server with no extra flag.
    A boolean flag's values are on/off: `engine-process=off,on` -> [["--no-engine-process"], ["--engine-process"]]."""
    if not sweep:
        return [[]]
    flag, _, values = sweep.partition("=")
    if not flag or not values:
        raise SystemExit(
            f"--sweep wants FLAG=V1,V2,... (e.g. max-prefill-tokens-while-decoding=0,2048): {sweep!r}"
        )
    flag = flag.removeprefix("--")
    switch = {"on": [f"--{flag}"], "off": [f"--no-{flag}"]}
    return [switch.get(value) or [f"--{flag}", value] for value in values.split(",")]


def served_cost(serve_args: list[str]) -> ModelCost:
    """What a step of the server these flags start costs (bench/serving_floor.py): FP8 linears and K/V as the
    engine's own parser reads the flags."""
    parsed = build_parser().parse_args(["serve", *serve_args])
    config = engine_config(parsed, parsed.command_parser)
    cost = llama_3_1_8b()
    cost = cost.fp8() if config.quantization == "fp8" else cost
    return cost.fp8_kv() if config.kv_cache_dtype != "auto" else cost


def measure_server(serve_args: list[str], vocab_size: int, args: argparse.Namespace, log_path: Path,
                   spy: bool, ceiling: dict) -> dict:  # fmt: skip
    """Start one server, warm it, run every QPS of the load; its start-up time and runs (with --step-trace, each
    run's steps summarized and set against their floor at the ceiling's bandwidth)."""
    measured: dict = {"runs": []}
    trace = log_path.with_suffix(".trace.jsonl") if args.step_trace else None
    starts = []
    with kubellm_serve(serve_args, args.port, log_path, step_trace=trace) as server:
        measured["server_startup_s"] = server.startup_s
        warm = sharegpt_like_requests(16, vocab_size, seed=99)
        asyncio.run(
            run_load(server.url, "llama-8b", warm, math.inf)
        )  # first-request effects out of the numbers
        specs = sharegpt_like_requests(args.num_requests, vocab_size, seed=0)
        for i, qps in enumerate(args.qps):
            profiler = (
                start_py_spy(server.process.pid, args.py_spy, Path(args.out)) if spy and i == 0 else None
            )
            starts.append(time.perf_counter())
            summary = asyncio.run(run_load(server.url, "llama-8b", specs, qps, seed=0))
            if profiler is not None:
                profiler.wait()
            measured["runs"].append(summary)
            print(json.dumps(summary), flush=True)
    if trace and trace.exists():  # written as the server exits
        floor = step_floor_ms(served_cost(serve_args), ceiling["bandwidth"], ceiling["flops"])
        for run, summary in zip(measured["runs"], summarize_runs(trace, starts, floor), strict=True):
            run["step_trace"] = summary
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/w2_serving_gpu.json")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--qps", type=float, nargs="+", default=[math.inf, 32.0])
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument(
        "--server-log", default=None, help="file for the server's output (default: beside --out)"
    )
    parser.add_argument(
        "--py-spy",
        type=float,
        default=0,
        metavar="SECONDS",
        help="sample the server with py-spy (if installed) for this long during the first run (raw stacks beside --out)",
    )
    parser.add_argument(
        "--sweep",
        metavar="FLAG=V1,V2,...",
        help="one server per value of this `kubellm serve` flag, same checkpoint, one call "
        "(e.g. max-prefill-tokens-while-decoding=0,2048,auto)",
    )
    parser.add_argument(
        "--step-trace",
        action="store_true",
        help="record each server's step trace beside its log and summarise it in the JSON, steps against their "
        "floor (bench/diag/step_trace_summary.py)",
    )
    parser.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `kubellm serve` flags"
    )
    args = parser.parse_args()

    config = llama_3_1_8b_config()
    props = torch.cuda.get_device_properties(0)
    result: dict = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                    "model": "Llama-3.1-8B shape, random bf16 weights", "runs": []}  # fmt: skip
    # what an ideal server could reach on this GPU (bench/serving_floor.py), for each run's share of it
    ceiling = result["ceiling"] = w2_load_ceiling(llama_3_1_8b(), copy_bandwidth(), args.num_requests)
    log_path = Path(args.server_log or Path(args.out).with_suffix(".server.log"))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_random_checkpoint(config, Path(tmp))
        torch.cuda.empty_cache()
        result["checkpoint_write_s"] = time.perf_counter() - started
        for n, extra in enumerate(sweep_configs(args.sweep)):
            serve_args = ["--model", tmp, "--served-model-name", "llama-8b", "--dtype", "bfloat16",
                          "--max-model-len", "4096", *args.serve_args, *extra]  # fmt: skip
            label = "-".join(extra).removeprefix("--")  # e.g. max-prefill-tokens-while-decoding-2048
            log = log_path.with_name(f"{log_path.stem}.{label}{log_path.suffix}") if extra else log_path
            if extra:
                print(f"serve {' '.join(extra)}", flush=True)
            measured = measure_server(serve_args, config.vocab_size, args, log, n == 0, ceiling)
            result.setdefault("server_startup_s", measured["server_startup_s"])
            for run in measured["runs"]:
                result["runs"].append({"serve_args": [*args.serve_args, *extra], **run})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nW2 on {props.name}, Llama-3.1-8B shape, {args.num_requests} requests:")
    for r in result["runs"]:
        print(
            f"  {' '.join(r['serve_args']) or 'defaults'}, QPS={r['qps']}: {r['request_throughput']:.1f} req/s, "
            f"{r['output_token_throughput']:.0f} output tok/s, "
            f"TTFT p50/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms, "
            f"TPOT p50/p99 {r['tpot_ms']['p50']:.1f}/{r['tpot_ms']['p99']:.1f} ms, "
            f"ITL p50/p99 {r['itl_ms']['p50']:.1f}/{r['itl_ms']['p99']:.1f} ms, errors {r['errors']}"
        )
    print(
        f"  ceiling at QPS=inf on this GPU ({ceiling['bandwidth'] / 1e12:.2f} TB/s): {ceiling['req_per_s']:.1f} req/s"
    )


if __name__ == "__main__":
    main()
