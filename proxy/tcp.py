"""Moving bytes both ways between two streams, under an idle deadline and a hard stop.

Rules:

1. Full duplex, one task per direction.  An end of stream in one direction is
   passed on as a half-close (TLS 1.3 ``close_notify`` or TCP ``FIN``) and the
   other direction keeps flowing until it ends too: protocols that half-close
   (a client that sends its request and shuts its write side) keep working.
2. A failure in either direction (a reset, a TLS alert) ends both at once:
   half a broken connection is no use to anybody.
3. One cancel scope carries both deadlines.  The idle deadline moves whenever
   a chunk passes, but at most every `PUSH_EVERY_S` (moving a trio deadline
   costs a heap push, and a busy connection would otherwise pay it per
   chunk), so a connection is cut after between ``idle - PUSH_EVERY_S`` and
   ``idle`` seconds of silence.  The hard stop is when the peer's certificate
   expires (zero trust for long-lived connections) and never moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

CHUNK = 1 << 16
PUSH_EVERY_S = 0.5


class Deadline:
    """An idle timeout pushed back by activity, plus a hard stop (trio time)."""

    def __init__(self, idle_s: float, hard_at: float = math.inf) -> None:
        now = trio.current_time()
        self.idle_s = idle_s
        self.hard_at = hard_at
        self._pushed_at = now
        self.scope = trio.CancelScope(deadline=min(now + idle_s, hard_at))

    def touch(self) -> None:
        now = trio.current_time()
        if now - self._pushed_at >= PUSH_EVERY_S:
            self._pushed_at = now
            self.scope.deadline = min(now + self.idle_s, self.hard_at)

    def why(self) -> str:
        """Why the scope fired: ``peer_expired`` or ``idle``."""
        return "peer_expired" if trio.current_time() >= self.hard_at else "idle"


async def _send_eof(stream: trio.abc.Stream) -> None:
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


async def splice(
    client: trio.abc.Stream,
    target: trio.abc.Stream,
    deadline: Deadline,
    count_to_target: Callable[[int], None],
    count_from_target: Callable[[int], None],
) -> str:
    """Forward until both directions end; returns closed, reset, idle or peer_expired."""
    broken = False

    async def pump(
        src: trio.abc.Stream, dst: trio.abc.Stream, count: Callable[[int], None]
    ) -> None:
        nonlocal broken
        try:
            while data := await src.receive_some(CHUNK):
                deadline.touch()
                await dst.send_all(data)
                count(len(data))
            await _send_eof(dst)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            broken = True
            nursery.cancel_scope.cancel()

    with deadline.scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, target, count_to_target)
            nursery.start_soon(pump, target, client, count_from_target)
    if deadline.scope.cancelled_caught:
        return deadline.why()
    return "reset" if broken else "closed"
