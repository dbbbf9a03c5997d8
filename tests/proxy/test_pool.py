"""proxy.pool in virtual time: reuse, retirement before certificate expiry, idle sweep, limits."""

from __future__ import annotations

import trio
import trio.testing

from proxy.http import HttpStream
from proxy.metrics import Stats
from proxy.pool import Pool, Upstream
from tally.spiffe.spiffeid import SpiffeId
from tally.wire import http1

PEER = SpiffeId.parse("spiffe://example.org/api")


def after_one_request(stream) -> HttpStream:
    """An upstream HttpStream that has just finished a keep-alive cycle."""
    http = HttpStream(stream, http1.CLIENT)
    http.conn.send(http1.Request(method="GET", target="/", headers=[("Host", "x")]))
    http.conn.send(http1.EndOfMessage())
    http.conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    while not isinstance(http.conn.next_event(), http1.EndOfMessage):
        pass
    return http


class Dialer:
    def __init__(self, lifetime: float = 3600) -> None:
        self.made: list[Upstream] = []
        self.lifetime = lifetime

    async def __call__(self) -> Upstream:
        await trio.lowlevel.checkpoint()
        stream, _ = trio.testing.memory_stream_pair()
        up = Upstream(
            stream, HttpStream(stream, http1.CLIENT), PEER, trio.current_time() + self.lifetime
        )
        self.made.append(up)
        return up


async def used(pool: Pool) -> Upstream:
    up = await pool.acquire()
    up.http = after_one_request(up.http.stream)
    return up


async def test_released_connections_are_reused_last_in_first_out():
    stats = Stats()
    dial = Dialer()
    pool = Pool(dial, max_idle=8, idle_s=30, stats=stats)
    a, b = await used(pool), await used(pool)
    await pool.release(a)
    await pool.release(b)
    assert await pool.acquire() is b
    assert (await pool.acquire()) is a and a.reused
    assert (stats.pool_dialed, stats.pool_reused) == (2, 2)


async def test_a_connection_that_cannot_carry_another_request_is_closed():
    pool = Pool(Dialer(), max_idle=8, idle_s=30, stats=Stats())
    up = await pool.acquire()  # no finished cycle: the connection is not ready for a next request
    await pool.release(up)
    assert pool.idle_count == 0


async def test_connections_retire_before_a_certificate_expires(autojump_clock):
    dial = Dialer(lifetime=10)  # retire_at = made + 10 (the caller already took the margin off)
    pool = Pool(dial, max_idle=8, idle_s=300, stats=Stats())
    first = await used(pool)
    await pool.release(first)
    await trio.sleep(9)
    assert await pool.acquire() is first
    first.http = after_one_request(first.http.stream)
    await pool.release(first)
    await trio.sleep(1.5)
    fresh = await pool.acquire()
    assert fresh is not first and len(dial.made) == 2


async def test_the_sweep_closes_idle_connections_and_shutdown_closes_the_rest(autojump_clock):
    pool = Pool(Dialer(), max_idle=8, idle_s=30, stats=Stats())
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        old = await used(pool)
        await pool.release(old)
        await trio.sleep(20)
        young = await used(pool)
        assert young is old  # still within its idle time
        young.http = after_one_request(young.http.stream)
        await pool.release(young)
        await trio.sleep(31)
        assert pool.idle_count == 0
        kept = await used(pool)
        await pool.release(kept)
        nursery.cancel_scope.cancel()
    assert pool.idle_count == 0
    await pool.release(await used(pool))  # a closed pool keeps nothing
    assert pool.idle_count == 0


async def test_at_most_max_idle_connections_are_kept():
    pool = Pool(Dialer(), max_idle=2, idle_s=30, stats=Stats())
    ups = [await used(pool) for _ in range(4)]
    for up in ups:
        await pool.release(up)
    assert pool.idle_count == 2
