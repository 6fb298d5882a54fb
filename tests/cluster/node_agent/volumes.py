"""A pod's volumes as directories on this machine (no mounts: container_launch maps mountPaths to them)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tests.cluster.node_agent.container_launch import LaunchError, ObjectReader, field_value
from tests.cluster.node_agent.kube import KubeApi


async def _service_account_token(api: KubeApi, pod: dict[str, Any], source: dict[str, Any]) -> str:
    """A bound token from the TokenRequest API, as the kubelet asks for it."""
    namespace = pod["metadata"]["namespace"]
    account = pod["spec"].get("serviceAccountName", "default")
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [source["audience"]] if source.get("audience") else [],
            "expirationSeconds": source.get("expirationSeconds", 3607),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            },
        },
    }
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"
    return (await api.create(path, request))["status"]["token"]


def _items(data: dict[str, str], items: list[dict[str, Any]] | None) -> dict[str, str]:
    if not items:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items if item["key"] in data}


async def _key_value_files(
    kind: str, source: dict[str, Any], namespace: str, read: ObjectReader
) -> dict[str, str]:
    name = source.get("name") or source.get("secretName")
    obj = await read(f"/api/v1/namespaces/{namespace}/{kind}", name)
    if obj is None:
        if source.get("optional"):
            return {}
        raise LaunchError("ContainerCreating", f'MountVolume.SetUp failed: {kind[:-1]} "{name}" not found')
    data = obj.get("data", {})
    if kind == "secrets":
        data = {key: base64.b64decode(value).decode() for key, value in data.items()}
    return _items(data, source.get("items"))


async def _projected_files(
    api: KubeApi, pod: dict[str, Any], projected: dict[str, Any], read: ObjectReader
) -> dict[str, str]:
    namespace = pod["metadata"]["namespace"]
    files: dict[str, str] = {}
    for source in projected.get("sources", []):
        if "serviceAccountToken" in source:
            token_source = source["serviceAccountToken"]
            files[token_source["path"]] = await _service_account_token(api, pod, token_source)
        elif "configMap" in source:
            files |= await _key_value_files("configmaps", source["configMap"], namespace, read)
        elif "secret" in source:
            files |= await _key_value_files("secrets", source["secret"], namespace, read)
        elif "downwardAPI" in source:
            files |= _downward_files(pod, source["downwardAPI"])
    return files


def _downward_files(pod: dict[str, Any], downward: dict[str, Any]) -> dict[str, str]:
    files = {}
    for item in downward.get("items", []):
        if "fieldRef" in item:
            path = item["fieldRef"]["fieldPath"]
            if path in ("metadata.labels", "metadata.annotations"):
                values = pod["metadata"].get(path.split(".")[1], {})
                files[item["path"]] = "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))
            else:
                files[item["path"]] = field_value(pod, path)
    return files


def _write(directory: Path, files: dict[str, str]) -> None:
    for relative, content in files.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)


async def prepare_volumes(
    api: KubeApi, pod: dict[str, Any], pod_dir: Path, read: ObjectReader
) -> dict[str, Path]:
    """Directory of each volume by name: emptyDir (memory-backed ones too) is a fresh directory;
    configMap, secret, downwardAPI and projected volumes (the service account token) are written out;
    hostPath is the path itself (this machine is the host). Claims need a volume plugin: not here."""
    namespace = pod["metadata"]["namespace"]
    if pod["spec"].get("initContainers"):  # refused where it shows, rather than skipped silently
        raise LaunchError("CreateContainerConfigError", "init containers are not supported by the node agent")
    directories: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes", []):
        name = volume["name"]
        if "hostPath" in volume:
            directories[name] = Path(volume["hostPath"]["path"])
            continue
        directory = pod_dir / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        directories[name] = directory
        if "emptyDir" in volume:
            continue
        if "configMap" in volume:
            _write(directory, await _key_value_files("configmaps", volume["configMap"], namespace, read))
        elif "secret" in volume:
            _write(directory, await _key_value_files("secrets", volume["secret"], namespace, read))
        elif "downwardAPI" in volume:
            _write(directory, _downward_files(pod, volume["downwardAPI"]))
        elif "projected" in volume:
            _write(directory, await _projected_files(api, pod, volume["projected"], read))
        else:
            kind = next((key for key in volume if key != "name"), "unknown")
            raise LaunchError(
                "ContainerCreating", f"volume {name!r}: {kind} volumes are not supported by the node agent"
            )
    return directories


def container_mounts(container: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Path]:
    """mountPath -> directory on this machine, for one container (subPath honoured)."""
    mounts = {}
    for mount in container.get("volumeMounts", []):
        directory = volumes[mount["name"]]
        if mount.get("subPath"):
            directory = directory / mount["subPath"]
            directory.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = directory
    return mounts
