"""What crosses between the API process and the engine process, and how it is encoded.

Two ZMQ PUSH/PULL sockets over IPC, one per direction (vLLM V1's layout). Each message is two frames:
a one-byte kind and a payload. The per-step outputs, sent every step, are msgpack (msgspec: about a
microsecond per token, a fifth of pickle's); everything else is rare (one per request or per call) and
pickled, so any SamplingParams, grammar spec or exception crosses as it is.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.outputs import RequestOutput

# Engine -> API kinds.
STARTED = b"s"  # payload: pickled EngineInfo, or the exception that stopped the start
STEP = b"o"  # payload: msgpack StepOutputs
REPLY = b"r"  # payload: pickled Reply
FAILED = b"f"  # payload: pickled (request_id, exception): that request failed, the engine goes on


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the API process needs from the loaded model (it loads no model itself)."""

    served_model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # the Hugging Face tokenizer, pickled: the API process tokenizes and detokenizes


@dataclass(slots=True)
class StepOutputs:
    outputs: list[RequestOutput]
    # For the API process's queue-full check: the engine's waiting queue and how many requests it has
    # taken in so far (those sent but not yet taken are still on their way).
    num_waiting: int
    num_taken: int


@dataclass(frozen=True, slots=True)
class CompileGrammar:
    call_id: int
    spec: Any  # StructuredOutputSpec


@dataclass(frozen=True, slots=True)
class RenderMetrics:
    call_id: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop the loop, close the engine (grammar threads, tensor-parallel ranks) and exit."""


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    result: Any = None
    error: BaseException | None = field(default=None)


_encoder = msgspec.msgpack.Encoder()
_step_decoder = msgspec.msgpack.Decoder(StepOutputs)


def encode_step(step: StepOutputs) -> bytes:
    return _encoder.encode(step)


def decode_step(payload: bytes | memoryview) -> StepOutputs:
    return _step_decoder.decode(payload)


def dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def dumps_error(exc: BaseException) -> BaseException:
    """exc itself when it survives pickling (GrammarError, ModelLoadError keep their type for the API
    process's error mapping), else a RuntimeError that says what it was."""
    try:
        pickle.loads(dumps(exc))
    except Exception:  # noqa: BLE001 - any exception type may refuse to round-trip
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


loads = pickle.loads
