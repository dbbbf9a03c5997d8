"""Kept-alive connections to the target, shared by every connection the proxy serves.

Rules:

1. An app that opens a new connection per request must not pay a TLS
   handshake per request.  After a response ends cleanly the upstream
   connection goes back to the pool, and the next request from *any* local
   connection takes the most recently used one (LIFO keeps few connections
   warm and lets the rest age out).  HTTP mode uses the same pool on the
   server side for plain connections to the service.
2. A pooled connection is retired before either certificate on it expires
   (`RETIRE_MARGIN_S` early): the server proxy closes connections whose
   client certificate has expired, and we would rather not send a request
   into that close.  Connections made before a rotation stay in use until
   then, which is what "established connections are untouched" means.
3. A connection the server closed while it sat idle is noticed without
   reading from it: its socket polls readable (an idle HTTP/1.1 server has
   nothing to say except goodbye).  A sweep every `SWEEP_S` closes those and
   the ones idle longer than the pool's idle timeout.  A connection HTTP mode's
   lane gives back stays in the relay's epoll set while it sits here (its
   ``watch``), so the next lane takes it without two ``epoll_ctl`` calls, and a
   goodbye from the target closes it at once; it leaves the set (`Watch.unwatch`)
   whenever it leaves the pool any other way.
4. The pool never waits for a connection: it dials when none is idle, so the
   only limit on upstream connections is the number of local requests in
   flight.
"""

from __future__ import annotations

import math
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from proxy.http import HttpStream
from proxy.metrics import Stats
from tally.spiffe.spiffeid import SpiffeId
from tally.tls.plain import PlainStream
from tally.tls.stream import TLSStream

RETIRE_MARGIN_S = 2.0
SWEEP_S = 1.0
CLOSE_TIMEOUT_S = 1.0


class DialError(Exception):
    """No upstream connection could be made; ``timeout`` says whether time ran out."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class Watch(Protocol):
    """An idle connection's place in the relay's epoll set (rule 3)."""

    def unwatch(self) -> None:
        """Leave the set; the connection is about to be closed or served elsewhere."""


@dataclass(eq=False)
class Upstream:
    """One mTLS connection to the target and what we know about it."""

    stream: trio.abc.Stream
    """The mTLS stream (a `tally.tls.stream.TLSStream` in the proxy)."""
    http: HttpStream
    peer_id: SpiffeId | None
    """The server proxy's ID (client mode); None for a plain connection to the service."""
    retire_at: float
    """trio time after which it must not carry a new request (rule 2)."""
    peer_expires_at: float = math.inf
    """trio time when the server's certificate expires (client mode)."""
    reused: bool = False
    idle_since: float = field(default_factory=trio.current_time)
    watch: Watch | None = None
    """Set while it sits in the pool still in the relay's epoll set (rule 3)."""

    def unwatch(self) -> None:
        if self.watch is not None:
            self.watch.unwatch()
            self.watch = None


def _socket_readable(stream: trio.abc.Stream) -> bool:
    """Whether the peer said something (or closed) while the connection sat idle."""
    transport = stream.transport if isinstance(stream, TLSStream | PlainStream) else stream
    if not isinstance(transport, trio.SocketStream):
        return False
    _POLLER.register(transport.socket.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    try:
        return bool(_POLLER.poll(0))
    finally:
        _POLLER.unregister(transport.socket.fileno())


_POLLER = select.poll()
"""One poll object reused (trio runs one task at a time), not one built per request."""


async def close_quietly(stream: trio.abc.Stream) -> None:
    if isinstance(stream, TLSStream | PlainStream):
        stream.close_now()  # nothing in it waits: no scope and no trip through the scheduler
        return
    # Shielded from the caller's cancellation, bounded by its own deadline.
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class Pool:
    def __init__(
        self,
        dial: Callable[[], Awaitable[Upstream]],
        *,
        max_idle: int,
        idle_s: float,
        stats: Stats,
    ) -> None:
        self._dial = dial
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._stats = stats
        self._idle: list[Upstream] = []
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def _usable(self, up: Upstream, now: float, probe: bool = True) -> bool:
        return (
            now < up.retire_at
            and now - up.idle_since < self.idle_s
            and not (probe and _socket_readable(up.stream))
        )

    def take(
        self, *, probe: bool = True, watched: bool = False
    ) -> tuple[Upstream | None, list[Upstream]]:
        """An idle connection still good for a request, without waiting or dialing, and the
        stale ones met on the way, for the caller to close (HTTP mode's lane calls this
        from the relay's task, which must not wait).  Without ``probe`` a connection the
        target closed is not looked for (rule 3): for a request that is safe to send again.
        With ``watched`` the connection keeps its ``watch``, for the lane to take over."""
        now = trio.current_time()
        stale: list[Upstream] = []
        while self._idle:
            up = self._idle.pop()
            if self._usable(up, now, probe):
                up.reused = True
                self._stats.pool_reused += 1
                if not watched:
                    up.unwatch()
                return up, stale
            up.unwatch()
            stale.append(up)
        return None, stale

    def forget(self, up: Upstream) -> None:
        """Drop an idle connection the target closed (rule 3); the caller closes it."""
        if up in self._idle:
            self._idle.remove(up)
        up.unwatch()

    async def acquire(self) -> Upstream:
        """A connection ready for a request: an idle one if any is still good, else a new one."""
        up, stale = self.take()
        for old in stale:
            await close_quietly(old.stream)
        if up is not None:
            return up  # no checkpoint of its own: the request's I/O follows at once
        up = await self._dial()
        self._stats.pool_dialed += 1
        return up

    def keep(self, up: Upstream) -> bool:
        """Take a connection back after a request, if it can carry another; False: close it."""
        now = trio.current_time()
        if (
            self._closed
            or len(self._idle) >= self.max_idle
            or now >= up.retire_at
            or not up.http.reusable()
        ):
            return False
        up.idle_since = now
        self._idle.append(up)  # no checkpoint: the caller reads its next request at once
        return True

    async def release(self, up: Upstream) -> None:
        """Give a connection back after a request; it is kept only if it can carry another."""
        if not self.keep(up):
            await close_quietly(up.stream)

    async def discard(self, up: Upstream) -> None:
        await close_quietly(up.stream)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep idle connections (rule 3) until cancelled, then close them all."""
        task_status.started()
        try:
            while True:
                await trio.sleep(SWEEP_S)
                now = trio.current_time()
                stale = [up for up in self._idle if not self._usable(up, now)]
                self._idle = [up for up in self._idle if up not in stale]
                for up in stale:
                    up.unwatch()
                    await close_quietly(up.stream)
        finally:
            self._closed = True
            idle, self._idle = self._idle, []
            for up in idle:
                up.unwatch()
                await close_quietly(up.stream)
