"""Where a served run's time went, from its step trace (`KUBELLM_STEP_TRACE=trace.jsonl`, engine/step_trace.py):
steps with prompt tokens against decode-only steps, and decode-only steps by how many sequences they carried
(count, mean step time: GPU time from CUDA events). The wall span runs from the first launch to the last
step's tokens on the host; the host waiting for the GPU for most of it means the GPU sets the pace.

Given the model (`--model`, bench/serving_floor.py's cost of a step) and the GPU's copy bandwidth, every
step is also set against its floor, as the run had it: the longer of its bytes (its weights, the experts
its tokens choose under uniform routing, the LM head, its decodes' K/V: `decode_context_tokens`, which
traces carry since 2026-12-07) and its products at the dense rate (the LM head's for the decodes only: the
trace does not say which prompts finished in a step, under 1 % of a prompt step's products).
`pct_of_floor` is the floors' sum over the steps' GPU time; the decode-only steps' is issue 14's "decode
steps at >= 50 % of the floor" over a whole served run.

    python3 bench/diag/step_trace_summary.py trace.jsonl [--json out.json]
    python3 bench/diag/step_trace_summary.py trace.jsonl --model qwen3-30b-a3b --fp8 --bandwidth 3.0e12
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class StepCost(Protocol):  # bench/serving_floor.py's ModelCost
    def step_seconds(
        self, tokens: int, sampled: int, context_tokens: int, bandwidth: float, flops: float
    ) -> float: ...


FloorMs = Callable[[dict], "float | None"]


def step_floor_ms(cost: StepCost, bandwidth: float, flops: float) -> FloorMs:
    """A trace row -> its step's floor in ms (None: a row from a trace without the K/V count)."""

    def floor(row: dict) -> float | None:
        if "decode_context_tokens" not in row:
            return None
        decodes, tokens = row["decodes"], row["decodes"] + row["prefill_tokens"]
        return 1e3 * cost.step_seconds(tokens, decodes, row["decode_context_tokens"], bandwidth, flops)

    return floor


DECODE_BINS = ((1, 8), (9, 32), (33, 128), (129, 256), (257, 512), (513, 1 << 30))


def summarize(rows: list[dict], floor_ms: FloorMs | None = None) -> dict:
    """`floor_ms` (step_floor_ms): the steps also against their floor."""
    rows = [r for r in rows if "done" in r]
    if not rows:
        return {"steps": 0}
    span_s = rows[-1]["done"] - rows[0]["launch"]

    def part(selected: list[dict], floor: FloorMs | None = None) -> dict:
        step_ms = [r["step_ms"] for r in selected if r.get("step_ms") is not None]
        out = {
            "steps": len(selected),
            "step_ms_total": round(sum(step_ms), 1),
            "step_ms_mean": round(sum(step_ms) / len(step_ms), 3) if step_ms else None,
            "prefill_tokens": sum(r["prefill_tokens"] for r in selected),
            "decodes": sum(r["decodes"] for r in selected),
        }
        if floor is not None:  # steps with both a time and a floor
            pairs = [(r["step_ms"], f) for r in selected if r.get("step_ms") and (f := floor(r)) is not None]
            if pairs:
                floors, measured = sum(f for _, f in pairs), sum(m for m, _ in pairs)
                out |= {"floor_ms_total": round(floors, 1), "pct_of_floor": round(100 * floors / measured, 1)}
        return out

    mixed = [r for r in rows if r["prefill_tokens"] > 0]
    decode_only = [r for r in rows if r["prefill_tokens"] == 0]
    by_batch = {
        f"{lo}-{hi if hi < 1 << 30 else 'up'}": part(
            [r for r in decode_only if lo <= r["decodes"] <= hi], floor_ms
        )
        for lo, hi in DECODE_BINS
    }
    return {
        "steps": len(rows),
        "span_s": round(span_s, 3),
        "waited_s": round(sum(r.get("waited_ms", 0.0) for r in rows) / 1e3, 3),
        "gc_s": round(sum(r.get("gc_ms", 0.0) for r in rows) / 1e3, 3),
        "with_prompt_tokens": part(mixed, floor_ms),
        "decode_only": part(decode_only, floor_ms),
        "decode_only_by_sequences": {k: v for k, v in by_batch.items() if v["steps"]},
        "graphed_steps": sum(bool(r.get("graph")) for r in rows),
        # older traces wrote true for a decode graph
        "piecewise_graphed_steps": sum(r.get("graph") == "piecewise" for r in rows),
    }


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_runs(path: Path, starts: list[float], floor_ms: FloorMs | None = None) -> list[dict]:
    """A served bench's trace split at its load runs' start times (time.perf_counter: one clock for the bench
    and the server it started), each run's steps summarized (the warm-up's steps, before the first, left out)."""
    rows = read_trace(path)
    bounds = [*starts, math.inf]
    return [
        {"file": path.name, **summarize([r for r in rows if start <= r["launch"] < end], floor_ms)}
        for start, end in zip(bounds, bounds[1:], strict=False)
    ]


def main() -> None:
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # here, not at the top: the benches import this
    from serving_floor import MODELS  # module from bench/, where serving_floor is already on their path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="set the steps against this model's floor (needs --bandwidth)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="layers served (default: all)")
    parser.add_argument("--fp8", action="store_true", help="the linears below the LM head in FP8")
    parser.add_argument("--fp8-kv", action="store_true", help="an e4m3 KV cache")
    parser.add_argument("--bandwidth", type=float, default=None, help="the GPU's copy bandwidth, bytes/s")
    parser.add_argument("--flops", type=float, default=7.9e14, help="dense bf16 products/s")
    args = parser.parse_args()
    floor = None
    if args.model:
        if args.bandwidth is None:
            parser.error(
                "--model needs --bandwidth (the bench's JSON records the copy bandwidth it measured)"
            )
        cost = MODELS[args.model](*([args.layers] if args.layers else []))
        cost = cost.fp8() if args.fp8 else cost
        cost = cost.fp8_kv() if args.fp8_kv else cost
        floor = step_floor_ms(cost, args.bandwidth, args.flops)
    summary = summarize(read_trace(args.trace), floor)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
