"""One container of a pod across its restarts: start the process, probe it, restart it per the pod's
restartPolicy with the kubelet's back-off, stop it (preStop hook, SIGTERM, grace period, SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from tests.cluster.node_agent.container_launch import ContainerLaunch, LaunchError, map_exec_argv
from tests.cluster.node_agent.probes import ProbeTarget, ProbeWorker
from tests.cluster.processes import _die_with_parent

if TYPE_CHECKING:
    from tests.cluster.node_agent.pod_worker import PodWorker

BACKOFF_INITIAL_S = 10.0  # the kubelet's crash-loop back-off: 10 s, doubling, at most 5 minutes,
BACKOFF_MAX_S = 300.0
BACKOFF_RESET_AFTER_S = 600.0  # forgotten once the container ran 10 minutes
MIN_GRACE_AFTER_PRE_STOP_S = 2.0  # the kubelet always leaves SIGTERM at least this long
# FallbackToLogsOnError: the kubelet's termination message is at most the last 80 lines / 2048 bytes.
TERMINATION_LOG_LINES = 80
TERMINATION_LOG_BYTES = 2048


def rfc3339(timestamp: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def log_tail(path: Path) -> str:
    with open(path, "rb") as log:
        lines = deque(log, maxlen=TERMINATION_LOG_LINES)
    return b"".join(lines)[-TERMINATION_LOG_BYTES:].decode(errors="replace")


class ContainerRun:
    def __init__(self, worker: PodWorker, spec: dict[str, Any]) -> None:
        self.worker = worker
        self.spec = spec
        self.name: str = spec["name"]
        self.restart_count = 0
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.started = False
        self.ready = False
        self.container_id = ""
        self.process: asyncio.subprocess.Process | None = None
        self.launch: ContainerLaunch | None = None
        self.log_path: Path | None = None  # this run's output, as /var/log/pods/... on a real node
        self.backoff_s = 0.0
        self.probe_tasks: list[asyncio.Task[None]] = []
        self.stopping: asyncio.Task[None] | None = None

    @property
    def log_dir(self) -> Path:
        return self.worker.pod_dir / "logs" / self.name

    def status(self) -> dict[str, Any]:
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status

    # --- the life of the container -----------------------------------------------------------------

    async def supervise(self, volumes: dict[str, Path]) -> None:
        """Runs the container until it ends for good (restartPolicy) or the pod stops."""
        while not self.worker.stopping.is_set():
            try:
                await self._start(volumes)
            except LaunchError as error:
                self.state = {"waiting": {"reason": error.reason, "message": str(error)}}
                if await self._back_off(crashed=False):
                    return
                continue
            if self.worker.stopping.is_set():  # deleted while starting: stop it like the others
                grace = self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30)
                await self.stop(time.monotonic() + grace)
            started_at = time.time()
            exit_code = await self._run_until_exit()
            terminated = self._terminated(exit_code, started_at)
            self.started = self.ready = False
            if self.worker.stopping.is_set() or not self._restarts(exit_code):
                self.state = {"terminated": terminated}
                await self.worker.publish()
                return
            self.last_state = {"terminated": terminated}
            if time.time() - started_at >= BACKOFF_RESET_AFTER_S:
                self.backoff_s = 0.0
            if await self._back_off(crashed=True):
                self.state = {"terminated": terminated}
                await self.worker.publish()
                return
            self.restart_count += 1

    def _restarts(self, exit_code: int) -> bool:
        policy = self.worker.pod["spec"].get("restartPolicy", "Always")
        return policy == "Always" or (policy == "OnFailure" and exit_code != 0)

    async def _back_off(self, crashed: bool) -> bool:
        """Waits out the crash-loop back-off; True if the pod began stopping meanwhile."""
        self.backoff_s = min(BACKOFF_MAX_S, self.backoff_s * 2 if self.backoff_s else BACKOFF_INITIAL_S)
        if crashed:
            metadata = self.worker.pod["metadata"]
            message = (
                f"back-off {self.backoff_s:.0f}s restarting failed container={self.name} "
                f"pod={metadata['name']}_{metadata['namespace']}({metadata['uid']})"
            )
            self.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        await self.worker.publish()
        try:
            await asyncio.wait_for(self.worker.stopping.wait(), self.backoff_s)
            return True
        except TimeoutError:
            return False

    async def _start(self, volumes: dict[str, Path]) -> None:
        self.launch = await self.worker.launch_for(self.spec, volumes)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.restart_count}.log"
        with open(log_path, "ab") as log:
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *self.launch.in_pod(self.launch.argv),
                    env=self.launch.env,
                    cwd=self.launch.cwd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # its own group: stopping reaches its children, as a cgroup would
                    preexec_fn=_die_with_parent,  # an agent killed outright takes its containers along
                )
            except OSError as error:
                raise LaunchError("CreateContainerError", str(error)) from error
        self.log_path = log_path
        self.container_id = f"kubellm-node-agent://{self.worker.uid}-{self.name}-{self.restart_count}"
        self.state = {"running": {"startedAt": rfc3339()}}
        self.started = self.ready = False
        await self.worker.publish()

    async def _run_until_exit(self) -> int:
        assert self.process is not None
        self._start_probes()
        try:
            return await self.process.wait()
        finally:
            for task in self.probe_tasks:
                task.cancel()
            self.probe_tasks = []
            # Whatever the main process left behind goes with it (the runtime kills the container's cgroup).
            _kill_group(self.process.pid)

    def _terminated(self, exit_code: int, started_at: float) -> dict[str, Any]:
        terminated: dict[str, Any] = {
            "exitCode": exit_code if exit_code >= 0 else 128 - exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": rfc3339(started_at),
            "finishedAt": rfc3339(),
            "containerID": self.container_id,
        }
        if exit_code < 0:
            terminated["signal"] = -exit_code
        policy = self.spec.get("terminationMessagePolicy", "File")
        if exit_code != 0 and policy == "FallbackToLogsOnError" and self.log_path is not None:
            message = log_tail(self.log_path)
            if message:
                terminated["message"] = message
        return terminated

    # --- probes ----------------------------------------------------------------------------------

    def _probe_target(self) -> ProbeTarget:
        assert self.launch is not None
        ports = {p["name"]: p["containerPort"] for p in self.spec.get("ports", []) if p.get("name")}
        return ProbeTarget(pod_ip=self.worker.pod_ip, ports=ports, launch=self.launch)

    def _spawn_probe(self, kind: str, initial: bool | None, on_result: Any) -> None:
        # The startup probe ends with its first success; the others run as long as the container.
        until_success = kind == "startupProbe"
        worker = ProbeWorker(self.spec[kind], self._probe_target(), initial, on_result, until_success)
        self.probe_tasks.append(asyncio.create_task(worker.run(), name=f"{self.name}-{kind}"))

    def _start_probes(self) -> None:
        if "startupProbe" in self.spec:
            self._spawn_probe("startupProbe", None, self._on_startup)
        else:
            self._spawn_after_startup()

    def _spawn_after_startup(self) -> None:
        self.started = True
        if "readinessProbe" in self.spec:
            self._spawn_probe("readinessProbe", False, self._on_readiness)
        else:
            self.ready = True
        if "livenessProbe" in self.spec:
            self._spawn_probe("livenessProbe", True, self._on_liveness)
        asyncio.get_running_loop().create_task(self.worker.publish())

    async def _on_startup(self, ok: bool, message: str) -> None:
        if ok:
            self._spawn_after_startup()
        else:
            self.worker.log.info("%s: startup probe failed (%s): restarting", self.name, message)
            self._kill_for_restart()

    async def _on_readiness(self, ok: bool, message: str) -> None:
        self.ready = ok
        await self.worker.publish()

    async def _on_liveness(self, ok: bool, message: str) -> None:
        if not ok:
            self.worker.log.info("%s: liveness probe failed (%s): restarting", self.name, message)
            self._kill_for_restart()

    def _kill_for_restart(self) -> None:
        # The kubelet kills a failed container like a deleted pod's: preStop hook, then SIGTERM, grace, SIGKILL.
        if self.stopping is None or self.stopping.done():
            grace = self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30)
            self.stopping = asyncio.get_running_loop().create_task(self.stop(time.monotonic() + grace))

    # --- stopping --------------------------------------------------------------------------------

    async def stop(self, deadline: float) -> None:
        """preStop hook, SIGTERM, then SIGKILL at `deadline` (time.monotonic()), at least 2 s after the hook."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        pre_stop = self.spec.get("lifecycle", {}).get("preStop")
        if pre_stop:
            try:
                await asyncio.wait_for(self._run_hook(pre_stop), max(0.0, deadline - time.monotonic()))
            except Exception as error:  # a failed hook does not stop the termination
                self.worker.log.info("%s: preStop hook failed: %r", self.name, error)
        if process.returncode is None:
            _signal(process.pid, signal.SIGTERM)
        remaining = max(deadline - time.monotonic(), MIN_GRACE_AFTER_PRE_STOP_S if pre_stop else 0.0)
        try:
            await asyncio.wait_for(process.wait(), remaining)
        except TimeoutError:
            self.worker.log.info("%s: grace period over: SIGKILL", self.name)
            _kill_group(process.pid)
            await process.wait()

    async def _run_hook(self, hook: dict[str, Any]) -> None:
        if "sleep" in hook:
            await asyncio.sleep(hook["sleep"]["seconds"])
        elif "exec" in hook:
            assert self.launch is not None
            process = await asyncio.create_subprocess_exec(
                *self.launch.in_pod(map_exec_argv(hook["exec"]["command"], self.launch)),
                env=self.launch.env,
                cwd=self.launch.cwd,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await process.wait()
        elif "httpGet" in hook:
            action = hook["httpGet"]
            target = self._probe_target()
            url = f"http://{action.get('host') or target.pod_ip}:{target.port(action['port'])}{action.get('path', '/')}"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                await response.read()

    def kill_now(self) -> None:
        if self.process is not None and self.process.returncode is None:
            _kill_group(self.process.pid)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
