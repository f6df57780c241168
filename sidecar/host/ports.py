"""Listening TCP ports that a second sidecar can share, for a restart without a refused caller.

Listeners bind with SO_REUSEPORT (where the system has it): a new sidecar process
binds the port the running one holds, the kernel spreads new connections over both,
and the old one drains and exits. Linux lets only processes of the same user share a
port this way. So that two sidecars started on one port by mistake do not share it
silently, `already_listening` tells, before binding, whether another socket holds the
port, and the caller says so in a WARNING.
"""

from __future__ import annotations

import contextlib
import errno
import socket

REUSEPORT = getattr(socket, "SO_REUSEPORT", None)  # Linux, the BSDs, macOS; not Windows


def already_listening(family: int, sockaddr: tuple[object, ...]) -> bool:
    """Whether another socket holds this address: a bind without SO_REUSEPORT fails with
    EADDRINUSE then (SO_REUSEADDR lets it pass over connections in TIME_WAIT)."""
    if sockaddr[1] == 0:
        return False  # a port picked by the system is nobody else's
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(sockaddr)
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def port_held(host: str | None, port: int) -> bool:
    """Whether another socket holds host:port on any address the host name has."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return any(already_listening(info[0], info[4]) for info in dict.fromkeys(infos))


def bind_tcp(host: str | None, port: int) -> tuple[list[socket.socket], bool]:
    """Listening sockets for host:port, one per address the host name has (all on one
    port), bound with SO_REUSEPORT; and whether another socket held the port already."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    shared = False
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):  # unique, in order
            address = (sockaddr[0], port, *sockaddr[2:])
            shared = shared or already_listening(family, address)
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if REUSEPORT is not None:
                sock.setsockopt(socket.SOL_SOCKET, REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            port = sock.getsockname()[1]  # port 0: the others take the one picked
    except OSError:
        for opened in socks:
            with contextlib.suppress(OSError):
                opened.close()
        raise
    return socks, shared
