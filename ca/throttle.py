"""How many failed node attestations a peer may make: a token bucket per address.

Rules:

1. A join token's secret is 256 random bits, so guessing one is hopeless; the
   limit exists so that an attacker cannot make the CA do unbounded work or
   write an unbounded audit log while trying.  Only *failures* take from a
   peer's bucket: an agent that attests on its first try is never slowed.
2. Once a peer's bucket is empty the CA answers 429 without looking at the
   token at all, so a throttled peer learns nothing, not even whether its
   guess would have been right.  The first refusal of each throttled spell is
   worth an audit record; the ones after it are not (see `refuse`).
3. Peers are counted by address: the whole IPv4 address, or the /64 an IPv6
   address sits in (one host commonly owns a /64).  The port never counts.
4. The table of peers is bounded (`MAX_PEERS`): full buckets carry no
   information and are dropped first, then the least recently seen.
5. Time is monotonic, so a wall-clock step neither refills nor drains buckets.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_PEERS = 10_000


def peer_key(address: str) -> str:
    """The part of a ``host:port`` address that identifies a peer for throttling."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    at: float
    refused: bool = False  # a refusal of the current throttled spell was reported


class AttestThrottle:
    """Failed attestations per peer: ``burst`` at once, then one per ``refill`` seconds."""

    def __init__(
        self,
        burst: int = 10,
        refill: float = 6.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or not refill > 0:
            raise ValueError("burst must be at least 1 and refill positive")
        self.burst = burst
        self.refill = refill
        self.clock = clock
        self._peers: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str) -> _Bucket | None:
        bucket = self._peers.get(key)
        if bucket is None:
            return None
        now = self.clock()
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) / self.refill)
        bucket.at = now
        return bucket

    def retry_after(self, key: str) -> int:
        """Whole seconds until ``key`` may try again; 0 when it may try now."""
        bucket = self._bucket(key)
        if bucket is None or bucket.tokens >= 1:
            return 0
        return max(1, math.ceil((1 - bucket.tokens) * self.refill))

    def refuse(self, key: str) -> bool:
        """Note a 429 for ``key``; True only for the first one of a throttled spell."""
        bucket = self._bucket(key)
        if bucket is None or bucket.refused:
            return False
        bucket.refused = True
        return True

    def failed(self, key: str) -> None:
        """Take one from ``key``'s bucket for a failed attestation."""
        bucket = self._bucket(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), self.clock())
            self._peers[key] = bucket
        self._peers.move_to_end(key)
        bucket.tokens = max(0.0, bucket.tokens - 1)
        bucket.refused = False
        self._trim()  # after the spend, so the newest bucket is never the one dropped

    def _trim(self) -> None:
        if len(self._peers) <= MAX_PEERS:
            return
        for key in list(self._peers):
            bucket = self._bucket(key)
            if bucket is not None and bucket.tokens >= self.burst:
                del self._peers[key]
        while len(self._peers) > MAX_PEERS:
            self._peers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._peers)


def overload_retry_after(queued: int, limit: int) -> int | None:
    """Whole seconds an agent should stay away while ``queued`` store calls wait; None
    while the queue is under ``limit`` (the CA is keeping up).

    This is admission control for a thundering herd (all agents reconnecting at once):
    past ``limit`` waiting calls, a new one would only wait behind them and time out,
    so it is answered 429 at once, without touching the datastore.  The more is
    queued, the longer the wait asked (one second per ``limit`` / 2 queued, between
    1 s and `OVERLOAD_MAX_RETRY_S`); agents add jitter of their own, so the refused
    come back spread out rather than as the next herd.
    """
    if queued < limit:
        return None
    return max(1, min(OVERLOAD_MAX_RETRY_S, math.ceil(2 * queued / max(1, limit))))


OVERLOAD_MAX_RETRY_S = 30
