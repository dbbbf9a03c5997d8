"""Client mode: plain TCP or HTTP in from the local app, mutual TLS out to the server proxy.

Rules:

1. Each connection out is verified before it carries a byte: the server
   proxy must present an SVID whose ID is one of ``--expect-id``, checked in
   the handshake (`proxy.hotswap` rule 2).
2. HTTP mode reuses those connections through the pool (`dial_server`), and
   retires each `RETIRE_MARGIN_S` before either certificate on it expires
   (`proxy.pool` rule 2); TCP mode dials one per local connection.
3. The local app is trusted by position (it reached a local listener), so
   its connection has no hard stop of its own; the server's certificate
   expiry is the spliced connection's.
"""

from __future__ import annotations

import math

import trio

from proxy.http import HttpStream
from proxy.http_relay import relay_http
from proxy.pool import RETIRE_MARGIN_S, DialError, Upstream, close_quietly
from proxy.traffic import Traffic
from tally.ops.logs import get_logger
from tally.tls.plain import PlainStream
from tally.tls.stream import TLSStream
from tally.wire import http1

log = get_logger("tally.proxy")


async def serve_outbound(t: Traffic, accepted: trio.SocketStream) -> None:
    stream = PlainStream(accepted)
    try:
        if t.cfg.http:
            await relay_http(t, stream, caller=None, hard_at=math.inf, stamp=None)
            return
        try:
            up = await dial_server(t)
        except DialError as exc:
            log.warning("target.failed", target=str(t.cfg.target), error=str(exc))
            return
        try:
            # `dial_server` makes TLS streams; the pool's type is wider only for its tests.
            assert isinstance(up.stream, TLSStream)
            await t.splice(stream, up.stream, up.peer_id, up.peer_expires_at)
        finally:
            await close_quietly(up.stream)
    finally:
        await close_quietly(stream)


async def dial_server(t: Traffic) -> Upstream:
    """A verified mTLS connection to the server proxy at --target (rule 1)."""
    cur = t.swap.current
    assert cur is not None
    transport = await t.connect_target()
    stream = TLSStream(transport, cur.context, server_side=False)
    peer = await t.handshake(stream, str(t.cfg.target))
    if peer is None:
        await close_quietly(stream)
        raise DialError(f"TLS handshake with {t.cfg.target} failed")
    own_left = (cur.identity.not_after - t.clock()).total_seconds()
    retire_at = min(peer.expires_at, trio.current_time() + own_left) - RETIRE_MARGIN_S
    return Upstream(
        stream, HttpStream(stream, http1.CLIENT), peer.spiffe_id, retire_at, peer.expires_at
    )
