"""Sized for a fleet: the open-file limit, and 429 + Retry-After (or, for a new
connection, a close before its handshake) when overloaded."""

from __future__ import annotations

import logging
import resource
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agent.ca_client import make_csr
from ca.api import AgentApi, AgentPeer
from ca.authority import Authority
from ca.feed import ChangeFeed
from ca.server import LAG_PROBE_S, CAServer, raise_open_files
from ca.settings import CASettings
from ca.throttle import OVERLOAD_MAX_RETRY_S, overload_retry_after
from tally.spiffe.spiffeid import SpiffeId
from tally.spiffe.x509profile import generate_key
from tally.wire import http

T = TypeVar("T")


@given(st.integers(0, 100_000), st.integers(0, 100_000), st.integers(1, 10_000))
def test_overload_retry_after_is_none_under_the_limit_then_grows_bounded(
    a: int, b: int, limit: int
) -> None:
    low, high = sorted((a, b))
    for queued in (low, high):
        wait = overload_retry_after(queued, limit)
        if queued < limit:
            assert wait is None
        else:
            assert wait is not None and 1 <= wait <= OVERLOAD_MAX_RETRY_S
    if low >= limit:  # more queued never asks for a shorter wait
        assert overload_retry_after(low, limit) <= overload_retry_after(high, limit)  # type: ignore[operator]


def test_raise_open_files_goes_up_to_the_hard_limit_and_no_further() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_files(300) == (300, hard)
        assert raise_open_files(100) == (300, hard)  # never lowered
        if hard != resource.RLIM_INFINITY:
            assert raise_open_files(hard + 1000) == (hard, hard)  # short: the caller logs it
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _inline(fn: Callable[[], T]) -> T:
    return fn()


async def test_an_overloaded_ca_answers_429_with_retry_after_but_serves_the_bundle(
    authority: Authority,
) -> None:
    sid = SpiffeId.parse("spiffe://example.org/agent/n1")
    token = authority.create_token(sid, None, "admin:uid=0").token
    serial = authority.attest(token, make_csr(generate_key()), "10.0.0.1:1").svid.serial
    busy: list[int | None] = [7]
    api = AgentApi(authority, _inline, ChangeFeed(), ChangeFeed(), overloaded=lambda: busy[0])
    peer = AgentPeer(sid, serial, "10.0.0.1:1")
    renew = http.Request(
        "POST", "/v1/agent/renew", (), http.Response.json({"csr": make_csr(generate_key())}).body
    )
    refused = await api.handle(peer, renew)
    assert refused.status == 429 and dict(refused.headers) == {"Retry-After": "7"}
    assert b'"code":"overloaded"' in refused.body and api.refused_overloaded == 1
    assert authority.issued_total == 1  # nothing was signed for it
    bundle = await api.handle(peer, http.Request("GET", "/v1/bundle?since=-1", (), b""))
    assert bundle.status == 200
    busy[0] = None
    assert (await api.handle(peer, renew)).status == 200


async def test_while_the_store_queue_is_long_new_connections_close_unshaken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A herd's handshakes would starve the store's thread of the CPU it needs to drain
    the queue: past ``overload_queue``, a new agent connection gets not one byte of
    TLS, and a burst of them is one log line."""
    cfg = CASettings(
        trust_domain="example.org",
        data_dir=tmp_path / "data",
        admin_socket=tmp_path / "admin.sock",
        overload_queue=2,
    )
    server = CAServer(cfg)
    unused = cast(AgentApi, None)  # a shed connection never reaches the API
    release = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # the store's one thread is busy with a call, two wait
                nursery.start_soon(server.run_sync, release.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert server._overloaded() is not None
            with caplog.at_level(logging.WARNING, logger="tally.ca"):
                for _ in range(3):
                    ours, theirs = (trio.SocketStream(trio.socket.from_stdlib_socket(s))
                                    for s in socket.socketpair())  # fmt: skip
                    await server._agent_connection(unused, ours)
                    assert await theirs.receive_some() == b""
                    await theirs.aclose()
            release.set()
        assert server.shed == 3
        assert [r.getMessage() for r in caplog.records].count("ca.shedding") == 1
        assert server._overloaded() is None  # the queue drained: connections are served
    finally:
        release.set()
        server.store_thread.close()
        server.store.close()


async def test_while_the_event_loop_lags_new_connections_close_unshaken(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA that takes on every connection of a herd answers so late that agents give
    up on calls it then does anyway: past a second of event-loop lag, twice in a row,
    a new agent connection is closed before its handshake, until the probe wakes on
    time again.  One stall alone (a collector pass, a paused host) sheds nothing."""
    cfg = CASettings(
        trust_domain="example.org", data_dir=tmp_path / "data", admin_socket=tmp_path / "a.sock"
    )
    server = CAServer(cfg)
    unused = cast(AgentApi, None)  # a shed connection never reaches the API

    async def connect() -> bytes:
        ours, theirs = (trio.SocketStream(trio.socket.from_stdlib_socket(s))
                        for s in socket.socketpair())  # fmt: skip
        await server._agent_connection(unused, ours)
        got = await theirs.receive_some()
        await theirs.aclose()
        return got

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._watch_lag)
            await trio.testing.wait_all_tasks_blocked()
            assert server._shedding() is None
            mock_clock.jump(1.5)  # one stall: the probe is 1.4 s late ...
            assert server._shedding() is None
            await trio.testing.wait_all_tasks_blocked()
            assert server.loop_lag == pytest.approx(1.4)  # ... and says so once it wakes
            assert server._shedding() is None
            mock_clock.jump(1.5)  # busy again: late twice in a row, even before it wakes
            assert server._shedding() == "the event loop runs 1.4s behind"
            with caplog.at_level(logging.WARNING, logger="tally.ca"):
                assert await connect() == b""
            assert server.shed == 1
            [line] = [r for r in caplog.records if r.getMessage() == "ca.shedding"]
            assert vars(line)["tally_fields"]["reason"] == "the event loop runs 1.4s behind"
            await trio.testing.wait_all_tasks_blocked()
            assert server.loop_lag == pytest.approx(1.4)  # the probe woke, late
            assert server._shedding() is not None
            mock_clock.jump(LAG_PROBE_S)  # the next wake-up is on time
            await trio.testing.wait_all_tasks_blocked()
            assert server.loop_lag == 0
            assert server._shedding() is None
            nursery.cancel_scope.cancel()
    finally:
        server.store.close()
