"""The engine command line the operator builds from a spec: served names and every engine flag."""

from typing import Any

import pytest

from kubellm_operator.engine_args import engine_invocation, served_model_name
from kubellm_operator.spec import ModelDeploymentSpec, ModelSource


def invocation(spec: dict[str, Any]):
    return engine_invocation(ModelDeploymentSpec.model_validate(spec))


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ({"source": "hf://meta-llama/Llama-3.2-3B-Instruct"}, "meta-llama/Llama-3.2-3B-Instruct"),
        ({"source": "hf://Qwen/Qwen3-0.6B@main"}, "Qwen/Qwen3-0.6B"),
        ({"source": "/models/llama.gguf"}, "/models/llama.gguf"),
        ({}, "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ({"source": "hf://Qwen/Qwen3-0.6B", "servedModelName": "qwen"}, "qwen"),
    ],
)
def test_served_model_name(model: dict[str, Any], name: str) -> None:
    assert served_model_name(ModelSource.model_validate(model)) == name


def test_command_is_kubellm_serve_on_port_8000() -> None:
    result = invocation({"model": {"source": "hf://org/model"}})
    assert result.command == ["kubellm", "serve"]
    assert flag(result.args, "--port") == "8000"
    assert flag(result.args, "--host") == "0.0.0.0"
    assert flag(result.args, "--model") == "hf://org/model"


def test_engine_flags_are_passed_only_when_set() -> None:
    bare = invocation({"model": {"source": "hf://org/model"}}).args
    for name in ("--max-model-len", "--max-num-seqs", "--dtype", "--gpu-memory-utilization",
                 "--quantization", "--kv-cache-dtype"):  # fmt: skip
        assert name not in bare
    engine = {
        "maxModelLen": 8192,
        "maxNumSeqs": 64,
        "maxNumBatchedTokens": 4096,
        "gpuMemoryUtilization": 0.85,
        "dtype": "bfloat16",
        "quantization": "fp8",
        "kvCacheDtype": "fp8",
        "enablePrefixCaching": False,
        "extraArgs": ["--block-size", "32"],
    }
    args = invocation({"model": {"source": "hf://org/model"}, "engine": engine}).args
    assert flag(args, "--max-model-len") == "8192"
    assert flag(args, "--max-num-seqs") == "64"
    assert flag(args, "--max-num-batched-tokens") == "4096"
    assert flag(args, "--gpu-memory-utilization") == "0.85"
    assert flag(args, "--dtype") == "bfloat16"
    assert flag(args, "--quantization") == "fp8"
    assert flag(args, "--kv-cache-dtype") == "fp8"
    assert "--no-enable-prefix-caching" in args
    assert args[-2:] == ["--block-size", "32"]


def test_device_follows_gpu_count() -> None:
    assert flag(invocation({"model": {}, "gpu": {"count": 0}}).args, "--device") == "cpu"
    assert flag(invocation({"model": {}, "gpu": {"count": 2}}).args, "--device") == "cuda"


def test_secrets_arrive_as_environment_variables() -> None:
    spec = {
        "model": {"source": "hf://org/model", "hfTokenSecret": {"name": "hf"}},
        "engine": {"apiKeySecret": {"name": "keys", "key": "api"}},
    }
    result = invocation(spec)
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in result.env
    assert {
        "name": "KUBELLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api"}},
    } in result.env
    assert not any("secret" in arg.lower() for arg in result.args)  # nothing secret on the command line


def test_user_env_overrides_the_operators_by_name() -> None:
    env = [
        {"name": "HF_HOME", "value": "/elsewhere"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    result = invocation({"model": {}, "engine": {"env": env}})
    assert result.env[0] == env[0]  # HF_HOME replaced in place
    assert result.env[-1] == env[1]
    assert len({var["name"] for var in result.env}) == len(result.env)  # no duplicate names
