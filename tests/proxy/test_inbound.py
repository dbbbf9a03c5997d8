"""proxy.inbound in-process: a server-mode connection from handshake to service and back."""

from __future__ import annotations

import pytest
import trio

from proxy.inbound import address_of, serve_inbound
from tally.tls.contexts import client_context
from tally.tls.stream import TLSStream
from tally.tls.verify import TLSError
from tests.pki import Authority
from tests.proxy.inprocess import Echo, identity_of, running, server_settings, traffic_for
from tests.test_tls import _close_socket_pairs as _close_socket_pairs
from tests.test_tls import socket_pair


@pytest.fixture
def ex() -> Authority:
    return Authority.create("example.org")


def client_stream(ex: Authority, spiffe_id: str, transport: trio.SocketStream) -> TLSStream:
    svid = ex.svid(spiffe_id)
    ctx = client_context(roots=[ex.root], chain=svid.chain, key=svid.key)
    return TLSStream(transport, ctx, server_side=False)


async def test_an_allowed_peer_reaches_the_service_and_a_refused_one_never_does(ex):
    echo = Echo()
    async with trio.open_nursery() as outer:
        target = await echo.start(outer)
        t = traffic_for(
            server_settings(target), identity_of(ex, ex.svid("spiffe://example.org/api"))
        )
        async with running(t) as nursery:
            a, b = socket_pair()
            nursery.start_soon(serve_inbound, t, b)
            refused = client_stream(ex, "spiffe://example.org/db", a)
            with trio.fail_after(10), pytest.raises((TLSError, trio.BrokenResourceError)):
                await refused.do_handshake()
                await (
                    refused.receive_some()
                )  # TLS 1.3: the refusal arrives after the client's Finished
            assert echo.connections == 0
            assert t.stats.denied == {"not_allowed": 1}

            a, b = socket_pair()
            nursery.start_soon(serve_inbound, t, b)
            client = client_stream(ex, "spiffe://example.org/web", a)
            with trio.fail_after(10):
                await client.send_all(b"ping")
                assert await client.receive_some() == b"ping"
                await client.send_eof()
                assert await client.receive_some() == b""
            assert echo.connections == 1
            assert t.stats.bytes_to_target == t.stats.bytes_from_target == 4
        outer.cancel_scope.cancel()


async def test_address_of_names_tcp_peers_and_unix_ones():
    a, _b = socket_pair()
    assert address_of(a) == "unix"
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, trio.SocketStream.aclose, 0)
        port = listeners[0].socket.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            host, _, peer_port = address_of(stream).rpartition(":")
            assert (host, int(peer_port)) == ("127.0.0.1", port)
        nursery.cancel_scope.cancel()
