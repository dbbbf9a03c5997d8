"""proxy.traffic in-process: judging handshakes, dialling the target, accounting for splices."""

from __future__ import annotations

import math

import pytest
import trio

from proxy.pool import DialError
from proxy.settings import ServerSettings
from proxy.traffic import Traffic
from tally.tls.contexts import client_context
from tally.tls.stream import TLSStream
from tally.tls.verify import TLSError
from tests.pki import Authority
from tests.proxy.inprocess import closed_port, identity_of, running, server_settings, traffic_for
from tests.test_plain import plain_pair
from tests.test_tls import _close_socket_pairs as _close_socket_pairs
from tests.test_tls import socket_pair


@pytest.fixture
def ex() -> Authority:
    return Authority.create("example.org")


def server_traffic(ex: Authority, cfg: ServerSettings | None = None) -> Traffic:
    return traffic_for(
        cfg or server_settings(), identity_of(ex, ex.svid("spiffe://example.org/api"))
    )


async def handshake_as(ex: Authority, t: Traffic, spiffe_id: str | None):
    """The proxy's judgement of a client holding ``spiffe_id`` (None: a silent peer)."""
    assert t.swap.current is not None
    a, b = socket_pair()
    proxy_end = TLSStream(b, t.swap.current.context, server_side=True)
    result = []
    async with trio.open_nursery() as nursery:
        if spiffe_id is not None:
            svid = ex.svid(spiffe_id)
            ctx = client_context(roots=[ex.root], chain=svid.chain, key=svid.key)
            client = TLSStream(a, ctx, server_side=False)

            async def client_side() -> None:
                try:
                    await client.do_handshake()
                    await client.receive_some()  # until the proxy closes
                except (TLSError, trio.BrokenResourceError):
                    pass

            nursery.start_soon(client_side)
        result.append(await t.handshake(proxy_end, "test"))
        proxy_end.close_now()
    return result[0]


async def test_an_allowed_peer_is_counted_ok_with_its_expiry_as_trio_time(ex):
    t = server_traffic(ex)
    peer = await handshake_as(ex, t, "spiffe://example.org/web")
    assert peer is not None and str(peer.spiffe_id) == "spiffe://example.org/web"
    left = (peer.leaf.not_valid_after_utc - t.clock()).total_seconds()
    assert peer.expires_at == pytest.approx(trio.current_time() + left, abs=2)
    assert t.stats.handshakes == {"ok": 1}


async def test_a_refused_peer_is_counted_by_reason(ex):
    t = server_traffic(ex)
    assert await handshake_as(ex, t, "spiffe://example.org/db") is None
    assert t.stats.handshakes == {"denied": 1}
    assert t.stats.denied == {"not_allowed": 1}


async def test_a_silent_peer_times_out(ex, autojump_clock):
    t = server_traffic(ex, server_settings(handshake_timeout=7))
    start = trio.current_time()
    assert await handshake_as(ex, t, None) is None
    assert trio.current_time() - start == pytest.approx(7)
    assert t.stats.handshakes == {"timeout": 1}


async def test_allowing_expired_peers_lifts_the_hard_stop(ex):
    t = server_traffic(ex, server_settings(allow_expired_peer_connections=True))
    peer = await handshake_as(ex, t, "spiffe://example.org/web")
    assert peer is not None and peer.expires_at == math.inf


async def test_an_unreachable_target_is_a_dial_error(ex):
    t = server_traffic(ex, server_settings(target=closed_port()))
    with pytest.raises(DialError, match=r"cannot connect to 127\.0\.0\.1:") as info:
        await t.connect_target()
    assert not info.value.timeout


async def test_a_splice_cut_at_the_peer_expiry_is_counted(ex, autojump_clock):
    t = server_traffic(ex, server_settings(idle_timeout=60))
    _client, proxy_side = plain_pair()  # both outer ends stay open and silent
    target_side, _service = plain_pair()
    async with running(t):
        await t.splice(proxy_side, target_side, None, trio.current_time() + 5)
    assert t.stats.closed_peer_expired == 1


async def test_a_splice_counts_the_bytes_both_ways(ex):
    t = server_traffic(ex)
    client, proxy_side = plain_pair()
    target_side, service = plain_pair()
    async with running(t) as nursery:
        nursery.start_soon(t.splice, proxy_side, target_side, None, math.inf)
        await client.send_all(b"hello")
        assert await service.receive_some() == b"hello"
        await service.send_all(b"hi")
        assert await client.receive_some() == b"hi"
        await client.send_eof()
        await service.send_eof()
        assert await client.receive_some() == b""
    assert (t.stats.bytes_to_target, t.stats.bytes_from_target) == (5, 2)
    assert t.stats.closed_peer_expired == 0
