"""A load generator for any OpenAI-compatible server: streaming /v1/completions with token-id (or text)
prompts, or /v1/chat/completions with messages, and ignore_eos (vLLM's extension, which kubellm
accepts), so every request produces exactly the output length asked for. Measures what vLLM's
benchmark_serving reports: request and output-token throughput, time to first token (TTFT), time per
output token after the first (TPOT) and inter-token latency (ITL: the gaps between streamed chunks that
carry text, pooled over all requests).

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
from dataclasses import dataclass, field

import aiohttp


@dataclass
class RequestSpec:
    """One request: exactly one of token ids or text (/v1/completions) or messages (/v1/chat/completions)."""

    prompt_token_ids: list[int] | None
    max_tokens: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt_token_ids, self.text, self.messages)]
        if sum(given) != 1:
            raise ValueError("a request has exactly one of prompt_token_ids, text or messages")

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.messages is not None else "/v1/completions"

    def body(self, model: str) -> dict:
        prompt = {"messages": self.messages} if self.messages is not None else {
            "prompt": self.prompt_token_ids if self.prompt_token_ids is not None else self.text}  # fmt: skip
        return {"model": model, **prompt, "max_tokens": self.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


@dataclass
class RequestResult:
    prompt_tokens: int | None  # as the server counted them (its usage chunk)
    output_tokens: int
    ttft: float | None  # seconds from send to the first streamed chunk with text
    latency: float  # seconds from send to the end of the stream
    error: str | None = None
    itl: list[float] = field(default_factory=list)  # seconds between successive chunks with text

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


def _chunk_text(chunk: dict) -> str | None:
    """The text a streamed chunk carries: completions' `text`, chat's `delta.content` (the role chunk has
    none)."""
    choices = chunk.get("choices")
    if not choices:
        return None
    choice = choices[0]
    return choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content")


async def send_one(
    session: aiohttp.ClientSession, url: str, model: str, spec: RequestSpec, cache_salt: str | None = None
) -> RequestResult:
    body = spec.body(model)
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    started = time.perf_counter()
    ttft: float | None = None
    last = started
    itl: list[float] = []
    output_tokens = 0
    prompt_tokens: int | None = None
    try:
        async with session.post(f"{url}{spec.path}", json=body) as resp:
            if resp.status != 200:
                text = await resp.text()
                return RequestResult(None, 0, None, time.perf_counter() - started,
                                     f"HTTP {resp.status}: {text[:200]}")  # fmt: skip
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if _chunk_text(chunk):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - started
                    else:
                        itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    output_tokens = chunk["usage"]["completion_tokens"]
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    except (TimeoutError, aiohttp.ClientError) as exc:
        return RequestResult(
            prompt_tokens, output_tokens, ttft, time.perf_counter() - started, repr(exc), itl
        )
    return RequestResult(prompt_tokens, output_tokens, ttft, time.perf_counter() - started, None, itl)


async def run_load(
    url: str, model: str, specs: list[RequestSpec], qps: float, seed: int = 0, cache_salt: str | None = None
) -> dict:
    """Send every request, at Poisson arrivals of rate `qps` (all at once for inf); summarise. A
    `cache_salt` keeps the server's prefix cache from serving blocks that another run computed."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        started = time.perf_counter()
        tasks = []
        for spec in specs:
            tasks.append(asyncio.create_task(send_one(session, url, model, spec, cache_salt)))
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
    itls = [gap for r in ok for gap in r.itl]
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
        "total_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),  # as the server counted them
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
        "itl_ms": {
            "mean": statistics.fmean(itls) * ms if itls else None,
            "p50": _ms(percentile(itls, 50)),
            "p99": _ms(percentile(itls, 99)),
        },  # fmt: skip
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


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
