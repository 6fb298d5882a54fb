"""Startup, readiness and liveness probes run as the kubelet runs them: every periodSeconds after
initialDelaySeconds, each attempt bounded by timeoutSeconds, a result flipping only after
successThreshold / failureThreshold consecutive attempts agree."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.cluster.node_agent.container_launch import ContainerLaunch, map_exec_argv


@dataclass(frozen=True)
class ProbeTarget:
    """Where a container's probes go: its pod's IP, its named ports, its environment for exec."""

    pod_ip: str
    ports: dict[str, int]
    launch: ContainerLaunch

    def port(self, value: int | str) -> int:
        return value if isinstance(value, int) else self.ports[value]


async def _http_get(action: dict[str, Any], target: ProbeTarget, timeout_s: float) -> tuple[bool, str]:
    scheme = action.get("scheme", "HTTP").lower()
    host = action.get("host") or target.pod_ip
    path = action.get("path", "/")
    url = f"{scheme}://{host}:{target.port(action['port'])}{path if path.startswith('/') else '/' + path}"
    headers = {h["name"]: h["value"] for h in action.get("httpHeaders", [])}
    headers.setdefault("User-Agent", "kube-probe/1.34")
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, headers=headers, allow_redirects=False, ssl=False) as response:
            if 200 <= response.status < 400:
                return True, ""
            return False, f"HTTP probe failed with statuscode: {response.status}"


async def _tcp_socket(action: dict[str, Any], target: ProbeTarget, timeout_s: float) -> tuple[bool, str]:
    host = action.get("host") or target.pod_ip
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, target.port(action["port"])), timeout_s)
    writer.close()
    return True, ""


async def _exec(action: dict[str, Any], target: ProbeTarget, timeout_s: float) -> tuple[bool, str]:
    process = await asyncio.create_subprocess_exec(
        *target.launch.in_pod(map_exec_argv(action["command"], target.launch)),
        env=target.launch.env,
        cwd=target.launch.cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode == 0:
        return True, ""
    return False, output.decode(errors="replace").strip()[-1024:]


async def probe_once(probe: dict[str, Any], target: ProbeTarget) -> tuple[bool, str]:
    """One attempt: (success, message). Timeouts and refused connections are failures, as in the kubelet."""
    timeout_s = probe.get("timeoutSeconds", 1)
    handlers = {"httpGet": _http_get, "tcpSocket": _tcp_socket, "exec": _exec}
    kind = next((key for key in handlers if key in probe), None)
    if kind is None:
        return False, "unsupported probe handler (grpc probes are not run by the node agent)"
    try:
        return await handlers[kind](probe[kind], target, timeout_s)
    except TimeoutError:
        return False, f"{kind} probe timed out after {timeout_s}s"
    except (OSError, aiohttp.ClientError) as error:
        return False, f"{kind} probe failed: {error}"


class ProbeWorker:
    """One probe of one container run: calls `on_result(ok, message)` when its verdict changes.

    `initial` is the verdict before any attempt: False for readiness (not ready until it passes), True for
    liveness (alive until it fails), None for startup (either verdict is news)."""

    def __init__(
        self,
        probe: dict[str, Any],
        target: ProbeTarget,
        initial: bool | None,
        on_result: Callable[[bool, str], Awaitable[None]],
        until_success: bool = False,
    ) -> None:
        self.probe = probe
        self.until_success = until_success
        self.target = target
        self.result = initial
        self.on_result = on_result
        self.successes = 0
        self.failures = 0

    async def run(self) -> None:
        period = self.probe.get("periodSeconds", 10)
        await asyncio.sleep(self.probe.get("initialDelaySeconds", 0))
        while True:
            started = asyncio.get_running_loop().time()
            ok, message = await probe_once(self.probe, self.target)
            await self._record(ok, message)
            if self.until_success and self.result is True:
                return
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, period - elapsed))

    async def _record(self, ok: bool, message: str) -> None:
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            flips = self.result is not True and self.successes >= self.probe.get("successThreshold", 1)
        else:
            self.successes, self.failures = 0, self.failures + 1
            flips = self.result is not False and self.failures >= self.probe.get("failureThreshold", 3)
        if flips:
            self.result = ok
            await self.on_result(ok, message)
