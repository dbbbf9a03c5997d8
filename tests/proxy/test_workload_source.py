"""The Workload API source against a fake agent speaking real gRPC over HTTP/2 on a Unix socket.

The fake is a few lines of h2: it answers FetchX509SVID with whatever messages
the test feeds it, so the proxy's source runs through `tally.wire.workload_client`
exactly as it would against a Tally or SPIRE agent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from proxy.daemon import Proxy
from proxy.identity import BACKOFF_FIRST_S, IdentityError, WorkloadSource, from_workload
from proxy.settings import ServerSettings
from tally.ops.config import Address
from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import SpiffeId
from tally.tls.contexts import client_context
from tally.tls.stream import TLSStream
from tally.wire import workload_pb as pb
from tally.wire.grpc import Status, encode_message, trailers
from tally.wire.workload_client import parse_x509_svid_response
from tests.pki import Authority, Svid

End = Status


def response(
    authority: Authority, *svids: Svid, federated: dict[str, Authority] | None = None
) -> bytes:
    root_der = pem.chain_to_der([authority.root])
    message = pb.X509SVIDResponse(
        svids=[
            pb.X509SVID(
                spiffe_id=x509profile.validate_leaf(s.leaf).__str__(),
                x509_svid=pem.chain_to_der(s.chain),
                x509_svid_key=pem.key_to_pkcs8_der(s.key),
                bundle=root_der,
            )
            for s in svids
        ],
        federated_bundles={
            f"spiffe://{td}": pem.chain_to_der([a.root]) for td, a in (federated or {}).items()
        },
    )
    return message.SerializeToString()


class FakeAgent:
    """Serves one FetchX509SVID stream per connection from a channel of payloads or a Status."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.send, self._receive = trio.open_memory_channel[bytes | Status](10)
        self.connections = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen()
        async with trio.SocketListener(sock) as listener:
            task_status.started()
            while True:
                stream = await listener.accept()
                self.connections += 1
                async with stream:
                    await self._serve(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        stream_id = None
        while stream_id is None:
            data = await stream.receive_some(65536)
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    assert (b"workload.spiffe.io", b"true") in event.headers
                    stream_id = event.stream_id
            await stream.send_all(conn.data_to_send())
        conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        async for item in self._receive:
            if isinstance(item, Status):
                conn.send_headers(
                    stream_id, trailers(item, "fake agent says goodbye"), end_stream=True
                )
                await stream.send_all(conn.data_to_send())
                return
            conn.send_data(stream_id, encode_message(item))
            await stream.send_all(conn.data_to_send())


@pytest.fixture
def ex():
    return Authority.create("example.org")


def now():
    return datetime.now(UTC)


def test_from_workload_picks_the_wanted_svid_and_keeps_bundles_apart(ex):
    other = Authority.create("other.org")
    api, web = ex.svid("spiffe://example.org/api"), ex.svid("spiffe://example.org/web")
    ctx = parse_x509_svid_response(response(ex, api, web, federated={"other.org": other}))
    first = from_workload(ctx, None, now())
    assert str(first.spiffe_id) == "spiffe://example.org/api"
    chosen = from_workload(ctx, SpiffeId.parse("spiffe://example.org/web"), now())
    assert chosen.serial == format(web.leaf.serial_number, "x")
    assert {td.name for td in chosen.bundles} == {"example.org", "other.org"}
    assert chosen.trusted()[ex.td] == ex.bundle.fingerprints()
    with pytest.raises(
        IdentityError, match=r"offers spiffe://example\.org/api, spiffe://example\.org/web but not"
    ):
        from_workload(ctx, SpiffeId.parse("spiffe://example.org/db"), now())


def test_an_svid_whose_chain_does_not_reach_our_bundle_is_rejected(ex):
    stranger = Authority.create("example.org")  # same name, different keys
    ctx = parse_x509_svid_response(response(ex, stranger.svid("spiffe://example.org/api")))
    with pytest.raises(IdentityError) as info:
        from_workload(ctx, None, now())
    assert info.value.reason == "untrusted"


async def test_workload_source_publishes_each_update_and_reconnects(ex, tmp_path):
    agent = FakeAgent(tmp_path / "agent.sock")
    published = []
    got = trio.Event()

    def publish(identity):
        published.append(identity)
        got.set()

    async def next_publication():
        nonlocal got
        with trio.fail_after(10):
            await got.wait()
        got = trio.Event()
        return published[-1]

    source = WorkloadSource(Path(agent.path), want=None, clock=now)
    first, second = ex.svid("spiffe://example.org/api"), ex.svid("spiffe://example.org/api")
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        nursery.start_soon(source.run, publish)
        await agent.send.send(response(ex, first))
        assert (await next_publication()).serial == format(first.leaf.serial_number, "x")
        bad = Svid(second.chain, ex.svid("spiffe://example.org/api").key)  # key of another leaf
        await agent.send.send(response(ex, bad))
        await agent.send.send(response(ex, second))
        assert (await next_publication()).serial == format(second.leaf.serial_number, "x")
        assert len(published) == 2  # the bad update was refused, not published
        # The agent restarts, again and again: each stream delivered, so each reconnect
        # comes after the first, shortest wait, not after a backoff that kept growing.
        for restart in range(1, 4):
            await agent.send.send(End.UNAVAILABLE)
            await agent.send.send(response(ex, first if restart % 2 else second))
            assert (await next_publication()).serial == format(
                (first if restart % 2 else second).leaf.serial_number, "x"
            )
            assert agent.connections == restart + 1
            assert source.retry_delay <= BACKOFF_FIRST_S, restart
        assert source.last_error is None
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def test_proxy_waits_for_its_first_svid_then_swaps_in_new_ones(ex, tmp_path, monkeypatch):
    agent = FakeAgent(tmp_path / "agent.sock")
    client = ex.svid("spiffe://example.org/web")
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        echo_listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        target = f"127.0.0.1:{echo_listeners[0].socket.getsockname()[1]}"
        cfg = ServerSettings(
            listen=Address.parse("127.0.0.1:0"),
            target=Address.parse(target),
            workload_socket=agent.path,
            allow_id=["spiffe://example.org/web"],
        )
        proxy = Proxy(cfg, reload=lambda: cfg, env={})
        published = trio.Event()
        original = proxy.swap.publish

        def publish(identity):
            nonlocal published
            original(identity)
            published.set()
            published = trio.Event()

        monkeypatch.setattr(proxy.swap, "publish", publish)
        addresses = await nursery.start(proxy.run)
        host, port = addresses["listen"].rsplit(":", 1)
        ok, why = proxy.ready()
        assert not ok and "waiting for the first SVID from Workload API at" in why
        with pytest.raises(OSError):
            await trio.open_tcp_stream(host, int(port))  # bound, not listening: refused

        seen: list[str] = []

        def note_serial(chain):
            seen.append(format(chain[0].serial_number, "x"))
            return None

        ctx = client_context(
            roots=[ex.root], chain=client.chain, key=client.key, verifier=note_serial
        )

        async def round_trip() -> None:
            stream = TLSStream(await trio.open_tcp_stream(host, int(port)), ctx, server_side=False)
            async with stream:
                await stream.send_all(b"ping")
                assert await stream.receive_some(10) == b"ping"

        first, second = ex.svid("spiffe://example.org/api"), ex.svid("spiffe://example.org/api")
        await agent.send.send(response(ex, first))
        with trio.fail_after(10):
            await proxy.serving.wait()
            assert proxy.ready()[0]
            await round_trip()
            rotated = published
            await agent.send.send(response(ex, second))
            await rotated.wait()
            await round_trip()
        assert seen == [
            format(first.leaf.serial_number, "x"),
            format(second.leaf.serial_number, "x"),
        ]
        assert proxy.stats.rotations == 1
        nursery.cancel_scope.cancel()


async def test_allow_expired_peer_connections_lifts_the_hard_stop(ex):
    peer = ex.svid("spiffe://example.org/web").leaf

    def proxy(allow_expired: bool) -> Proxy:
        cfg = ServerSettings(
            listen=Address.parse("127.0.0.1:0"),
            target=Address.parse("127.0.0.1:1"),
            workload_socket="/nonexistent.sock",
            allow_id=["spiffe://example.org/web"],
            allow_expired_peer_connections=allow_expired,
        )
        return Proxy(cfg, reload=lambda: cfg, env={})

    left = (peer.not_valid_after_utc - now()).total_seconds()
    assert proxy(False).traffic.expires_at(peer) == pytest.approx(trio.current_time() + left, abs=2)
    assert proxy(True).traffic.expires_at(peer) == float("inf")
