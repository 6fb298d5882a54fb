"""The operator-to-engine contract, for real: the container command, args and env the operator
generates for the CPU sample run as a local process, pass the pod's probes, and answer the seed's
client code under the served model name the status advertises.

Like the kubelet, the test only swaps what a pod gets from its surroundings: the port (a free one
instead of the pod's own 8000), the model cache volume (a temp dir where the pod mounts it) and /tmp (a
temp dir as TMPDIR). HOME is an empty temp dir that must stay empty: in the pod the root filesystem is
read-only, so every cache has to land on the cache volume.
"""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from openai import OpenAI

from kubellm_operator.desired import Owner, desired_children
from kubellm_operator.engine_args import ENGINE_SHUTDOWN_TIMEOUT_S, served_model_name
from tests.operator.operator_process import free_port, kubellm_executable
from tests.operator.samples import sample_spec

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300


def engine_container() -> dict:
    deployment = next(
        c
        for c in desired_children(Owner("smollm2", "default", "uid"), sample_spec("cpu-smollm2.yaml"))
        if c["kind"] == "Deployment"
    )
    return deployment["spec"]["template"]["spec"]["containers"][0]


def resolve_command(command: list[str]) -> list[str]:
    """The image has `kubellm` on PATH; here it is the one installed next to this Python."""
    assert command[0] == "kubellm", command
    return [kubellm_executable(), *command[1:]]


class RunningEngine:
    def __init__(
        self, process: subprocess.Popen, port: int, container: dict, log: Path, cache: Path, home: Path
    ) -> None:
        self.process = process
        self.port = port
        self.container = container
        self.log = log
        self.cache = cache
        self.home = home

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    container = engine_container()
    port = free_port()
    args = list(container["args"])
    args[args.index("--port") + 1] = str(port)

    cache_dir = tmp_path_factory.mktemp("model-cache")
    [mount] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "model-cache"]
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "KUBELLM_", "TRITON_", "HF_"))}
    env |= {"HOME": str(home), "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
    for var in container["env"]:
        assert "value" in var, (
            f"{var['name']} comes from the cluster ({var}); the CPU sample should need none"
        )
        # The cache volume is mounted here instead of at its path in the pod.
        env[var["name"]] = var["value"].replace(mount, str(cache_dir), 1)

    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            resolve_command(container["command"]) + args, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    running = RunningEngine(process, port, container, log, cache_dir, home)
    try:
        wait_for_probe(running, container["startupProbe"])
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def probe_url(engine: RunningEngine, probe: dict) -> str:
    get = probe["httpGet"]
    assert get["port"] == "http" and engine.container["ports"][0]["name"] == "http"
    return f"{engine.url}{get['path']}"


def wait_for_probe(engine: RunningEngine, probe: dict) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            pytest.fail(
                f"the engine exited with {engine.process.returncode}:\n{engine.log.read_text()[-4000:]}"
            )
        try:
            if requests.get(probe_url(engine, probe), timeout=probe["timeoutSeconds"]).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(
        f"the engine did not pass its startup probe in {STARTUP_TIMEOUT_S}s:\n{engine.log.read_text()[-4000:]}"
    )


def test_startup_probe_fits_the_samples_timeout(engine: RunningEngine) -> None:
    probe = engine.container["startupProbe"]
    assert (
        probe["periodSeconds"] * probe["failureThreshold"]
        >= sample_spec("cpu-smollm2.yaml").startup_timeout_seconds
    )


def test_readiness_and_liveness_probes_pass(engine: RunningEngine) -> None:
    for probe in (engine.container["readinessProbe"], engine.container["livenessProbe"]):
        assert requests.get(probe_url(engine, probe), timeout=probe["timeoutSeconds"]).status_code == 200


def test_seed_client_code_gets_an_answer_under_the_served_name(engine: RunningEngine) -> None:
    served = served_model_name(sample_spec("cpu-smollm2.yaml").model)
    client = OpenAI(base_url=f"{engine.url}/v1", api_key="not-needed")
    assert served in [m.id for m in client.models.list().data]
    response = client.chat.completions.create(
        model=served,
        messages=[{"role": "user", "content": "What is Kubernetes?"}],
        max_tokens=16,
        temperature=0,
    )
    assert response.model == served
    assert response.choices[0].message.content.strip()
    assert response.usage.completion_tokens > 0


def test_termination_grace_period_outlasts_the_engines_own_drain_default() -> None:
    """Kubernetes kills the pod terminationGracePeriodSeconds after SIGTERM; the engine drains for
    --shutdown-timeout first, so the pod must be given longer."""
    from engine.cli import build_parser

    drain = build_parser().parse_args(["serve"]).shutdown_timeout
    assert drain == ENGINE_SHUTDOWN_TIMEOUT_S
    deployment = next(
        c
        for c in desired_children(Owner("vllm", "default", "uid"), sample_spec("vllm.yaml"))
        if c["kind"] == "Deployment"
    )
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain + 10


def test_the_engine_writes_its_caches_on_the_cache_volume_and_nothing_in_home(engine: RunningEngine) -> None:
    """The embedded model's GGUF conversion is cached on the volume (a restart reuses it); HOME, which is
    read-only in the pod, is untouched."""
    requests.get(f"{engine.url}/health", timeout=5).raise_for_status()
    converted = list((engine.cache / "kubellm" / "gguf").glob("*/model.safetensors"))
    assert converted, sorted(str(p.relative_to(engine.cache)) for p in engine.cache.rglob("*"))[:20]
    assert sorted(engine.home.rglob("*")) == []
