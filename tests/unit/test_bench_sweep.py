"""The GPU backlog's prefill-cap sweep (bench/gpu_backlog.sh w2-cap) becomes `kubellm serve` flags that the
real CLI takes: one server per value, `auto` included. Checked here because the GPU time is spent only once."""

from __future__ import annotations

import re

from engine.cli import build_parser, engine_config
from tests.bench_modules import BENCH, load_bench_module


def test_the_backlogs_prefill_cap_sweep_is_flags_kubellm_serve_takes() -> None:
    backlog = (BENCH / "gpu_backlog.sh").read_text()
    sweep = re.search(r"--sweep (max-prefill-tokens-while-decoding=\S+)", backlog)
    assert sweep is not None
    servers = load_bench_module("w2_serving").sweep_configs(sweep.group(1))
    assert [flags[-1] for flags in servers] == ["0", "2048", "auto"]
    caps = []
    for flags in servers:
        args = build_parser().parse_args(["serve", *flags])
        caps.append(engine_config(args, args.command_parser).max_prefill_tokens_while_decoding)
    assert caps == [0, 2048, "auto"]


def test_a_w2_servers_step_cost_follows_its_quantization_flags() -> None:
    w2 = load_bench_module("w2_serving")
    bf16 = w2.llama_3_1_8b()  # serving_floor's, as w2_serving imported it
    assert w2.served_cost([]) == bf16
    assert w2.served_cost(["--quantization", "fp8", "--kv-cache-dtype", "fp8"]) == bf16.fp8().fp8_kv()
    assert w2.served_cost(["--quantization=fp8"]) == bf16.fp8()
    assert (
        w2.served_cost(["--kv-cache-dtype", "fp8", "--kv-cache-dtype", "auto"]) == bf16
    )  # the last one wins
    assert w2.served_cost(["--kv-cache-dtype", "fp8_e4m3"]) == bf16.fp8_kv()  # fp8's other name
