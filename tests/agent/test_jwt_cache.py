"""The agent's JWT-SVID cache: one token per (entry, audience set), renewed at half-life,
one CA call for concurrent askers; driven by an injected clock, no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from agent.jwt_cache import Cached, JwtCache
from tally.spiffe import jwt
from tally.spiffe.spiffeid import SpiffeId

KEY = ec.generate_private_key(ec.SECP256R1())
SUB = SpiffeId.parse("spiffe://example.org/web")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class FakeCA:
    """Signs real tokens of `ttl` seconds, counting calls; `gate` holds them back."""

    def __init__(self, clock: Clock, ttl: int = 300) -> None:
        self.clock = clock
        self.ttl = ttl
        self.calls: list[tuple[str, list[str]]] = []
        self.gate: trio.Event | None = None

    async def __call__(self, entry_id: str, audience) -> str:
        self.calls.append((entry_id, list(audience)))
        if self.gate is not None:
            await self.gate.wait()
        now = int(self.clock().timestamp())
        return jwt.encode(jwt.svid_claims(SUB, audience, now, now + self.ttl), KEY, "k1")


async def test_served_from_cache_until_half_life_then_renewed():
    clock = Clock()
    ca = FakeCA(clock)
    cache = JwtCache(ca, clock)
    first = await cache.get("e1", ["b", "a"])
    assert await cache.get("e1", ["a", "b"]) == first  # audiences are a set
    clock.now += timedelta(seconds=149)
    assert await cache.get("e1", ["a", "b"]) == first
    clock.now += timedelta(seconds=1)  # half of 300 s
    renewed = await cache.get("e1", ["a", "b"])
    assert renewed != first and len(ca.calls) == 2
    assert ca.calls[0] == ("e1", ["a", "b"])
    await cache.get("e2", ["a", "b"])
    await cache.get("e1", ["c"])
    assert len(ca.calls) == 4  # per entry and per audience set


async def test_concurrent_askers_share_one_ca_call():
    clock = Clock()
    ca = FakeCA(clock)
    ca.gate = trio.Event()
    cache = JwtCache(ca, clock)
    got: list[str] = []

    async def ask() -> None:
        got.append(await cache.get("e1", ["a"]))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        ca.gate.set()
    assert len(ca.calls) == 1 and len(set(got)) == 1 and len(got) == 5


async def test_the_cache_is_bounded():
    clock = Clock()
    cache = JwtCache(FakeCA(clock), clock)
    cache.MAX_ITEMS = 8
    for i in range(40):
        await cache.get(f"e{i}", ["a"])
    assert len(cache._items) <= 8


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=1, max_value=10**6))
def test_a_token_is_fresh_exactly_before_its_half_life(iat, ttl):
    c = Cached("t", iat, iat + ttl)
    assert c.fresh(iat)
    assert not c.fresh(iat + ttl / 2)
    assert c.fresh(iat + ttl / 2 - 0.001) or ttl / 2 < 0.001
