"""Where a served run's time went, from its step trace (`KUBELLM_STEP_TRACE=trace.jsonl`, engine/step_trace.py):
steps with prompt tokens against decode-only steps, and decode-only steps by how many sequences they carried
(count, mean step time: GPU time from CUDA events). The wall span runs from the first launch to the last
step's tokens on the host; the host waiting for the GPU for most of it means the GPU sets the pace.

    python3 bench/diag/step_trace_summary.py trace.jsonl [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DECODE_BINS = ((1, 8), (9, 32), (33, 128), (129, 256), (257, 512), (513, 1 << 30))


def summarize(rows: list[dict]) -> dict:
    rows = [r for r in rows if "done" in r]
    if not rows:
        return {"steps": 0}
    span_s = rows[-1]["done"] - rows[0]["launch"]

    def part(selected: list[dict]) -> dict:
        step_ms = [r["step_ms"] for r in selected if r.get("step_ms") is not None]
        return {
            "steps": len(selected),
            "step_ms_total": round(sum(step_ms), 1),
            "step_ms_mean": round(sum(step_ms) / len(step_ms), 3) if step_ms else None,
            "prefill_tokens": sum(r["prefill_tokens"] for r in selected),
            "decodes": sum(r["decodes"] for r in selected),
        }

    mixed = [r for r in rows if r["prefill_tokens"] > 0]
    decode_only = [r for r in rows if r["prefill_tokens"] == 0]
    by_batch = {
        f"{lo}-{hi if hi < 1 << 30 else 'up'}": part([r for r in decode_only if lo <= r["decodes"] <= hi])
        for lo, hi in DECODE_BINS
    }
    return {
        "steps": len(rows),
        "span_s": round(span_s, 3),
        "waited_s": round(sum(r.get("waited_ms", 0.0) for r in rows) / 1e3, 3),
        "gc_s": round(sum(r.get("gc_ms", 0.0) for r in rows) / 1e3, 3),
        "with_prompt_tokens": part(mixed),
        "decode_only": part(decode_only),
        "decode_only_by_sequences": {k: v for k, v in by_batch.items() if v["steps"]},
        "graphed_steps": sum(bool(r.get("graph")) for r in rows),
        # older traces wrote true for a decode graph
        "piecewise_graphed_steps": sum(r.get("graph") == "piecewise" for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.trace.read_text().splitlines() if line.strip()]
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
