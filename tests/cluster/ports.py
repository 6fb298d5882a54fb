"""Free loopback ports, so parallel or leftover clusters never collide."""

import socket


def free_loopback_ports(count: int) -> list[int]:
    # All sockets stay open until every port is chosen, so the kernel hands out `count` distinct ports.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
