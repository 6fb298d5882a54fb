"""A load generator for any OpenAI-compatible server: streaming /v1/completions with token-id prompts
and ignore_eos (vLLM's extension, which kubellm accepts), so every request produces exactly the
output length asked for. Measures what vLLM's benchmark_serving reports: request and output-token
throughput, time to first token (TTFT) and time per output token after the first (TPOT).

    python3 bench/load_client.py --url http://localhost:8000 --model NAME --num-requests 500 --qps inf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass

import aiohttp


@dataclass
class RequestSpec:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int
    ttft: float | None  # seconds from send to the first streamed token
    latency: float  # seconds from send to the end of the stream
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def lognormal_lengths(n: int, mean: float, sigma: float, lo: int, hi: int, rng: random.Random) -> list[int]:
    """Lognormal lengths with the given mean before clipping to [lo, hi] (ShareGPT's lengths are
    roughly lognormal with a long tail)."""
    mu = math.log(mean) - sigma**2 / 2
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def sharegpt_like_requests(n: int, vocab_size: int, seed: int = 0, prompt_mean: float = 202,
                           output_mean: float = 179, sigma: float = 0.8) -> list[RequestSpec]:  # fmt: skip
    rng = random.Random(seed)
    prompt_lens = lognormal_lengths(n, prompt_mean, sigma, 4, 2048, rng)
    output_lens = lognormal_lengths(n, output_mean, sigma, 4, 1024, rng)
    top = min(vocab_size, 30000)  # ordinary token ids, clear of any special tokens at the end
    return [
        RequestSpec([rng.randrange(100, top) for _ in range(p)], o)
        for p, o in zip(prompt_lens, output_lens, strict=True)
    ]


async def send_one(session: aiohttp.ClientSession, url: str, model: str, spec: RequestSpec) -> RequestResult:
    body = {
        "model": model,
        "prompt": spec.prompt_token_ids,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft: float | None = None
    output_tokens = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                text = await resp.text()
                return RequestResult(len(spec.prompt_token_ids), 0, None, time.perf_counter() - started,
                                     f"HTTP {resp.status}: {text[:200]}")  # fmt: skip
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("choices") and ttft is None:
                    ttft = time.perf_counter() - started
                if chunk.get("usage"):
                    output_tokens = chunk["usage"]["completion_tokens"]
    except (TimeoutError, aiohttp.ClientError) as exc:
        return RequestResult(
            len(spec.prompt_token_ids), output_tokens, ttft, time.perf_counter() - started, repr(exc)
        )
    return RequestResult(len(spec.prompt_token_ids), output_tokens, ttft, time.perf_counter() - started)


async def run_load(url: str, model: str, specs: list[RequestSpec], qps: float, seed: int = 0) -> dict:
    """Send every request, at Poisson arrivals of rate `qps` (all at once for inf); summarise."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        started = time.perf_counter()
        tasks = []
        for spec in specs:
            tasks.append(asyncio.create_task(send_one(session, url, model, spec)))
            if math.isfinite(qps):
                await asyncio.sleep(rng.expovariate(qps))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    return summarise(results, duration, qps)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarise(results: list[RequestResult], duration: float, qps: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    output = sum(r.output_tokens for r in ok)
    ms = 1e3
    return {
        "qps": "inf" if not math.isfinite(qps) else qps,
        "requests": len(results),
        "completed": len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": output / duration,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": output,
        "ttft_ms": {
            "mean": statistics.fmean(ttfts) * ms if ttfts else None,
            "p50": _ms(percentile(ttfts, 50)),
            "p99": _ms(percentile(ttfts, 99)),
        },  # fmt: skip
        "tpot_ms": {
            "mean": statistics.fmean(tpots) * ms if tpots else None,
            "p50": _ms(percentile(tpots, 50)),
            "p99": _ms(percentile(tpots, 99)),
        },  # fmt: skip
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--qps", type=float, default=math.inf)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    specs = sharegpt_like_requests(args.num_requests, args.vocab_size, args.seed)
    summary = asyncio.run(run_load(args.url, args.model, specs, args.qps, args.seed))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()


def wait_until_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Poll a `kubellm serve` started by a benchmark until /health answers 200 (or it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"kubellm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("kubellm serve did not become ready")
