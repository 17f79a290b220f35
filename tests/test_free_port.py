"""rollout/process.free_port: server ports come from below the OS's ephemeral range, free when drawn."""

import socket

from dapo_megatron.rollout.process import free_port


def test_server_ports_are_free_and_never_in_the_range_outgoing_connections_draw_from():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(10000 <= p < min(20000, ephemeral_low) for p in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free: binds
