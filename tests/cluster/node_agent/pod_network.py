"""Pod networks on this machine, as a CNI bridge plugin makes them: every pod is a host of its own.

Each pod gets a network namespace `kubellm-<uid prefix>` with `lo` and an `eth0` holding its IP from
POD_NETWORK; the other end of eth0's veth pair is attached to the bridge BRIDGE in the root namespace,
which holds the gateway NODE_IP. So two pods both listen on 0.0.0.0:8000, the agent (and the tests) reach a
pod's IP through the bridge, and the controller-manager publishes the IPs in EndpointSlices (the API
server refuses loopback addresses there, so the range cannot be 127/8). Nothing stays behind: a pod's
namespace (and with it its veth pair) goes with the pod, the bridge with the agent. It needs `ip` (iproute2)
and CAP_NET_ADMIN (root in CI).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import shutil
import subprocess

POD_NETWORK = ipaddress.ip_network("10.245.0.0/16")
NODE_IP = "10.245.0.1"  # the bridge's address: the pods' gateway, the node's InternalIP, every pod's hostIP
BRIDGE = "kubellm-br0"
NETNS_PREFIX = "kubellm-"
PREFIX = POD_NETWORK.prefixlen

log = logging.getLogger("node-agent")


class PodNetworkUnavailable(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        problem = result.stderr.strip()
        hint = " (it needs CAP_NET_ADMIN: run the agent as root)" if "not permitted" in problem else ""
        raise PodNetworkUnavailable(f"`{' '.join(command)}` failed: {problem}{hint}")
    return result


def netns_name(pod_uid: str) -> str:
    return NETNS_PREFIX + pod_uid.replace("-", "")[:12]


def _host_veth(netns: str) -> str:
    return "kv" + netns[len(NETNS_PREFIX) :]  # interface names have at most 15 characters


def _our_netns() -> list[str]:
    listed = _ip("netns", "list").stdout.split()
    return [name for name in listed if name.startswith(NETNS_PREFIX)]


def ensure_pod_network() -> None:
    """Creates the bridge with the gateway address (and clears what an earlier agent may have left)."""
    if shutil.which("ip") is None:
        raise PodNetworkUnavailable("the node agent needs `ip` from iproute2: apt-get install -y iproute2")
    # The node agent once put the gateway on `lo`; traffic to 10.245/16 must go to the pods' namespaces.
    _ip("addr", "del", f"{NODE_IP}/{PREFIX}", "dev", "lo", check=False)
    for netns in _our_netns():  # an agent killed outright leaves its pods' namespaces
        remove_pod_netns(netns)
    _ip("link", "del", BRIDGE, check=False)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{NODE_IP}/{PREFIX}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    log.info("pod network %s on bridge %s (gateway %s)", POD_NETWORK, BRIDGE, NODE_IP)


def remove_pod_network() -> None:
    """Removes every pod namespace left and the bridge (its address goes with it)."""
    for netns in _our_netns():
        remove_pod_netns(netns)
    _ip("link", "del", BRIDGE, check=False)


def add_pod_netns(pod_uid: str, pod_ip: str) -> str:
    """The pod's network namespace with `eth0` = pod_ip/16 behind the bridge; returns its name."""
    netns = netns_name(pod_uid)
    host_end, pod_end = _host_veth(netns), "kp" + netns[len(NETNS_PREFIX) :]
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        _ip("link", "set", host_end, "master", BRIDGE)
        _ip("link", "set", host_end, "up")
        _ip("link", "set", pod_end, "netns", netns)
        inside = ("-n", netns)
        _ip(*inside, "link", "set", pod_end, "name", "eth0")
        _ip(*inside, "addr", "add", f"{pod_ip}/{PREFIX}", "dev", "eth0")
        _ip(*inside, "link", "set", "eth0", "up")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "route", "add", "default", "via", NODE_IP)
    except PodNetworkUnavailable:
        remove_pod_netns(netns)
        raise
    return netns


def remove_pod_netns(netns: str) -> None:
    """Deletes the namespace and its veth pair (ignoring what is already gone)."""
    _ip("link", "del", _host_veth(netns), check=False)
    _ip("netns", "del", netns, check=False)


def in_netns(netns: str, argv: list[str]) -> list[str]:
    """argv run inside the pod's namespace: `ip netns exec` execs it, so the process keeps its PID."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class PodAddresses:
    """Hands out pod IPs from POD_NETWORK; a released IP is reused only after the others, so a stale
    endpoint never reaches a new pod at once. The start is random so two agents rarely collide."""

    def __init__(self) -> None:
        hosts = [str(ip) for ip in POD_NETWORK.hosts() if str(ip) != NODE_IP]
        start = random.randrange(len(hosts))
        self.free: list[str] = hosts[start:] + hosts[:start]
        self.in_use: set[str] = set()

    def allocate(self) -> str:
        address = self.free.pop(0)
        self.in_use.add(address)
        return address

    def release(self, address: str) -> None:
        if address in self.in_use:
            self.in_use.remove(address)
            self.free.append(address)
