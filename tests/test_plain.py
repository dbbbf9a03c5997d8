"""PlainStream against trio's stream conformance suite, on real socket pairs."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from tally.ops import net
from tally.ops.config import Address
from tally.tls.plain import PlainStream
from tests.test_tls import _close_socket_pairs as _close_socket_pairs
from tests.test_tls import socket_pair


def plain_pair() -> tuple[PlainStream, PlainStream]:
    a, b = socket_pair()
    return PlainStream(a), PlainStream(b)


def fill(stream: PlainStream) -> None:
    """Write junk until the kernel refuses more: sends now block until the peer reads."""
    fd = stream.socket.fileno()
    try:
        while True:
            os.write(fd, b"x" * 65536)
    except BlockingIOError:
        pass


async def test_conforms_to_trio_half_closeable_stream():
    async def stream_maker():
        return plain_pair()

    async def clogged_stream_maker():
        left, right = plain_pair()
        fill(left)
        fill(right)
        return left, right

    await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def test_a_reset_peer_breaks_the_stream_and_a_closed_one_refuses_use():
    left, right = plain_pair()
    right.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first write may still be taken by the kernel
            await left.send_all(b"x" * 65536)
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await left.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"late")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_connect_reaches_literal_addresses_directly_and_names_by_resolving(host):
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    try:
        listeners = await trio.open_tcp_listeners(0, host="::1" if host == "::1" else "127.0.0.1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        stream = await net.connect(
            Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        )
        accepted = await listeners[0].accept()
        async with stream, accepted:
            assert stream.socket.family == family
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            plain = PlainStream(stream)
            await plain.send_all(b"ping")
            assert await accepted.receive_some() == b"ping"
    with pytest.raises(OSError):
        await net.connect(Address.parse(f"127.0.0.1:{port}"))  # nobody listens any more


async def test_send_some_nowait_writes_what_the_kernel_takes_and_never_waits():
    # The Workload API server's flush (agent.workload_server) relies on it.
    left, right = plain_pair()
    assert left.send_some_nowait(b"now") == 3
    assert await right.receive_some() == b"now"
    fill(left)
    assert left.send_some_nowait(b"more") == 0  # full: the caller falls back to send_all
    await left.aclose()
    assert left.send_some_nowait(b"late") == 0
    await right.aclose()
