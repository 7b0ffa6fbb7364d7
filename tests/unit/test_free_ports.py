"""Ports for local etcd and servers come from below the kernel's ephemeral range, where no
outgoing connection can take one between its choice and its bind."""

from __future__ import annotations

import socket
from pathlib import Path

from discovery.devtools.process import free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(50)
    assert len(set(ports)) == 50
    assert all(1024 <= p < first for p in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_or_excluded_is_not_offered() -> None:
    taken = free_ports(1)[0]
    with socket.socket() as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        for _ in range(20):
            assert taken not in free_ports(100)
    assert taken not in free_ports(200, exclude={taken})
