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
3. Workers (`proxy.workers`) share a TCP port through ``SO_REUSEPORT``: each
   binds its own socket (``reuse_port``) and the kernel spreads new
   connections over those that listen, so a worker still waiting for its
   first SVID gets none.  A Unix socket cannot be shared that way; its
   workers inherit the one socket the supervisor bound (`adopt`) and take
   turns accepting from its queue.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

import trio

from tally.ops.config import Address
from tally.ops.net import ListenError, clear_stale_unix

BACKLOG = 1024


async def bind(addr: Address, *, reuse_port: bool = False) -> trio.socket.SocketType:
    """A socket bound to ``addr`` and not yet listening (rule 1); ``reuse_port`` for a TCP
    port shared with other workers (rule 3)."""
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
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        await sock.bind(target)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ListenError(f"cannot listen on {addr}: {reason}") from exc
    return sock


def adopt(fd: int) -> trio.socket.SocketType:
    """The bound Unix socket a worker inherited from its supervisor (rule 3)."""
    try:
        return trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenError(f"cannot use the listening socket passed as fd {fd}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # fromfd duplicated it


def bound_name(sock: trio.socket.SocketType) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return name
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_listening(sock: trio.socket.SocketType) -> trio.SocketListener:
    sock.listen(BACKLOG)
    return trio.SocketListener(sock)
