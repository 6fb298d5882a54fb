"""The server's host cost per output token (issue 13: W2-text's gap), measured on a CPU where the model is
nearly free: `kubellm serve --device cpu` with a tiny random Llama (1 layer, hidden 64) and the embedded
SmolLM2 tokenizer, so what remains is the host path: parsing, tokenizing and chat templating,
scheduling, detokenizing, building SSE chunks, aiohttp, and the GIL the event loop shares with the
engine thread. These cost the same on a GPU machine's host.

The same requests (ShareGPT text from `bench/w2_text.py --prepare`'s prompts.json, the first
`--requests`, all sent at once so that many streams run together, `max_tokens` fixed, `ignore_eos`) go
out as token ids (`/v1/completions`, the ids the server would get from the text), as text
(`/v1/completions`) and as chat messages (`/v1/chat/completions`), in interleaved rounds. Reported per
load: the server's CPU seconds per output token (all its threads, and the engine thread / event loop /
tokenizer thread apart), output tok/s, ITL p50/p99, and each text load over token ids. Each round also
runs the same engine with no server (`LLMEngine.generate` on the ids): what serving adds to it.

    python3 bench/host_overhead.py [--rounds 3] [--profile text] [--out bench/results/host_overhead_cpu.json]

`--profile LOAD` records the server with py-spy (`--native --idle`: a thread waiting for the GIL shows
as a condition wait under a Python frame) during one more run of LOAD and splits each thread's samples
by what it does. `--baseline-src DIR` serves another checkout (e.g. `git worktree add /tmp/base main`)
beside this one, every run interleaved, for before/after figures from one invocation;
`--this-serve-args="--stream-interval 4"` gives flags to this checkout's server only.
Needs bench/data/w2_text (prompts.json and tokenizer/, git-ignored: `python3 bench/w2_text.py --prepare
bench/data/w2_text`, or a copy of another checkout's).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE))  # appended: bench/kernels.py must not shadow the `kernels` package

from kubellm_server import kubellm_serve  # noqa: E402
from load_client import RequestSpec, run_load  # noqa: E402
from sharegpt_prompts import PreparedPrompts  # noqa: E402

SERVED_NAME = "tiny"
LOADS = ("ids", "text", "chat")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def write_tiny_model(tokenizer, path: Path) -> None:
    """A 1-layer Llama of hidden 64 over the tokenizer's vocabulary, random float32 weights."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_loads(
    prepared: PreparedPrompts, tokenizer, n: int, max_tokens: int, max_prompt: int
) -> dict[str, list[RequestSpec]]:
    """The first n requests whose prompts have at most max_prompt tokens (the CPU decode attention pads
    every context to the longest: one 2k prompt would make the model's cost hide the host's)."""
    requests = [r for r in prepared.requests if max(r.prompt_tokens, r.chat_tokens) <= max_prompt][:n]
    return {
        "ids": [RequestSpec(tokenizer.encode(r.prompt), max_tokens) for r in requests],
        "text": [RequestSpec(None, max_tokens, text=r.prompt) for r in requests],
        "chat": [RequestSpec(None, max_tokens, messages=[m.model_dump() for m in r.messages]) for r in requests],
    }  # fmt: skip


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of the server, by thread id; the threads of its child
    processes (the engine process of `--engine-process`, tensor-parallel ranks) under negative ids."""
    out = {}
    for proc, sign in [(pid, 1)] + [(child, -1) for child in child_pids(pid)]:
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:  # the process ended
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{proc}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            out[sign * int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by OS thread id, from `py-spy dump` (Python 3.11 does not name OS threads)."""
    dump = subprocess.run([py_spy(), "dump", "--pid", str(pid)], capture_output=True, text=True, check=True)
    names = {}
    for line in dump.stdout.splitlines():
        # Thread 12345 (idle): "engine-loop"
        if line.startswith("Thread ") and '"' in line:
            tid = line.split()[1]
            name = line.split('"')[1]
            names[int(tid, 16) if tid.startswith("0x") else int(tid)] = name
    return names


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: python -m pip install py-spy")
    return found


def thread_group(name: str) -> str:
    if name == "MainThread":
        return "event loop"
    if name == "engine-loop":
        return "engine thread"
    if name.startswith("tokenizer"):
        return "tokenizer thread"
    return "other"


def measure(url: str, pid: int, load: list[RequestSpec], salt: str, names: dict[int, str]) -> dict:
    before, wall = thread_cpu(pid), time.perf_counter()
    summary = asyncio.run(run_load(url, SERVED_NAME, load, math.inf, cache_salt=salt))
    after, wall = thread_cpu(pid), time.perf_counter() - wall
    tokens = summary["total_output_tokens"] or 1
    by_group: dict[str, float] = collections.Counter()
    for tid, cpu in after.items():
        group = "engine process" if tid < 0 else thread_group(names.get(tid, ""))
        by_group[group] += cpu - before.get(tid, 0.0)
    total = sum(by_group.values())
    return {
        "output_tokens": summary["total_output_tokens"],
        "completed": summary["completed"],
        "errors": summary["errors"],
        "wall_s": wall,
        "output_tok_s": summary["output_token_throughput"],
        "itl_ms": summary["itl_ms"],
        "tpot_ms": summary["tpot_ms"],
        "ttft_ms": summary["ttft_ms"],
        "server_cpu_s": total,
        "server_cpu_us_per_token": 1e6 * total / tokens,
        "cpu_us_per_token_by_thread": {k: 1e6 * v / tokens for k, v in sorted(by_group.items())},
    }


# What a profiled sample is doing: the first rule that matches, from the innermost frame outwards.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("tokenization/templating", ("engine/api/prompts.py", "tokenization_utils", "jinja2", "chat_template")),
    ("detokenization", ("engine/detokenizer.py", "engine/stop_checker.py")),
    (
        "SSE/JSON building",
        (
            "engine/api/streaming.py",
            "engine/api/completions.py",
            "engine/api/chat.py",
            "pydantic",
            "engine/api/generation.py",
        ),
    ),  # fmt: skip
    ("request parsing", ("engine/api/body.py", "engine/api/protocol.py")),
    ("engine step (model + sampler)", ("engine/model/", "engine/sampling/", "engine/kernels/", "torch/")),
    (
        "scheduler/host step work",
        ("engine/core/", "engine/llm_engine.py", "engine/metrics.py", "prometheus_client"),
    ),  # fmt: skip
    ("engine→loop handoff", ("engine/async_engine.py",)),
    ("aiohttp/asyncio", ("aiohttp", "asyncio", "yarl", "multidict")),
]
PROFILE_RATE = 100  # samples a second
GIL_WAIT = ("take_gil", "PyEval_RestoreThread", "pthread_cond_timedwait", "pthread_mutex_lock")


def categorize(frames: list[str]) -> str:
    """frames: outermost first, as py-spy's raw format writes them. CPython 3.11's GIL wait is a
    pthread_cond_timedwait (or the GIL's mutex) under a Python frame that blocks on nothing else; a
    thread blocked for work sits in epoll_wait or a semaphore (Python's locks)."""
    if any(p in f for f in frames[-4:] for p in IDLE):
        return "idle (waiting for work)"
    if any(p in f for f in frames[-3:] for p in GIL_WAIT):
        return "waiting for the GIL"
    for frame in reversed(frames):
        if ".py:" not in frame:
            continue
        for name, patterns in CATEGORIES:
            if any(p in frame for p in patterns):
                return name
    return "other"


def split_profile(raw: Path) -> dict:
    """Samples of each thread group by category (idle = blocked for work, not on the GIL)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        head, *frames = stack.split(";")  # head: `thread (12345): MainThread`
        group = thread_group(head.split(": ", 1)[-1])
        counts[group][categorize(frames) if frames else "other"] += int(n)
    return {g: dict(c.most_common()) for g, c in counts.items()}


IDLE = ("epoll_wait", "PyThread_acquire_lock_timed", "sem_wait", "sem_clockwait", "pthread_cond_wait (")


def profile(url: str, pid: int, load: list[RequestSpec], out: Path, names: dict[int, str]) -> dict:
    raw = out.with_suffix(".pyspy.txt")
    command = [py_spy(), "record", "--pid", str(pid), "--native", "--idle", "--threads", "--rate", str(PROFILE_RATE),
               "--format", "raw", "--output", str(raw)]  # fmt: skip
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2)  # py-spy attaches
    result = measure(url, pid, load, "profile", names)
    recorder.send_signal(2)  # SIGINT: py-spy writes the file and exits
    _, err = recorder.communicate(timeout=300)
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-500:]}")
    split = split_profile(raw)
    tokens = result["output_tokens"] or 1
    us_per_token = {
        g: {k: round(1e6 * n / PROFILE_RATE / tokens, 1) for k, n in c.items()} for g, c in split.items()
    }
    return {"run": result, "raw": str(raw), "samples": split, "wall_us_per_token": us_per_token}


def offline_engine(model_dir: Path, prompts: list[list[int]], max_tokens: int, max_num_seqs: int) -> dict:
    """The same engine work with no server: `LLMEngine.generate` on the token-id prompts (greedy,
    ignore_eos, detokenized), in a child process with one torch thread. Its CPU per token is the engine
    thread's share alone: what the served figure adds is the HTTP path, and the GIL it shares."""
    code = (
        "import json, sys, time\n"
        "from engine.config import EngineConfig\n"
        "from engine.llm_engine import LLMEngine\n"
        "from engine.model.loader import load_model\n"
        "from engine.sampling.params import SamplingParams\n"
        "args = json.loads(sys.stdin.read())\n"
        "config = EngineConfig(model=args['model'], device='cpu', dtype='float32', max_model_len=4096,\n"
        "                      max_num_seqs=args['max_num_seqs'])\n"
        "engine = LLMEngine(config, load_model(config))\n"
        "params = SamplingParams(temperature=0.0, max_tokens=args['max_tokens'], ignore_eos=True)\n"
        "engine.generate(args['prompts'][:8], params)\n"
        "cpu, wall = time.process_time(), time.perf_counter()\n"
        "tokens = sum(map(len, engine.generate(args['prompts'], params)))\n"
        "cpu, wall = time.process_time() - cpu, time.perf_counter() - wall\n"
        "print(json.dumps({'output_tokens': tokens, 'output_tok_s': tokens / wall,\n"
        "                  'cpu_us_per_token': 1e6 * cpu / tokens}))\n"
    )
    args = {
        "model": str(model_dir),
        "prompts": prompts,
        "max_tokens": max_tokens,
        "max_num_seqs": max_num_seqs,
    }
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), capture_output=True, text=True,
                          cwd=HERE.parent, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def source_tree(path: Path | None) -> Iterator[None]:
    """Processes started inside import kubellm from `path` (see engine_only_path), else from here."""
    if path is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def engine_only_path(checkout: str, where: Path) -> Path:
    """A folder holding only checkout's `engine` package, for PYTHONPATH: the checkout's own root would
    put its `operator/` folder in front of the stdlib's `operator`."""
    where.mkdir()
    (where / "engine").symlink_to(Path(checkout).resolve() / "engine")
    return where


def row(version: str, load: str, r: dict) -> str:
    t = r["cpu_us_per_token_by_thread"]
    return (f"| {version:<8} | {load:<5} | {r['output_tok_s']:7.0f} | {r['server_cpu_us_per_token']:6.0f} "
            f"| {t.get('event loop', 0):5.0f} | {t.get('engine thread', 0):5.0f} | {t.get('tokenizer thread', 0):4.0f} "
            f"| {t.get('other', 0):5.0f} | {t.get('engine process', 0):5.0f} "
            f"| {_ms(r['itl_ms']['p50'])} / {_ms(r['itl_ms']['p99'])} | {r['server_cpu_s'] / r['completed'] * 1e3:5.2f} "
            f"| {r['completed']} |")  # fmt: skip


def _ms(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(HERE / "data" / "w2_text"), help="w2_text.py --prepare's folder"
    )
    parser.add_argument("--requests", type=int, default=128, help="sent at once: concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every load")
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    parser.add_argument("--profile", choices=LOADS, default=None, help="py-spy one more run of this load")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="another checkout (e.g. `git worktree add /tmp/base main`) served beside this one, "
                        "every run interleaved: before/after in one invocation")  # fmt: skip
    parser.add_argument("--this-serve-args", default="", metavar="'FLAGS'",
                        help="flags for this checkout's server only, one string (the baseline's gets --serve-args alone)")  # fmt: skip
    parser.add_argument("--no-offline", action="store_true", help="skip the engine-alone runs")
    parser.add_argument("--port", type=int, default=8341)
    parser.add_argument("--out", default="bench/results/host_overhead_cpu.json")
    parser.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `kubellm serve` flags"
    )
    args = parser.parse_args()

    import transformers

    data = Path(args.data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(data / "tokenizer")
    prepared = PreparedPrompts.model_validate_json((data / "prompts.json").read_text())
    loads = build_loads(prepared, tokenizer, args.requests, args.max_tokens, args.max_prompt_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "machine": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, shared",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_tokens": sum(len(s.prompt_token_ids or []) for s in loads["ids"]),
        "serve_args": args.serve_args,
        "this_serve_args": args.this_serve_args,
        "baseline_src": args.baseline_src,
        "runs": [],
    }
    # One torch thread: the forward runs on the engine thread alone, as a GPU host's engine thread launches
    # it; a second OpenMP thread would spin beside the host work being measured, on 2 shared cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory() as paths,
        contextlib.ExitStack() as stack,
    ):
        versions: dict[str, Path | None] = {"this": None}
        if args.baseline_src:
            versions["baseline"] = engine_only_path(args.baseline_src, Path(paths) / "baseline")
        write_tiny_model(tokenizer, Path(tmp))
        max_num_seqs = max(256, args.requests)
        serve_args = ["--model", tmp, "--served-model-name", SERVED_NAME, "--device", "cpu", "--dtype", "float32",
                      "--max-model-len", "4096", "--max-num-seqs", str(max_num_seqs), *args.serve_args]  # fmt: skip
        prompts = [s.prompt_token_ids or [] for s in loads["ids"]]
        servers = {}
        for k, (version, src) in enumerate(versions.items()):
            flags = serve_args + (shlex.split(args.this_serve_args) if version == "this" else [])
            with source_tree(src):
                log = out.with_suffix(f".{version}.server.log")
                servers[version] = stack.enter_context(kubellm_serve(flags, args.port + k, log))
        names = {}
        for version, server in servers.items():
            for name in args.loads:  # warm-up: first template render, first compiles
                asyncio.run(
                    run_load(server.url, SERVED_NAME, loads[name][:8], math.inf, cache_salt="warm-up")
                )
            names[version] = thread_names(server.process.pid)
        print("| version  | load  |   tok/s | CPU µs/tok | loop | engine | tok. | other | eng. proc. | ITL p50 / p99 ms "
              "| CPU ms/req | done |", flush=True)  # fmt: skip
        for i in range(args.rounds):
            for name in args.loads:
                for version, server in servers.items():
                    r = measure(server.url, server.process.pid, loads[name], f"{name}/{i}", names[version])
                    result["runs"].append({"version": version, "load": name, "round": i, **r})
                    print(row(version, name, r), flush=True)
            if not args.no_offline:  # interleaved too; the servers idle meanwhile
                for version, src in versions.items():
                    with source_tree(src):
                        r = offline_engine(Path(tmp), prompts, args.max_tokens, max_num_seqs)
                    result["runs"].append({"version": version, "load": "engine alone", "round": i, **r})
                    print(f"| {version:<8} | engine alone (no server, ids) | {r['output_tok_s']:7.0f} tok/s | "
                          f"{r['cpu_us_per_token']:6.0f} CPU µs/tok |", flush=True)  # fmt: skip
        if args.profile:
            server = servers["this"]
            result["profile"] = {"load": args.profile,
                                 **profile(server.url, server.process.pid, loads[args.profile], out, names["this"])}  # fmt: skip
    result["summary"] = summarise(result["runs"])
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    if "profile" in result:
        print(json.dumps(result["profile"]["wall_us_per_token"], indent=1))


def summarise(runs: list[dict]) -> dict:
    """Per version and load: the median over rounds, the spread (max/min - 1), and the ratio to token ids."""
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for r in runs:
        groups[(r["version"], r["load"])].append(r)

    def med(rs: list[dict], key) -> float:
        values = sorted(key(r) for r in rs)
        return values[len(values) // 2] if len(values) % 2 else sum(values[len(values) // 2 - 1 :][:2]) / 2

    out: dict[str, dict] = collections.defaultdict(dict)
    for (version, load), rs in groups.items():
        if load == "engine alone":
            out[version][load] = {"cpu_us_per_token": med(rs, lambda r: r["cpu_us_per_token"]),
                                  "output_tok_s": med(rs, lambda r: r["output_tok_s"])}  # fmt: skip
            continue
        cpu = [r["server_cpu_us_per_token"] for r in rs]
        by_thread = collections.defaultdict(list)
        for r in rs:
            for k, v in r["cpu_us_per_token_by_thread"].items():
                by_thread[k].append(v)
        out[version][load] = {
            "cpu_us_per_token": med(rs, lambda r: r["server_cpu_us_per_token"]),
            "cpu_spread": max(cpu) / min(cpu) - 1,
            "cpu_us_per_token_by_thread": {k: sorted(v)[len(v) // 2] for k, v in by_thread.items()},
            "cpu_ms_per_request": med(rs, lambda r: 1e3 * r["server_cpu_s"] / max(1, r["completed"])),
            "output_tok_s": med(rs, lambda r: r["output_tok_s"]),
            "itl_p50_ms": med(rs, lambda r: r["itl_ms"]["p50"] or 0.0),
            "itl_p99_ms": med(rs, lambda r: r["itl_ms"]["p99"] or 0.0),
        }
    for loads in out.values():
        for load, x in loads.items():
            if "ids" in loads and load != "engine alone":
                x["cpu_ratio_to_ids"] = x["cpu_us_per_token"] / loads["ids"]["cpu_us_per_token"]
                x["tok_s_ratio_to_ids"] = x["output_tok_s"] / loads["ids"]["output_tok_s"]
    return dict(out)


if __name__ == "__main__":
    main()
