"""`kubellm serve` from model load to exit: start, serve, and on SIGTERM/SIGINT drain gracefully.

Draining: /health turns 503 and new requests are refused, the listening socket closes, requests in
flight finish (up to shutdown_timeout, then they are cancelled and aborted), the engine loop stops,
and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from engine.api.output_plan import ServerToolOptions
from engine.api.server import build_app
from engine.api.state import STATE
from engine.config import EngineConfig

log = logging.getLogger("engine.serve")


class StartupError(Exception):
    """The server could not start for a reason the user can fix (bad model, port taken); no traceback."""


class EngineProcessDied(Exception):
    """The engine process (--engine-process) died while serving: the server has stopped, exit 1."""


# Seconds between the engine process's death and the server's stop: the requests in flight get their
# error event out first (the tensor-parallel driver waits as long before it ends the process).
ENGINE_DEATH_GRACE_S = 0.5


@dataclass
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    served_model_names: list[str] | None = None
    shutdown_timeout: float = EngineConfig.DEFAULT_SHUTDOWN_TIMEOUT_S
    trust_request_chat_template: bool = False
    tool_call_parser: str | None = None  # --tool-call-parser (vLLM's names)
    enable_auto_tool_choice: bool = False


def tool_options(options: ServeOptions, config: EngineConfig) -> ServerToolOptions:
    from engine.reasoning.think_tags import REASONING_PARSERS

    reasoning = REASONING_PARSERS[config.reasoning_parser] if config.reasoning_parser else None
    return ServerToolOptions(options.tool_call_parser, options.enable_auto_tool_choice, reasoning)


def _display_url(host: str, port: int) -> str:
    shown = "localhost" if host in ("", "0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/v1"


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s: draining in-flight requests, then exiting", sig.name)
        stop.set()
        # A second signal means "now": fall back to the default (terminate / KeyboardInterrupt).
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def freeze_startup_heap() -> None:
    """Move everything built at start-up (torch, transformers, the model: ~4e5 objects) out of the
    garbage collector's view. They live until exit, yet each full collection walked them all: a ~0.2 s
    stall of the engine loop, seen twice in one 13 s W2 run on the GPU (vLLM freezes its heap too).
    Frozen objects are never collected, even in cycles: fine for a server that loads one model and
    exits after shutdown; run_server unfreezes on the way out for callers that go on."""
    gc.collect()
    gc.freeze()


async def run_server(config: EngineConfig, options: ServeOptions) -> None:
    from engine.async_engine import AsyncEngine  # torch comes in here, not at CLI import
    from engine.model.kv_cache_sizing import KVCacheTooSmallError
    from engine.model.loader import resolve_device
    from engine.model.sources import ModelLoadError
    from engine.outputs import EngineDeadError

    try:
        # Loads the model (the loader logs progress): on a thread of this process, or in its own.
        if config.engine_process_on(resolve_device(config.device).type):
            from engine.engine_process.client import ProcessEngine  # pyzmq, msgspec: only with the flag

            engine: AsyncEngine | ProcessEngine = ProcessEngine(config)
        else:
            engine = AsyncEngine(config)
    except ModelLoadError as exc:
        raise StartupError(f"cannot load the model: {exc}") from exc
    except KVCacheTooSmallError as exc:
        raise StartupError(str(exc)) from exc
    except EngineDeadError as exc:  # the engine process ended before it was ready (killed, out of memory)
        raise StartupError(str(exc)) from exc
    await engine.start()
    stop = asyncio.Event()
    died: list[str] = []
    if not isinstance(engine, AsyncEngine):

        def on_death(message: str) -> None:
            died.append(message)
            asyncio.get_running_loop().call_later(ENGINE_DEATH_GRACE_S, stop.set)

        engine.on_death.append(on_death)
    names = options.served_model_names or [engine.served_model_name]
    app = build_app(engine, api_key=options.api_key, served_model_names=names, model_root=config.model,
                    trust_request_chat_template=options.trust_request_chat_template,
                    tool_options=tool_options(options, config))  # fmt: skip
    freeze_startup_heap()
    # handler_cancellation: a client that hangs up mid-request cancels its handler, which aborts the
    # engine request (streams notice on their next write anyway; this covers non-streaming ones).
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=options.shutdown_timeout)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, options.host, options.port).start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {options.host}:{options.port}: {exc}") from exc
        _stop_on_signals(stop)
        url = _display_url(options.host, options.port)
        log.info("serving model %r at %s (OpenAI API)", names[0], url)
        print(f"kubellm: serving {names[0]!r} at {url}", flush=True)
        await stop.wait()
        app[STATE].draining = True
    finally:
        await runner.cleanup()  # stops listening, waits for handlers in flight
        await engine.shutdown()
        gc.unfreeze()
    if died:
        raise EngineProcessDied(died[0])
    log.info("shutdown complete")
