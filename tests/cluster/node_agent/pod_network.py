"""Pod addresses on this machine: a private range routed to the loopback interface.

A pod's processes bind its own IP, so two pods can both listen on port 8000 (as in their own network
namespaces) and the controller-manager publishes the IPs in EndpointSlices. The range cannot be 127/8:
the API server refuses loopback addresses in EndpointSlices. Adding an address with a /16 prefix to `lo`
makes Linux deliver the whole /16 locally (like 127.0.0.0/8), which needs CAP_NET_ADMIN once per
machine; the address stays (other local clusters may be using it) and is removed with
`ip addr del 10.245.0.1/16 dev lo`.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
import subprocess

POD_NETWORK = ipaddress.ip_network("10.245.0.0/16")
NODE_IP = "10.245.0.1"  # the address on `lo`; the node's InternalIP and every pod's hostIP


class PodNetworkUnavailable(RuntimeError):
    pass


def _is_local(address: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def ensure_pod_network() -> None:
    """Makes POD_NETWORK local to this machine (adds NODE_IP/16 to `lo` unless some address already does)."""
    probe_address = str(POD_NETWORK.network_address + 2)
    if _is_local(probe_address):
        return
    command = ["ip", "addr", "add", f"{NODE_IP}/{POD_NETWORK.prefixlen}", "dev", "lo"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        problem = result.stderr.strip() if result.returncode != 0 else ""
    except OSError as error:
        problem = str(error)
    if (problem and "File exists" not in problem) or not _is_local(probe_address):
        raise PodNetworkUnavailable(
            f"the node agent's pods need {POD_NETWORK} routed to the loopback interface, and "
            f"`{' '.join(command)}` failed ({problem or 'still not local'}): run it once as root "
            "(it needs CAP_NET_ADMIN)"
        )


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
