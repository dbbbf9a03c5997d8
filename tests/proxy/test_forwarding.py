"""proxy.http over in-memory streams, in virtual time (autojump clock); the TCP relay is in test_relay."""

from __future__ import annotations

import math

import h11
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from proxy import http as ph
from tally.wire import http1


def ignore(n):
    pass


# -- HTTP ---------------------------------------------------------------------------


class Peer:
    """The far end of an in-memory stream, speaking h11 as a client or a server."""

    def __init__(self, stream, role):
        self.stream = stream
        self.conn = h11.Connection(role)

    async def send(self, *events):
        for event in events:
            await self.stream.send_all(self.conn.send(event))

    async def next(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self):
        head = await self.next()
        body = b""
        while True:
            event = await self.next()
            if isinstance(event, h11.Data):
                body += event.data
            else:
                return head, body


async def test_next_request_times_out_idle_connections(autojump_clock):
    _client, proxy_side = trio.testing.memory_stream_pair()
    down = ph.HttpStream(proxy_side, http1.SERVER)
    request, why = await ph.next_request(down, ph.Idlers(), 15, math.inf)
    assert (request, why) == (None, "idle")
    assert trio.current_time() == pytest.approx(15)


async def test_drain_wakes_idle_waiters_but_not_a_request_in_progress(autojump_clock):
    idlers = ph.Idlers()
    _c1, p1 = trio.testing.memory_stream_pair()
    c2, p2 = trio.testing.memory_stream_pair()
    results = {}

    async def wait(name, stream):
        results[name] = await ph.next_request(
            ph.HttpStream(stream, http1.SERVER), idlers, 300, math.inf
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "idle", p1)
        nursery.start_soon(wait, "busy", p2)
        await c2.send_all(b"GET /slow-head HTTP/1.1\r\n")  # the request has begun
        await trio.sleep(1)
        idlers.drain()
        await trio.sleep(1)
        await c2.send_all(b"Host: x\r\n\r\n")
    assert results["idle"] == (None, "draining")
    request, why = results["busy"]
    assert request is not None and request.target == b"/slow-head" and why == ""
    assert await ph.next_request(ph.HttpStream(p1, http1.SERVER), idlers, 300, math.inf) == (
        None,
        "draining",
    )


async def test_malformed_request_gets_400_and_the_connection_ends():
    client_stream, proxy_side = trio.testing.memory_stream_pair()
    down = ph.HttpStream(proxy_side, http1.SERVER)
    await client_stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    request, why = await ph.next_request(down, ph.Idlers(), 10, math.inf)
    assert (request, why) == (None, "bad_request")
    assert (await client_stream.receive_some(1000)).startswith(b"HTTP/1.1 400 ")


def test_hop_by_hop_headers_are_dropped_and_xfcc_replaced():
    reader = http1.Connection(http1.SERVER)  # the request as the proxy reads it
    reader.receive_data(
        b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nUpgrade: websocket\r\n"
        b"X-Forwarded-Client-Cert: By=forged\r\nX-Forwarded-Client-Cert: URI=forged\r\n"
        b"Accept: */*\r\n\r\n"
    )
    request = reader.next_event()
    assert isinstance(request, http1.Request)
    headers = ph.request_headers(
        request,
        "fallback",
        drop=frozenset({b"x-forwarded-client-cert"}),
        add=[(b"x-forwarded-client-cert", b"By=us")],
    )
    assert headers == [
        (b"host", b"svc"),
        (b"accept", b"*/*"),
        (b"x-forwarded-client-cert", b"By=us"),
    ]


def test_host_is_added_for_http10_clients():
    request = http1.Request(method="GET", target="/", headers=[], http_version="1.0")
    assert (b"host", b"svc:80") in ph.request_headers(request, "svc:80")


async def exchange_setup():
    client, down_side = trio.testing.memory_stream_pair()
    up_side, service = trio.testing.memory_stream_pair()
    down = ph.HttpStream(down_side, http1.SERVER)
    up = ph.HttpStream(up_side, http1.CLIENT)
    return Peer(client, h11.CLIENT), down, up, Peer(service, h11.SERVER)


async def test_exchange_streams_a_chunked_body_and_relays_100_continue():
    client, down, up, service = await exchange_setup()
    ex = ph.Exchange("POST", "/upload")
    async with trio.open_nursery() as nursery:

        async def proxy():
            request = await down.next_event()
            headers = ph.request_headers(request, "svc")
            await ph.exchange(
                down,
                up,
                request,
                headers,
                body_pending=True,
                ex=ex,
                idle_s=30,
                closing=lambda: False,
                count_to_target=ignore,
                count_from_target=ignore,
            )

        nursery.start_soon(proxy)
        await client.send(
            h11.Request(
                method="POST",
                target="/upload",
                headers=[
                    ("Host", "svc"),
                    ("Transfer-Encoding", "chunked"),
                    ("Expect", "100-continue"),
                ],
            )
        )
        request = await service.next()
        assert isinstance(request, h11.Request)
        await service.send(h11.InformationalResponse(status_code=100, headers=[]))
        assert (await client.next()).status_code == 100
        for part in (b"first ", b"second"):
            await client.send(h11.Data(data=part))
            assert (await service.next()).data == part  # each chunk arrives before the next is sent
        await client.send(h11.EndOfMessage())
        assert isinstance(await service.next(), h11.EndOfMessage)
        await service.send(
            h11.Response(status_code=201, headers=[("Content-Length", "2")]),
            h11.Data(data=b"ok"),
            h11.EndOfMessage(),
        )
        head, body = await client.response()
    assert head.status_code == 201 and body == b"ok"
    assert (ex.status, ex.bytes_in, ex.bytes_out) == (201, len(b"first second"), 2)
    assert up.reusable() and down.reusable()


async def test_exchange_reports_a_target_that_closes_before_answering():
    client, down, up, service = await exchange_setup()
    ex = ph.Exchange("GET", "/")
    await client.send(
        h11.Request(method="GET", target="/", headers=[("Host", "svc")]), h11.EndOfMessage()
    )
    request = await down.next_event()
    await down.next_event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.stream.aclose)
        with pytest.raises(ph.UpstreamError):
            await ph.exchange(
                down,
                up,
                request,
                ph.request_headers(request, "svc"),
                body_pending=False,
                ex=ex,
                idle_s=30,
                closing=lambda: False,
                count_to_target=ignore,
                count_from_target=ignore,
            )
    assert not ex.response_started
    await ph.respond_error(down, 502, "bad gateway")
    head, _ = await client.response()
    assert head.status_code == 502


async def test_exchange_times_out_a_silent_target(autojump_clock):
    client, down, up, _service = await exchange_setup()
    ex = ph.Exchange("GET", "/")
    await client.send(
        h11.Request(method="GET", target="/", headers=[("Host", "svc")]), h11.EndOfMessage()
    )
    request = await down.next_event()
    await down.next_event()
    with pytest.raises(ph.UpstreamError) as info:
        await ph.exchange(
            down,
            up,
            request,
            ph.request_headers(request, "svc"),
            body_pending=False,
            ex=ex,
            idle_s=30,
            closing=lambda: False,
            count_to_target=ignore,
            count_from_target=ignore,
        )
    assert info.value.timeout
    assert trio.current_time() == pytest.approx(30)


async def test_closing_adds_connection_close_to_the_response():
    client, down, up, service = await exchange_setup()
    ex = ph.Exchange("GET", "/")
    await client.send(
        h11.Request(method="GET", target="/", headers=[("Host", "svc")]), h11.EndOfMessage()
    )
    request = await down.next_event()
    await down.next_event()
    async with trio.open_nursery() as nursery:

        async def serve():
            assert isinstance(await service.next(), h11.Request)
            await service.next()
            await service.send(
                h11.Response(status_code=200, headers=[("Content-Length", "0")]), h11.EndOfMessage()
            )

        nursery.start_soon(serve)
        await ph.exchange(
            down,
            up,
            request,
            ph.request_headers(request, "svc"),
            body_pending=False,
            ex=ex,
            idle_s=30,
            closing=lambda: True,
            count_to_target=ignore,
            count_from_target=ignore,
        )
    head, _ = await client.response()
    assert (b"connection", b"close") in head.headers
    assert up.reusable()  # the target's side stays keep-alive
    assert not down.reusable()


# -- request_timeout (rule 7): a trickle does not keep a request alive -----------------------


async def trickle(client_stream, data: bytes, every_s: float = 1.0) -> None:
    """One byte per ``every_s``: well inside any idle timeout, forever if nobody stops it."""
    try:
        for byte in data:
            await client_stream.send_all(bytes([byte]))
            await trio.sleep(every_s)
    except trio.BrokenResourceError:
        pass


async def test_a_trickled_head_is_cut_at_the_request_deadline(autojump_clock):
    client, proxy_side = trio.testing.memory_stream_pair()
    down = ph.HttpStream(proxy_side, http1.SERVER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, client, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000)
        request, why = await ph.next_request(down, ph.Idlers(), 30, math.inf, 10)
        nursery.cancel_scope.cancel()
    assert (request, why) == (None, "request_timeout")
    assert trio.current_time() == pytest.approx(10)
    assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 408 ")


async def test_a_trickled_body_is_cut_at_the_request_deadline_with_408(autojump_clock):
    """Each byte comes well within the 30 s idle timeout; the 10 s total deadline,
    counted from the request's first byte, ends it anyway."""
    client, down, up, _service = await exchange_setup()
    await client.stream.send_all(
        b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\n"
    )
    request, why = await ph.next_request(down, ph.Idlers(), 30, math.inf, 10)
    assert isinstance(request, http1.Request) and why == ""
    ex = ph.Exchange("POST", "/upload")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, client.stream, b"x" * 1000)
        with pytest.raises(ph.RequestTimeout) as info:
            await ph.exchange(
                down,
                up,
                request,
                ph.request_headers(request, "svc"),
                body_pending=True,
                ex=ex,
                idle_s=30,
                closing=lambda: False,
                count_to_target=ignore,
                count_from_target=ignore,
            )
        nursery.cancel_scope.cancel()
    assert info.value.phase == "body"
    assert trio.current_time() == pytest.approx(10)
    assert (ex.status, ex.timed_out) == (408, "body")
    assert 0 < ex.bytes_in < 1000
    assert not down.reusable()
    head, _ = await client.response()
    assert head.status_code == 408


@given(st.binary(max_size=40), st.sampled_from([b"x-forwarded-client-cert", b"authorization"]))
def test_added_headers_are_never_laxer_than_h11(value, name):
    """`checked` stands in for h11's own check on what the proxy adds (rule 8): whatever it
    accepts, h11 would have accepted too, so no CR, LF or NUL reaches the target."""
    try:
        h11.Request(method="GET", target="/", headers=[(b"host", b"svc"), (name, value)])
        h11_accepts = True
    except h11.LocalProtocolError:
        h11_accepts = False
    try:
        ph.checked([(name, value)])
        ours = True
    except ph.UpstreamError:
        ours = False
    assert h11_accepts or not ours
    if ours:
        assert b"\r" not in value and b"\n" not in value and b"\0" not in value
