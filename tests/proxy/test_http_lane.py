"""proxy.http_lane: HTTP mode's plain exchanges served from the relay's task, on real sockets.

Each test runs `relay_http` as the proxy does (its relay, its pool, a real
backend), with h11 as the independent client.  The lane is watched through
what it hands back to the connection's task, so a test can tell an exchange
the lane served from one the task served.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import http_relay
from proxy.http_lane import Handback, Lane
from proxy.inbound import dial_service
from proxy.pool import Pool
from proxy.traffic import Traffic
from tally.ops.config import Duration
from tally.tls.plain import PlainStream
from tests.proxy.backends import HttpServer, blob
from tests.proxy.inprocess import running, server_settings, traffic_for


class Watched(Lane):
    """The real lane, noting each handback: how the tests see who served what."""

    kinds: list[str]

    async def run(self) -> Handback:
        back = await super().run()
        Watched.kinds.append(back.kind)
        return back


@pytest.fixture(autouse=True)
def watched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    Watched.kinds = []
    monkeypatch.setattr(http_relay, "Lane", Watched)
    return Watched.kinds


@asynccontextmanager
async def proxy_to(target: str, **overrides: object) -> AsyncIterator[tuple[Traffic, Callable]]:
    """HTTP mode's traffic to ``target``, its relay and pool running; yields it and a
    function that connects a client (an h11 client on one end of a socket pair)."""
    cfg = server_settings(target=target, http=True, access_log=False, **overrides)
    t = traffic_for(cfg, None)
    t.pool = Pool(partial(dial_service, t), max_idle=8, idle_s=60, stats=t.stats)
    clients: list[Client] = []
    async with running(t) as nursery:
        await nursery.start(t.pool.run)

        async def connect(hard_at: float = math.inf) -> Client:
            ours, theirs = trio.socket.socketpair()
            down = PlainStream(trio.SocketStream(theirs))
            client = Client(trio.SocketStream(ours))
            clients.append(client)

            async def serve() -> None:
                try:
                    await http_relay.relay_http(t, down, caller=None, hard_at=hard_at, stamp=None)
                finally:
                    down.close_now()
                    client.served.set()

            nursery.start_soon(serve)
            return client

        try:
            yield t, connect
        finally:
            for client in clients:
                client.stream.socket.close()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h = h11.Connection(h11.CLIENT)
        self.served = trio.Event()
        """Set when the proxy's side of the connection is done."""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, method: str, target: str, body: bytes = b"") -> None:
        headers = [("host", "lane.test")]
        if body:
            headers.append(("content-length", str(len(body))))
        data = self.h.send(h11.Request(method=method, target=target, headers=headers))
        data += self.h.send(h11.Data(data=body)) if body else b""
        await self.send(data + self.h.send(h11.EndOfMessage()))

    async def response(self) -> tuple[list[int], dict[str, str], bytes]:
        """Statuses (interim ones first), the final head's headers, the body."""
        statuses: list[int] = []
        headers: dict[str, str] = {}
        body = b""
        while True:
            event = self.h.next_event()
            if event is h11.NEED_DATA:
                self.h.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.InformationalResponse | h11.Response):
                statuses.append(event.status_code)
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
                    self.h.start_next_cycle()
                return statuses, headers, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def get(self, target: str) -> tuple[int, dict[str, object]]:
        await self.request("GET", target)
        statuses, _, body = await self.response()
        return statuses[-1], json.loads(body)

    async def rest(self, within: float = 5) -> bytes:
        """What the proxy still sends before it closes the connection (``within`` seconds)."""
        data = b""
        with trio.fail_after(within):
            while chunk := await self.stream.receive_some(65536):
                data += chunk
        return data


@pytest.fixture
def backend():
    server = HttpServer()
    yield server
    server.close()


async def test_plain_requests_are_served_in_the_lane_on_one_pooled_connection(backend, watched):
    async with proxy_to(backend.address) as (t, connect):
        client = await connect()
        for i in range(5):
            status, answer = await client.get(f"/n{i}")
            assert (status, answer["path"]) == (200, f"/n{i}")
        await client.stream.aclose()
        with trio.fail_after(5):
            await client.served.wait()
    # The first request found the pool empty: the task dialled.  The other four never
    # left the lane, which gave the connection back only when the client closed it.
    assert watched == ["request", "ended"]
    assert backend.connections == 1
    assert (t.stats.pool_dialed, t.stats.pool_reused) == (1, 4)
    assert t.stats.requests["2xx"] == 5


async def test_what_the_lane_does_not_take_goes_to_the_task_and_back(backend, watched):
    async with proxy_to(backend.address) as (_, connect):
        client = await connect()
        await client.get("/warm")
        body = blob(300_000)
        await client.request("POST", "/upload", body)  # a body: the task's
        statuses, _, answer = await client.response()
        assert statuses == [200] and json.loads(answer)["length"] == len(body)
        head = client.h.send(h11.Request(method="GET", target="/split", headers=[("host", "x")]))
        await client.send(head[:9])  # a head in two pieces: the task's too
        await trio.sleep(0.05)
        await client.send(head[9:] + client.h.send(h11.EndOfMessage()))
        assert (await client.response())[0] == [200]
        status, answer = await client.get("/after")  # and the lane's again
        assert (status, answer["path"]) == (200, "/after")
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
        assert (await client.rest()).startswith(b"HTTP/1.1 400 ")
    assert watched == ["request", "request", "partial", "malformed"]


async def test_a_target_that_closed_an_idle_connection_costs_no_request(backend, watched):
    async with proxy_to(backend.address) as (t, connect):
        client = await connect()
        await client.get("/warm")  # the task dials
        await client.get("/lane")
        # The lane gave the connection back still in the relay's epoll set.
        assert [up.watch is not None for up in t.pool._idle] == [True]
        await client.get("/bye?hangup=1")  # the backend closes this connection after answering
        for _ in range(1000):  # the relay sees the goodbye and drops it from the pool
            if not t.pool.idle_count:
                break
            await trio.sleep(0.005)
        assert t.pool.idle_count == 0
        status, answer = await client.get("/again")
        assert (status, answer["path"]) == (200, "/again")
    # Nothing was sent on the closed connection: the pool was empty, so the task dialled.
    assert watched[:2] == ["request", "request"]
    assert [s.path for s in backend.seen] == ["/warm", "/lane", "/bye?hangup=1", "/again"]
    assert t.stats.pool_dialed == 2


async def test_a_request_the_target_closed_on_unanswered_is_sent_again(watched):
    """The race the relay cannot see coming: the target closes as the request arrives."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        # Each connection answers one request, then closes on the next, unanswered.
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(scripted, [ok], seen), 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with proxy_to(f"127.0.0.1:{port}") as (t, connect):
            client = await connect()
            for target in ("/first", "/second"):
                await client.request("GET", target)
                statuses, _, body = await client.response()
                assert (statuses, body) == ([200], b"ok")
        nursery.cancel_scope.cancel()
    # The lane sent /second on the pooled connection, which took it and closed unanswered
    # (`scripted` records only what it answers); the task sent it once more on a new one.
    assert watched[:2] == ["request", "failed"]
    assert [head.split(b" ")[1] for head in seen] == [b"/first", b"/second"]
    assert t.stats.pool_dialed == 2


async def scripted(answers: list[bytes], seen: list[bytes], stream: trio.SocketStream) -> None:
    """A backend that answers its requests (heads only) with ``answers``, in order."""
    buffered = b""
    for answer in answers:
        while b"\r\n\r\n" not in buffered:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffered += data
        head, buffered = buffered.split(b"\r\n\r\n", 1)
        seen.append(head)
        await stream.send_all(answer)
    await stream.receive_some(65536)


async def test_an_interim_response_is_passed_on_and_the_request_is_not_sent_again(watched):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(scripted, [ok, hints + ok], seen), 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with proxy_to(f"127.0.0.1:{port}") as (_, connect):
            client = await connect()
            await client.request("GET", "/first")
            assert (await client.response())[0] == [200]
            await client.request("DELETE", "/item")  # no body: the lane's
            statuses, _, body = await client.response()
            assert statuses == [103, 200] and body == b"ok"
            assert watched == ["request"]  # the DELETE and its 103 never left the lane
        nursery.cancel_scope.cancel()
    assert [head.split(b" ")[:2] for head in seen] == [[b"GET", b"/first"], [b"DELETE", b"/item"]]


async def test_large_responses_stream_through_the_lane_to_a_slow_reader(backend, watched):
    async with proxy_to(backend.address) as (_, connect):
        slow, other = await connect(), await connect()
        await slow.get("/warm")
        await other.get("/warm")
        await slow.request("GET", "/blob?size=8000000")
        # The slow client reads nothing meanwhile: its lane holds, the relay serves the others.
        assert (await other.get("/meanwhile"))[0] == 200
        statuses, _, body = await slow.response()
        assert statuses == [200] and body == blob(8_000_000)
        await slow.request("GET", "/blob?size=3000000&chunked=1")
        statuses, _, body = await slow.response()
        assert statuses == [200] and body == blob(3_000_000)
        # Only the requests that found the pool empty left the lane (the first, and the
        # one that came while the first blob held the pooled connection).
        assert watched == ["request", "request"]


async def test_a_drain_ends_waiting_lanes_and_closes_after_the_exchange_in_flight(backend, watched):
    async with proxy_to(backend.address) as (t, connect):
        idle, busy = await connect(), await connect()
        await idle.get("/warm")
        await busy.get("/warm")
        await busy.request("GET", f"/slow?until={time.time() + 0.5}")
        await trio.sleep(0.1)
        t.idlers.drain()
        assert await idle.rest() == b""
        statuses, headers, _ = await busy.response()
        assert statuses == [200] and headers["connection"] == "close"
        assert await busy.rest() == b""
    assert sorted(watched) == ["ended", "ended", "request"]  # only the first found no pool


async def test_idle_and_expired_connections_are_cut_in_virtual_time(autojump_clock, watched):
    async with proxy_to("127.0.0.1:1", idle_timeout=Duration(30)) as (t, connect):
        start = trio.current_time()
        client = await connect()
        assert await client.rest(within=60) == b""
        assert 29.5 <= trio.current_time() - start <= 30.01
        expiring = await connect(hard_at=trio.current_time() + 5)
        assert await expiring.rest(within=60) == b""
    assert watched == ["timeout", "timeout"]
    assert t.stats.closed_peer_expired == 1


async def test_a_peer_expiring_mid_exchange_gets_its_answer_then_the_close(backend, watched):
    async with proxy_to(backend.address) as (t, connect):
        client = await connect(hard_at=trio.current_time() + 0.6)
        await client.get("/warm")
        await client.request("GET", f"/slow?until={time.time() + 1.0}")
        statuses, headers, _ = await client.response()
        assert statuses == [200] and headers["connection"] == "close"
        assert await client.rest() == b""
    assert watched == ["request", "ended"]
    assert t.stats.closed_peer_expired == 1


REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["GET", "HEAD", "DELETE", "POST"]),
        st.integers(0, 3),  # where the head is cut (0: whole)
        st.integers(0, 40_000),  # the size of the answer asked for
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(REQUESTS)
def test_any_sequence_of_requests_is_answered_in_order_whoever_serves_it(backend, requests):
    async def main() -> None:
        async with proxy_to(backend.address) as (_, connect):
            client = await connect()
            for i, (method, cut, asked) in enumerate(requests):
                size = 0 if method == "HEAD" else asked
                body = b"x" * 10 if method == "POST" else b""
                target = f"/blob?size={size}&i={i}"
                headers = [("host", "lane.test")] + (
                    [("content-length", str(len(body)))] if body else []
                )
                data = client.h.send(h11.Request(method=method, target=target, headers=headers))
                data += (client.h.send(h11.Data(data=body)) if body else b"") + client.h.send(
                    h11.EndOfMessage()
                )
                pieces = [data] if not cut else [data[: cut * 7], data[cut * 7 :]]
                for piece in pieces:
                    await client.send(piece)
                    await trio.lowlevel.checkpoint()
                statuses, _, answer = await client.response()
                assert statuses == [200]
                assert answer == blob(size)
            await client.stream.aclose()

    trio.run(main)


async def test_an_http10_client_is_answered_in_the_lane_and_closed_unless_it_keeps_alive(
    backend, watched
):
    async with proxy_to(backend.address) as (_, connect):
        warm = await connect()
        await warm.get("/warm")  # a pooled connection for the lanes below
        kept = await connect()
        await kept.send(b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                data += await kept.stream.receive_some(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["path"] == "/ten"
        assert b"connection: close" not in head.lower()
        await kept.send(b"GET /ten-again HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        again = b""
        with trio.fail_after(5):
            while b"/ten-again" not in again:  # still open (head and body may come apart)
                chunk = await kept.stream.receive_some(65536)
                assert chunk, "closed"
                again += chunk
        once = await connect()
        await once.send(b"GET /once HTTP/1.0\r\n\r\n")
        answer = await once.rest()  # answered, then closed
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"/once"' in answer
    # Only the warm-up found the pool empty; both HTTP/1.0 requests were the lanes'.
    assert watched[0] == "request" and watched.count("request") == 1


async def test_a_body_that_came_whole_is_the_lanes_and_never_meets_a_closed_connection(
    backend, watched
):
    async with proxy_to(backend.address) as (t, connect):
        client = await connect()
        await client.get("/warm")
        body = b'{"name": "value"}' * 100
        await client.request("POST", "/json", body)  # head and body in one write
        statuses, _, answer = await client.response()
        assert statuses == [200] and json.loads(answer)["length"] == len(body)
        assert watched == ["request"]  # the POST did not leave the lane
        assert t.stats.bytes_to_target >= len(body)
        await client.get("/bye?hangup=1")  # the backend closes the pooled connection
        await trio.sleep(0.05)
        await client.request("POST", "/after-close", b"once")
        statuses, _, answer = await client.response()
        # Probed before use: the closed connection was dropped, not sent a body that
        # could not be sent again; the task dialled.
        assert statuses == [200] and json.loads(answer)["length"] == 4
    assert [s.path for s in backend.seen].count("/after-close") == 1
    assert "failed" not in watched
