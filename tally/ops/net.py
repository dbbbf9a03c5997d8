"""Opening listeners and reading who is on the other end of a Unix socket.

Rules:

1. A Unix socket path is only ever replaced if what sits there is a stale
   *socket*.  A symlink, a regular file or a directory is refused with a
   message naming the path: a planted symlink must never redirect where a
   daemon listens.
2. The socket's mode is set with the umask while it is bound, so there is no
   moment at which it exists with looser permissions, and no ``chmod`` by
   path afterwards, which would follow a link swapped in after the bind.
3. Peer credentials come from the kernel (``SO_PEERCRED``), never from
   anything the peer says.
4. `accept_loop` takes every waiting connection before it waits again, each without
   a trip through the scheduler.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tally.ops.config import Address
from tally.ops.errors import OperatorError
from tally.ops.logs import get_logger

log = get_logger("tally.net")


class ListenError(OperatorError):
    """A listener cannot be opened; the message names the address and why."""


@dataclass(frozen=True)
class PeerCred:
    """The calling process as the kernel recorded it when it connected.

    ``sock`` is the connection itself, kept so that attestation can ask the
    kernel for a handle on that exact process (see ``agent.attestor``).
    """

    pid: int
    uid: int
    gid: int
    sock: trio.socket.SocketType | None = field(default=None, compare=False, repr=False)


def peer_credentials(sock: trio.socket.SocketType) -> PeerCred:
    """The pid, uid and gid the kernel recorded for a Unix socket's peer at connect time."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid, sock)


def stream_peer_credentials(stream: trio.abc.Stream) -> PeerCred | None:
    if isinstance(stream, trio.SocketStream) and stream.socket.family == socket.AF_UNIX:
        return peer_credentials(stream.socket)
    return None


def clear_stale_unix(path: Path) -> None:
    """Make way for a Unix socket at ``path``: remove a stale socket there, refuse anything else.

    Rule 1: a symlink or a non-socket file is refused, and so is a socket that a
    live process still answers on; ListenError names the path.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ListenError(f"refusing to listen on {path}: it is a symlink")
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"refusing to listen on {path}: a non-socket file is in the way")
    # A live daemon answers on its socket; only a stale one may be replaced.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        os.unlink(path)
    else:
        raise ListenError(f"cannot listen on {path}: another process is serving it")
    finally:
        probe.close()


async def open_unix_listener(path: Path, mode: int) -> trio.SocketListener:
    """Bind a Unix socket at ``path`` with ``mode`` (e.g. 0o600 for admin sockets)."""
    if not path.parent.is_dir():
        raise ListenError(f"cannot listen on {path}: directory {path.parent} does not exist")
    clear_stale_unix(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    sock.listen(256)
    return trio.SocketListener(sock)


async def open_listener(addr: Address, *, unix_mode: int = 0o666) -> trio.SocketListener:
    if addr.is_unix:
        assert addr.path is not None
        return await open_unix_listener(Path(addr.path), unix_mode)
    try:
        listeners = await trio.open_tcp_listeners(addr.port or 0, host=addr.host)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ListenError(f"cannot listen on {addr}: {reason}") from exc
    return listeners[0]


def bound_address(listener: trio.SocketListener) -> str:
    """What a listener actually bound, e.g. ``127.0.0.1:40123`` for port 0."""
    name = listener.socket.getsockname()
    if isinstance(name, str):
        return name
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def connect(addr: Address) -> trio.SocketStream:
    if addr.is_unix:
        assert addr.path is not None
        return await trio.open_unix_socket(addr.path)
    assert addr.host is not None and addr.port is not None
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(addr.host).version == 6 else socket.AF_INET
    except ValueError:  # a name: resolve it, and race its addresses (happy eyeballs)
        return await trio.open_tcp_stream(addr.host, addr.port)
    # A literal address needs neither: one socket, one connect.  Proxies dial per connection.
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((addr.host, addr.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""Out of descriptors or memory: retried after a pause, as ``trio.serve_listeners`` does."""
ACCEPT_IGNORED_ERRNOS = frozenset({errno.EPERM, errno.ECONNABORTED, errno.EPROTO})
"""The connection went away before it was accepted: the next one is accepted."""


async def accept_loop(
    listener: trio.SocketListener,
    handlers: trio.Nursery,
    handle: Callable[[socket.socket], Awaitable[None]],
) -> None:
    """``trio.serve_listeners`` for one listener, taking over (and in the end closing) its
    socket, without trio's wrapper task around each handler (``handle`` closes its own
    connection), and accepting every waiting connection before it waits again (rule 4):
    trio's accept is a trip through the scheduler for each one, and its socket
    wrapper's calls were a twentieth of a short connection's time."""
    listening = socket.socket(fileno=listener.socket.detach())
    try:
        while True:
            try:
                accepted, _ = listening.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listening)
                continue
            except OSError as exc:
                if exc.errno in ACCEPT_IGNORED_ERRNOS:
                    continue
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept.failed", error=exc)  # and again in 0.1 s
                await trio.sleep(0.1)
                continue
            handlers.start_soon(handle, accepted)
    finally:
        trio.lowlevel.notify_closing(listening)
        listening.close()
