"""Tests for tally.wire.http: server and client over TCP, memory streams and mutual TLS.

Timeouts run on trio's autojump clock over memory streams (virtual time, exact
assertions); real sockets are used where the kernel matters (interop, TCP resets).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from http.client import HTTPSConnection
from typing import Self

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.tls.contexts import TLSContext
from tally.tls.stream import TLSStream
from tally.tls.verify import PeerRejected
from tally.wire import http
from tests.test_tls import _close_socket_pairs as _close_socket_pairs
from tests.test_tls import (
    make_leaf,
    make_pki,
    make_root,
    socket_pair,
    spiffe_id,
    stdlib_client_context,
)


async def echo(req: http.Request) -> http.Response:
    if req.path == "/boom":
        raise RuntimeError("database password is hunter2")
    if req.path == "/teapot":
        raise http.HttpError(418, "short and stout")
    if req.path == "/json":
        return http.Response.json({"got": req.json(), "query": req.query})
    if req.path == "/sleep":
        await trio.sleep(float(req.query["s"]))
    return http.Response.json(
        {
            "method": req.method,
            "path": req.path,
            "len": len(req.body),
            "agent": req.header("X-Agent"),
        }
    )


# -- harnesses ---------------------------------------------------------------------------


class TcpServer:
    def __init__(self, handler=echo, **options):
        self.handler = handler
        self.options = options
        self.accepted = 0
        self.port = 0

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        async with stream:
            await http.serve_http(stream, self.handler, **self.options)

    async def start(self, nursery: trio.Nursery) -> Self:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), self._connection, 0
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self

    def client(self, **kw) -> http.HttpClient:
        return http.HttpClient(partial(trio.open_tcp_stream, "127.0.0.1", self.port), **kw)


class MemoryServer:
    """Each connect() makes a memory stream pair and serves its far end."""

    def __init__(self, nursery: trio.Nursery, handler=echo, **options):
        self.nursery = nursery
        self.handler = handler
        self.options = options
        self.connections = 0
        self.finished = 0

    async def _serve(self, stream) -> None:
        async with stream:
            await http.serve_http(stream, self.handler, **self.options)
        self.finished += 1

    async def connect(self) -> trio.abc.Stream:
        self.connections += 1
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server)
        return client


async def raw_exchange(
    data: bytes, *, eof: bool = True, handler=echo, **options
) -> tuple[bytes, float]:
    """Send raw bytes to serve_http; returns everything it wrote and when it returned."""
    client, server = trio.testing.memory_stream_pair()
    returned_at = []

    async def serve():
        async with server:
            await http.serve_http(server, handler, **options)
        returned_at.append(trio.current_time())

    out = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(data)
        if eof:
            await client.send_eof()
        while chunk := await client.receive_some():
            out += chunk
    return bytes(out), returned_at[0]


def parse_responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse raw response bytes with h11 itself (as a client that sent GETs)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    out: list[tuple[int, dict[str, str], bytes]] = []
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
            body = b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, headers, body))
            if not conn.trailing_data[0] or h11.MUST_CLOSE in (conn.our_state, conn.their_state):
                return out
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        else:
            return out


# -- over TCP ----------------------------------------------------------------------------


async def test_json_round_trip_and_keep_alive_over_tcp():
    async with trio.open_nursery() as nursery:
        server = await TcpServer().start(nursery)
        client = server.client()
        for i in range(3):
            resp = await client.request(
                "POST", f"/json?i={i}&x=a%20b", json_body={"n": i, "s": "é"}
            )
            assert resp.status == 200
            assert resp.header("Content-Type") == "application/json"
            assert resp.json() == {"got": {"n": i, "s": "é"}, "query": {"i": str(i), "x": "a b"}}
        assert client.connections_opened == 1
        assert server.accepted == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_malformed_request_gets_400_and_the_server_keeps_serving():
    async with trio.open_nursery() as nursery:
        server = await TcpServer().start(nursery)
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with raw:
            await raw.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            out = bytearray()
            while chunk := await raw.receive_some():
                out += chunk
        [(status, headers, body)] = parse_responses(bytes(out))
        assert status == 400
        assert headers["connection"] == "close"
        assert json.loads(body) == {"error": "bad request"}
        client = server.client()
        assert (await client.request("GET", "/after")).json()["path"] == "/after"
        assert server.accepted == 2
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_oversized_body_gets_413_even_when_the_client_keeps_sending():
    async with trio.open_nursery() as nursery:
        server = await TcpServer(max_body=1000).start(nursery)
        client = server.client()
        resp = await client.request("POST", "/", body=b"x" * 200_000)
        assert resp.status == 413
        assert resp.json() == {"error": "request body exceeds 1000 bytes"}
        # The refused connection was dropped; the next call opens a fresh one.
        assert (await client.request("POST", "/", body=b"x" * 1000)).json()["len"] == 1000
        assert client.connections_opened == 2
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_stdlib_http_client_over_mutual_tls_interoperates(tmp_path):
    pki = make_pki()
    server_ctx = pki.server_ctx()
    ctx = stdlib_client_context(pki, tmp_path)

    async def identity(req: http.Request) -> http.Response:
        return http.Response.text(f"hello {req.header('x-peer')}")

    async def connection(raw: trio.SocketStream) -> None:
        stream = TLSStream(raw, server_ctx, server_side=True)
        async with stream:
            with trio.fail_after(10):
                await stream.do_handshake()
            peer = str(stream.peer_identity)

            async def handler(req: http.Request) -> http.Response:
                return await identity(
                    http.Request(req.method, req.target, (*req.headers, ("x-peer", peer)), req.body)
                )

            await http.serve_http(stream, handler)

    def client(port: int) -> tuple[int, bytes, bytes]:
        conn = HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        try:
            conn.request("GET", "/")
            first = conn.getresponse()
            first_body = first.read()
            conn.request("GET", "/again")  # same connection: keep-alive
            second_body = conn.getresponse().read()
        finally:
            conn.close()
        return first.status, first_body, second_body

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), connection, 0)
        port = listeners[0].socket.getsockname()[1]
        status, body, again = await trio.to_thread.run_sync(client, port)
        nursery.cancel_scope.cancel()
    assert status == 200
    assert body == again == b"hello spiffe://example.org/client"


# -- over mutual TLS with our own client ---------------------------------------------------


class TlsServer(TcpServer):
    def __init__(self, ctx: TLSContext, **options):
        super().__init__(self._whoami, **options)
        self.ctx = ctx
        self.rejections: list[PeerRejected] = []

    async def _whoami(self, req: http.Request) -> http.Response:
        return http.Response.json({"you": req.header("x-test-peer")})

    async def _connection(self, raw: trio.SocketStream) -> None:
        self.accepted += 1
        stream = TLSStream(raw, self.ctx, server_side=True)
        async with stream:
            try:
                with trio.fail_after(10):
                    await stream.do_handshake()
            except PeerRejected as exc:
                self.rejections.append(exc)
                return
            peer = str(stream.peer_identity)

            async def handler(req: http.Request) -> http.Response:
                tagged = (*req.headers, ("x-test-peer", peer))
                return await self._whoami(http.Request(req.method, req.target, tagged, req.body))

            await http.serve_http(stream, handler, **self.options)

    def tls_client(self, ctx: TLSContext) -> http.HttpClient:
        async def connect() -> trio.abc.Stream:
            raw = await trio.open_tcp_stream("127.0.0.1", self.port)
            stream = TLSStream(raw, ctx, server_side=False)
            try:
                with trio.fail_after(10):
                    await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(raw)
                raise
            return stream

        return http.HttpClient(connect)


async def test_http_over_mutual_tls():
    pki = make_pki()
    async with trio.open_nursery() as nursery:
        server = await TlsServer(pki.server_ctx()).start(nursery)
        client = server.tls_client(pki.client_ctx())
        for _ in range(2):
            assert (await client.request("GET", "/")).json() == {
                "you": "spiffe://example.org/client"
            }
        assert client.connections_opened == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_untrusted_client_is_refused_in_the_handshake():
    pki = make_pki()
    stranger = make_leaf(make_root("stranger"))
    async with trio.open_nursery() as nursery:
        server = await TlsServer(pki.server_ctx()).start(nursery)
        client = server.tls_client(pki.client_ctx(chain=stranger.chain, key=stranger.key))
        with pytest.raises(http.HttpClientError):
            await client.request("GET", "/")
        nursery.cancel_scope.cancel()
    assert [r.reason for r in server.rejections] == ["untrusted"]


async def test_client_refusing_the_server_surfaces_peer_rejected_as_the_cause():
    pki = make_pki()

    def only_ca(chain):
        raise PeerRejected("not_allowed", f"{spiffe_id(chain)} is not the CA")

    async with trio.open_nursery() as nursery:
        server = await TlsServer(pki.server_ctx()).start(nursery)
        client = server.tls_client(pki.client_ctx(verifier=only_ca))
        with pytest.raises(http.HttpClientError) as info:
            await client.request("GET", "/")
        assert isinstance(info.value.__cause__, PeerRejected)
        assert info.value.__cause__.reason == "not_allowed"
        nursery.cancel_scope.cancel()


async def test_serve_http_swallows_a_failed_implicit_handshake():
    # serve_http over a TLSStream whose handshake was never run: the peer's garbage
    # fails it inside receive_some, and the connection just ends.
    pki = make_pki()
    client, server = socket_pair()
    stream = TLSStream(server, pki.server_ctx(), server_side=True)

    async def serve():
        async with stream:
            await http.serve_http(stream, echo)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        out = bytearray()
        try:
            while chunk := await client.receive_some():
                out += chunk
        except trio.BrokenResourceError:
            pass  # closed with our request unread: the kernel resets the connection
    assert b"HTTP" not in out  # at most a TLS alert; the connection simply ended


# -- timeouts, on virtual time --------------------------------------------------------------


async def test_idle_connection_is_closed_silently_at_idle_timeout(autojump_clock):
    start = trio.current_time()
    out, returned = await raw_exchange(b"", eof=False, idle_timeout=7, request_timeout=3)
    assert out == b""
    assert returned - start == pytest.approx(7)


async def test_slow_request_gets_408_at_request_timeout(autojump_clock):
    start = trio.current_time()
    out, returned = await raw_exchange(
        b"GET / HTTP/1.1\r\nHo", eof=False, idle_timeout=7, request_timeout=3
    )
    [(status, _, body)] = parse_responses(out)
    assert status == 408
    assert json.loads(body) == {"error": "request timeout"}
    assert returned - start == pytest.approx(3 + http.LINGER_S)


async def test_slow_body_gets_408(autojump_clock):
    out, _ = await raw_exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", eof=False, request_timeout=5
    )
    assert [r[0] for r in parse_responses(out)] == [408]


async def test_client_reconnects_after_the_server_dropped_an_idle_connection(autojump_clock):
    async with trio.open_nursery() as nursery:
        server = MemoryServer(nursery, idle_timeout=5)
        client = http.HttpClient(server.connect)
        assert (await client.request("POST", "/", body=b"abc")).json()["len"] == 3
        await trio.sleep(6)
        assert server.finished == 1  # the server gave up on the idle connection
        assert (await client.request("POST", "/", body=b"abcd")).json()["len"] == 4
        assert server.connections == 2
        await client.aclose()


async def test_client_timeout_raises_and_drops_the_connection(autojump_clock):
    async with trio.open_nursery() as nursery:
        server = MemoryServer(nursery)
        client = http.HttpClient(server.connect)
        start = trio.current_time()
        with pytest.raises(http.HttpClientError) as info:
            await client.request("GET", "/sleep?s=20", timeout=2)
        assert isinstance(info.value.__cause__, trio.TooSlowError)
        assert trio.current_time() - start == pytest.approx(2)
        assert (await client.request("GET", "/fast")).status == 200
        assert server.connections == 2
        await client.aclose()
        nursery.cancel_scope.cancel()


# -- server behaviour over raw bytes ---------------------------------------------------------


async def test_handler_crash_gives_generic_500_and_logs_the_traceback(autojump_clock, caplog):
    caplog.set_level(logging.ERROR, logger="tally.http")
    out, _ = await raw_exchange(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    [(status, _, body)] = parse_responses(out)
    assert status == 500
    assert json.loads(body) == {"error": "internal error"}
    assert b"hunter2" not in out
    [record] = [r for r in caplog.records if r.name == "tally.http"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "hunter2" in str(record.exc_info[1])


async def test_handler_returning_garbage_is_a_500(autojump_clock, caplog):
    async def wrong(req: http.Request) -> http.Response:
        return {"not": "a response"}  # type: ignore[return-value]

    out, _ = await raw_exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", handler=wrong)
    assert [r[0] for r in parse_responses(out)] == [500]
    assert any("not a Response" in r.getMessage() for r in caplog.records)


async def test_http_error_from_handler_sets_status_and_message(autojump_clock):
    out, _ = await raw_exchange(b"GET /teapot HTTP/1.1\r\nHost: x\r\n\r\n")
    [(status, headers, body)] = parse_responses(out)
    assert status == 418
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "short and stout"}


async def test_bad_json_body_is_the_clients_400(autojump_clock):
    for body in (b"{nope", b"[1, 2]", b"\xff\xfe"):
        request = b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        [(status, _, _)] = parse_responses((await raw_exchange(request))[0])
        assert status == 400


async def test_chunked_body_over_the_limit_gets_413(autojump_clock):
    chunk = b"100\r\n" + b"x" * 256 + b"\r\n"
    request = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 5
    out, _ = await raw_exchange(request, max_body=1000)
    assert [r[0] for r in parse_responses(out)] == [413]


async def test_declared_oversized_body_is_refused_before_it_is_read(autojump_clock):
    out, _ = await raw_exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", eof=False, max_body=1000
    )
    assert [r[0] for r in parse_responses(out)] == [413]


@pytest.mark.parametrize("trickle", [False, True])
async def test_oversized_headers_get_431(autojump_clock, trickle):
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    if trickle:  # arriving in pieces, h11's own buffer limit trips
        out, _ = await raw_exchange(request[:3000], eof=False, max_header_bytes=1024)
    else:  # arriving whole, the parsed head is measured
        out, _ = await raw_exchange(request, max_header_bytes=1024)
    assert [r[0] for r in parse_responses(out)] == [431]


async def test_pipelined_requests_are_answered_in_order_and_head_has_no_body(autojump_clock):
    request = (
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-Agent: one\r\n\r\n"
        b"HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    out, _ = await raw_exchange(request)
    assert out.count(b"HTTP/1.1 200 ") == 3
    rest = out.split(b"\r\n\r\n", 1)[1]
    assert json.loads(rest[: rest.index(b"HTTP/1.1")])["agent"] == "one"
    head_response = rest[rest.index(b"HTTP/1.1") :]
    assert head_response.split(b"\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 200 ")


async def test_expect_100_continue_is_honoured(autojump_clock):
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.serve_http, server, echo)
        await client.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await client.receive_some() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send_all(b"abc")
        await client.send_eof()
        out = bytearray()
        while chunk := await client.receive_some():
            out += chunk
            if out.endswith(b"}"):
                break
        assert json.loads(bytes(out).split(b"\r\n\r\n", 1)[1])["len"] == 3


# -- client details --------------------------------------------------------------------------


async def test_client_caps_the_response_body(autojump_clock):
    async def big(req: http.Request) -> http.Response:
        return http.Response(200, b"x" * 5000)

    async with trio.open_nursery() as nursery:
        client = http.HttpClient(MemoryServer(nursery, big).connect, max_body=4096)
        with pytest.raises(http.HttpClientError, match="exceeds 4096"):
            await client.request("GET", "/")
        nursery.cancel_scope.cancel()


async def test_connect_failure_is_an_http_client_error_with_the_cause():
    async def refuse() -> trio.abc.Stream:
        raise PermissionError("socket mode 0600")

    client = http.HttpClient(refuse)
    with pytest.raises(http.HttpClientError) as info:
        await client.request("GET", "/")
    assert isinstance(info.value.__cause__, PermissionError)


async def test_server_asking_to_close_makes_the_client_reconnect(autojump_clock):
    async def closing(req: http.Request) -> http.Response:
        return http.Response.text("bye")

    async with trio.open_nursery() as nursery:
        server = MemoryServer(nursery, closing)
        client = http.HttpClient(server.connect)
        resp = await client.request("GET", "/", headers=[("connection", "close")])
        assert resp.body == b"bye"
        assert resp.header("content-type") == "text/plain; charset=utf-8"
        await client.request("GET", "/")
        assert server.connections == 2
        await client.aclose()


async def test_server_closing_without_answer_on_a_fresh_connection_is_an_error(autojump_clock):
    async def hang_up() -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await server.aclose()
        return client

    with pytest.raises(http.HttpClientError):
        await http.HttpClient(hang_up).request("GET", "/")


def test_request_and_response_helpers():
    req = http.Request("GET", "/v1/x?a=1&b=%2F&a=2&flag", (("X-Thing", "v"),), b'{"k": 1}')
    assert req.path == "/v1/x"
    assert req.query == {"a": "2", "b": "/", "flag": ""}
    assert req.header("x-thing") == "v"
    assert req.header("missing") is None
    assert req.json() == {"k": 1}
    with pytest.raises(http.HttpError) as info:
        http.Request("POST", "/", (), b"[]").json()
    assert info.value.status == 400
    with pytest.raises(http.HttpError):
        http.Request("POST", "/", (), b"[" * 100_000).json()
    with pytest.raises(ValueError, match="set by the HTTP layer"):
        http.Response(200, headers=(("Content-Length", "3"),))
    with pytest.raises(ValueError, match="one line"):
        http.Response(200, headers=(("x-a", "b\r\nInjected: yes"),))
    with pytest.raises(ValueError, match="not an HTTP token"):
        http.Response(200, headers=(("bad name", "x"),))
    with pytest.raises(ValueError, match="200-599"):
        http.Response(101)
    with pytest.raises(ValueError, match="either json_body or body"):
        http.HttpClient(lambda: None)._build("POST", "/", {"a": 1}, b"x", ())  # type: ignore[arg-type,return-value]


# -- property: a peer's bytes never crash the server -----------------------------------------

VALID_STARTS = [
    b"",
    b"GET / HTTP/1.1\r\nHost: x\r\n",
    b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from(VALID_STARTS),
    chunks=st.lists(st.binary(max_size=300), max_size=4),
    close=st.booleans(),
)
def test_random_bytes_never_escape_serve_http(start, chunks, close):
    async def main():
        client, server = trio.testing.memory_stream_pair()
        out = bytearray()

        async def reader():
            while chunk := await client.receive_some():
                out.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)

            async def feed():
                for piece in [start, *chunks]:
                    await client.send_all(piece)
                if close:
                    await client.send_eof()

            nursery.start_soon(feed)
            await http.serve_http(
                server, echo, idle_timeout=5, request_timeout=5, max_body=200, max_header_bytes=512
            )
            await server.aclose()
        assert not out or out.startswith(b"HTTP/1.1 ")
        assert b"hunter2" not in out

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), JSON_VALUES, max_size=5))
def test_json_bodies_round_trip_from_response_to_request(obj):
    body = http.Response.json(obj).body
    assert http.Request("POST", "/", (), body).json() == obj


@given(st.binary(max_size=200))
def test_request_json_accepts_objects_or_raises_only_400(body):
    try:
        value = http.Request("POST", "/", (), body).json()
    except http.HttpError as exc:
        assert exc.status == 400
    else:
        assert isinstance(value, dict)


async def test_drain_closes_idle_connections_at_once_and_busy_ones_after_their_answer(
    autojump_clock,
):
    drain = http.Drain()
    _idle_client, idle_server = trio.testing.memory_stream_pair()
    busy_client, busy_server = trio.testing.memory_stream_pair()
    ended = {}

    async def serve(name, stream):
        async with stream:
            await http.serve_http(stream, echo, idle_timeout=300, drain=drain)
        ended[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, "idle", idle_server)
        nursery.start_soon(serve, "busy", busy_server)
        await busy_client.send_all(b"GET /sleep?s=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(1)
        started = trio.current_time()
        drain.start()
        answer = bytearray()
        while chunk := await busy_client.receive_some():
            answer += chunk
    assert ended["idle"] == started  # no idle timeout waited out
    assert ended["busy"] == started + 4  # the request in flight finished first
    [(status, headers, _)] = parse_responses(bytes(answer))
    assert status == 200 and headers["connection"] == "close"
    # A connection that gets through while the listener closes is closed unread.
    late_client, late_server = trio.testing.memory_stream_pair()
    before = trio.current_time()
    with trio.fail_after(1):
        await http.serve_http(late_server, echo, idle_timeout=300, drain=drain)
    assert trio.current_time() == before
    await late_client.aclose()


async def test_a_streamed_response_is_sent_piece_by_piece_and_ends_at_the_drain(autojump_clock):
    """`Response.stream` (the console's server-sent events): each piece goes out as it is
    made, a drain cuts the wait for the next one, the stream still ends with its last
    chunk, and the generator is closed."""
    drain = http.Drain()
    closed = []

    async def ticks():
        try:
            n = 0
            while True:
                yield f"tick {n}\n".encode()
                n += 1
                await trio.sleep(10)
        finally:
            closed.append(trio.current_time())

    async def handler(request: http.Request) -> http.Response:
        return http.Response(200, content_type="text/event-stream", stream=ticks())

    client, server = trio.testing.memory_stream_pair()
    ended = []

    async def serve():
        async with server:
            await http.serve_http(server, handler, drain=drain)
        ended.append(trio.current_time())

    raw = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        while b"tick 2" not in raw:
            raw += await client.receive_some()
        assert trio.current_time() == 20  # one piece every 10 s, none held back
        await trio.sleep(5)
        drain.start()
        while chunk := await client.receive_some():
            raw += chunk
    assert ended == [25] and closed == [25]  # cut at the drain, not at the next tick
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/events", headers=[("host", "x")]))
    conn.receive_data(bytes(raw))
    conn.receive_data(b"")
    events = []
    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        events.append(event)
        if isinstance(event, h11.ConnectionClosed):
            break
    head = events[0]
    assert isinstance(head, h11.Response) and head.status_code == 200
    assert (b"transfer-encoding", b"chunked") in list(head.headers)
    body = b"".join(e.data for e in events if isinstance(e, h11.Data))
    assert body == b"tick 0\ntick 1\ntick 2\n"
    assert any(isinstance(e, h11.EndOfMessage) for e in events)  # ended cleanly


async def test_a_connect_timeout_gives_opening_its_own_deadline_and_no_resend(autojump_clock):
    """``connect_timeout``: a slow open is not counted in ``timeout``; a connection
    opened for the request is fresh, so its failure is not retried as a stale one."""
    served: list[bytes | bytearray] = []

    def connect_after(delay: float, answer: bytes) -> Callable[[], Awaitable[trio.abc.Stream]]:
        async def connect() -> trio.abc.Stream:
            await trio.sleep(delay)  # a server that makes connections wait their turn
            ours, theirs = trio.testing.memory_stream_pair()

            async def serve() -> None:
                served.append(await theirs.receive_some())
                await theirs.send_all(answer)
                await theirs.aclose()

            nursery.start_soon(serve)
            return ours

        return connect

    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    async with trio.open_nursery() as nursery:
        slow = http.HttpClient(connect_after(40, ok))
        with pytest.raises(http.HttpClientError, match="TooSlowError"):
            await slow.request("GET", "/", timeout=15)
        start = trio.current_time()
        resp = await slow.request("GET", "/", timeout=15, connect_timeout=60)
        assert resp.status == 200 and trio.current_time() - start == pytest.approx(40)
        with pytest.raises(http.HttpClientError):
            await http.HttpClient(connect_after(100, ok)).request(
                "GET", "/", timeout=15, connect_timeout=60
            )
        served.clear()
        dropped = http.HttpClient(connect_after(0, b""))  # closes before answering
        with pytest.raises(http.HttpClientError):
            await dropped.request("GET", "/", timeout=15, connect_timeout=60)
        assert dropped.connections_opened == 1 and len(served) == 1
