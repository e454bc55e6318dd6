"""Loopback ports: what the local platform, test fixtures and benchmarks bind."""
from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"  # loopback only: local services are not meant to be reachable from the network


# Ray's workers take ports 10002-19999 by default (``--min/max-worker-port``); Serve's direct-ingress
# replicas 30000-31000 (HTTP) and 40000-41000 (gRPC).  Ours come from between the two.
_OURS = range(20000, 30000)
_FALLBACK_EPHEMERAL = (32768, 60999)
_handed_out: set[int] = set()


def ephemeral_ports() -> range:
    """The ports the OS gives outgoing connections and ``bind(0)`` (Linux's ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = _FALLBACK_EPHEMERAL
    return range(low, high + 1)


def _bindable(port: int, host: str) -> bool:
    # Without SO_REUSEADDR, on the address asked for and on all of them (HAProxy binds 0.0.0.0):
    # any socket holding the port, listening or connected, makes this fail.
    for addr in {host, "0.0.0.0"}:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def free_port(host: str = HOST) -> int:
    """A port nothing holds now, that nothing is likely to take before its server binds it.

    Not the OS's pick (``bind(0)``): that comes from the ephemeral range, where every outgoing
    connection on the machine (Ray's processes open hundreds) takes its local port, so a port
    picked before a cluster starts can be taken by the time its server binds it (CI saw HAProxy
    die on "Address already in use" this way).  Instead a random free port between Ray's
    worker ports and Serve's direct-ingress ports, below the ephemeral range, never the same
    one twice in a process.
    """
    low, high = _OURS.start, min(_OURS.stop, ephemeral_ports().start) - 1
    if high - low < 1000:  # an unusual port layout: leave it to the OS
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    for _ in range(200):
        port = random.randint(low, high)
        if port not in _handed_out and _bindable(port, host):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port found in {low}-{high}")


def port_free(port: int, host: str = HOST) -> bool:
    """Whether ``port`` can be bound (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on ``port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
