"""How the operator runs the engine: the container's command, args and env for a spec.

This is the operator-to-engine contract; tests/operator/test_engine_contract.py runs the result as
a real local process, so a flag renamed on either side fails there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig  # torch-free: the engine's defaults, for the operator too
from kubellm_operator import names
from kubellm_operator.spec import EMBEDDED_MODEL_NAME, ModelDeploymentSpec, ModelSource

ENGINE_COMMAND = ["kubellm", "serve"]
API_KEY_ENV = "KUBELLM_API_KEY"  # `kubellm serve` reads its --api-key default from here
ENGINE_SHUTDOWN_TIMEOUT_S = EngineConfig.DEFAULT_SHUTDOWN_TIMEOUT_S  # the engine's drain on SIGTERM


@dataclass(frozen=True)
class EngineInvocation:
    command: list[str]
    args: list[str]
    env: list[dict[str, Any]]


def served_model_name(model: ModelSource) -> str:
    """What clients pass as `model`: the explicit name, else what the source says."""
    if model.served_model_name:
        return model.served_model_name
    if model.source is None:
        return EMBEDDED_MODEL_NAME
    if model.source.startswith("hf://"):
        # hf://meta-llama/Llama-3.2-3B-Instruct@main -> meta-llama/Llama-3.2-3B-Instruct
        return model.source.removeprefix("hf://").split("@", 1)[0]
    return model.source


def engine_invocation(spec: ModelDeploymentSpec) -> EngineInvocation:
    return EngineInvocation(command=list(ENGINE_COMMAND), args=engine_args(spec), env=engine_env(spec))


def engine_args(spec: ModelDeploymentSpec) -> list[str]:
    engine = spec.engine
    args = ["--host", "0.0.0.0", "--port", str(names.ENGINE_PORT)]
    if spec.model.source is not None:  # no --model: the engine serves its embedded model
        args += ["--model", spec.model.source]
    args += ["--served-model-name", served_model_name(spec.model)]
    args += ["--device", "cuda" if spec.gpus_per_replica > 0 else "cpu"]
    if engine.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
    optional: list[tuple[str, object]] = [
        ("--max-model-len", engine.max_model_len),
        ("--max-num-seqs", engine.max_num_seqs),
        ("--max-num-batched-tokens", engine.max_num_batched_tokens),
        ("--gpu-memory-utilization", engine.gpu_memory_utilization),
        ("--dtype", engine.dtype),
        ("--quantization", engine.quantization),
        ("--kv-cache-dtype", engine.kv_cache_dtype),
    ]
    args += [part for flag, value in optional if value is not None for part in (flag, str(value))]
    if engine.enable_prefix_caching is not None:
        args.append(
            "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching"
        )
    return args + list(engine.extra_args)


def cache_env(mount_path: str) -> dict[str, str]:
    """Every cache the engine (and the libraries under it) writes, on the model cache volume: a restarted
    pod reuses the downloads, GGUF conversions and compiled kernels, and the root filesystem stays
    read-only. Anything else goes to /tmp (an emptyDir)."""
    root = mount_path.rstrip("/") or "/"

    def under(name: str) -> str:
        return f"{root.rstrip('/')}/{name}"

    return {
        "HF_HOME": root,  # Hugging Face downloads (hf:// sources)
        "KUBELLM_CACHE_DIR": under("kubellm"),  # the engine's own: GGUF conversions
        "TRITON_CACHE_DIR": under("triton"),  # compiled Triton kernels (default ~/.triton/cache)
        "TORCHINDUCTOR_CACHE_DIR": under("torchinductor"),  # torch.compile (default /tmp/torchinductor_*)
        "CUDA_CACHE_PATH": under("nv-compute-cache"),  # the driver's PTX JIT cache (default ~/.nv)
        "XDG_CACHE_HOME": under("xdg"),  # any other library's ~/.cache
    }


def engine_env(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    env: dict[str, dict[str, Any]] = {
        name: {"name": name, "value": value} for name, value in cache_env(spec.model_cache.mount_path).items()
    }
    if spec.model.hf_token_secret is not None:
        env["HF_TOKEN"] = _from_secret(
            "HF_TOKEN", spec.model.hf_token_secret.name, spec.model.hf_token_secret.key
        )
    if spec.engine.api_key_secret is not None:
        secret = spec.engine.api_key_secret
        env[API_KEY_ENV] = _from_secret(API_KEY_ENV, secret.name, secret.key)
    # The user's variables win by name (a duplicate name would be rejected by server-side apply).
    for var in spec.engine.env:
        env[var.name] = var.model_dump(by_alias=True, exclude_none=True)
    return list(env.values())


def _from_secret(env_name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def shutdown_timeout(spec: ModelDeploymentSpec) -> float:
    """How long the engine drains in-flight requests on SIGTERM: its default, or engine.extraArgs' value."""
    timeout = ENGINE_SHUTDOWN_TIMEOUT_S
    args = spec.engine.extra_args
    for i, arg in enumerate(args):  # the last one wins, as with argparse
        value = None
        if arg == "--shutdown-timeout" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--shutdown-timeout="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                timeout = float(value)
            except ValueError:
                pass  # the engine refuses to start and says why
    return timeout
