"""proxy.http.HttpStream over the proxy's own streams, driven through their relay ends (rule 9).

test_forwarding runs the exchanges over memory streams (the stream API); these
run HttpStream on real sockets, where it reads and writes through
`tally.tls.plain.PlainEnd`: lent reads, no checkpoint when bytes are waiting.
"""

from __future__ import annotations

import math
import os

import h11
import trio
import trio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import http as ph
from tally.wire import http1
from tests.test_plain import plain_pair
from tests.test_tls import _close_socket_pairs as _close_socket_pairs


def _fd(stream) -> int:
    return stream.transport.socket.fileno()


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=150_000), min_size=1, max_size=3),
    cut=st.integers(min_value=1000, max_value=70_000),
)
def test_responses_of_any_size_arrive_whole_while_reads_share_the_lent_buffer(sizes, cut):
    """Two connections read in turns: each read lends this thread's buffer, which the
    other connection's next read overwrites, so the parser must have taken a copy at once."""

    async def main() -> None:
        pairs = [plain_pair() for _ in sizes]
        try:
            ups = [ph.HttpStream(ours, http1.CLIENT) for ours, _ in pairs]
            bodies = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]
            for up in ups:
                up.queue(http1.Request(method="GET", target="/", headers=[(b"host", b"svc")]))
                up.queue(http1.EndOfMessage())
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
                        if event is http1.NEED_DATA:
                            await up.receive()
                        elif isinstance(event, http1.Data):
                            got[i] += event.data
                        elif isinstance(event, http1.EndOfMessage):
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
    down = ph.HttpStream(ours, http1.SERVER)
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
        # Two yields: trio may run us first in the batch after the first one.
        head = b"GET /" + b"a" * 2 * ph.YIELD_EVERY + b" HTTP/1.1\r\nhost: x\r\n\r\n"
        for i in range(2 * (ph.YIELD_EVERY + 1)):
            os.write(_fd(theirs), head[i : i + 1])  # already there when we read: no wait
            await down.receive()
        assert turns > before, (turns, before)
        nursery.cancel_scope.cancel()
    os.write(_fd(theirs), head[2 * (ph.YIELD_EVERY + 1) :])
    await down.receive()
    request = down.conn.next_event()  # every byte was kept
    assert isinstance(request, http1.Request) and request.target == head.split(b" ")[1]
    await ours.aclose()
    await theirs.aclose()


async def test_a_cancellation_after_a_read_that_did_not_wait_loses_no_bytes():
    """A deadline that fired while we were busy is delivered after the bytes read are
    safely in the parser, so a drain or a timeout never drops part of a request."""
    ours, theirs = plain_pair()
    down = ph.HttpStream(ours, http1.SERVER)
    os.write(_fd(theirs), b"GET / HTTP/1.1\r\n")
    with trio.CancelScope() as scope:
        scope.cancel()
        await down.receive()
    assert scope.cancelled_caught
    assert down.conn.trailing_data[0]  # a head has begun
    os.write(_fd(theirs), b"host: x\r\n\r\n")
    await down.receive()
    assert isinstance(down.conn.next_event(), http1.Request)
    await ours.aclose()
    await theirs.aclose()


def ignore(n: int) -> None:
    pass


@settings(max_examples=15, deadline=None)
@given(size=st.integers(min_value=0, max_value=600_000))
def test_a_long_body_never_brings_the_next_head_in_a_read_longer_than_chunk(size):
    """Whatever the target sends after a response's body (here an oversized head)
    arrives in reads of at most CHUNK bytes, where the head limit applies: a longer
    read within a long body (tried: up to what is left of it) must never take it along."""

    async def main() -> None:
        (down_ours, client), (up_ours, target) = plain_pair(), plain_pair()
        down, up = ph.HttpStream(down_ours, http1.SERVER), ph.HttpStream(up_ours, http1.CLIENT)
        body = b"b" * size
        after = b"HTTP/1.1 200 OK\r\nx-big: " + b"y" * (3 * ph.CHUNK) + b"\r\n\r\n"
        got = bytearray()
        read_all = trio.Event()

        async def serve() -> None:
            await target.receive_some(65536)
            await target.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + body + after
            )

        async def read() -> None:
            peer = h11.Connection(h11.CLIENT)
            peer.send(h11.Request(method="GET", target="/", headers=[(b"host", b"svc")]))
            peer.send(h11.EndOfMessage())
            while True:
                event = peer.next_event()
                if event is h11.NEED_DATA:
                    peer.receive_data(await client.receive_some(65536))
                elif isinstance(event, h11.Data):
                    got.extend(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    read_all.set()
                    return

        try:
            await client.send_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            request, why = await ph.next_request(down, ph.Idlers(), 30, math.inf)
            assert request is not None, why
            assert type(down.conn.next_event()) is http1.EndOfMessage
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(read)
                await ph.exchange(
                    down,
                    up,
                    request,
                    ph.request_headers(request, "svc"),
                    body_pending=False,
                    ex=ph.Exchange("GET", "/"),
                    idle_s=30,
                    closing=lambda: False,
                    count_to_target=ignore,
                    count_from_target=ignore,
                )
                await read_all.wait()
                nursery.cancel_scope.cancel()  # the target is still pushing its next head
            assert bytes(got) == body
            assert len(up.conn.trailing_data[0]) <= ph.CHUNK
        finally:
            for stream in (down_ours, client, up_ours, target):
                await stream.aclose()

    trio.run(main)
