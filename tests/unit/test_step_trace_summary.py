"""bench/diag/step_trace_summary.py: a served run's steps split into those with prompt tokens and decode-only
ones by batch size, from rows as engine/step_trace.py writes them."""

from __future__ import annotations

from tests.bench_modules import load_bench_module

trace = load_bench_module("diag/step_trace_summary")


def row(launch: float, decodes: int, prefill: int, step_ms: float, waited_ms: float = 0.0) -> dict:
    return {"launch": launch, "launched": launch, "decodes": decodes, "prefill_tokens": prefill,
            "graph": "piecewise" if prefill else "decode", "gc_ms": 0.0, "done": launch + step_ms / 1e3, "waited_ms": waited_ms,
            "step_ms": step_ms}  # fmt: skip


def test_steps_are_split_by_prompt_tokens_and_decode_batch_size():
    rows = [row(0.0, 0, 2048, 50.0, 40.0), row(0.05, 100, 2048, 60.0), row(0.11, 300, 0, 20.0),
            row(0.13, 5, 0, 4.0), row(0.134, 5, 0, 4.0), {"launch": 0.2, "decodes": 1, "prefill_tokens": 0}]  # fmt: skip
    s = trace.summarize(rows)
    assert s["steps"] == 5  # the last step's tokens never reached the host: left out
    assert s["span_s"] == round(0.138 - 0.0, 3) and s["waited_s"] == 0.04
    assert s["with_prompt_tokens"] == {"steps": 2, "step_ms_total": 110.0, "step_ms_mean": 55.0,
                                       "prefill_tokens": 4096, "decodes": 100}  # fmt: skip
    assert s["decode_only"]["steps"] == 3 and s["decode_only"]["step_ms_total"] == 28.0
    assert s["decode_only_by_sequences"] == {
        "1-8": {"steps": 2, "step_ms_total": 8.0, "step_ms_mean": 4.0, "prefill_tokens": 0, "decodes": 10},
        "257-512": {
            "steps": 1,
            "step_ms_total": 20.0,
            "step_ms_mean": 20.0,
            "prefill_tokens": 0,
            "decodes": 300,
        },
    }
    assert s["graphed_steps"] == 5 and s["piecewise_graphed_steps"] == 2
    assert trace.summarize([]) == {"steps": 0}
