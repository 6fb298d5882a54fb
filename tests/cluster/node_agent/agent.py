"""NodeAgent: registers the node, keeps its Lease and Ready condition fresh, and runs a PodWorker for
every pod the scheduler binds to it (found by a list + watch on spec.nodeName)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster.node_agent.container_run import ContainerRun, rfc3339
from tests.cluster.node_agent.kube import KubeApi, KubeError
from tests.cluster.node_agent.kubelet_api import self_signed_tls, serve_kubelet_api
from tests.cluster.node_agent.node import (
    KUBELET_API_HOST,
    LEASE_RENEW_S,
    STATUS_REPORT_S,
    lease_manifest,
    node_conditions,
    node_manifest,
    node_status,
)
from tests.cluster.node_agent.pod_network import (
    PodAddresses,
    PodNetworkUnavailable,
    add_pod_netns,
    ensure_pod_network,
    remove_pod_netns,
    remove_pod_network,
)
from tests.cluster.node_agent.pod_worker import PodWorker

log = logging.getLogger("node-agent")


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeAgent:
    def __init__(self, api: KubeApi, node_name: str, workdir: Path) -> None:
        self.api = api
        self.node_name = node_name
        self.pods_dir = workdir / "pods"
        self.addresses = PodAddresses()
        self.workers: dict[str, PodWorker] = {}  # by pod UID
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.node_uid = ""
        self.workdir = workdir
        self.kubelet_port = 0

    async def run(self) -> None:
        ensure_pod_network()
        try:
            await self._run()
        finally:
            remove_pod_network()

    async def _run(self) -> None:
        # The API server reaches the kubelet API on loopback (the Node's Hostname address).
        tls = self_signed_tls(self.workdir / "kubelet-tls", KUBELET_API_HOST)
        kubelet_api, self.kubelet_port = await serve_kubelet_api(KUBELET_API_HOST, tls, self.container)
        await self.register()
        try:
            await asyncio.gather(self.heartbeat(), self.watch_pods())
        finally:
            await kubelet_api.cleanup()
            for worker in self.workers.values():
                for container in worker.containers:
                    container.kill_now()
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the node --------------------------------------------------------------------------------

    async def register(self) -> None:
        path = f"/api/v1/nodes/{self.node_name}"
        try:
            manifest = node_manifest(self.node_name, rfc3339(), self.kubelet_port)
            node = await self.api.create("/api/v1/nodes", manifest)
        except KubeError as error:
            if error.status != 409:
                raise
            node = await self.api.merge_patch(
                f"{path}/status", {"status": node_status(rfc3339(), self.kubelet_port)}
            )
        self.node_uid = node["metadata"]["uid"]
        log.info("registered node %s", self.node_name)

    async def heartbeat(self) -> None:
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        last_status = time.monotonic()
        while True:
            lease = lease_manifest(self.node_name, self.node_uid, _micro_time())
            try:
                current = await self.api.get(lease_path)
                lease["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self.api.replace(lease_path, lease)
            except KubeError as error:
                if error.status == 404:
                    await self.api.create(
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease
                    )
                else:
                    log.warning("lease renewal failed: %s", error)
            if time.monotonic() - last_status >= STATUS_REPORT_S:
                conditions = node_conditions(rfc3339())
                await self.api.merge_patch(
                    f"/api/v1/nodes/{self.node_name}/status", {"status": {"conditions": conditions}}
                )
                last_status = time.monotonic()
            await asyncio.sleep(LEASE_RENEW_S)

    def container(self, namespace: str, pod: str, name: str) -> ContainerRun | None:
        for worker in self.workers.values():
            metadata = worker.pod["metadata"]
            if (metadata["namespace"], metadata["name"]) == (namespace, pod):
                return next((c for c in worker.containers if c.name == name), None)
        return None

    # --- its pods --------------------------------------------------------------------------------

    async def watch_pods(self) -> None:
        params = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        while True:
            try:
                listed = await self.api.get("/api/v1/pods", params)
                self.sync(listed["items"])
                version = listed["metadata"]["resourceVersion"]
                async for event in self.api.watch("/api/v1/pods", {**params, "resourceVersion": version}):
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    if event["type"] == "BOOKMARK":
                        continue
                    pod = event["object"]
                    if event["type"] == "DELETED":
                        self.forget(pod["metadata"]["uid"])
                    else:
                        self.observe(pod)
            except (KubeError, OSError, TimeoutError, aiohttp.ClientError, ValueError) as error:
                log.warning("pod watch interrupted: %r; listing again", error)
                await asyncio.sleep(1)

    def sync(self, pods: list[dict[str, Any]]) -> None:
        listed = {pod["metadata"]["uid"] for pod in pods}
        for uid in list(self.workers):
            if uid not in listed:
                self.forget(uid)
        for pod in pods:
            self.observe(pod)

    def observe(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is not None:
            worker.observe(pod)
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not pod["metadata"].get(
            "deletionTimestamp"
        ):
            return  # finished before this agent started: nothing to run
        worker = PodWorker(self.api, pod, self.addresses.allocate(), self.pods_dir)
        worker.observe(pod)
        self.workers[uid] = worker
        self.tasks[uid] = asyncio.create_task(self._run_worker(worker), name=f"pod-{uid}")

    async def _run_worker(self, worker: PodWorker) -> None:
        try:
            worker.netns = await asyncio.to_thread(add_pod_netns, worker.uid, worker.pod_ip)
            await worker.run()
        except PodNetworkUnavailable as error:
            worker.log.error("no pod network: %s", error)
        except Exception:
            pass  # logged by the worker; its pod stays as it last was
        finally:
            if worker.netns:
                await asyncio.to_thread(remove_pod_netns, worker.netns)
            self.addresses.release(worker.pod_ip)
            self.workers.pop(worker.uid, None)
            self.tasks.pop(worker.uid, None)

    def forget(self, uid: str) -> None:
        worker = self.workers.get(uid)
        if worker is not None:
            worker.vanished()
