"""The proxy's listening socket: bound at startup, listening only once there is an identity.

Rules:

1. Until the first SVID arrives the proxy accepts nothing.  We bind at once
   (so "address in use" fails the start with one line, and port 0 resolves to
   the real port that `proxy.waiting` reports) but call ``listen()`` only when
   a TLS context exists.  A bound socket that is not listening refuses
   connections outright (RST, ECONNREFUSED), so a client or load balancer
   learns immediately that this instance is not serving, instead of
   completing a TCP handshake into a backlog that nobody reads, or being
   accepted and then closed, which looks like a broken server.
2. A Unix socket path is only replaced when what is there is a stale socket
   (nothing answers on it); a symlink or any other file is refused
   (`tally.ops.net.clear_stale_unix`).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import trio

from tally.ops.config import Address
from tally.ops.net import ListenError, clear_stale_unix

BACKLOG = 1024


async def bind(addr: Address) -> trio.socket.SocketType:
    """A socket bound to ``addr`` and not yet listening (rule 1)."""
    if addr.path is not None:
        clear_stale_unix(Path(addr.path))
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = addr.path
    else:
        try:
            infos = await trio.socket.getaddrinfo(
                addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise ListenError(f"cannot listen on {addr}: {exc}") from exc
        family, _, _, _, target = infos[0]
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        await sock.bind(target)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ListenError(f"cannot listen on {addr}: {reason}") from exc
    return sock


def bound_name(sock: trio.socket.SocketType) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return name
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_listening(sock: trio.socket.SocketType) -> trio.SocketListener:
    sock.listen(BACKLOG)
    return trio.SocketListener(sock)
