"""Slow and greedy clients: slowloris, idle and half-open connections, connection floods.

Rules / theory of operation: a client that is merely slow costs the server a
connection and a task, so every wait on a peer must end.  The daemons run with
short ``--handshake-timeout``, ``--request-timeout`` and ``--idle-timeout`` so
that each bound can be watched expire; the bounds that have no flag (the health
ports' 10 s, the Workload API's 10 s for the HTTP/2 preface) are watched too, and
all attacks of one kind run at once in threads, so the suite waits for the
longest bound once, not once per socket.  Each attack must end with the server
closing (or answering 408), no sooner than its bound (so it is the bound that
acted) and well within a generous ceiling; meanwhile a legitimate client of every
socket is served.  Floods of idle connections measure the daemon's resident
memory (``VmRSS``) before and after and assert a per-connection ceiling, and a
proxy at ``--max-connections`` keeps the next client in the kernel's backlog
until a slot frees, then serves it.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from agent.workload_calls import DEFAULT_LIMITS
from agent.workload_server import WorkloadStats, serve_workload_connection
from tests.agent.test_workload_server import PEER, FakeBackend, RawClient, cas, snapshot
from tests.proxy.conftest import Running, launch, wait_until
from tests.security.test_garbage import (
    BY_NAME,
    WEB,
    WORKLOAD,
    H2Peer,
    Stack,
    all_controls,
    build_stack,
    client_hello,
    read_to_eof,
    rss_kib,
    status_of,
    stop_stack,
    tcp,
    tls,
    unix,
    workload_fetch,
)

pytestmark = pytest.mark.e2e

__all__ = ["cas"]  # the fixture, for the in-memory Workload API test

HANDSHAKE_S = 2.0
REQUEST_S = 2.0
IDLE_S = 3.0
HEALTH_S = 10.0  # tally.ops.health: not a flag
PREFACE_S = DEFAULT_LIMITS.request_timeout_s  # the Workload API's wait for the HTTP/2 preface
CEILING_S = 45.0
MAX_CONNECTIONS = 8
FLOOD = 500


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    made = build_stack(
        tmp_path_factory.mktemp("slow"),
        [
            "--handshake-timeout",
            f"{HANDSHAKE_S:g}s",
            "--request-timeout",
            f"{REQUEST_S:g}s",
            # The floods measure memory per idle connection, above the connection caps.
            "--admin-max-connections",
            str(4 * FLOOD),
        ],
        ["--handshake-timeout", f"{HANDSHAKE_S:g}s", "--idle-timeout", f"{IDLE_S:g}s"],
        ("--max-connections", str(MAX_CONNECTIONS)),
        ("--workload-max-connections-per-uid", str(4 * FLOOD)),
    )
    yield made
    stop_stack(made)


# -- slowloris and silence ------------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    seconds: float
    reply: bytes
    closed: bool
    """False when the ceiling was reached with the connection still open."""


def trickle(sock: socket.socket, payload: bytes, start: float, interval: float = 0.25) -> Ending:
    """Send ``payload`` one byte per ``interval`` (nothing, if empty) until the server
    closes the connection; what it said on the way is the reply.  ``start`` is when
    the connection (and its handshake) was made, which is when the server's clock began."""
    sock.settimeout(interval)
    reply = b""
    sent = 0
    try:
        while time.monotonic() - start < CEILING_S:
            if sent < len(payload):
                sock.send(payload[sent : sent + 1])
                sent += 1
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            reply += data
        else:
            return Ending(time.monotonic() - start, reply, False)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass
    finally:
        sock.close()
    return Ending(time.monotonic() - start, reply, True)


ENDLESS_HEAD = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000


@dataclass(frozen=True)
class Slow:
    name: str
    connect: Callable[[Stack], socket.socket]
    payload: Callable[[Stack], bytes]
    bound_s: float
    status: int | None
    """408 when the server answers before closing; None for a plain close."""


def hello(stack: Stack) -> bytes:
    return client_hello(stack.web_context())


def head(stack: Stack) -> bytes:
    return ENDLESS_HEAD


def nothing(stack: Stack) -> bytes:
    return b""


def preface(stack: Stack) -> bytes:
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


SLOW = [
    # Headers one byte at a time, after a good handshake where there is one.
    Slow("ca_api_head", BY_NAME["ca_api"].connect, head, REQUEST_S, 408),
    Slow("proxy_http_head", BY_NAME["proxy_http"].connect, head, IDLE_S, 408),
    Slow("ca_metrics_head", BY_NAME["ca_metrics"].connect, head, HEALTH_S, 408),
    Slow("agent_metrics_head", BY_NAME["agent_metrics"].connect, head, HEALTH_S, 408),
    Slow("proxy_metrics_head", BY_NAME["proxy_metrics"].connect, head, HEALTH_S, 408),
    # A ClientHello one byte at a time: the handshake never finishes.
    Slow("ca_api_hello", lambda s: tcp(s.ca.listen), hello, HANDSHAKE_S, None),
    Slow("proxy_http_hello", lambda s: tcp(s.proxy_http.listen), hello, HANDSHAKE_S, None),
    Slow("proxy_tcp_hello", lambda s: tcp(s.proxy_tcp.listen), hello, HANDSHAKE_S, None),
    Slow("workload_preface", lambda s: unix(s.agent.socket), preface, PREFACE_S, None),
    # Connected, then silent: before the handshake, and after it where the wait is short.
    Slow("ca_api_silent", lambda s: tcp(s.ca.listen), nothing, HANDSHAKE_S, None),
    Slow("proxy_http_silent", lambda s: tcp(s.proxy_http.listen), nothing, HANDSHAKE_S, None),
    Slow("proxy_http_idle", BY_NAME["proxy_http"].connect, nothing, IDLE_S, None),
    Slow(
        "proxy_tcp_idle", lambda s: tls(s.proxy_tcp.listen, s.web_context()), nothing, IDLE_S, None
    ),
    Slow("ca_metrics_idle", BY_NAME["ca_metrics"].connect, nothing, HEALTH_S, None),
    Slow("workload_silent", lambda s: unix(s.agent.socket), nothing, PREFACE_S, None),
]


def test_slow_and_silent_clients_are_cut_off_while_others_are_served(stack):
    mark = stack.mark()
    handshake_timeouts = stack.proxy_http.metric("tally_proxy_handshakes_total", outcome="timeout")
    with ThreadPoolExecutor(len(SLOW)) as pool:
        futures = {}
        for case in SLOW:
            sock = case.connect(stack)
            futures[case.name] = pool.submit(trickle, sock, case.payload(stack), time.monotonic())
        # Legitimate clients of every socket, while all of the above are in progress.
        all_controls(stack)
        endings = {name: future.result() for name, future in futures.items()}
    for case in SLOW:
        ending = endings[case.name]
        assert ending.closed, f"{case.name}: still open after {CEILING_S}s"
        assert ending.seconds >= case.bound_s - 1, f"{case.name}: cut before its bound"
        assert status_of(ending.reply) == case.status, (case.name, ending.reply[:200])
    assert stack.proxy_http.metric("tally_proxy_handshakes_total", outcome="timeout") >= (
        handshake_timeouts + 2
    )
    all_controls(stack)
    stack.assert_healthy(mark)


def test_admin_socket_serves_while_slowloris_holds_connections(stack):
    """The admin socket's waits are 30 s (not a flag, and only its owner may connect),
    too long to watch here: what is shown is that slow clients do not block others."""
    mark = stack.mark()
    slow = [unix(stack.ca.admin_socket) for _ in range(50)]
    try:
        for byte in ENDLESS_HEAD[:20]:
            for sock in slow:
                sock.send(bytes([byte]))
            BY_NAME["ca_admin"].control(stack)
        assert stack.ca.cli("health").returncode == 0
    finally:
        for sock in slow:
            sock.close()
    stack.assert_healthy(mark)


# -- greedy clients -----------------------------------------------------------------------


def echo(sock: socket.socket, data: bytes = b"ping") -> None:
    sock.sendall(data)
    assert sock.recv(len(data)) == data


def test_max_connections_keeps_the_next_client_waiting_until_a_slot_frees(stack):
    """Greedy clients hold every slot (and keep them busy, so the idle timeout does not
    free them); the next client waits in the backlog, unanswered, and is served as soon
    as one slot is given back."""
    proxy = stack.proxy_tcp
    wait_until(lambda: proxy.metric("tally_proxy_connections_open") == 0, 30, "a quiet proxy")
    greedy = [tls(proxy.listen, stack.web_context()) for _ in range(MAX_CONNECTIONS)]
    for sock in greedy:
        echo(sock)
    waiting = tcp(proxy.listen)  # the kernel completes the TCP handshake: the backlog
    served = threading.Event()
    outcome: list[object] = []

    def next_client() -> None:
        try:
            with stack.web_context().wrap_socket(waiting, server_hostname="localhost") as sock:
                served.set()
                echo(sock)
                outcome.append("ok")
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=next_client, daemon=True)
    try:
        thread.start()
        for _ in range(3):  # while all slots are held, the handshake gets no answer
            assert not served.wait(0.5)
            for sock in greedy:
                echo(sock)
        assert proxy.metric("tally_proxy_connections_open") == MAX_CONNECTIONS
        greedy.pop().close()
        thread.join(CEILING_S)
        assert outcome == ["ok"]
    finally:
        for sock in greedy:
            sock.close()


def fill_without_reading(sock: ssl.SSLSocket, data: bytes) -> None:
    """Send until our side blocks: the peer (through the proxy) has stopped taking more."""
    sock.settimeout(1.0)
    try:
        while True:
            sock.sendall(data)
    except TimeoutError:
        pass


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_client_that_never_reads_is_cut_at_the_idle_timeout(stack, mode: str):
    """A 1 GiB download (HTTP) or an echo (TCP) that the client never reads: the proxy
    holds no more than socket buffers, and cuts the connection once nothing moves."""
    proxy = stack.proxy_http if mode == "http" else stack.proxy_tcp
    mark = stack.mark()
    pid = proxy.daemon.pid
    wait_until(lambda: proxy.metric("tally_proxy_connections_open") == 0, 30, "a quiet proxy")
    before = rss_kib(pid)
    blamed = len(proxy.daemon.events("target.failed"))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # stalls sooner
    raw.connect(("127.0.0.1", proxy.port))
    with stack.web_context().wrap_socket(raw, server_hostname="localhost") as sock:
        if mode == "http":
            sock.sendall(b"GET /blob?size=1073741824 HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            fill_without_reading(sock, bytes(1 << 16))
        wait_until(lambda: proxy.metric("tally_proxy_connections_open") == 1, 10, "accepted")
        all_controls(stack)  # others are served meanwhile
        wait_until(
            lambda: proxy.metric("tally_proxy_connections_open") == 0,
            CEILING_S,
            "the stalled connection to be cut",
        )
        grown = rss_kib(pid) - before
    assert grown < 64 * 1024, f"{grown} KiB held for one stalled reader"
    assert len(proxy.daemon.events("target.failed")) == blamed, "the target was blamed"
    stack.assert_healthy(mark)


# -- floods of idle connections: memory stays bounded ------------------------------------------


PER_CONNECTION_KIB = 256
"""Ceiling on what one idle connection may cost a daemon.  Measured on this code: about
10 KiB (admin socket), 30 KiB (Workload API), 65-80 KiB (TLS on the CA or the proxy);
a server that buffered what a peer declares (a 16 MiB frame, a huge body) would not
stay under it."""


def one_response(sock: socket.socket) -> bytes:
    """One keep-alive response (head and Content-Length body), leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def open_workload(stack: Stack) -> socket.socket:
    """HTTP/2 preface and SETTINGS sent, the server's SETTINGS read: past the preface
    deadline, an idle connection with no call."""
    peer = H2Peer(stack.agent.socket)
    assert peer.sock.recv(65536), "no SETTINGS from the agent"
    return peer.sock


def open_admin(stack: Stack) -> socket.socket:
    sock = unix(stack.ca.admin_socket)
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert one_response(sock).startswith(b"HTTP/1.1 200")
    return sock


def open_ca_api(stack: Stack) -> socket.socket:
    return tls(stack.ca.listen, stack.agent_context())


@dataclass(frozen=True)
class Flood:
    name: str
    pid: Callable[[Stack], int]
    open: Callable[[Stack], socket.socket]
    control: Callable[[Stack], None]
    size: int = FLOOD


def control_workload(stack: Stack) -> None:
    assert workload_fetch(stack) == WORKLOAD


FLOODS = [
    Flood("workload_api", lambda s: s.agent.daemon.pid, open_workload, control_workload),
    Flood("ca_admin", lambda s: s.ca.daemon.pid, open_admin, BY_NAME["ca_admin"].control),
    # Half as many: each is a full mutual-TLS handshake that the suite pays for too.
    Flood("ca_api", lambda s: s.ca.daemon.pid, open_ca_api, BY_NAME["ca_api"].control, FLOOD // 2),
]


@pytest.mark.parametrize("flood", FLOODS, ids=lambda f: f.name)
def test_idle_connection_flood_costs_bounded_memory(stack, flood: Flood):
    mark = stack.mark()
    pid = flood.pid(stack)
    flood.control(stack)
    before = rss_kib(pid)
    held: list[socket.socket] = []
    try:
        for _ in range(flood.size):
            held.append(flood.open(stack))
        flood.control(stack)  # served while the flood sits idle
        grown = rss_kib(pid) - before
    finally:
        for sock in held:
            sock.close()
    assert grown < flood.size * PER_CONNECTION_KIB, f"{grown} KiB for {flood.size} connections"
    flood.control(stack)
    stack.assert_healthy(mark)


@pytest.fixture(scope="module")
def roomy_proxy(stack) -> Iterator[Running]:
    """HTTP mode with a long handshake deadline, so that a flood stays open to be
    measured even when building it takes a loaded machine longer than the default 10 s."""
    proxy = launch(
        "server",
        "--target",
        stack.http_backend.address,
        "--http",
        "--allow-id",
        WEB,
        "--handshake-timeout",
        "120s",
        *stack.api.files(),
    )
    yield proxy
    proxy.daemon.stop()


def test_proxy_flood_of_idle_and_half_open_connections(stack, roomy_proxy):
    """Half of the flood never starts its handshake, half finishes it and goes quiet."""
    pid = roomy_proxy.daemon.pid
    before = rss_kib(pid)
    held: list[socket.socket] = []
    try:
        for _ in range(FLOOD // 2):
            held.append(tcp(roomy_proxy.listen))
            held.append(tls(roomy_proxy.listen, stack.web_context()))
        with tls(roomy_proxy.listen, stack.web_context()) as control:
            control.sendall(b"GET /during HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status_of(read_to_eof(control)) == 200
        assert roomy_proxy.metric("tally_proxy_connections_open") >= FLOOD
        grown = rss_kib(pid) - before
    finally:
        for sock in held:
            sock.close()
    assert grown < FLOOD * PER_CONNECTION_KIB, f"{grown} KiB for {FLOOD} connections"
    assert roomy_proxy.daemon.proc is not None and roomy_proxy.daemon.proc.poll() is None


def test_half_open_handshake_flood_on_the_ca_is_timed_out(stack):
    """500 connections that send half a ClientHello: each is closed at the handshake
    deadline, and an agent is served meanwhile."""
    mark = stack.mark()
    half = client_hello(stack.agent_context())[:100]
    held = [tcp(stack.ca.listen) for _ in range(FLOOD)]
    try:
        for sock in held:
            sock.sendall(half)
        BY_NAME["ca_api"].control(stack)
        for sock in held:
            assert read_to_eof(sock) == b""  # closed, without a word, by the CA
    finally:
        for sock in held:
            sock.close()
    BY_NAME["ca_api"].control(stack)
    stack.assert_healthy(mark)


# -- the Workload API's idle deadline, in virtual time ----------------------------------------


async def serve_then_close(stream: trio.abc.HalfCloseableStream, backend, stats) -> None:
    async with stream:
        await serve_workload_connection(stream, PEER, backend, stats=stats)


async def test_workload_connection_without_calls_is_closed_when_idle(autojump_clock, cas):
    """After the preface, a connection that opens no call is closed with a GOAWAY once it
    has been idle for a whole ``idle_timeout_s``; calls now and then keep it open."""
    idle = DEFAULT_LIMITS.idle_timeout_s
    server_side, client_side = trio.testing.memory_stream_pair()
    stats = WorkloadStats()
    client = RawClient(client_side)
    await client.flush()
    with trio.fail_after(idle * 10):
        await _idle_then_closed(client, server_side, stats, cas, idle)
    assert client.terminated, "closed without a GOAWAY"
    assert stats.connections_open == 0


async def _idle_then_closed(client, server_side, stats, cas, idle: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close, server_side, FakeBackend(snapshot(cas, 1)), stats)
        for _ in range(5):  # a short call every 0.6 idle periods: never idle long enough
            with trio.move_on_after(idle * 0.6):
                await client.wait_closed()
            assert not client.eof
            stream_id = client.call("/SpiffeWorkloadAPI/Nope")
            await client.flush()
            await client.wait_status(stream_id)
        quiet_from = trio.current_time()
        await client.wait_closed()
    assert idle <= trio.current_time() - quiet_from <= 2 * idle + 2


# -- request_timeout: a trickle that the idle timeout alone would never end -------------------


TRICKLE_REQUEST_S = 4.0
TRICKLE_IDLE_S = 30.0


@pytest.fixture(scope="module")
def strict_proxy(stack) -> Iterator[Running]:
    """HTTP mode with a long idle timeout and a short request deadline, so that only the
    deadline can be what cuts a trickle (each byte comes well inside the idle timeout)."""
    proxy = launch(
        "server",
        "--target",
        stack.http_backend.address,
        "--http",
        "--allow-id",
        WEB,
        "--idle-timeout",
        f"{TRICKLE_IDLE_S:g}s",
        "--request-timeout",
        f"{TRICKLE_REQUEST_S:g}s",
        *stack.api.files(),
    )
    yield proxy
    proxy.daemon.stop()


def trickle_body(sock: socket.socket, start: float) -> Ending:
    """A whole head at once, then a 1000-byte body one byte per 0.25 s (250 s in all)."""
    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    return trickle(sock, b"x" * 1000, start)


def steady_upload(sock: socket.socket, size: int, pieces: int, over_s: float) -> bytes:
    """``size`` bytes in ``pieces`` chunks sent on a fixed schedule spread over ``over_s``:
    a client that is slow but keeps moving (the pacing is the behaviour under test)."""
    piece = bytes(size // pieces)
    with sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Content-Length: {len(piece) * pieces}\r\n\r\n".encode()
        )
        start = time.monotonic()
        for i in range(pieces):
            time.sleep(max(0.0, start + i * over_s / pieces - time.monotonic()))
            sock.sendall(piece)
        return read_to_eof(sock)


def test_trickled_requests_are_cut_at_the_request_deadline_while_a_steady_upload_succeeds(
    stack, strict_proxy
):
    """A head and a body trickled one byte per 0.25 s never idle for 30 s, so only
    ``--request-timeout`` (4 s from the first byte) ends them: with a 408, counted by
    phase, one ``http.request_timeout`` line each.  Meanwhile an 8 MiB upload paced over
    2 s, under the deadline, is relayed whole."""
    proxy = strict_proxy
    seen = len(proxy.daemon.events("http.request_timeout"))
    size = 8 << 20
    with ThreadPoolExecutor(3) as pool:
        now = time.monotonic()
        head_sock = tls(proxy.listen, stack.web_context())
        head_end = pool.submit(trickle, head_sock, ENDLESS_HEAD, now)
        now = time.monotonic()
        body_end = pool.submit(trickle_body, tls(proxy.listen, stack.web_context()), now)
        steady = pool.submit(steady_upload, tls(proxy.listen, stack.web_context()), size, 64, 2.0)
        endings = {"head": head_end.result(), "body": body_end.result()}
        uploaded = steady.result()
    for phase, ending in endings.items():
        assert ending.closed, f"{phase}: still open after {CEILING_S}s"
        assert TRICKLE_REQUEST_S - 1 <= ending.seconds < TRICKLE_IDLE_S, (phase, ending.seconds)
        assert status_of(ending.reply) == 408, (phase, ending.reply[:200])
    assert status_of(uploaded) == 200, uploaded[:200]
    assert json.loads(uploaded.partition(b"\r\n\r\n")[2])["length"] == size
    # The log reader thread may be behind the client that just saw its 408: wait for both.
    proxy.daemon.wait_for("http.request_timeout", timeout=10, count=seen + 2)
    lines = proxy.daemon.events("http.request_timeout")[seen:]
    assert sorted(line["phase"] for line in lines) == ["body", "head"]
    assert all(line["timeout_s"] == TRICKLE_REQUEST_S for line in lines)
    for phase in ("head", "body"):
        assert proxy.metric("tally_proxy_http_request_timeouts_total", phase=phase) == 1
    assert proxy.metric("tally_proxy_http_requests_total", status="4xx") >= 1
