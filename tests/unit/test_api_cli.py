"""`kubellm` argument handling: vLLM-style flags become a validated EngineConfig; no torch at import."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from engine.cli import build_parser, byte_size, engine_config, main

KUBELLM = Path(sys.executable).parent / "kubellm"


def config_of(*argv: str):
    args = build_parser().parse_args(["serve", *argv])
    return engine_config(args, args.command_parser)


def test_vllm_style_flags_reach_engine_config() -> None:
    cfg = config_of(
        "/models/x", "--max-model-len", "4096", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
        "--block-size", "32", "--gpu-memory-utilization", "0.5", "--kv-cache-memory", "2GiB", "--dtype", "bfloat16",
        "--device", "cpu", "--no-enable-prefix-caching", "--max-queue", "3", "--enforce-eager", "--seed", "7",
        "--stream-interval", "5",
        "--served-model-name", "mine", "alias",
    )  # fmt: skip
    assert cfg.model == "/models/x" and cfg.served_model_name == "mine"
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.block_size) == (
        4096,
        8,
        512,
        32,
    )
    assert (cfg.gpu_memory_utilization, cfg.kv_cache_memory, cfg.dtype, cfg.device) == (
        0.5,
        2 * 2**30,
        "bfloat16",
        "cpu",
    )
    assert (cfg.enable_prefix_caching, cfg.max_queue, cfg.enforce_eager, cfg.seed) == (False, 3, True, 7)
    assert cfg.stream_interval == 5


def test_fp8_flags_reach_engine_config() -> None:
    cfg = config_of("--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3")
    assert (cfg.quantization, cfg.kv_cache_dtype) == ("fp8", "fp8_e4m3")
    assert (config_of().quantization, config_of().kv_cache_dtype) == (None, "auto")


def test_prefill_cap_flag_and_its_per_device_defaults() -> None:
    from engine.config import EngineConfig

    assert config_of("--max-prefill-tokens-while-decoding", "512").max_prefill_tokens_while_decoding == 512
    default = EngineConfig()
    assert default.max_prefill_tokens_while_decoding_on("cuda") == 2048
    assert default.max_prefill_tokens_while_decoding_on("cpu") == 2048  # no cap: the CPU's whole budget
    no_cap = EngineConfig(max_prefill_tokens_while_decoding=0)
    assert no_cap.max_prefill_tokens_while_decoding_on("cuda") == 8192
    above = EngineConfig(max_prefill_tokens_while_decoding=4096, max_num_batched_tokens=1024)
    assert above.max_prefill_tokens_while_decoding_on("cuda") == 1024  # never above the step's budget
    assert (
        EngineConfig(max_prefill_tokens_while_decoding=64).max_prefill_tokens_while_decoding_on("cpu") == 64
    )


def test_piecewise_graph_tokens_flag_and_its_defaults() -> None:
    from engine.config import EngineConfig

    assert config_of("--max-piecewise-graph-tokens", "0").max_piecewise_graph_tokens == 0
    assert EngineConfig().max_piecewise_graph_tokens_on("cuda") == 3072
    assert EngineConfig().max_piecewise_graph_tokens_on("cpu") == 0  # no CUDA graphs on the CPU
    assert EngineConfig(enforce_eager=True).max_piecewise_graph_tokens_on("cuda") == 0
    assert EngineConfig(max_num_batched_tokens=2048).max_piecewise_graph_tokens_on("cuda") == 2048
    assert EngineConfig(max_piecewise_graph_tokens=0).max_piecewise_graph_tokens_on("cuda") == 0
    # the model's host-bound step lowers the default, never a value the user set
    assert EngineConfig().max_piecewise_graph_tokens_on("cuda", 1344) == 1344
    assert EngineConfig(max_piecewise_graph_tokens=3072).max_piecewise_graph_tokens_on("cuda", 1344) == 3072


def test_prefill_cap_auto_and_its_step_time_target() -> None:
    from engine.config import EngineConfig

    auto = config_of("--max-prefill-tokens-while-decoding", "auto", "--decode-step-target-ms", "30")
    assert auto.max_prefill_tokens_while_decoding == "auto" and auto.prefill_cap_is_auto_on("cpu")
    assert auto.decode_step_target_ms == 30.0
    assert config_of("--max-prefill-tokens-while-decoding", "AUTO").prefill_cap_is_auto_on("cuda")
    default = config_of()
    assert default.decode_step_target_ms == 50.0
    # unset: learnt on a GPU, none on the CPU; a number or 0 set by the user is kept on both
    assert default.prefill_cap_is_auto_on("cuda") and not default.prefill_cap_is_auto_on("cpu")
    for fixed in ("2048", "0"):
        assert not config_of("--max-prefill-tokens-while-decoding", fixed).prefill_cap_is_auto_on("cuda")
    assert (
        EngineConfig.per_device_default("max_prefill_tokens_while_decoding")
        == "auto (from 2048) on a GPU, 0 on the CPU"
    )
    # What auto answers until it has measured enough steps: the fixed default of the device.
    assert auto.max_prefill_tokens_while_decoding_on("cuda") == 2048
    assert auto.max_prefill_tokens_while_decoding_on("cpu") == 2048  # the CPU's: no cap
    assert auto.auto_prefill_floor_on("cuda") == 256
    small = EngineConfig(max_prefill_tokens_while_decoding="auto", max_num_batched_tokens=64)
    assert small.auto_prefill_floor_on("cpu") == 8  # an eighth of a small budget
    # The engine process gets the config as JSON.
    assert EngineConfig.model_validate_json(auto.model_dump_json()) == auto
    with pytest.raises(ValueError, match="a number of tokens \\(0: no cap\\) or 'auto', not -1"):
        EngineConfig(max_prefill_tokens_while_decoding=-1)


def test_defaults_serve_the_embedded_model() -> None:
    cfg = config_of()
    assert cfg.model is None and cfg.enable_prefix_caching and cfg.device == "auto"
    assert config_of("--model", "m").model == "m"


def test_every_default_comes_from_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI, the server and the operator carry no copies of the engine's defaults."""
    from engine.api.lifecycle import ServeOptions
    from engine.config import EngineConfig
    from kubellm_operator.engine_args import ENGINE_SHUTDOWN_TIMEOUT_S
    from kubellm_operator.spec import EngineSpec

    assert config_of() == EngineConfig()  # every flag's default is the config field's
    assert EngineConfig().max_num_seqs_on("cuda") == 1024 and EngineConfig().max_num_seqs_on("cpu") == 256
    assert EngineConfig().max_num_batched_tokens_on("cuda") == 8192
    assert EngineConfig().max_num_batched_tokens_on("cpu") == 2048
    assert EngineConfig(max_num_seqs=7).max_num_seqs_on("cuda") == 7
    assert EngineConfig(max_num_seqs=4096).max_num_batched_tokens_on("cpu") == 4096  # room for every decode
    assert EngineConfig(max_num_batched_tokens=64).max_num_seqs_on("cpu") == 64  # and the other way round
    assert EngineConfig().async_scheduling_on("cuda") and not EngineConfig().async_scheduling_on("cpu")
    assert (
        ServeOptions().shutdown_timeout
        == ENGINE_SHUTDOWN_TIMEOUT_S
        == EngineConfig.DEFAULT_SHUTDOWN_TIMEOUT_S
    )
    assert "1024 on a GPU, 256 on the CPU" in EngineSpec.model_fields["max_num_seqs"].description

    monkeypatch.setattr(EngineConfig, "DEFAULT_MAX_NUM_SEQS", {"cuda": 77, "cpu": 11})
    monkeypatch.setattr(EngineConfig, "DEFAULT_SHUTDOWN_TIMEOUT_S", 12.0)
    parser = build_parser()
    assert parser.parse_args(["serve"]).shutdown_timeout == 12.0
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "77 on a GPU, 11 on the CPU" in " ".join(serve_help.split())


def test_docs_quote_the_defaults_engine_config_resolves() -> None:
    from engine.config import EngineConfig

    docs = Path(__file__).resolve().parents[2] / "docs"
    architecture = " ".join((docs / "ARCHITECTURE.md").read_text().split())
    seqs, tokens = EngineConfig.DEFAULT_MAX_NUM_SEQS, EngineConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert f"defaults to {seqs['cuda']} on a GPU and {seqs['cpu']} on the CPU" in architecture
    assert f"the token budget to {tokens['cuda']} and {tokens['cpu']}" in architecture
    cap = EngineConfig.DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING["cuda"]
    assert EngineConfig.DEFAULT_PREFILL_CAP_AUTO == {"cuda": True, "cpu": False}
    cap_sentence = f"at most `--max-prefill-tokens-while-decoding` (on a GPU `auto`, below, from {cap}; no cap on the CPU)"
    assert cap_sentence in architecture
    operations = " ".join((docs / "operations.md").read_text().split())
    assert f"`--shutdown-timeout` ({EngineConfig.DEFAULT_SHUTDOWN_TIMEOUT_S:g} s)" in operations


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-num-seqs", "0"],
        ["--gpu-memory-utilization", "1.5"],
        ["--max-prefill-tokens-while-decoding", "-1"],
        ["--max-prefill-tokens-while-decoding", "lots"],
        ["--decode-step-target-ms", "0"],
        ["a", "--model", "b"],
        ["--device", "tpu"],
        ["--quantization", "awq"],
        ["--kv-cache-dtype", "fp8_e5m2"],
        ["--enable-auto-tool-choice"],  # needs --tool-call-parser, as in vLLM
        ["--tool-call-parser", "nope"],
        ["--reasoning-parser", "nope"],
    ],
)
def test_bad_values_exit_with_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        config_of(*argv)
    assert exc.value.code == 2 and "kubellm serve" in capsys.readouterr().err


def test_tool_and_reasoning_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--reasoning-parser", "qwen3"]
    )
    assert (args.tool_call_parser, args.enable_auto_tool_choice) == ("hermes", True)
    assert engine_config(args, args.command_parser).reasoning_parser == "qwen3"


def test_byte_sizes() -> None:
    assert [byte_size(s) for s in ("1000", "4G", "512MiB", "1.5GiB")] == [
        1000,
        4 * 10**9,
        512 * 2**20,
        3 * 2**29,
    ]


def test_operator_gets_every_argument_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    fake = types.ModuleType("kubellm_operator.main")
    fake.main = lambda argv: received.append(argv) or 0
    monkeypatch.setitem(sys.modules, "kubellm_operator.main", fake)
    assert main(["operator", "--namespace", "ml", "--verbose"]) == 0
    assert received == [["--namespace", "ml", "--verbose"]]


def test_operator_without_package_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "kubellm_operator.main", None)  # makes the import fail
    assert main(["operator", "--help"]) == 1
    assert "kubellm[operator]" in capsys.readouterr().err


def test_version_and_no_torch_at_import() -> None:
    out = subprocess.run([str(KUBELLM), "--version"], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip().startswith("kubellm ")
    code = "import sys, engine.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_a_token_budget_below_max_num_seqs_is_refused_in_the_flags_terms(
    capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(SystemExit):
        config_of("--max-num-seqs", "64", "--max-num-batched-tokens", "32")
    err = capsys.readouterr().err
    assert "--max-num-batched-tokens (32) must be at least --max-num-seqs (64)" in err, err
    assert config_of("--max-num-seqs", "64", "--max-num-batched-tokens", "64").max_num_batched_tokens == 64
