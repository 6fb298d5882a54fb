"""CPU serving benchmark (issue 2): the embedded SmolLM2-135M-Instruct, chat completions of 64 tokens,
1 and 16 concurrent clients, aggregate output tokens/s.

In the same run on the same machine it measures, as baselines:
  - transformers' own OpenAI server: `transformers serve <dir> --continuous-batching`
  - plain Hugging Face `generate`, one stream.

    .venv/bin/python bench/cpu_serving.py [--rounds 2] [--out bench/results/cpu_serving.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import aiohttp

MAX_TOKENS = 64
QUESTIONS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a rainbow forms, step by step.",
    "Describe a day in the life of a lighthouse keeper.",
    "What are the benefits of learning a second language?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_hf_dir() -> Path:
    """transformers serve wants a Hugging Face directory: the loader's converted copy of the GGUF."""
    from engine.model.sources import resolve_model_source

    source = resolve_model_source(None)
    if source.gguf_file is not None or not (source.directory / "config.json").is_file():
        raise SystemExit("the GGUF conversion cache is off (KUBELLM_GGUF_CACHE=0); turn it on to run this")
    return source.directory


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError(url)


async def run_clients(base: str, model: str, clients: int, rounds: int) -> dict:
    """Each client sends `rounds` requests back to back; returns aggregate output tokens/s."""
    tokens = 0

    async def client(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal tokens
        for r in range(rounds):
            body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                    "messages": [{"role": "user", "content": QUESTIONS[(i + r) % len(QUESTIONS)]}]}
            async with session.post(base + "/v1/chat/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status}: {data}")
                tokens += data["usage"]["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await client(session, 0)  # warm-up, not timed
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": clients * rounds, "output_tokens": tokens,
            "seconds": round(elapsed, 2), "tok_per_s": round(tokens / elapsed, 2)}


def measure_server(cmd: list[str], port: int, model: str, rounds: int) -> list[dict]:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_healthy(base, proc))
        return [asyncio.run(run_clients(base, model, c, rounds)) for c in (1, 16)]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure_hf_generate(model_dir: Path, runs: int = 3) -> dict:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    total, elapsed = 0, 0.0
    for i in range(runs + 1):
        ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        if i:  # first run is warm-up
            elapsed += time.perf_counter() - start
            total += out.shape[1] - ids["input_ids"].shape[1]
    return {"clients": 1, "output_tokens": total, "seconds": round(elapsed, 2), "tok_per_s": round(total / elapsed, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--out", default="bench/results/cpu_serving.json")
    args = ap.parse_args()
    bindir = Path(sys.executable).parent
    model_dir = export_hf_dir()
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"

    port = free_port()
    ours = measure_server([str(bindir / "kubellm"), "serve", "--port", str(port), "--host", "127.0.0.1"], port, name, args.rounds)
    port = free_port()
    theirs = measure_server([str(bindir / "transformers"), "serve", str(model_dir), "--continuous-batching",
                             "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"], port, str(model_dir), args.rounds)
    hf = measure_hf_generate(model_dir)

    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "model": name, "max_tokens": MAX_TOKENS, "kubellm": ours, "transformers_serve_cb": theirs, "hf_generate": hf}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':28}{'1 client':>12}{'16 clients':>12}")
    print(f"{'kubellm serve':28}{ours[0]['tok_per_s']:>12}{ours[1]['tok_per_s']:>12}")
    print(f"{'transformers serve (CB)':28}{theirs[0]['tok_per_s']:>12}{theirs[1]['tok_per_s']:>12}")
    print(f"{'HF generate':28}{hf['tok_per_s']:>12}{'-':>12}")
    print(f"16 clients: {ours[1]['tok_per_s'] / theirs[1]['tok_per_s']:.2f}x transformers serve; "
          f"1 client: {ours[0]['tok_per_s'] / hf['tok_per_s']:.2f}x HF generate")


if __name__ == "__main__":
    main()
