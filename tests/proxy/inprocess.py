"""The proxy's own pieces assembled in this process, for tests that need no daemon.

A `Traffic` is built exactly as `proxy.daemon.Proxy` builds it, from real
settings and a `HotSwap` holding an identity minted by the test PKI; the
target is a real TCP listener in the test's nursery.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from proxy.hotswap import HotSwap, Mode
from proxy.identity import Identity, make_identity
from proxy.metrics import Stats
from proxy.settings import ClientSettings, ServerSettings
from proxy.traffic import Traffic
from tally.ops.config import Address
from tests.pki import Authority, Svid, now


def identity_of(authority: Authority, svid: Svid, *others: Authority) -> Identity:
    bundles = {authority.td: authority.bundle, **{a.td: a.bundle for a in others}}
    return make_identity(svid.chain, svid.key, bundles, want=None, now=now())


def server_settings(target: str = "127.0.0.1:1", **overrides: object) -> ServerSettings:
    fields: dict[str, object] = {
        "listen": Address.parse("127.0.0.1:0"),
        "target": Address.parse(target),
        "workload_socket": "/nonexistent.sock",
        "allow_id": ["spiffe://example.org/web"],
    }
    fields.update(overrides)
    return ServerSettings(**fields)  # type: ignore[arg-type]


def client_settings(target: str, **overrides: object) -> ClientSettings:
    fields: dict[str, object] = {
        "listen": Address.parse("127.0.0.1:0"),
        "target": Address.parse(target),
        "workload_socket": "/nonexistent.sock",
        "expect_id": ["spiffe://example.org/api"],
    }
    fields.update(overrides)
    return ClientSettings(**fields)  # type: ignore[arg-type]


def traffic_for(cfg: ServerSettings | ClientSettings, identity: Identity | None) -> Traffic:
    mode: Mode = "server" if isinstance(cfg, ServerSettings) else "client"
    stats = Stats()
    swap = HotSwap(mode, cfg.policy(), groups=cfg.tls_groups, stats=stats)
    if identity is not None:
        swap.publish(identity)
    return Traffic(cfg, mode=mode, clock=now, stats=stats, swap=swap)


@asynccontextmanager
async def running(t: Traffic) -> AsyncIterator[trio.Nursery]:
    """A nursery with ``t``'s relay running, cancelled at the end."""
    async with trio.open_nursery() as nursery:
        await nursery.start(t.relay.run)
        yield nursery
        nursery.cancel_scope.cancel()


class Echo:
    """A TCP echo service that counts the connections it got."""

    def __init__(self) -> None:
        self.connections = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    async def start(self, nursery: trio.Nursery) -> str:
        """Serve in ``nursery``; returns host:port."""
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def closed_port() -> str:
    """A local address where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"
