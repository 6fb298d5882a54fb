"""What a container runs on this machine: argv, environment and working directory, from the pod spec.

There is no image and no mount namespace, so three things are mapped (the README's "container mapping"):
- the image is not pulled: `command` (or the image's known entrypoint) runs from this machine, with the
  tools named in COMMANDS taken from the Python environment running the agent (`kubellm` is the venv's);
- the process runs in the pod's network namespace (pod_network: `ip netns exec`), so `0.0.0.0` is the
  pod's own addresses, as in a real pod;
- a volume's mountPath (in args, env values and workingDir, as a whole value or a path prefix) is
  replaced by the volume's directory on this machine (`/dev/shm` stays: it is this machine's).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster.node_agent.pod_network import in_netns

VENV_BIN = Path(sys.executable).parent
COMMANDS = {
    "kubellm": str(VENV_BIN / "kubellm"),
    "python": sys.executable,
    "python3": sys.executable,
}
# Images whose ENTRYPOINT/CMD the agent knows (Dockerfile.engine), for containers without `command`.
IMAGE_ENTRYPOINTS: dict[str, tuple[list[str], list[str]]] = {
    "ghcr.io/kubellm/engine": (["kubellm", "serve"], ["--host", "0.0.0.0", "--port", "8000"]),
}
# The image's ENV that matters on this machine (Dockerfile.engine: PYTHONUNBUFFERED=1).
IMAGE_ENV = {"PYTHONUNBUFFERED": "1"}
# From the agent's environment: the container's filesystem is this machine's, caches included.
PASSED_THROUGH = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "XDG_CACHE_HOME", "KUBELLM_CACHE_DIR")
UNSHADOWED_MOUNTS = ("/dev/shm",)

ObjectReader = Callable[[str, str], Awaitable[dict[str, Any] | None]]  # (kind path, name) -> object


class LaunchError(RuntimeError):
    """The container cannot start (CreateContainerConfigError / CreateContainerError in the kubelet)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ContainerLaunch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    mounts: dict[str, Path]
    netns: str = ""  # the pod's network namespace: the process and its exec probes and hooks run there

    def in_pod(self, argv: list[str]) -> list[str]:
        return in_netns(self.netns, argv)


def image_repository(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[0] if ":" in last else name


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are substituted, $$ escapes, the rest stays."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", substitute, text)


def field_value(pod: dict[str, Any], field_path: str) -> str:
    """A downward-API fieldRef, as the kubelet resolves it."""
    metadata, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs", [])),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs", [])),
    }
    if field_path in simple:
        return simple[field_path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
    if match:
        return metadata.get(match.group(1), {}).get(match.group(2), "")
    raise LaunchError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {field_path!r}")


async def _key_ref(ref: dict[str, Any], kind: str, namespace: str, read: ObjectReader) -> str | None:
    obj = await read(f"/api/v1/namespaces/{namespace}/{kind}", ref["name"])
    data = (obj or {}).get("data", {})
    if ref["key"] in data:
        value = data[ref["key"]]
        return base64_decode(value) if kind == "secrets" else value
    if ref.get("optional"):
        return None
    what = "secret" if kind == "secrets" else "configmap"
    missing = f'{what} "{ref["name"]}" not found' if obj is None else f"couldn't find key {ref['key']}"
    raise LaunchError("CreateContainerConfigError", missing)


def base64_decode(value: str) -> str:
    return base64.b64decode(value).decode()


async def container_env(pod: dict[str, Any], container: dict[str, Any], read: ObjectReader) -> dict[str, str]:
    """The container's own variables (envFrom, then env in order, each able to use the ones before)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for key, kind in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
            if key not in source:
                continue
            obj = await read(f"/api/v1/namespaces/{namespace}/{kind}", source[key]["name"])
            if obj is None and not source[key].get("optional"):
                raise LaunchError(
                    "CreateContainerConfigError", f'{kind[:-1]} "{source[key]["name"]}" not found'
                )
            for name, value in (obj or {}).get("data", {}).items():
                env[prefix + name] = base64_decode(value) if kind == "secrets" else value
    for var in container.get("env", []):
        value: str | None
        if "valueFrom" not in var:
            value = expand(var.get("value", ""), env)
        elif "fieldRef" in var["valueFrom"]:
            value = field_value(pod, var["valueFrom"]["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in var["valueFrom"]:
            value = await _key_ref(var["valueFrom"]["secretKeyRef"], "secrets", namespace, read)
        elif "configMapKeyRef" in var["valueFrom"]:
            value = await _key_ref(var["valueFrom"]["configMapKeyRef"], "configmaps", namespace, read)
        else:
            raise LaunchError("CreateContainerConfigError", f"unsupported valueFrom in env {var['name']}")
        if value is not None:
            env[var["name"]] = value
    return env


def _map_paths(value: str, mounts: dict[str, Path]) -> str:
    for mount_path, directory in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if mount_path in UNSHADOWED_MOUNTS:
            continue
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(directory) + value[len(mount_path.rstrip("/")) :]
    return value


def _executable(name: str) -> str:
    if name in COMMANDS:
        return COMMANDS[name]
    found = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
    if found is None:
        raise LaunchError("CreateContainerError", f'exec: "{name}": executable file not found in $PATH')
    return found


def map_exec_argv(command: list[str], launch: ContainerLaunch) -> list[str]:
    """An exec probe's or hook's command as it runs here (its executable mapped like the container's)."""
    argv = [_map_paths(expand(part, launch.env), launch.mounts) for part in command]
    return [_executable(argv[0]), *argv[1:]]


async def container_launch(
    pod: dict[str, Any],
    container: dict[str, Any],
    mounts: dict[str, Path],
    rootfs: Path,
    read: ObjectReader,
    netns: str = "",
) -> ContainerLaunch:
    """Everything needed to start `container` of `pod` (whose status already has its podIP)."""
    own_env = await container_env(pod, container, read)
    env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    env |= {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "HOSTNAME": pod["metadata"]["name"],
        **IMAGE_ENV,
    }
    env |= {name: _map_paths(value, mounts) for name, value in own_env.items()}
    command, args = container.get("command"), container.get("args")
    if not command:
        known = IMAGE_ENTRYPOINTS.get(image_repository(container.get("image", "")))
        if known is None:
            raise LaunchError(
                "CreateContainerError",
                f"image {container.get('image')!r} has no known entrypoint on this node: set `command`",
            )
        command, args = known[0], args if args is not None else known[1]
    argv = [expand(part, own_env) for part in [*command, *(args or [])]]
    argv = [_map_paths(arg, mounts) for arg in argv]
    argv[0] = _executable(argv[0])
    cwd = rootfs
    if container.get("workingDir"):
        mapped = _map_paths(container["workingDir"], mounts)
        # Outside every volume, the directory lives in the container's own scratch "root filesystem".
        cwd = Path(mapped) if mapped != container["workingDir"] else rootfs / mapped.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
    return ContainerLaunch(argv=argv, env=env, cwd=cwd, mounts=mounts, netns=netns)
