"""One pod bound to the agent's node, from its IP to its removal: prepares volumes, runs the containers
(container_run), writes the status, and on deletion stops the containers within the grace period and
removes the pod from the API (a delete with grace 0, as the kubelet does)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from tests.cluster.node_agent.container_launch import ContainerLaunch, LaunchError, container_launch
from tests.cluster.node_agent.container_run import ContainerRun, rfc3339
from tests.cluster.node_agent.kube import KubeApi, KubeError
from tests.cluster.node_agent.pod_network import NODE_IP, remove_pod_netns
from tests.cluster.node_agent.pod_status import pod_status
from tests.cluster.node_agent.volumes import container_mounts, prepare_volumes

VOLUME_RETRY_S = 5.0
DEFAULT_GRACE_S = 30


class PodWorker:
    def __init__(self, api: KubeApi, pod: dict[str, Any], pod_ip: str, pods_dir: Path) -> None:
        self.api = api
        self.pod = pod
        self.uid: str = pod["metadata"]["uid"]
        self.pod_ip = pod_ip
        self.netns = ""  # the pod's network namespace, made by the agent before run()
        metadata = pod["metadata"]
        self.pod_dir = pods_dir / f"{metadata['namespace']}_{metadata['name']}_{self.uid}"
        self.log = logging.getLogger(f"pod {metadata['namespace']}/{metadata['name']}")
        self.start_time = rfc3339()
        self.containers = [ContainerRun(self, spec) for spec in pod["spec"]["containers"]]
        self.stopping = asyncio.Event()  # set once the pod has a deletionTimestamp (or is gone)
        self.gone = False  # deleted from the API already (a forced delete): nothing left to write
        self._publish_lock = asyncio.Lock()
        self._last_status: dict[str, Any] | None = None
        self._final_phase: str | None = None

    @property
    def path(self) -> str:
        metadata = self.pod["metadata"]
        return f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}"

    def observe(self, pod: dict[str, Any]) -> None:
        """A newer version of the pod from the watch."""
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.stopping.set()

    def vanished(self) -> None:
        """The pod is gone from the API (force-deleted): stop its containers at once."""
        self.gone = True
        self.stopping.set()
        for container in self.containers:
            container.kill_now()

    async def read_object(self, collection: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.api.get(f"{collection}/{name}")
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    async def launch_for(self, spec: dict[str, Any], volumes: dict[str, Path]) -> ContainerLaunch:
        rootfs = self.pod_dir / "rootfs" / spec["name"]
        rootfs.mkdir(parents=True, exist_ok=True)
        mounts = container_mounts(spec, volumes)
        return await container_launch(self.pod, spec, mounts, rootfs, self.read_object, self.netns)

    async def publish(self) -> None:
        """Writes the status computed from the containers, unless nothing changed."""
        if self.gone:
            return
        async with self._publish_lock:
            containers = [c.status() for c in self.containers]
            status = pod_status(
                self.pod, self.pod_ip, NODE_IP, self.start_time, containers, rfc3339(), self._final_phase
            )
            comparable = {
                **status,
                "conditions": [{**c, "lastTransitionTime": ""} for c in status["conditions"]],
            }
            if comparable == self._last_status:
                return
            try:
                self.observe(await self.api.merge_patch(f"{self.path}/status", {"status": status}))
                self._last_status = comparable
            except KubeError as error:
                if error.status != 404:
                    raise
                self.gone = True

    async def run(self) -> None:
        try:
            await self._run()
        except Exception:
            self.log.exception("pod worker failed")
            raise
        finally:
            for container in self.containers:
                container.kill_now()

    async def _run(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        # The status the kubelet writes once the sandbox (here: the IP) exists, with every container
        # still ContainerCreating; the downward API's status.podIP reads it from here.
        await self.publish()
        volumes = await self._prepare_volumes()
        if volumes is not None:
            self.log.info("starting on %s", self.pod_ip)
            supervisors = [asyncio.create_task(c.supervise(volumes)) for c in self.containers]
            try:
                await self._until_stopping(supervisors)
                await self._stop_containers()
            finally:
                for supervisor in supervisors:
                    supervisor.cancel()  # a no-op for those that ended; the agent stopping cancels the rest
                for supervisor in await asyncio.gather(*supervisors, return_exceptions=True):
                    if isinstance(supervisor, Exception):
                        self.log.error("a container supervisor failed", exc_info=supervisor)
        await self._remove()

    async def _until_stopping(self, supervisors: list[asyncio.Task[None]]) -> None:
        """Until the pod is deleted; containers that end for good (restartPolicy) leave it to its phase."""
        stop = asyncio.create_task(self.stopping.wait())
        try:
            running = set(supervisors)
            while running and not self.stopping.is_set():
                _, running = await asyncio.wait({stop, *running}, return_when=asyncio.FIRST_COMPLETED)
                running.discard(stop)
            if not self.stopping.is_set():
                self.log.info("every container ended: the pod is %s", self.pod["status"].get("phase"))
                await self.stopping.wait()
        finally:
            stop.cancel()

    async def _prepare_volumes(self) -> dict[str, Path] | None:
        while not self.stopping.is_set():
            try:
                return await prepare_volumes(self.api, self.pod, self.pod_dir, self.read_object)
            except LaunchError as error:
                for container in self.containers:
                    container.state = {"waiting": {"reason": error.reason, "message": str(error)}}
                await self.publish()
            try:
                await asyncio.wait_for(self.stopping.wait(), VOLUME_RETRY_S)
            except TimeoutError:
                pass
        return None

    def _grace_s(self) -> float:
        metadata, spec = self.pod["metadata"], self.pod["spec"]
        grace = metadata.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds"))
        return float(DEFAULT_GRACE_S if grace is None else grace)

    async def _stop_containers(self) -> None:
        grace = self._grace_s()
        self.log.info("stopping containers (grace period %.0fs)", grace)
        deadline = time.monotonic() + grace
        await asyncio.gather(*(c.stop(deadline) for c in self.containers))

    async def _remove(self) -> None:
        """The final status (Succeeded if every container exited 0, else Failed), then the delete."""
        if self.gone:
            return
        states = [c.state.get("terminated", {}).get("exitCode", 1) for c in self.containers]
        self._final_phase = "Succeeded" if all(code == 0 for code in states) else "Failed"
        await self.publish()
        # The sandbox goes before the pod leaves the API, as the kubelet's: whoever sees the pod gone may rely
        # on its network being gone too (the agent's own teardown came after, and a test saw the namespace).
        if self.netns:
            await asyncio.to_thread(remove_pod_netns, self.netns)
            self.netns = ""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        try:
            await self.api.delete(self.path, body)
        except KubeError as error:
            if error.status not in (404, 409):
                raise
        self.log.info("removed")
