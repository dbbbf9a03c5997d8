"""proxy.tcp.Relay on real socket pairs, plain and TLS, in virtual time where time matters.

Each test builds the proxy's position: an app or peer on one socket pair, the
service on another, and the relay splicing the two inner ends.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.tcp import Deadline, Relay
from tally.tls.plain import LENT_SIZE
from tally.tls.stream import TLSStream
from tests.proxy.test_forwarding import ignore
from tests.test_plain import plain_pair
from tests.test_tls import PKI, handshake_both, make_pki, tls_pair
from tests.test_tls import _close_socket_pairs as _close_socket_pairs
from tests.test_tls import pki as pki


def counter() -> tuple[list[int], Callable[[int], None]]:
    total: list[int] = []
    return total, total.append


@asynccontextmanager
async def running_relay() -> AsyncIterator[Relay]:
    relay = Relay()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


async def tls_front(pki: PKI) -> tuple[TLSStream, TLSStream]:
    """A TLS client (the peer) and the proxy's server end of it, handshake done."""
    peer, proxy_side = tls_pair(pki.client_ctx(), pki.server_ctx())
    assert await handshake_both(peer, proxy_side) == {}
    return peer, proxy_side


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some()
        assert chunk, f"end of stream after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


async def receive_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while chunk := await stream.receive_some():
        got += chunk
    return bytes(got)


async def test_forwards_both_ways_and_passes_half_close():
    app, proxy_side = plain_pair()
    target_side, service = plain_pair()
    up, count_up = counter()
    down, count_down = counter()
    result = []
    async with running_relay() as relay, trio.open_nursery() as nursery:

        async def run():
            result.append(
                await relay.splice(proxy_side, target_side, Deadline(60), count_up, count_down)
            )

        nursery.start_soon(run)
        await app.send_all(b"request")
        await app.send_eof()
        assert await receive_to_end(service) == b"request"  # the half-close arrived
        await service.send_all(b"response after half-close")
        assert await receive_exactly(app, 25) == b"response after half-close"
        await service.send_eof()
        assert await app.receive_some() == b""
    assert result == ["closed"]
    assert sum(up) == len(b"request") and sum(down) == len(b"response after half-close")


async def test_tls_front_passes_close_notify_as_fin_and_fin_as_close_notify(pki):
    peer, proxy_side = await tls_front(pki)
    target_side, service = plain_pair()
    result = []
    async with running_relay() as relay, trio.open_nursery() as nursery:

        async def run():
            result.append(await relay.splice(proxy_side, target_side, Deadline(60), ignore, ignore))

        nursery.start_soon(run)
        await peer.send_all(b"x" * 100_000)  # several records, some full
        await peer.send_eof()  # close_notify
        assert await receive_to_end(service) == b"x" * 100_000
        await service.send_all(b"answer")
        await service.send_eof()  # FIN
        assert await receive_to_end(peer) == b"answer"  # then close_notify
    assert result == ["closed"]


async def test_tls_back_retries_a_blocked_write_with_the_same_bytes(pki):
    """Client mode: plain in, TLS out, and a peer that reads late, so writes block."""
    app, proxy_side = plain_pair()
    proxy_tls, peer = tls_pair(pki.client_ctx(), pki.server_ctx())
    assert await handshake_both(proxy_tls, peer) == {}
    payload = os.urandom(4 << 20)
    async with running_relay() as relay, trio.open_nursery() as nursery:
        nursery.start_soon(relay.splice, proxy_side, proxy_tls, Deadline(60), ignore, ignore)

        async def send():
            await app.send_all(payload)
            await app.send_eof()

        nursery.start_soon(send)
        await trio.sleep(0.2)  # everything backs up behind the peer that does not read
        assert await receive_to_end(peer) == payload
        await peer.send_eof()


async def test_a_slow_reader_holds_at_most_one_chunk_in_the_relay():
    app, proxy_side = plain_pair()
    target_side, service = plain_pair()
    up, count_up = counter()
    async with running_relay() as relay, trio.open_nursery() as nursery:
        nursery.start_soon(relay.splice, proxy_side, target_side, Deadline(60), count_up, ignore)
        with trio.move_on_after(0.5):
            while True:
                await app.send_all(b"y" * 65536)  # until the whole path is full
        await trio.sleep(0.1)
        # Unix socket pairs: what the relay wrote sits whole in the service's receive queue.
        queued = _inq(service.socket)
        assert sum(up) > queued > 0
        assert sum(up) - queued <= LENT_SIZE
        nursery.cancel_scope.cancel()


def _inq(sock: trio.socket.SocketType) -> int:
    return _ioctl_int(sock, termios.FIONREAD)


def _ioctl_int(sock: trio.socket.SocketType, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    return value


async def test_idle_timeout_in_virtual_time(autojump_clock):
    app, proxy_side = plain_pair()
    target_side, service = plain_pair()
    start = trio.current_time()
    result = []
    async with running_relay() as relay, trio.open_nursery() as nursery:

        async def run():
            result.append(await relay.splice(proxy_side, target_side, Deadline(30), ignore, ignore))

        nursery.start_soon(run)
        await trio.sleep(20)
        await app.send_all(b"x")  # activity pushes the deadline back
        assert await service.receive_some(10) == b"x"
    assert result == ["idle"]
    assert trio.current_time() - start == pytest.approx(50, abs=0.01)


async def test_hard_stop_at_peer_expiry_despite_traffic(autojump_clock):
    app, proxy_side = plain_pair()
    target_side, service = plain_pair()
    expires = trio.current_time() + 5

    async def chatter():
        while True:
            await app.send_all(b"tick")
            await service.receive_some(10)
            await trio.sleep(1)

    async with running_relay() as relay, trio.open_nursery() as nursery:
        nursery.start_soon(chatter)
        why = await relay.splice(proxy_side, target_side, Deadline(30, expires), ignore, ignore)
        assert why == "peer_expired"
        assert trio.current_time() == pytest.approx(expires)
        nursery.cancel_scope.cancel()


async def test_reset_on_one_side_ends_both(autojump_clock):
    app, proxy_side = plain_pair()
    target_side, service = plain_pair()
    result = []
    async with running_relay() as relay, trio.open_nursery() as nursery:

        async def run():
            result.append(await relay.splice(proxy_side, target_side, Deadline(60), ignore, ignore))
            await proxy_side.aclose()  # as the proxy does once a splice ends
            await target_side.aclose()

        nursery.start_soon(run)
        await app.send_all(b"unread")
        await trio.sleep(0.1)
        await service.aclose()  # the service vanishes with bytes unread
        await app.send_all(b"lost")
        try:
            assert await receive_to_end(app) == b""
        except trio.BrokenResourceError:
            pass  # or the app's own unread bytes made its end a reset too
    assert result == ["reset"]
    assert trio.current_time() < 1


async def test_a_failure_inside_the_relay_ends_only_its_connection(caplog):
    def explode(n: int) -> None:
        raise RuntimeError("a bug in a counter")

    bad_app, bad_proxy = plain_pair()
    bad_target, _bad_service = plain_pair()
    app, proxy_side = plain_pair()
    target_side, service = plain_pair()
    results = {}
    async with running_relay() as relay, trio.open_nursery() as nursery:

        async def run(name, a, b, count):
            results[name] = await relay.splice(a, b, Deadline(60), count, ignore)

        nursery.start_soon(run, "bad", bad_proxy, bad_target, explode)
        nursery.start_soon(run, "good", proxy_side, target_side, ignore)
        await bad_app.send_all(b"boom")
        await app.send_all(b"still here")
        assert await receive_exactly(service, 10) == b"still here"
        await app.send_eof()
        await service.send_eof()
    assert results == {"bad": "error", "good": "closed"}
    assert "relay.crashed" in caplog.text


async def test_stopping_the_relay_ends_its_connections():
    app, proxy_side = plain_pair()
    target_side, service = plain_pair()
    result = []
    relay = Relay()
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)

        async def run():
            result.append(await relay.splice(proxy_side, target_side, Deadline(60), ignore, ignore))

        nursery.start_soon(run)
        await app.send_all(b"x")
        assert await service.receive_some() == b"x"
        nursery.cancel_scope.cancel()
    assert result in ([], ["reset"])  # cancelled with the nursery, or ended by the relay first
    with pytest.raises(RuntimeError, match="not running"):
        await relay.splice(*plain_pair(), Deadline(60), ignore, ignore)


# -- property: whatever the chunking and the order of the half-closes ------------------


_PKI = None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    upward=st.lists(st.binary(min_size=1, max_size=40_000), max_size=6),
    downward=st.lists(st.binary(min_size=1, max_size=40_000), max_size=6),
    service_closes_first=st.booleans(),
)
def test_bytes_arrive_whole_and_in_order_through_tls_to_plain(
    upward: list[bytes], downward: list[bytes], service_closes_first: bool
):
    global _PKI
    if _PKI is None:
        _PKI = make_pki()
    pki = _PKI

    async def main() -> None:
        peer, proxy_side = await tls_front(pki)
        target_side, service = plain_pair()
        got: dict[str, bytes] = {}
        result = []
        async with running_relay() as relay, trio.open_nursery() as nursery:

            async def run():
                result.append(
                    await relay.splice(proxy_side, target_side, Deadline(60), ignore, ignore)
                )

            async def send(stream: trio.abc.HalfCloseableStream, chunks: list[bytes]) -> None:
                for chunk in chunks:
                    await stream.send_all(chunk)
                await stream.send_eof()

            async def collect(name: str, stream: trio.abc.ReceiveStream) -> None:
                got[name] = await receive_to_end(stream)

            nursery.start_soon(run)
            nursery.start_soon(collect, "service", service)
            nursery.start_soon(collect, "peer", peer)
            first, second = (
                ((service, downward), (peer, upward))
                if service_closes_first
                else ((peer, upward), (service, downward))
            )
            await send(*first)
            await send(*second)
        assert got == {"service": b"".join(upward), "peer": b"".join(downward)}
        assert result == ["closed"]
        for s in (peer, proxy_side, target_side, service):
            await s.aclose()

    trio.run(main)
