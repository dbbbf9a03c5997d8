"""Moving bytes both ways between two streams, under an idle deadline and a hard stop.

Rules:

1. Full duplex.  An end of stream in one direction is passed on as a
   half-close (TLS 1.3 ``close_notify`` or TCP ``FIN``) and the other direction
   keeps flowing until it ends too: protocols that half-close (a client that
   sends its request and shuts its write side) keep working.
2. A failure in either direction (a reset, a TLS alert) ends both at once:
   half a broken connection is no use to anybody.
3. One cancel scope carries both deadlines.  The idle deadline moves whenever
   a chunk passes, but at most every `PUSH_EVERY_S` (moving a trio deadline
   costs a heap push, and a busy connection would otherwise pay it per
   chunk), so a connection is cut after between ``idle - PUSH_EVERY_S`` and
   ``idle`` seconds of silence.  The hard stop is when the peer's certificate
   expires (zero trust for long-lived connections) and never moves.
4. Backpressure: a direction reads again only once what it read is written,
   so a slow reader holds at most one chunk per direction in the proxy.

Theory of operation of `Relay`.  Waking a trio task costs several times more
than the reads and writes it then does (measured on this path: a relay of
two tasks per connection spent about 60 us of Python per chunk, the same
bytes moved from one loop about 16 us).  So one task per proxy moves the
bytes of every spliced connection: the relay keeps its own epoll set, in
which each connection's two descriptors are registered for exactly the
readiness their blocked calls wait for, and trio wakes that one task when
the set has events.  Each wake-up then serves every ready connection with
plain, non-waiting calls (`tally.tls.plain.PlainEnd`, `tally.tls.relay_end.TLSEnd`), a
bounded number of chunks each (`BUDGET`) so one bulk transfer cannot starve
the others.  The connection's own task only waits for the end, in its cancel
scope, so deadlines, draining and cancellation work as for any trio task.
What the set serves is a `Served`: a spliced connection here, or one of HTTP
mode's connections between requests and during plain exchanges
(`proxy.http_lane`), which shares the set, the loop and the budget.
"""

from __future__ import annotations

import math
import os
import select
from collections.abc import Callable
from typing import Protocol

import trio

from tally.ops.logs import get_logger
from tally.tls.plain import WANT_READ

log = get_logger("tally.proxy")

PUSH_EVERY_S = 0.5


class Deadline:
    """An idle timeout pushed back by activity, plus a hard stop (trio time)."""

    def __init__(self, idle_s: float, hard_at: float = math.inf) -> None:
        now = trio.current_time()
        self.idle_s = idle_s
        self.hard_at = hard_at
        self.pushed_at = now
        self.scope = trio.CancelScope(deadline=min(now + idle_s, hard_at))

    def touch(self, now: float | None = None) -> None:
        """Note activity at ``now`` (trio time; read from the clock when not given)."""
        if now is None:
            now = trio.current_time()
        if now - self.pushed_at >= PUSH_EVERY_S:
            self.pushed_at = now
            self.scope.deadline = min(now + self.idle_s, self.hard_at)

    def without_hard_stop(self) -> Deadline:
        """The idle deadline alone, in a fresh scope, from the same last activity: for work
        that goes on past the hard stop once started (HTTP mode's exchange in flight)."""
        after = Deadline(self.idle_s)
        after.pushed_at = self.pushed_at
        after.scope.deadline = self.pushed_at + self.idle_s
        return after

    def why(self) -> str:
        """Why the scope fired: ``peer_expired`` or ``idle``."""
        return "peer_expired" if trio.current_time() >= self.hard_at else "idle"


class End(Protocol):
    """What the relay drives; see `tally.tls.plain.PlainEnd` for the contract."""

    fd: int
    wants: int
    more: bool

    def read(self, limit: int = ...) -> memoryview | bytes | None: ...

    def write(self, data: bytes | memoryview) -> int | None: ...

    def shut(self) -> bool: ...


class Relayable(Protocol):
    def relay_end(self) -> End: ...


BUDGET = 8
"""Chunks one direction moves per turn before the other connections get theirs."""
REPOLL = 4
"""Polls of the relay's own set per wake-up: under load, events arrive while a batch
is served, and taking them at once skips a round through trio's scheduler."""
NO_FD = -1


class _Flow:
    """One direction of a spliced connection."""

    __slots__ = ("count", "done", "dst", "eof", "pending", "src", "wait_ev", "wait_fd")

    def __init__(self, src: End, dst: End, count: Callable[[int], None]) -> None:
        self.src = src
        self.dst = dst
        self.count = count
        self.pending: bytes | memoryview | None = None
        self.eof = False
        self.done = False
        self.wait_fd = NO_FD
        self.wait_ev = 0


class Served(Protocol):
    """What the relay's epoll set serves: a spliced connection, or an HTTP lane
    (`proxy.http_lane`).  ``serve`` moves what can move without waiting; ``ready`` is the
    descriptor that woke it (`NO_FD` when it is run again for its budget)."""

    live: bool

    def serve(self, now: float, ready: int = ...) -> None: ...

    def abort(self) -> None: ...


class _Splice:
    __slots__ = (
        "a",
        "b",
        "deadline",
        "down",
        "finished",
        "live",
        "mask_a",
        "mask_b",
        "relay",
        "up",
        "why",
    )

    def __init__(
        self, relay: Relay, a: End, b: End, deadline: Deadline, up: _Flow, down: _Flow
    ) -> None:
        self.relay = relay
        self.a = a
        self.b = b
        self.deadline = deadline
        self.up = up
        self.down = down
        self.mask_a = 0  # what the relay's epoll set watches on a.fd and on b.fd
        self.mask_b = 0
        self.finished = trio.Event()
        self.live = True
        self.why = "closed"

    def serve(self, now: float, ready: int = NO_FD) -> None:
        """Move what can move now, then watch for what both directions wait on.

        With ``ready``, only a direction waiting on that descriptor is tried: the
        other one's call would only fail with "would block", at a syscall's cost.
        """
        up, down = self.up, self.down
        try:
            more = False
            if ready == NO_FD or up.wait_fd == ready or up.wait_fd == NO_FD:
                more = _pump(up, self.deadline, now)
            if ready == NO_FD or down.wait_fd == ready or down.wait_fd == NO_FD:
                more |= _pump(down, self.deadline, now)
        except trio.BrokenResourceError:
            self._end("reset")
            return
        except Exception as exc:  # a bug must cost one connection, not every one
            log.error("relay.crashed", error=exc)
            self._end("error")
            return
        if up.done and down.done:
            self._end("closed")
            return
        relay = self.relay
        if more:
            relay.later(self)
        a, b = self.a.fd, self.b.fd
        want_a = (up.wait_ev if up.wait_fd == a else 0) | (down.wait_ev if down.wait_fd == a else 0)
        want_b = (up.wait_ev if up.wait_fd == b else 0) | (down.wait_ev if down.wait_fd == b else 0)
        if want_a != self.mask_a:
            relay.watch(a, self.mask_a, want_a)
            self.mask_a = want_a
        if want_b != self.mask_b:
            relay.watch(b, self.mask_b, want_b)
            self.mask_b = want_b

    def abort(self) -> None:
        self._end("reset")

    def _end(self, why: str) -> None:
        self.why = why
        self.forget()
        self.finished.set()

    def forget(self) -> None:
        if not self.live:
            return
        self.live = False
        self.relay.drop(self, self.a.fd, self.mask_a)
        self.relay.drop(self, self.b.fd, self.mask_b)
        self.mask_a = self.mask_b = 0


class Relay:
    """Moves the bytes of every spliced connection of one proxy, from one trio task."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, Served] = {}
        self._again: list[Served] = []
        # Wakes the relay's task for work that no socket event announces.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the spliced connections until cancelled."""
        fd = self._epoll.fileno()
        self._running = True
        task_status.started()
        try:
            while True:
                if self._again:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(fd)
                again, self._again = self._again, []
                by_fd = self._by_fd
                now = trio.current_time()
                for _ in range(REPOLL):
                    events = self._epoll.poll(0)
                    if not events:
                        break
                    for ready, _events in events:
                        s = by_fd.get(ready)
                        if s is not None:
                            s.serve(now, ready)
                        elif ready == self._wake:
                            os.eventfd_read(self._wake)
                for s in again:
                    if s.live:
                        s.serve(now)
        finally:
            self._running = False
            for s in list(self._by_fd.values()):
                if s.live:
                    s.abort()
            trio.lowlevel.notify_closing(fd)
            self._epoll.close()
            os.close(self._wake)

    @property
    def running(self) -> bool:
        return self._running

    async def splice(
        self,
        client: Relayable,
        target: Relayable,
        deadline: Deadline,
        count_to_target: Callable[[int], None],
        count_from_target: Callable[[int], None],
    ) -> str:
        """Forward until both directions end; returns closed, reset, idle or peer_expired.

        The streams are the relay's until this returns; the caller closes them.
        """
        if not self._running:
            raise RuntimeError("the relay is not running")
        a, b = client.relay_end(), target.relay_end()
        s = _Splice(
            self, a, b, deadline, _Flow(a, b, count_to_target), _Flow(b, a, count_from_target)
        )
        self._by_fd[a.fd] = self._by_fd[b.fd] = s
        try:
            with deadline.scope:
                self.start(s)
                await s.finished.wait()
        finally:
            s.forget()
        if deadline.scope.cancelled_caught:
            return deadline.why()
        return s.why

    # -- for what the relay serves ----------------------------------------------------------

    def start(self, s: Served) -> None:
        """Serve ``s`` once now (bytes may be waiting already), from its own task."""
        s.serve(trio.current_time())
        if self._again:
            os.eventfd_write(self._wake, 1)  # work that no socket event announces

    def add(self, fd: int, s: Served) -> None:
        self._by_fd[fd] = s

    def later(self, s: Served) -> None:
        """Serve ``s`` again at the next turn: it stopped only because its budget ran out."""
        self._again.append(s)

    def watch(self, fd: int, have: int, want: int) -> None:
        # A descriptor nobody waits on leaves the set: its hang-up would otherwise
        # be reported on every poll.
        if not want:
            self._epoll.unregister(fd)
        elif have:
            self._epoll.modify(fd, want)
        else:
            self._epoll.register(fd, want)

    def drop(self, s: Served, fd: int, mask: int) -> None:
        """Stop serving ``fd`` for ``s`` (and stop watching it, if ``mask`` says it is watched)."""
        if self._by_fd.get(fd) is s:
            del self._by_fd[fd]
        if mask:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # closed under us: the kernel dropped it
                pass


def _pump(f: _Flow, deadline: Deadline, now: float) -> bool:
    """One direction's turn; True if it stopped only because its budget ran out."""
    if f.done:
        return False
    src, dst = f.src, f.dst
    for _ in range(BUDGET):
        data = f.pending
        lent = data is None  # a fresh read is lent until the next one, anywhere
        if data is None:
            if f.eof:
                if not dst.shut():
                    f.wait_fd, f.wait_ev = dst.fd, dst.wants
                    return False
                f.done = True
                f.wait_fd = NO_FD
                return False
            data = src.read()
            if data is None:
                f.wait_fd, f.wait_ev = src.fd, src.wants
                return False
            if not len(data):
                f.eof = True
                continue
            f.count(len(data))
            if now - deadline.pushed_at >= PUSH_EVERY_S:  # `touch`, without its call per chunk
                deadline.touch(now)
        # Write at once; keep what did not fit (a copy, if the data was lent).
        n = dst.write(data)
        if n is None:
            f.pending = bytes(data) if lent else data
            f.wait_fd, f.wait_ev = dst.fd, dst.wants
            return False
        if n < len(data):
            f.pending = bytes(data[n:]) if lent else memoryview(data)[n:]
            continue
        f.pending = None
        if not (src.more or f.eof):
            f.wait_fd, f.wait_ev = src.fd, WANT_READ
            return False
    f.wait_fd = NO_FD
    return True
