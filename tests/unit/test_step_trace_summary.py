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


def test_steps_against_their_floor():
    class Cost:  # ms = tokens / 100 + context / 100 (a stand-in for serving_floor.ModelCost.step_seconds)
        def step_seconds(self, tokens, sampled, context_tokens, bandwidth, flops):
            assert (bandwidth, flops) == (2.0, 3.0)
            self.calls.append((tokens, sampled))
            return (tokens / 100 + context_tokens / 100) / 1e3

    cost = Cost()
    cost.calls = []
    floor = trace.step_floor_ms(cost, 2.0, 3.0)
    rows = [row(0.0, 0, 2048, 50.0), row(0.1, 400, 0, 8.0), row(0.2, 400, 0, 8.0), row(0.3, 300, 0, 500.0)]
    rows[0]["decode_context_tokens"] = 0  # floor 20.48 ms
    rows[1]["decode_context_tokens"] = rows[2]["decode_context_tokens"] = 400  # floor 8 ms: 100 %
    rows[3]["decode_context_tokens"] = 39_700  # floor 400 ms: 80 %
    s = trace.summarize(rows, floor)
    assert s["with_prompt_tokens"]["pct_of_floor"] == round(100 * 20.48 / 50, 1)
    assert (2048, 0) in cost.calls  # the LM head for the decodes only (which prompts finished: not traced)
    assert s["decode_only"]["floor_ms_total"] == 416.0
    assert s["decode_only"]["pct_of_floor"] == round(100 * 416 / 516, 1)
    assert s["decode_only_by_sequences"]["257-512"]["pct_of_floor"] == round(100 * 416 / 516, 1)
    # a trace from before decode_context_tokens: no floor, the rest as before
    older = trace.summarize([row(0.1, 4, 0, 8.0)], floor)
    assert older["decode_only"]["steps"] == 1 and "pct_of_floor" not in older["decode_only"]


def test_the_floor_is_serving_floors_step_cost():
    floor_module = load_bench_module("serving_floor")
    cost = floor_module.qwen3_30b_a3b(48).fp8()
    r = row(0.0, 16, 0, 10.0) | {"decode_context_tokens": 16 * 1024}
    expected = 1e3 * cost.step_seconds(16, 16, 16 * 1024, 3.0e12, 7.9e14)
    assert trace.step_floor_ms(cost, 3.0e12, 7.9e14)(r) == expected
    assert 5.0 < expected < 10.0  # ~83 of 128 experts a layer at a byte a weight, the LM head, 16 K of K/V


def test_a_served_benchs_trace_is_split_at_its_runs(tmp_path):
    import json

    rows = [row(0.5, 0, 100, 9.0), row(1.0, 0, 2048, 50.0), row(1.1, 4, 0, 8.0), row(2.0, 8, 0, 9.0)]
    path = tmp_path / "w.trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = trace.summarize_runs(path, [1.0, 2.0])  # the warm-up's step (0.5) in neither
    assert (
        first["file"] == "w.trace.jsonl" and first["steps"] == 2 and first["with_prompt_tokens"]["steps"] == 1
    )
    assert second["steps"] == 1 and second["decode_only"]["decodes"] == 8
