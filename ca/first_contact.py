"""First contacts in arrival order: how a herd of reconnecting agents is served.

When every agent reconnects at once (all of them restarted, or the CA), the event
loop used to take on every connection and run all their handshakes side by side.
Each handshake then finished only when nearly all had, thousands of agents timed
out together and came back, and the CA did the same work twice (`bench.fleet`,
10,000 agents: half of them fresh after 96 s, all after 174 s).

Rules:

1. A connection's handshake starts once its peer's first TLS record (the
   ClientHello) has arrived whole (`first_record`).  The kernel holds the bytes
   until then (``SO_RCVLOWAT``), so a peer that trickles or says nothing costs no
   CPU and takes no lease: it can only run into the handshake deadline.
2. Then it takes one of `FirstContacts.count` leases, first come first served, and
   gives it back when its first contact ends (the CA: when the agent parks its
   first poll, after its handshake, entry sync and signing).  At most that many
   first contacts run side by side; the rest wait their turn, costing a
   descriptor and a task, and the handshake deadline starts when the turn comes.
   A peer that gave up while it waited is closed without a handshake
   (`peer_gone`), so an abandoned place in the queue costs no CPU; the agent
   backs off with jitter and comes back.
3. A lease lapses `FirstContacts.expiry` seconds after it was granted, whether or
   not its first contact has ended (which goes on without one): a peer that
   sends a whole ClientHello and then stalls holds a lease for that long at most.
4. Pure bookkeeping plus trio events: waking a waiter is O(1), so 10,000 waiting
   connections cost nothing while they wait.
"""

from __future__ import annotations

import itertools
import math
import select
import socket
from collections import OrderedDict

import trio

RECORD_HEADER = 5
"""A TLS record's header: type, version, length."""
HANDSHAKE_RECORD = 0x16
MAX_RECORD = (1 << 14) + 256
"""Longest TLS record a ClientHello may come in (RFC 8446 5.1, with slack)."""


async def first_record(sock: trio.socket.SocketType) -> None:
    """Return once the peer's first TLS record has arrived whole (rule 1), or when
    what arrived is not a TLS handshake record, or the peer closed: the handshake
    then fails on its own."""
    try:
        await trio.lowlevel.wait_readable(sock)
        head = await sock.recv(RECORD_HEADER, socket.MSG_PEEK)  # readable: no wait
        if len(head) < RECORD_HEADER:
            if not head:
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RECORD_HEADER)
            await trio.lowlevel.wait_readable(sock)
            head = await sock.recv(RECORD_HEADER, socket.MSG_PEEK)
            if len(head) < RECORD_HEADER:
                return
        length = int.from_bytes(head[3:5], "big")
        if head[0] != HANDSHAKE_RECORD or length > MAX_RECORD:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RECORD_HEADER + length)
        await trio.lowlevel.wait_readable(sock)
    except OSError:
        return  # reset or gone: the handshake says so
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            pass


def peer_gone(sock: trio.socket.SocketType) -> bool:
    """Whether the peer has closed or reset the connection, without reading from it."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(
        events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        for _, events in poller.poll(0)
    )


class _Waiter:
    __slots__ = ("granted", "poke")

    def __init__(self) -> None:
        self.granted = False
        self.poke = trio.Event()


class FirstContacts:
    """``count`` leases for first contacts, granted in arrival order, each lapsing after
    ``expiry`` seconds (rules 2 and 3)."""

    def __init__(self, count: int, expiry: float) -> None:
        if count < 1 or not expiry > 0:
            raise ValueError("count must be at least 1 and expiry positive")
        self.count = count
        self.expiry = expiry
        self._ids = itertools.count()
        self._held: OrderedDict[int, float] = OrderedDict()
        """Leases in force, by id, with when each was granted (oldest first)."""
        self._waiting: OrderedDict[int, _Waiter] = OrderedDict()
        self.granted = 0
        """Leases granted since start."""
        self.lapsed = 0
        """Leases that lapsed before they were given back."""

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def held(self) -> int:
        return len(self._held)

    def _lapse(self, now: float) -> None:
        while self._held:
            lease, granted = next(iter(self._held.items()))
            if granted + self.expiry > now:
                return
            del self._held[lease]
            self.lapsed += 1

    def _grant(self, now: float) -> None:
        self._lapse(now)
        moved = False
        while self._waiting and len(self._held) < self.count:
            lease, waiter = self._waiting.popitem(last=False)
            self._held[lease] = now
            self.granted += 1
            waiter.granted = True
            waiter.poke.set()
            moved = True
        if moved:
            self._poke_first()

    def _poke_first(self) -> None:
        """The first in line watches for the oldest lease to lapse: tell a new one."""
        if self._waiting:
            next(iter(self._waiting.values())).poke.set()

    def _next_lapse(self) -> float:
        return next(iter(self._held.values())) + self.expiry if self._held else -math.inf

    async def acquire(self) -> int:
        """A lease, once it is this caller's turn; give it back with `release`."""
        lease = next(self._ids)
        self._lapse(trio.current_time())
        if not self._waiting and len(self._held) < self.count:
            self._held[lease] = trio.current_time()
            self.granted += 1
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self.release(lease)
                raise
            return lease
        waiter = self._waiting[lease] = _Waiter()
        try:
            while not waiter.granted:
                first = next(iter(self._waiting)) == lease
                waiter.poke = trio.Event()
                with trio.move_on_at(self._next_lapse() if first else math.inf):
                    await waiter.poke.wait()
                if not waiter.granted:
                    self._grant(trio.current_time())
        except BaseException:
            if self._waiting.pop(lease, None) is None:  # granted, then cancelled
                self.release(lease)
            else:
                self._poke_first()
            raise
        return lease

    def release(self, lease: int) -> None:
        """Give a lease back (a lapsed one is already gone: nothing happens)."""
        if self._held.pop(lease, None) is not None:
            self._grant(trio.current_time())
