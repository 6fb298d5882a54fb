"""The engine's host cost per token read (issues 10 and 13), measured on the CPU with the model nearly free.

On an H100 a decode step of 256 rows is host-bound: the step's tokens arrive and the engine hands each to
its request (StepPipeline._read → Scheduler.append_token and LLMEngine._accept_token: stop checks,
incremental detokenization, stop strings, metrics, a RequestOutput). That code is the same on the CPU, so
here a real LLMEngine (a tiny random Llama: hidden 64, 1 layer, the embedded SmolLM2 tokenizer) runs
`--requests` decodes at once with async scheduling, as on a GPU, and detokenization on, and each step is
split into:

- `read`: `pipeline._read` once the step's tokens are on the host (the wait for them is left out),
  per token read;
- `rest`: the rest of `LLMEngine.step` except `runner.launch` (the forward and sampler, which dominate on
  the CPU and are not what this measures) and the wait: scheduling, the scheduler's bookkeeping, the
  per-step metrics and gauges; per token read.

Every request decodes `--decode-steps` tokens with `ignore_eos` (what the structured-outputs and W1 benches
do) at temperature 0.8, so the tokens are spread over the vocabulary as a random model's are. The
first round warms up; the median over the others is reported. `--profile` prints a cProfile of
`_read` (cumulative) for one more round.

    python3 bench/diag/engine_read_cost.py [--requests 256] [--decode-steps 64] [--rounds 5] [--profile 30]
    python3 bench/diag/engine_read_cost.py --stop "\\n\\n" --logprobs 1   # requests that ask for more
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling structured_host_cost.py

import structured_host_cost  # noqa: E402


def tiny_model_dir(path: str | None) -> str:
    """A 1-layer Llama of hidden 64 over the SmolLM2 vocabulary (made once into `path` when given)."""
    if path and (Path(path) / "config.json").exists():
        return path
    return structured_host_cost.tiny_model_dir(structured_host_cost.smollm2_tokenizer(None), 1, path)


class StepClock:
    """Wraps the engine's pipeline to time `_read` (less the wait for tokens) and `runner.launch`."""

    def __init__(self, engine) -> None:
        self.read_s = 0.0
        self.launch_s = 0.0
        self.wait_s = 0.0
        self.tokens = 0
        self.profiler: cProfile.Profile | None = None
        pipeline, runner = engine.pipeline, engine.runner
        read, launch = pipeline._read, runner.launch

        def timed_read(launched):
            t0 = time.perf_counter()
            launched.sample.result()  # the wait (cached: `_read` gets the same result at once)
            t1 = time.perf_counter()
            if self.profiler is not None:
                self.profiler.enable()
            outputs = read(launched)
            if self.profiler is not None:
                self.profiler.disable()
            self.read_s += time.perf_counter() - t1
            self.wait_s += t1 - t0
            self.tokens += len(outputs)
            return outputs

        def timed_launch(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return launch(*args, **kwargs)
            finally:
                self.launch_s += time.perf_counter() - t0

        pipeline._read = timed_read
        runner.launch = timed_launch

    def reset(self) -> None:
        self.read_s = self.launch_s = self.wait_s = 0.0
        self.tokens = 0


def one_round(engine, clock: StepClock, args, vocab: int, tag: str) -> dict:
    from engine.sampling.params import SamplingParams

    rng = random.Random(args.requests)
    params = SamplingParams(
        temperature=0.8, max_tokens=args.decode_steps, ignore_eos=True, stop=args.stop,
        logprobs=args.logprobs, seed=None,
    )  # fmt: skip
    for i in range(args.requests):
        prompt = [rng.randrange(100, vocab) for _ in range(args.prompt_len)]
        engine.add_request(f"{tag}-{i}", prompt, params)
    # Prefill first: only decode steps are timed.
    while engine.scheduler.num_waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    clock.reset()
    steps, started = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    total = time.perf_counter() - started
    rest = total - clock.read_s - clock.launch_s - clock.wait_s
    return {
        "steps": steps,
        "tokens_read": clock.tokens,
        "read_us_per_token": clock.read_s / clock.tokens * 1e6,
        "rest_us_per_token": rest / clock.tokens * 1e6,
        "read_ms_per_step": clock.read_s / steps * 1e3,
        "launch_ms_per_step": clock.launch_s / steps * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--stop", nargs="*", default=[], help="stop strings for every request")
    parser.add_argument("--logprobs", type=int, default=None, help="logprobs for every request")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile _read: top N rows")
    parser.add_argument("--model-dir", default=None, help="reuse (or make once) the tiny model here")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.model.loader import load_model

    torch.set_num_threads(1)  # the forward is not measured; keep it off the other core
    model_dir = tiny_model_dir(args.model_dir)
    config = EngineConfig(
        model=model_dir, device="cpu", dtype="float32", async_scheduling=True,
        max_num_seqs=args.requests, max_num_batched_tokens=max(2048, args.requests),
        max_model_len=args.prompt_len + args.decode_steps + 16,
    )  # fmt: skip
    engine = LLMEngine(config, load_model(config))
    clock = StepClock(engine)
    vocab = engine.vocab_size
    try:
        rounds = [one_round(engine, clock, args, vocab, f"r{i}") for i in range(args.rounds + 1)][1:]
        profile = None
        if args.profile:
            clock.profiler = cProfile.Profile()
            one_round(engine, clock, args, vocab, "profile")
            out = io.StringIO()
            pstats.Stats(clock.profiler, stream=out).sort_stats("cumulative").print_stats(args.profile)
            profile = out.getvalue()
    finally:
        engine.close()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
        "requests": args.requests,
        "decode_steps": args.decode_steps,
        "stop": args.stop,
        "logprobs": args.logprobs,
        "rounds": args.rounds,
    }
    for key in rounds[0]:
        result[key] = round(statistics.median(r[key] for r in rounds), 2)
    print(json.dumps(result, indent=1))
    if profile is not None:
        print(profile)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
