"""proxy.outbound in-process: a client-mode connection carried to an in-process server proxy."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from proxy.inbound import serve_inbound
from proxy.outbound import dial_server, serve_outbound
from proxy.pool import RETIRE_MARGIN_S, DialError
from tests.pki import Authority
from tests.proxy.inprocess import (
    Echo,
    client_settings,
    identity_of,
    running,
    server_settings,
    traffic_for,
)
from tests.test_plain import plain_pair
from tests.test_tls import _close_socket_pairs as _close_socket_pairs
from tests.test_tls import socket_pair


@pytest.fixture
def ex() -> Authority:
    return Authority.create("example.org")


async def test_the_app_reaches_the_service_through_both_proxies(ex):
    echo = Echo()
    async with trio.open_nursery() as outer:
        service = await echo.start(outer)
        server = traffic_for(
            server_settings(service), identity_of(ex, ex.svid("spiffe://example.org/api"))
        )
        await outer.start(server.relay.run)
        listeners = await outer.start(
            partial(trio.serve_tcp, partial(serve_inbound, server), 0, host="127.0.0.1")
        )
        front = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        client = traffic_for(
            client_settings(front), identity_of(ex, ex.svid("spiffe://example.org/web"))
        )
        async with running(client) as nursery:
            up = await dial_server(client)
            assert str(up.peer_id) == "spiffe://example.org/api"
            assert up.retire_at <= up.peer_expires_at - RETIRE_MARGIN_S
            await up.stream.aclose()

            app, proxy_side = socket_pair()
            nursery.start_soon(serve_outbound, client, proxy_side)
            with trio.fail_after(10):
                await app.send_all(b"ping")
                assert await app.receive_some() == b"ping"
                await app.send_eof()
                assert await app.receive_some() == b""
        assert sum(client.stats.handshakes.values()) == 2  # the dial above, then the splice
        assert not client.stats.denied
        assert server.stats.bytes_to_target == 4
        outer.cancel_scope.cancel()


async def test_a_server_with_an_unexpected_id_is_never_used(ex):
    async with trio.open_nursery() as outer:
        server = traffic_for(server_settings(), identity_of(ex, ex.svid("spiffe://example.org/db")))
        listeners = await outer.start(
            partial(trio.serve_tcp, partial(serve_inbound, server), 0, host="127.0.0.1")
        )
        front = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        client = traffic_for(
            client_settings(front), identity_of(ex, ex.svid("spiffe://example.org/web"))
        )
        with trio.fail_after(10), pytest.raises(DialError, match="TLS handshake with"):
            await dial_server(client)
        assert client.stats.denied == {"not_allowed": 1}
        async with running(client):
            app, proxy_side = plain_pair()
            with trio.fail_after(10):
                await serve_outbound(client, proxy_side.transport)
                assert await app.receive_some() == b""  # closed without a byte relayed
        outer.cancel_scope.cancel()
