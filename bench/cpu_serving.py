"""CPU serving benchmark (issue 2): the embedded SmolLM2-135M-Instruct, chat completions of 64 tokens,
1 and 16 concurrent clients, aggregate output tokens/s.

In the same run on the same machine it measures, as baselines:
  - transformers' own OpenAI server: `transformers serve <dir> --continuous-batching`
  - plain Hugging Face `generate`, one stream.
Each runs in float32 (the dequantized GGUF, as loaded) and in bfloat16; `kubellm serve` also with its
default `--dtype auto` (on CPUs with native bf16 matmuls: float32 with bfloat16 matmuls and KV cache,
see engine/model/loader.py; float32 elsewhere).

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
            body = {
                "model": model,
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
                "messages": [{"role": "user", "content": QUESTIONS[(i + r) % len(QUESTIONS)]}],
            }
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
    return {
        "clients": clients,
        "requests": clients * rounds,
        "output_tokens": tokens,
        "seconds": round(elapsed, 2),
        "tok_per_s": round(tokens / elapsed, 2),
    }


def measure_server(cmd: list[str], port: int, model: str, rounds: int) -> list[dict]:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
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


def measure_hf_generate(model_dir: Path, dtype: str, runs: int = 3) -> dict:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    total, elapsed = 0, 0.0
    for i in range(runs + 1):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        if i:  # first run is warm-up
            elapsed += time.perf_counter() - start
            total += out.shape[1] - ids["input_ids"].shape[1]
    return {
        "clients": 1,
        "output_tokens": total,
        "seconds": round(elapsed, 2),
        "tok_per_s": round(total / elapsed, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="requests per client")
    ap.add_argument("--out", default="bench/results/cpu_serving.json")
    args = ap.parse_args()
    bindir = Path(sys.executable).parent
    model_dir = export_hf_dir()
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"

    rows: dict[str, dict] = {}
    for dtype in ("auto", "float32", "bfloat16"):
        port = free_port()
        cmd = [str(bindir / "kubellm"), "serve", "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype]
        rows[f"kubellm serve --dtype {dtype}"] = {
            "dtype": dtype,
            "runs": measure_server(cmd, port, name, args.rounds),
        }
    for dtype in ("float32", "bfloat16"):
        port = free_port()
        cmd = [
            str(bindir / "transformers"),
            "serve",
            str(model_dir),
            "--continuous-batching",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--device",
            "cpu",
            "--dtype",
            dtype,
        ]
        rows[f"transformers serve --continuous-batching ({dtype})"] = {
            "dtype": dtype,
            "runs": measure_server(cmd, port, str(model_dir), args.rounds),
        }
    for dtype in ("float32", "bfloat16"):
        rows[f"HF generate ({dtype})"] = {"dtype": dtype, "runs": [measure_hf_generate(model_dir, dtype)]}

    import torch

    from engine.model.loader import cpu_has_native_bf16

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "model": name,
        "max_tokens": MAX_TOKENS,
        "rounds": args.rounds,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'aggregate output tok/s':58}{'1 client':>10}{'16 clients':>12}")
    for label, row in rows.items():
        runs = {r["clients"]: r["tok_per_s"] for r in row["runs"]}
        print(f"{label:58}{runs.get(1, '-'):>10}{runs.get(16, '-'):>12}")


if __name__ == "__main__":
    main()
