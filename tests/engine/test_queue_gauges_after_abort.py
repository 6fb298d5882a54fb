"""The queue gauges autoscalers read (`vllm:num_requests_waiting`, `vllm:num_requests_running`) drop when
requests are aborted, not only at the next step: an engine whose clients all hung up steps no more, and a
stale queue would keep an autoscaler (KEDA on the waiting gauge) from ever scaling in."""

from __future__ import annotations

from engine.sampling.params import SamplingParams
from tests.engine.engine_helpers import make_engine


def gauge(engine, metric) -> float:
    return engine.metrics.labels(metric)._value.get()


def test_aborting_every_request_empties_the_queue_gauges(tiny_model_dir):
    engine = make_engine(str(tiny_model_dir("llama")), block_size=4, max_num_seqs=1)
    for request_id in ("a", "b", "c"):
        engine.add_request(
            request_id, list(range(1, 20)), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        )
    engine.step()
    m = engine.metrics
    assert (gauge(engine, m.num_requests_running), gauge(engine, m.num_requests_waiting)) == (1, 2)

    for request_id in ("a", "b", "c"):
        engine.abort_request(request_id)

    assert not engine.has_unfinished()
    assert (gauge(engine, m.num_requests_running), gauge(engine, m.num_requests_waiting)) == (0, 0)
