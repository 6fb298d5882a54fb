"""On CUDA a step's time is its device time (engine/model/step_timer.py): events on the stream, read with the
step's tokens. Work queued before the step does not count (async scheduling queues step N+1 while step N
runs), and the engine under `--max-prefill-tokens-while-decoding auto` times every step, CUDA graphs and
async scheduling included, learns a fit from them and still gives the tokens an uncapped engine gives."""

from __future__ import annotations

import random
import time

import pytest
import torch
import transformers
from gpu_paged_batch import requires_cuda
from gpu_random_model import save_random_checkpoint
from small_engine import small_engine

from engine.model.step_timer import StepTimer
from engine.sampling.params import SamplingParams

pytestmark = [requires_cuda, pytest.mark.gpu]


def busy(n: int) -> None:
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(n):
        a = (a @ a).clamp_(-1, 1)


def test_the_timer_measures_the_steps_device_time_not_what_was_queued_before_it():
    busy(2)
    torch.cuda.synchronize()
    started = time.perf_counter()
    busy(200)  # queued before the step: the device is still on it when the step's start event is recorded
    timer = StepTimer(torch.device("cuda"))
    busy(20)
    timer.stop()
    torch.cuda.synchronize()
    everything_ms = (time.perf_counter() - started) * 1e3
    step_ms = timer.elapsed_ms()
    assert 0 < step_ms < everything_ms * 0.3  # ~20 of 220 matmuls


def test_the_timer_is_read_without_waiting_once_the_tokens_are():
    timer = StepTimer(torch.device("cuda"))
    busy(20)
    tokens = torch.zeros(4, dtype=torch.long, device="cuda")
    host = torch.empty(4, dtype=torch.long, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    timer.stop()
    copied.synchronize()  # what reading a step's tokens waits for
    read = time.perf_counter()
    assert timer.elapsed_ms() > 0
    assert (time.perf_counter() - read) * 1e3 < 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
    )  # fmt: skip
    return save_random_checkpoint(config, tmp_path_factory.mktemp("llama"))


def serve(engine, seed: int = 0) -> dict[str, list[int]]:
    """Eight requests decode 60 tokens; a prompt of 100-300 tokens joins every third step for 90 steps."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i in range(8):
        engine.add_request(f"d{i}", [rng.randrange(512) for _ in range(rng.randint(5, 20))], params)
        tokens[f"d{i}"] = []
    step = 0
    while engine.has_unfinished() or step < 90:
        if step % 3 == 0 and step < 90:
            prompt = [rng.randrange(512) for _ in range(rng.randint(100, 300))]
            engine.add_request(
                f"p{step}", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
            )
            tokens[f"p{step}"] = []
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return tokens


def test_auto_times_every_step_on_the_gpu_and_changes_no_token(model_dir):
    reference = serve(small_engine(model_dir, dtype="float32", max_prefill_tokens_while_decoding=0))
    engine = small_engine(
        model_dir, dtype="float32", max_num_batched_tokens=512, max_prefill_tokens_while_decoding="auto",
        decode_step_target_ms=0.01,
    )  # fmt: skip
    assert engine.runner.cuda_graphs is not None and engine.async_scheduling
    assert serve(engine) == reference
    costs = engine.step_costs
    assert costs is not None and costs.num_observed > 60
    assert all(ms > 0 for *_, ms in costs.observations)
    assert costs.fit is not None  # decode-only and mixed steps: enough to fit
