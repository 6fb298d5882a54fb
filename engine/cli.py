"""The `kubellm` command: `kubellm serve [MODEL] [options]` and `kubellm operator ...`.

Nothing heavy is imported at module level: the operator image runs this CLI without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from pydantic import ValidationError

from engine import __version__
from engine.config import EngineConfig

# Names only (the parsers themselves are imported with the engine): vLLM's names.
TOOL_CALL_PARSERS = ["hermes", "llama3_json", "mistral"]
REASONING_PARSERS = ["qwen3", "deepseek_r1"]

_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def byte_size(text: str) -> int:
    """`4294967296`, `4G`, `4GiB`, `512MiB` -> bytes (vLLM users write sizes both ways)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def prefill_cap(text: str) -> int | str:
    """`--max-prefill-tokens-while-decoding`: a number of tokens, or `auto`."""
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"not a number of tokens (0: no cap) or 'auto': {text!r}")
    return int(text)


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    a = serve.add_argument
    default = EngineConfig.default  # every engine default is EngineConfig's
    a("model_arg", nargs="?", metavar="MODEL", help="same as --model (as in `vllm serve MODEL`)")
    a(
        "--model",
        help="local HF directory, GGUF file or hf://org/name[@rev]; default: embedded SmolLM2-135M-Instruct",
    )
    a("--host", default="0.0.0.0")
    a("--port", type=int, default=8000)
    a(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="name(s) clients use in `model`; the first is echoed",
    )
    a("--tokenizer", help="tokenizer source, if not the model's own")
    a("--revision")
    a("--trust-remote-code", action="store_true")
    a(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default=default("dtype"),
        help="auto: bfloat16 (float16 for float16 checkpoints) on GPUs; on CPUs with AMX / AVX512-BF16, "
        "float32 with bfloat16 matmuls and KV cache; float32 on other CPUs",
    )
    a("--device", choices=["auto", "cpu", "cuda"], default=default("device"))
    a(
        "--quantization",
        "-q",
        choices=["fp8"],
        help="fp8: FP8 linear layers and MoE experts (W8A8: weights per output channel, activations per token) "
        "from a float checkpoint, on GPUs of compute capability 8.9+ (emulated on the CPU); FP8 checkpoints "
        "need no flag",
    )
    a(
        "--kv-cache-dtype",
        choices=["auto", "fp8", "fp8_e4m3"],
        default="auto",
        help="fp8 (= fp8_e4m3): the KV cache in float8 e4m3 with a scale per layer, twice the tokens; "
        "auto: the model's dtype",
    )
    a(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=default("tensor_parallel_size"),
        help="GPUs (ranks) each holding 1/N of every layer; one worker process per rank",
    )
    a("--max-model-len", type=int)
    a(
        "--max-num-seqs",
        type=int,
        help=f"sequences batched at once (default: {EngineConfig.per_device_default('max_num_seqs')})",
    )
    a(
        "--max-num-batched-tokens",
        type=int,
        help=f"tokens computed in one step (default: {EngineConfig.per_device_default('max_num_batched_tokens')})",
    )
    a(
        "--max-prefill-tokens-while-decoding",
        type=prefill_cap,
        metavar="N|auto",
        help="prompt tokens computed in one step while other sequences decode in it, so their inter-token "
        "latency stays bounded; an idle server prefills with the whole --max-num-batched-tokens; 0: no cap; "
        "auto: as many as keep the step within --decode-step-target-ms beside its decodes, learnt from "
        "measured steps "
        f"(default: {EngineConfig.per_device_default('max_prefill_tokens_while_decoding')})",
    )
    a(
        "--decode-step-target-ms",
        type=float,
        default=default("decode_step_target_ms"),
        metavar="MS",
        help="with --max-prefill-tokens-while-decoding auto: the step time (a decoding stream's inter-token "
        "gap) that prompt chunks may fill up to; prompts always get as long as the decodes take, up to this "
        "(default: %(default)g)",
    )
    a("--block-size", type=int, default=default("block_size"))
    a("--gpu-memory-utilization", type=float, default=default("gpu_memory_utilization"))
    a(
        "--kv-cache-memory",
        type=byte_size,
        help="KV cache size (bytes, or 4GiB); overrides utilization sizing",
    )
    a("--num-gpu-blocks-override", type=int, help="force the KV cache to this many blocks (testing)")
    a(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=default("enable_prefix_caching"),
    )
    a("--enforce-eager", action="store_true", help="no CUDA graphs")
    a(
        "--max-piecewise-graph-tokens",
        type=int,
        help="steps with prompt tokens up to this many tokens replay CUDA graphs captured between attention "
        f"calls; 0: they run eagerly (default: {EngineConfig.DEFAULT_MAX_PIECEWISE_GRAPH_TOKENS} on a GPU)",
    )
    a(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=default("async_scheduling"),
        help="build the next step while the GPU runs this one (default: on with CUDA)",
    )
    a(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=default("engine_process"),
        help="run the engine loop in its own process, apart from the HTTP server's event loop "
        "(default: on with CUDA)",
    )
    a(
        "--max-queue",
        type=int,
        default=default("max_queue"),
        help="waiting requests beyond this are answered 429",
    )
    a(
        "--stream-interval",
        type=int,
        default=default("stream_interval"),
        help="stream every N tokens (the first at once): less host work per token, coarser chunks",
    )
    a("--seed", type=int, default=default("seed"))
    a(
        "--api-key",
        default=os.environ.get("KUBELLM_API_KEY") or os.environ.get("VLLM_API_KEY"),
        help="require `Authorization: Bearer KEY` (env KUBELLM_API_KEY / VLLM_API_KEY)",
    )
    a(
        "--trust-request-chat-template",
        action="store_true",
        help="accept `chat_template` in requests (a Jinja template runs on the server: off by default, as in vLLM)",
    )
    a(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        help="read tool calls in the model's own format for tool_choice auto (vLLM's names: hermes for "
        "Qwen2.5/Qwen3/Hermes, llama3_json for Llama 3.1/3.2, mistral)",
    )
    a(
        "--enable-auto-tool-choice",
        action="store_true",
        help="allow tool_choice auto (needs --tool-call-parser), as in vLLM",
    )
    a(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        help="split <think>...</think> into reasoning_content (qwen3, deepseek_r1)",
    )
    a(
        "--shutdown-timeout",
        type=float,
        default=EngineConfig.DEFAULT_SHUTDOWN_TIMEOUT_S,
        help=f"seconds to let in-flight requests finish on SIGTERM (default: {EngineConfig.DEFAULT_SHUTDOWN_TIMEOUT_S:g})",
    )
    a(
        "--log-level",
        default=os.environ.get("KUBELLM_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    a("--log-format", default=os.environ.get("KUBELLM_LOG_FORMAT", "text"), choices=["text", "json"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm", description="LLM serving for Kubernetes.")
    parser.add_argument("--version", action="version", version=f"kubellm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,operator}")
    serve_parser = commands.add_parser("serve", help="serve a model over the OpenAI API")
    _add_serve_arguments(serve_parser)
    serve_parser.set_defaults(command_parser=serve_parser)  # so errors show `kubellm serve` usage
    # Listed for --help only: main() hands everything after `operator` to the operator untouched.
    commands.add_parser(
        "operator", help="run the Kubernetes operator (kubellm operator --help)", add_help=False
    )
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines in the cluster."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def engine_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineConfig:
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")
    if args.model and args.model_arg and args.model != args.model_arg:
        parser.error(f"the model is given twice: {args.model_arg!r} and --model {args.model!r}")
    try:
        return EngineConfig(
            model=args.model or args.model_arg,
            served_model_name=args.served_model_name[0] if args.served_model_name else None,
            tokenizer=args.tokenizer,
            revision=args.revision,
            dtype=args.dtype,
            device=args.device,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
            decode_step_target_ms=args.decode_step_target_ms,
            block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory=args.kv_cache_memory,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            enable_prefix_caching=args.enable_prefix_caching,
            enforce_eager=args.enforce_eager,
            max_piecewise_graph_tokens=args.max_piecewise_graph_tokens,
            async_scheduling=args.async_scheduling,
            tensor_parallel_size=args.tensor_parallel_size,
            engine_process=args.engine_process,
            max_queue=args.max_queue,
            stream_interval=args.stream_interval,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            reasoning_parser=args.reasoning_parser,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        parser.error(problems)


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio

    from engine.api.lifecycle import EngineProcessDied, ServeOptions, StartupError, run_server

    config = engine_config(args, parser)
    configure_logging(args.log_level, args.log_format)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        served_model_names=args.served_model_name,
        shutdown_timeout=args.shutdown_timeout,
        trust_request_chat_template=args.trust_request_chat_template,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
    )
    try:
        asyncio.run(run_server(config, options))
    except StartupError as exc:  # e.g. the port is taken: one clear line, no traceback
        logging.getLogger("engine.serve").error("%s", exc)
        return 1
    except EngineProcessDied as exc:
        logging.getLogger("engine.serve").error("stopped: %s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130
    return 0


def run_operator(operator_args: list[str]) -> int:
    try:
        from kubellm_operator.main import main as operator_main
    except ImportError as exc:
        print(
            f"kubellm operator: the operator is not installed here ({exc}); "
            "install it with: pip install 'kubellm[operator]'",
            file=sys.stderr,
        )
        return 1
    return operator_main(operator_args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:
        return run_operator(argv[1:])
    args = build_parser().parse_args(argv)
    return serve(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
