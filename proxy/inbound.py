"""Server mode: mutual TLS in from peers, plain TCP or HTTP out to the service.

Rules:

1. The handshake runs in the connection's own task, under its deadline,
   with the context current when the connection was accepted
   (`proxy.hotswap`); a refused peer never reaches the service.
2. Each connection to the service is plain and dialled after the handshake,
   so an unauthenticated peer costs the service nothing.  HTTP mode shares
   kept-alive connections to it through the pool (`dial_service`).
3. The peer's certificate expiry is the connection's hard stop, in both
   TCP and HTTP mode (`proxy.traffic` rule 3).
"""

from __future__ import annotations

import math

import trio
from cryptography.hazmat.primitives import serialization

from proxy import xfcc
from proxy.http import HttpStream
from proxy.http_relay import relay_http
from proxy.pool import DialError, Upstream, close_quietly
from proxy.traffic import Peer, Traffic
from tally.ops.logs import get_logger
from tally.tls.plain import PlainStream
from tally.tls.stream import TLSStream
from tally.tls.verify import TLSError
from tally.wire import http1

log = get_logger("tally.proxy")


def address_of(stream: trio.abc.Stream) -> str:
    """The peer's address for logs: host:port, or ``unix`` (or ``unknown``)."""
    if isinstance(stream, trio.SocketStream):
        try:
            name = stream.socket.getpeername()
        except OSError:
            return "unknown"
        if isinstance(name, tuple):
            return f"{name[0]}:{name[1]}"
    return "unix"


async def serve_inbound(t: Traffic, stream: trio.SocketStream) -> None:
    cur = t.swap.current
    assert cur is not None
    where = address_of(stream)
    conn = TLSStream(stream, cur.context, server_side=True)
    if t.swap.client_auth == "none":
        await _serve_anonymous(t, conn, where)
        return
    peer = await t.handshake(conn, where)
    if peer is None:
        await close_quietly(conn)
        return
    try:
        if t.cfg.http:
            stamp = xfcc.proxy_element(
                str(cur.identity.spiffe_id),
                peer.leaf.public_bytes(serialization.Encoding.DER),
                str(peer.spiffe_id),
            )
            await relay_http(
                t, conn, caller=peer.spiffe_id, hard_at=peer.expires_at, stamp=stamp.encode()
            )
        else:
            await _splice_to_service(t, conn, peer)
    finally:
        await close_quietly(conn)


async def _serve_anonymous(t: Traffic, conn: TLSStream, where: str) -> None:
    """--no-client-cert: TLS without a client certificate, for callers behind a load
    balancer; HTTP mode only, where each request's bearer JWT-SVID is the credential
    (`proxy.bearer`, required by the settings)."""
    try:
        with trio.fail_after(t.cfg.handshake_timeout):
            await conn.do_handshake()
    except (
        TLSError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    ) as exc:
        t.stats.handshakes["failed"] += 1
        log.info("handshake.failed", peer=where, error=str(exc), mode=t.mode)
        await close_quietly(conn)
        return
    t.stats.handshakes["ok"] += 1
    try:
        await relay_http(t, conn, caller=None, hard_at=math.inf, stamp=None)
    finally:
        await close_quietly(conn)


async def _splice_to_service(t: Traffic, conn: TLSStream, peer: Peer) -> None:
    try:
        target = PlainStream(await t.connect_target())
    except DialError as exc:
        log.warning("target.unreachable", target=str(t.cfg.target), error=str(exc))
        return
    try:
        await t.splice(conn, target, peer.spiffe_id, peer.expires_at)
    finally:
        await close_quietly(target)


async def dial_service(t: Traffic) -> Upstream:
    """HTTP mode: a plain connection to the service for the pool."""
    stream = PlainStream(await t.connect_target())
    return Upstream(stream, HttpStream(stream, http1.CLIENT), None, math.inf)
