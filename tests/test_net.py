"""Ports handed to local servers: free, and out of the way of the machine's own allocations."""
from __future__ import annotations

import socket

import pytest

from deepindex.net import HOST, ephemeral_ports, free_port, port_free

pytestmark = pytest.mark.timeout(60)


def test_free_ports_are_bindable_distinct_and_outside_the_ephemeral_ray_and_serve_ranges():
    """A port from the ephemeral range can be taken by any outgoing connection between the pick and
    the server's bind (CI lost HAProxy's stats port that way); Ray's workers take 10002-19999, Serve's
    direct-ingress replicas 30000-31000."""
    ephemeral = ephemeral_ports()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert port not in ephemeral
        assert not 10002 <= port <= 19999 and not 30000 <= port <= 31000
    assert all(port_free(p) for p in ports[:20])


def test_free_port_skips_ports_held_by_a_listener_or_a_connection(monkeypatch):
    """A port held by a connected socket (not only a listener) is not free: such a socket made
    HAProxy's bind on 0.0.0.0 fail."""
    import deepindex.net as net

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((HOST, free_port()))
        server.listen()
        listening = server.getsockname()[1]
        with socket.create_connection((HOST, listening)) as client:
            connected = client.getsockname()[1]
            picks = [listening, connected]
            real = net.random.randint
            monkeypatch.setattr(net.random, "randint", lambda a, b: picks.pop(0) if picks else real(a, b))
            port = free_port()
            assert not picks  # both held ports were tried first, and refused
            assert port not in (listening, connected)
