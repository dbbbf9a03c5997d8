"""proxy.http.HttpStream over the proxy's own streams, driven through their relay ends (rule 9).

test_forwarding runs the exchanges over memory streams (the stream API); these
run HttpStream on real sockets, where it reads and writes through
`tally.tls.plain.PlainEnd`: lent reads, no checkpoint when bytes are waiting.
"""

from __future__ import annotations

import os

import h11
import trio
import trio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import http as ph
from tests.test_plain import plain_pair
from tests.test_tls import _close_socket_pairs as _close_socket_pairs


def _fd(stream) -> int:
    return stream.transport.socket.fileno()


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=150_000), min_size=1, max_size=3),
    cut=st.integers(min_value=1, max_value=70_000),
)
def test_responses_of_any_size_arrive_whole_while_reads_share_the_lent_buffer(sizes, cut):
    """Two connections read in turns: each read lends this thread's buffer, which the
    other connection's next read overwrites, so h11 must have taken a copy at once."""

    async def main() -> None:
        pairs = [plain_pair() for _ in sizes]
        try:
            ups = [ph.HttpStream(ours, h11.CLIENT) for ours, _ in pairs]
            bodies = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]
            for up in ups:
                up.queue(h11.Request(method="GET", target="/", headers=[(b"host", b"svc")]))
                up.queue(h11.EndOfMessage())
                await up.flush()
            async with trio.open_nursery() as nursery:
                for (_, theirs), body in zip(pairs, bodies, strict=True):
                    nursery.start_soon(_serve, theirs, body, cut)
                got = [bytearray() for _ in ups]
                done = [False for _ in ups]
                while not all(done):
                    for i, up in enumerate(ups):
                        if done[i]:
                            continue
                        event = up.conn.next_event()
                        if event is h11.NEED_DATA:
                            await up.receive()
                        elif isinstance(event, h11.Data):
                            got[i] += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            done[i] = True
            assert [bytes(g) for g in got] == bodies
        finally:
            for ours, theirs in pairs:
                await ours.aclose()
                await theirs.aclose()

    trio.run(main)


async def _serve(theirs, body: bytes, cut: int) -> None:
    """Read the request, then answer in pieces of ``cut`` bytes."""
    request = await theirs.receive_some(65536)
    assert request.startswith(b"GET / HTTP/1.1\r\n")
    wire = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    for start in range(0, len(wire), cut):
        await theirs.send_all(wire[start : start + cut])


async def test_a_peer_that_never_makes_us_wait_still_lets_other_tasks_run():
    """Reads that find their bytes waiting skip the scheduler, but not forever."""
    ours, theirs = plain_pair()
    down = ph.HttpStream(ours, h11.SERVER)
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        before = turns
        for _ in range(ph.YIELD_EVERY + 1):
            os.write(_fd(theirs), b"x")  # already there when we read: no wait
            await down.receive()
        assert turns > before, (turns, before)
        nursery.cancel_scope.cancel()
    assert down.conn.trailing_data[0] == b"x" * (ph.YIELD_EVERY + 1)
    await ours.aclose()
    await theirs.aclose()


async def test_a_cancellation_after_a_read_that_did_not_wait_loses_no_bytes():
    """A deadline that fired while we were busy is delivered after the bytes read are
    safely in h11's buffer, so a drain or a timeout never drops part of a request."""
    ours, theirs = plain_pair()
    down = ph.HttpStream(ours, h11.SERVER)
    os.write(_fd(theirs), b"GET / HTTP/1.1\r\n")
    with trio.CancelScope() as scope:
        scope.cancel()
        await down.receive()
    assert scope.cancelled_caught
    assert down.conn.trailing_data[0] == b"GET / HTTP/1.1\r\n"
    await ours.aclose()
    await theirs.aclose()
