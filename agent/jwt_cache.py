"""JWT-SVIDs held by the agent, one per (entry, audience set), renewed at half-life.

Rules:

1. A token handed to a workload has at least half its life left: a cached
   token is served until half its lifetime (from its own ``iat`` and ``exp``)
   has passed, then a fresh one is asked of the CA.  With the default 5 min
   TTL a caller gets a token good for 2.5 to 5 min, and a busy workload costs
   the CA one signature per audience per 2.5 min, not one per call.
2. Concurrent callers asking for the same (entry, audiences) wait for one CA
   call, not one each.
3. Audiences are a set: ``["a", "b"]`` and ``["b", "a"]`` share a token.
4. Bounded: past `MAX_ITEMS` cached tokens, the expired and then the oldest
   go.  Tokens are bearer credentials and live in memory only; nothing here
   logs them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import trio

from tally.spiffe import jwt

Fetch = Callable[[str, Sequence[str]], Awaitable[str]]
Key = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class Cached:
    token: str
    issued_at: int
    expires_at: int

    def fresh(self, now: float) -> bool:
        """Before half-life (rule 1)."""
        return now < self.issued_at + (self.expires_at - self.issued_at) / 2


def cache_key(entry_id: str, audience: Sequence[str]) -> Key:
    return entry_id, tuple(sorted(set(audience)))


class JwtCache:
    MAX_ITEMS = 4096

    def __init__(self, fetch: Fetch, clock: Callable[[], datetime]) -> None:
        self._fetch = fetch
        self._clock = clock
        self._items: dict[Key, Cached] = {}
        self._locks: dict[Key, trio.Lock] = {}
        self.fetched = 0

    def _now(self) -> float:
        return self._clock().timestamp()

    async def get(self, entry_id: str, audience: Sequence[str]) -> str:
        key = cache_key(entry_id, audience)
        hit = self._items.get(key)
        if hit is not None and hit.fresh(self._now()):
            return hit.token
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            hit = self._items.get(key)
            if hit is not None and hit.fresh(self._now()):
                return hit.token
            token = await self._fetch(entry_id, list(key[1]))
            claims = jwt.parse_insecure(token).claims
            cached = Cached(token, int(claims["iat"]), int(claims["exp"]))
            self._prune()
            self._items[key] = cached
            self.fetched += 1
            return token

    def _prune(self) -> None:
        if len(self._items) < self.MAX_ITEMS:
            return
        now = self._now()
        live = {k: v for k, v in self._items.items() if v.expires_at > now}
        if len(live) >= self.MAX_ITEMS:
            oldest = sorted(live, key=lambda k: live[k].issued_at)[: len(live) // 4]
            for k in oldest:
                del live[k]
        self._items = live
        self._locks = {k: v for k, v in self._locks.items() if k in live or v.locked()}
