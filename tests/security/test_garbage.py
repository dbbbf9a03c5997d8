"""Garbage on every socket: random, truncated and hostile bytes against the real daemons.

Rules / theory of operation: every listening socket Tally opens is attacked by a
client that speaks its protocol wrongly on purpose: the CA's agent API (TLS, then
HTTP/1.1), the CA's admin socket (HTTP/1.1 on a unix socket), the agent's Workload
API (HTTP/2 gRPC on a unix socket), the proxy in HTTP and TCP mode, and the
``--metrics`` health ports of all three.  One stack of daemons serves the whole
module.  Each attack must (1) get a clean refusal, an HTTP 4xx/5xx status, a gRPC
status or a plain close, and never hang; (2) leave the daemon running with no
error-level line and no traceback in what it logged meanwhile; (3) be followed at
once by a legitimate client that is served, so a refusal can never pass merely
because the daemon or the socket is broken.  Where a handshake stands in front
of the parser, the garbage is sent both before TLS and after a good handshake
(an agent's SVID for the CA, an allowed SVID for the proxy), so the parser
behind the handshake is reached too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.workload_calls import FrameGuard
from tally.app.launch import Daemon, run_cli
from tally.wire.grpc import Status, encode_message, status_from_headers
from tally.wire.workload_client import fetch_x509
from tests.e2e.conftest import CA, Agent, make_ca, start_agent
from tests.e2e.test_agent import probe, register
from tests.proxy.backends import EchoServer, HttpServer
from tests.proxy.conftest import Minted, Running, client_context, launch, mint

pytestmark = pytest.mark.e2e

UID = os.geteuid()
WEB = "spiffe://example.org/web"
WORKLOAD = "spiffe://example.org/garbage-workload"
READ_TIMEOUT_S = 20.0


# -- the stack under attack -------------------------------------------------------------


@dataclass
class Stack:
    """One CA, one agent, two proxies and their backends, plus what a good client needs."""

    ca: CA
    agent: Agent
    proxy_http: Running
    proxy_tcp: Running
    http_backend: HttpServer
    echo_backend: EchoServer
    web: Minted
    """An SVID the proxies admit."""
    api: Minted
    """The proxies' own SVID."""
    bundle: Path

    @property
    def daemons(self) -> dict[str, Daemon]:
        return {
            "ca": self.ca.daemon,
            "agent": self.agent.daemon,
            "proxy_http": self.proxy_http.daemon,
            "proxy_tcp": self.proxy_tcp.daemon,
        }

    def mark(self) -> dict[str, int]:
        return {name: len(d.raw) for name, d in self.daemons.items()}

    def assert_healthy(self, mark: dict[str, int]) -> None:
        """Every daemon still runs and logged nothing alarming since ``mark``."""
        for name, daemon in self.daemons.items():
            assert daemon.proc is not None and daemon.proc.poll() is None, f"{name} died"
            for raw in daemon.raw[mark[name] :]:
                assert "Traceback" not in raw, f"{name} logged a traceback: {raw}"
                line = json.loads(raw)  # a line that is not JSON is a crash dump
                assert line.get("level") not in ("error", "critical"), f"{name}: {raw}"

    def agent_context(self) -> ssl.SSLContext:
        """The real agent's own SVID (key and chain in one file), as the CA expects."""
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(self.agent.data_dir / "agent_svid.pem"))
        return ctx

    def web_context(self) -> ssl.SSLContext:
        return client_context(self.web, self.bundle)


def build_stack(
    base: Path,
    ca_args: list[str],
    proxy_args: list[str],
    tcp_args: tuple[str, ...] = (),
    agent_args: tuple[str, ...] = (),
) -> Stack:
    """``proxy_args`` go to both proxies, ``tcp_args`` to the TCP one only."""
    ca = make_ca(base, *ca_args)
    bundle = base / "bundle.pem"
    bundle.write_text(ca.json("bundle", "show")["bundle"])
    agent = start_agent(ca, base, "node-1", *agent_args)
    register(ca, agent, "garbage-workload", f"unix:uid:{UID}")
    api = mint(ca, base / "api", "spiffe://example.org/api", dns="localhost")
    web = mint(ca, base / "web", WEB)
    http_backend, echo_backend = HttpServer(), EchoServer()
    common = ["--allow-id", WEB, *api.files(), *proxy_args]
    proxy_http = launch("server", "--target", http_backend.address, "--http", *common)
    proxy_tcp = launch("server", "--target", echo_backend.address, *common, *tcp_args)
    stack = Stack(ca, agent, proxy_http, proxy_tcp, http_backend, echo_backend, web, api, bundle)
    wait_for_workload(stack)
    return stack


def stop_stack(stack: Stack) -> None:
    for daemon in stack.daemons.values():  # all at once: each drains on its own
        daemon.signal(signal.SIGTERM)
    for daemon in stack.daemons.values():
        daemon.stop()
    stack.http_backend.close()
    stack.echo_backend.close()


def wait_for_workload(stack: Stack) -> None:
    """The agent learns the entry on its next poll of the CA and logs the SVID it got."""
    seen = 1
    while stack.agent.daemon.wait_for("svid.issued", count=seen).get("spiffe_id") != WORKLOAD:
        seen += 1
    assert workload_fetch(stack) == WORKLOAD


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    made = build_stack(
        tmp_path_factory.mktemp("garbage"),
        ["--handshake-timeout", "3s", "--request-timeout", "3s"],
        ["--handshake-timeout", "3s", "--idle-timeout", "5s"],
    )
    yield made
    stop_stack(made)


# -- legitimate clients (the controls) ----------------------------------------------------


def read_to_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes; a reset counts as a close."""
    sock.settimeout(READ_TIMEOUT_S)
    chunks: list[bytes] = []
    got = 0
    try:
        while got < limit and (data := sock.recv(65536)):
            chunks.append(data)
            got += len(data)
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        pass
    return b"".join(chunks)


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


def get(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return read_to_eof(sock)


def unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(READ_TIMEOUT_S)
    sock.connect(path)
    return sock


def tcp(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=READ_TIMEOUT_S)


def tls(address: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    return ctx.wrap_socket(tcp(address), server_hostname="localhost")


def workload_fetch(stack: Stack) -> str:
    """Tally's own Workload API client, in this process: the default SVID's ID."""
    context = trio.run(fetch_x509, Path(stack.agent.socket))
    return context.default_svid.spiffe_id


@dataclass(frozen=True)
class HttpTarget:
    """One HTTP/1.1 socket and the request a legitimate client makes on it."""

    name: str
    connect: Callable[[Stack], socket.socket]
    good_path: str
    good_status: int = 200

    def control(self, stack: Stack) -> None:
        with self.connect(stack) as sock:
            response = get(sock, self.good_path)
        assert status_of(response) == self.good_status, response[:300]


HTTP_TARGETS = [
    HttpTarget("ca_api", lambda s: tls(s.ca.listen, s.agent_context()), "/v1/entries"),
    HttpTarget("ca_admin", lambda s: unix(s.ca.admin_socket), "/v1/health"),
    HttpTarget("ca_metrics", lambda s: tcp(s.ca.metrics), "/healthz"),
    HttpTarget("agent_metrics", lambda s: tcp(s.agent.metrics), "/healthz"),
    HttpTarget("proxy_metrics", lambda s: tcp(s.proxy_http.metrics), "/readyz"),
    HttpTarget("proxy_http", lambda s: tls(s.proxy_http.listen, s.web_context()), "/control"),
]
BY_NAME = {t.name: t for t in HTTP_TARGETS}


def all_controls(stack: Stack) -> None:
    for target in HTTP_TARGETS:
        target.control(stack)
    assert workload_fetch(stack) == WORKLOAD
    with tls(stack.proxy_tcp.listen, stack.web_context()) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


# -- hostile HTTP/1.1 ---------------------------------------------------------------------

HOST = b"Host: x\r\n"


@dataclass(frozen=True)
class Hostile:
    name: str
    payload: bytes
    statuses: frozenset[int]
    skip: frozenset[str] = frozenset()
    """Targets the case does not apply to (the proxy streams bodies of any size)."""
    in_body: bool = False
    """The fault is in the body: the proxy has streamed the head on before it shows."""


def chunked(body: bytes) -> bytes:
    return b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + body


PROXY = frozenset({"proxy_http"})
HOSTILE = [
    Hostile("invalid_method", b"G@T / HTTP/1.1\r\n" + HOST + b"\r\n", frozenset({400})),
    Hostile("binary_line", b"\x16\x03\x01\x00\xff\x01\x00\xfc\x03\x03\r\n\r\n", frozenset({400})),
    Hostile("no_host", b"GET / HTTP/1.1\r\n\r\n", frozenset({400})),
    Hostile(
        "nul_in_header", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n", frozenset({400})
    ),
    Hostile("space_before_colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", frozenset({400})),
    Hostile(
        "huge_header",
        b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        frozenset({431}),
    ),
    Hostile(
        "many_headers",
        b"GET / HTTP/1.1\r\n"
        + HOST
        + b"".join(b"X-%d: v\r\n" % i for i in range(20_000))
        + b"\r\n",
        frozenset({431}),
    ),
    Hostile(
        "huge_target",
        b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        frozenset({431}),
    ),
    Hostile(
        "huge_declared_body",
        b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Content-Length: 1000000000000\r\n\r\n",
        frozenset({413}),
        PROXY,
    ),
    Hostile(
        "huge_chunked_body",
        chunked(
            b"".join(b"10000\r\n" + b"a" * 0x10000 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
        ),
        frozenset({413}),
        PROXY,
    ),
    Hostile("bad_chunk_size", chunked(b"zz\r\nhello\r\n0\r\n\r\n"), frozenset({400}), in_body=True),
    Hostile(
        "chunk_size_overflow",
        chunked(b"f" * 40 + b"\r\nab\r\n0\r\n\r\n"),
        frozenset({400}),
        in_body=True,
    ),
    Hostile(
        "chunk_without_crlf", chunked(b"5\r\nhelloXX0\r\n\r\n"), frozenset({400}), in_body=True
    ),
    Hostile(
        "cl_and_te",
        b"POST /v1/x HTTP/1.1\r\n"
        + HOST
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        frozenset({400}),
    ),
    Hostile(
        "te_and_cl",
        b"POST /v1/x HTTP/1.1\r\n"
        + HOST
        + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        frozenset({400}),
    ),
    Hostile(
        "conflicting_cl",
        b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        frozenset({400}),
    ),
    Hostile(
        "cl_list",
        b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Content-Length: 2, 3\r\n\r\nabc",
        frozenset({400}),
    ),
    Hostile(
        "negative_cl",
        b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n",
        frozenset({400}),
    ),
    Hostile(
        "unknown_coding",
        b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        frozenset({501}),
    ),
    Hostile("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", frozenset({505})),
    Hostile("http_3", b"GET / HTTP/3.0\r\n" + HOST + b"\r\n", frozenset({505})),
]


def send_hostile(sock: socket.socket, payload: bytes) -> bytes:
    """Send all we can (a server may refuse before reading everything), then read to EOF."""
    try:
        sock.sendall(payload)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass
    return read_to_eof(sock)


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
@pytest.mark.parametrize("target", HTTP_TARGETS, ids=lambda t: t.name)
def test_hostile_http_is_refused_cleanly(stack, target: HttpTarget, case: Hostile):
    if target.name in case.skip:
        pytest.skip(f"{target.name}: not a refusal there ({case.name})")
    mark = stack.mark()
    seen = len(stack.http_backend.seen)
    with target.connect(stack) as sock:
        response = send_hostile(sock, case.payload)
    assert status_of(response) in case.statuses, response[:300]
    assert b"connection: close" in response.lower()
    if not case.in_body:
        assert len(stack.http_backend.seen) == seen, "the proxy relayed a refused request"
    target.control(stack)
    stack.assert_healthy(mark)


@pytest.mark.parametrize("target", HTTP_TARGETS, ids=lambda t: t.name)
def test_truncated_request_then_hangup(stack, target: HttpTarget):
    """A head or body cut short by a closed connection leaves nothing behind."""
    mark = stack.mark()
    for cut in (b"GET / HT", b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\nab"):
        with target.connect(stack) as sock:
            sock.sendall(cut)
    target.control(stack)
    stack.assert_healthy(mark)


@pytest.mark.parametrize("target", ["ca_admin", "ca_metrics", "agent_metrics", "proxy_metrics"])
def test_half_closed_truncated_request_gets_400(stack, target: str):
    """On plain sockets the peer can half-close: the server answers what it has, 400."""
    mark = stack.mark()
    with BY_NAME[target].connect(stack) as sock:
        sock.sendall(b"POST /v1/x HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\nab")
        sock.shutdown(socket.SHUT_WR)
        assert status_of(read_to_eof(sock)) == 400
    BY_NAME[target].control(stack)
    stack.assert_healthy(mark)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=4096))
def test_random_bytes_on_the_admin_socket(stack, garbage: bytes):
    """Whatever the bytes, the answer is a 4xx/5xx or a plain close, and the CA stays up."""
    mark = stack.mark()
    with unix(stack.ca.admin_socket) as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        response = read_to_eof(sock)
    status = status_of(response)
    assert status is None or status >= 400, response[:200]
    BY_NAME["ca_admin"].control(stack)
    stack.assert_healthy(mark)


@pytest.mark.parametrize("target", ["ca_api", "proxy_http", "ca_metrics"])
def test_random_bytes_behind_the_handshake(stack, target: str):
    """Random lines after a good handshake (or on the plain metrics port) get a 400."""
    rng = random.Random(6)
    mark = stack.mark()
    for _ in range(5):
        line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
        with BY_NAME[target].connect(stack) as sock:
            response = send_hostile(sock, line.replace(b"\n", b"") + b"\r\n\r\n")
        assert status_of(response) in (400, 431), response[:200]
    BY_NAME[target].control(stack)
    stack.assert_healthy(mark)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /folded HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n  b\r\nConnection: close\r\n\r\n",
        b"GET /bare-lf HTTP/1.1\nHost: x\nConnection: close\n\n",
    ],
    ids=["obs_fold", "bare_lf"],
)
def test_obs_fold_and_bare_lf_are_refused(stack, head: bytes):
    """llhttp reads strictly (`tally.wire.http1` rule 1): a folded header or a bare LF line
    end is a 400 and never reaches the service, at the proxy as at the CA."""
    seen = len(stack.http_backend.seen)
    with tls(stack.proxy_http.listen, stack.web_context()) as sock:
        assert status_of(send_hostile(sock, head)) == 400
    assert stack.http_backend.seen[seen:] == []
    with unix(stack.ca.admin_socket) as sock:
        assert status_of(send_hostile(sock, head.replace(b"/folded", b"/v1/health"))) == 400


@pytest.mark.parametrize(
    "smuggled",
    [
        # CL.TE: a front end reading Content-Length would pass the rest on as a request.
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        # TE.CL: a back end reading Content-Length would take the chunk as a new request.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"2a\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\nX: GET / HTTP/1.1\r\n\r\n\r\n0\r\n\r\n",
        # Tab-separated, differently cased TE: still two framings.
        b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-ENCODING:\tchunked\r\ncontent-length: 4\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["cl_te", "te_cl", "te_cased"],
)
def test_smuggling_never_reaches_the_backend(stack, smuggled: bytes):
    seen = len(stack.http_backend.seen)
    with tls(stack.proxy_http.listen, stack.web_context()) as sock:
        response = send_hostile(sock, smuggled)
    assert status_of(response) == 400
    assert response.count(b"HTTP/1.1 ") == 1, "a second response means a second request"
    assert stack.http_backend.seen[seen:] == []
    # Pipelining, by contrast, is two honest requests: both relayed, both answered.
    with tls(stack.proxy_http.listen, stack.web_context()) as sock:
        two = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert send_hostile(sock, two).count(b"HTTP/1.1 200") == 2
    assert [r.path for r in stack.http_backend.seen[seen:]] == ["/one", "/two"]


def test_proxy_streams_a_huge_body_in_bounded_memory(stack):
    """The proxy does not refuse a large body (it is the service's to judge) but streams
    it: a 64 MiB chunked upload, and the proxy's memory grows by less than a quarter of it."""
    size, piece = 64 << 20, bytes(1 << 16)
    pid = stack.proxy_http.daemon.pid
    before = rss_kib(pid)
    with tls(stack.proxy_http.listen, stack.web_context()) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(size // len(piece)):
            sock.sendall(b"10000\r\n" + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        response = read_to_eof(sock)
    assert status_of(response) == 200, response[:200]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["length"] == size
    assert rss_kib(pid) - before < (size >> 10) // 4


def rss_kib(pid: int) -> int:
    """The daemon's resident memory, from the kernel."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- garbage in place of TLS --------------------------------------------------------------


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight a real client sends, from an in-memory handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


TLS_LISTENERS = {
    "ca_api": (lambda s: s.ca.listen, Stack.agent_context),
    "proxy_http": (lambda s: s.proxy_http.listen, Stack.web_context),
    "proxy_tcp": (lambda s: s.proxy_tcp.listen, Stack.web_context),
}


def pre_tls_garbage(stack: Stack, ctx: ssl.SSLContext) -> dict[str, bytes]:
    hello = client_hello(ctx)
    rng = random.Random(61)
    return {
        "random": bytes(rng.randrange(256) for _ in range(4096)),
        "http_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "truncated_hello": hello[: len(hello) // 2],
        "hello_header_only": hello[:5],
        "record_too_long": b"\x16\x03\x01\xff\xff" + os.urandom(1000),
        "hello_then_garbage": hello + os.urandom(2000),
        "alert_first": b"\x15\x03\x03\x00\x02\x02\x28",
    }


@pytest.mark.parametrize("listener", list(TLS_LISTENERS))
def test_garbage_instead_of_a_handshake(stack, listener: str):
    address_of, context_of = TLS_LISTENERS[listener]
    address, ctx = address_of(stack), context_of(stack)
    mark = stack.mark()
    for name, garbage in pre_tls_garbage(stack, ctx).items():
        with tcp(address) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            reply = read_to_eof(sock)
        # At most a TLS alert or a partial server flight; never an HTTP answer or a hang.
        assert not reply.startswith(b"HTTP/"), (name, reply[:100])
        with tcp(address) as sock:  # and a hang-up half way, without the half-close
            sock.sendall(garbage[: max(1, len(garbage) // 3)])
    control_tls(stack, listener)
    stack.assert_healthy(mark)


def control_tls(stack: Stack, listener: str) -> None:
    if listener == "proxy_tcp":
        with tls(stack.proxy_tcp.listen, stack.web_context()) as sock:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
    else:
        BY_NAME[listener].control(stack)


def handshake_raw(address: str, ctx: ssl.SSLContext) -> tuple[socket.socket, ssl.SSLObject]:
    """A completed handshake over a plain socket, so the test can then write raw records."""
    sock = tcp(address)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out := outgoing.read():
                sock.sendall(out)
            incoming.write(sock.recv(65536))
    if out := outgoing.read():
        sock.sendall(out)
    return sock, obj


@pytest.mark.parametrize("listener", list(TLS_LISTENERS))
def test_garbage_records_after_a_good_handshake(stack, listener: str):
    """Once authenticated, broken TLS records (not HTTP) end the connection, quietly."""
    address_of, context_of = TLS_LISTENERS[listener]
    mark = stack.mark()
    records = {
        "random": os.urandom(3000),
        "truncated_record": b"\x17\x03\x03\x40\x00" + os.urandom(100),
        "oversized_record": b"\x17\x03\x03\xff\xff" + os.urandom(2000),
        "bad_mac": b"\x17\x03\x03\x00\x40" + os.urandom(0x40),
        "handshake_again": b"\x16\x03\x03\x00\x04\x01\x00\x00\x00",
    }
    for name, raw in records.items():
        sock, _ = handshake_raw(address_of(stack), context_of(stack))
        with sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            reply = read_to_eof(sock)
        assert b"HTTP/1.1" not in reply, (name, reply[:100])
    control_tls(stack, listener)
    stack.assert_healthy(mark)


# -- HTTP/2 and gRPC on the Workload API ----------------------------------------------------

FETCH = "/SpiffeWorkloadAPI/FetchX509SVID"


class H2Peer:
    """A deliberately careless HTTP/2 client on a blocking unix socket."""

    def __init__(self, path: str, *, preface: bool = True) -> None:
        self.sock = unix(path)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.events: list[h2.events.Event] = []
        self.closed = False
        if preface:
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                self.closed = True

    def headers(
        self, path: str = FETCH, *, security: bool = True, method: str = "POST", extra=()
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *([(b"workload.spiffe.io", b"true")] if security else []),
            *extra,
        ]
        self.conn.send_headers(stream_id, headers)
        return stream_id

    def call(self, path: str = FETCH, body: bytes | None = None, **kwargs) -> int:
        stream_id = self.headers(path, **kwargs)
        body = encode_message(b"") if body is None else body
        for start in range(0, len(body), 16384):  # h2's default maximum frame size
            self.conn.send_data(stream_id, body[start : start + 16384])
        self.conn.end_stream(stream_id)
        self.flush()
        return stream_id

    def pump(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            self.closed = True
            return
        self.events += self.conn.receive_data(data)
        self.flush()

    def ending(self, stream_id: int) -> tuple[int, Status | None, str]:
        """(HTTP status, gRPC status, message) once the stream ends, or the connection does."""
        deadline = time.monotonic() + READ_TIMEOUT_S
        http_status = 0
        grpc: tuple[Status, str] | None = None
        while time.monotonic() < deadline:
            for event in self.events:
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    if event.stream_id != stream_id:
                        continue
                    fields = dict(event.headers)
                    http_status = int(fields.get(b":status", http_status or 0))
                    grpc = status_from_headers(event.headers) or grpc
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    if event.stream_id == stream_id and grpc is not None:
                        return http_status, grpc[0], grpc[1]
            if self.closed:
                return http_status, None, "connection closed"
            self.pump()
        raise AssertionError(f"stream {stream_id} never ended")

    def first_message(self, stream_id: int) -> bytes:
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            for event in self.events:
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    return event.data
            assert not self.closed, "the connection closed before the good call was served"
            self.pump()
        raise AssertionError(f"stream {stream_id} got no message")

    def until_closed(self) -> bytes:
        """What the server still says (a GOAWAY, say) until it closes the connection."""
        return read_to_eof(self.sock)

    def close(self) -> None:
        self.sock.close()


def frame(
    kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None
) -> bytes:
    size = len(payload) if length is None else length
    return (
        struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload
    )


@dataclass(frozen=True)
class BadCall:
    """One malformed call and how it must end: (HTTP status, gRPC status)."""

    name: str
    status: Status
    body: bytes | None = None
    """The DATA sent; None for one well-formed empty request message."""
    path: str = FETCH
    security: bool = True
    method: str = "POST"
    extra: tuple[tuple[bytes, bytes], ...] = ()
    http_status: int = 200


def prefix(flag: int, length: int) -> bytes:
    return bytes([flag]) + struct.pack(">I", length)


BAD_CALLS = [
    BadCall("missing_security_header", Status.INVALID_ARGUMENT, security=False),
    BadCall(
        "wrong_security_value",
        Status.INVALID_ARGUMENT,
        security=False,
        extra=((b"workload.spiffe.io", b"True"),),
    ),
    BadCall("unknown_method", Status.UNIMPLEMENTED, path="/SpiffeWorkloadAPI/Nope"),
    BadCall("foreign_service", Status.UNIMPLEMENTED, path="/grpc.health.v1.Health/Check"),
    BadCall(
        "jwt_without_audience", Status.INVALID_ARGUMENT, path="/SpiffeWorkloadAPI/FetchJWTSVID"
    ),
    BadCall("empty_path", Status.UNIMPLEMENTED, path="/"),
    BadCall("get_method", Status.INTERNAL, method="GET", http_status=405),
    BadCall("compressed_flag", Status.UNIMPLEMENTED, prefix(1, 0)),
    BadCall("invalid_flag", Status.INTERNAL, prefix(7, 0)),
    BadCall("length_beyond_data", Status.INTERNAL, prefix(0, 100) + b"abc"),
    BadCall("length_beyond_limit", Status.RESOURCE_EXHAUSTED, prefix(0, 0xFFFFFFFF)),
    # As much of a 100 kB message as the 64 KiB flow-control window lets in.
    BadCall("oversized_message", Status.RESOURCE_EXHAUSTED, prefix(0, 100_000) + bytes(60_000)),
    BadCall("two_messages", Status.INTERNAL, encode_message(b"") * 2),
    BadCall("not_protobuf", Status.INTERNAL, encode_message(b"\xff\xff\xff\xff")),
    BadCall("truncated_prefix", Status.INTERNAL, b"\x00\x00"),
    BadCall("no_message", Status.INTERNAL, b""),
    BadCall("bad_grpc_timeout", Status.INTERNAL, extra=((b"grpc-timeout", b"forever"),)),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=lambda c: c.name)
def test_bad_grpc_calls_end_with_a_status(stack, case: BadCall):
    mark = stack.mark()
    peer = H2Peer(stack.agent.socket)
    try:
        stream_id = peer.call(
            case.path,
            case.body,
            security=case.security,
            method=case.method,
            extra=case.extra,
        )
        got_http, got, message = peer.ending(stream_id)
        assert (got_http, got) == (case.http_status, case.status), message
        # The connection survives a bad call: a good one on it is served.
        peer.first_message(peer.call())
    finally:
        peer.close()
    assert workload_fetch(stack) == WORKLOAD
    stack.assert_healthy(mark)


def broken_connections(stack: Stack) -> dict[str, Callable[[H2Peer], None]]:
    def send(*frames: bytes) -> Callable[[H2Peer], None]:
        def attack(peer: H2Peer) -> None:
            peer.sock.sendall(b"".join(frames))

        return attack

    def window_overflow(peer: H2Peer) -> None:
        peer.sock.sendall(frame(8, 0, 0, struct.pack(">I", 0x7FFFFFFF)) * 2)

    def streams_at_once(peer: H2Peer) -> None:
        """Thousands of streams in one write, far past MAX_CONCURRENT_STREAMS (100)."""
        for _ in range(3000):
            peer.headers()
        peer.flush()

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = frame(4, 0, 0, b"")
    return {
        "random_preface": send(os.urandom(4096)),
        "http1_instead": send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        "truncated_preface": send(preface[:10]),
        "frame_too_long": send(preface, settings_frame, frame(0, 0, 1, b"", length=0xFFFFFF)),
        "frame_cut_short": send(preface, settings_frame, frame(1, 4, 1, b"\x82", length=1000)),
        "data_on_stream_0": send(preface, settings_frame, frame(0, 0, 0, b"abc")),
        "garbage_hpack": send(preface, settings_frame, frame(1, 5, 1, os.urandom(64))),
        "even_stream_id": send(preface, settings_frame, frame(1, 5, 2, b"\x83\x86\x84")),
        "bad_settings_length": send(preface, frame(4, 0, 0, b"\x00\x01\x00")),
        "continuation_flood": send(
            preface,
            settings_frame,
            frame(1, 0, 1, b"\x83\x86\x84"),  # HEADERS without END_HEADERS, then more and more
            *[frame(9, 0, 1, b"\x00" * 16384) for _ in range(60)],
        ),
        "window_overflow": window_overflow,
        "thousands_of_streams": streams_at_once,
    }


def test_broken_http2_closes_only_that_connection(stack):
    """Each connection-level fault ends its connection (with a GOAWAY where h2 can say
    one); a cut-short preface or frame is ended by our half-close, since the server
    cannot tell it from a slow peer (test_slow_clients times those out)."""
    mark = stack.mark()
    for name, attack in broken_connections(stack).items():
        peer = H2Peer(stack.agent.socket, preface=name in PREFACED)
        try:
            attack(peer)
            if name in CUT_SHORT:
                peer.sock.shutdown(socket.SHUT_WR)
            peer.until_closed()
        finally:
            peer.close()
        assert workload_fetch(stack) == WORKLOAD, name
    stack.assert_healthy(mark)


PREFACED = frozenset({"thousands_of_streams", "window_overflow"})
CUT_SHORT = frozenset({"truncated_preface", "frame_cut_short"})


frames_strategy = st.lists(
    st.tuples(
        st.sampled_from([0x0, 0x1, 0x3, 0x4, 0x6, 0x8, 0x9]),
        st.integers(0, 2000),
    ),
    max_size=12,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=200, deadline=None)
@given(
    frames=frames_strategy,
    oversized=st.one_of(st.none(), st.integers(16385, 0xFFFFFF)),
    at=st.integers(0, 12),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=8),
)
def test_frame_guard_finds_every_oversized_frame_however_the_bytes_are_cut(
    frames, oversized, at, cuts
):
    """The agent's pre-h2 frame reader: honest frames (header blocks ended) always pass,
    one declared length over the maximum is caught on the read that completes its header."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    encoded = [frame(kind, 0x4, 1, bytes(length)) for kind, length in frames]
    bad_end = None
    if oversized is not None:
        index = min(at, len(encoded))
        before = len(preface) + sum(len(f) for f in encoded[:index])
        encoded.insert(index, frame(0, 0, 1, b"", length=oversized))
        bad_end = before + 9
    data = preface + b"".join(encoded)
    guard = FrameGuard(16384, 64 * 1024)
    fed = 0
    for chunk in split(data, cuts):
        why = guard.check(chunk)
        fed += len(chunk)
        if bad_end is not None and fed >= bad_end:
            assert why is not None and "exceeds the maximum frame size" in why
            return
        assert why is None
    assert bad_end is None


def test_frame_guard_bounds_a_header_block_over_continuations():
    guard = FrameGuard(16384, 64 * 1024)
    assert guard.check(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(1, 0, 1, bytes(16384))) is None
    for _ in range(2):
        assert guard.check(frame(9, 0, 1, bytes(16384))) is None
    assert guard.check(frame(9, 0, 1, bytes(16384))) is None  # 64 KiB exactly
    assert "header block" in (guard.check(frame(9, 0, 1, b"x")) or "")


def test_rapid_reset_flood(stack):
    """Open and reset 5000 streams (CVE-2023-44487's shape); the agent keeps serving."""
    mark = stack.mark()
    peer = H2Peer(stack.agent.socket)
    try:
        for batch in range(50):
            for _ in range(100):
                stream_id = peer.call()
                peer.conn.reset_stream(stream_id)
            try:
                peer.flush()
            except (BrokenPipeError, ConnectionResetError):
                break
            assert workload_fetch(stack) == WORKLOAD if batch % 10 == 0 else True
    finally:
        peer.close()
    assert workload_fetch(stack) == WORKLOAD
    stack.assert_healthy(mark)


def test_py_spiffe_and_the_clis_after_the_barrage(stack):
    """Last in the module: the stock clients all still work against the attacked daemons."""
    all_controls(stack)
    out = probe("fetch", stack.agent.socket)[0]
    assert out["svids"][0]["spiffe_id"] == WORKLOAD
    assert stack.ca.cli("health").returncode == 0
    fetched = run_cli("agent", "api", "fetch", "--socket", stack.agent.socket, "--output", "json")
    assert fetched.returncode == 0, fetched.stderr
    with urllib.request.urlopen(f"http://{stack.proxy_http.metrics}/readyz", timeout=10) as resp:
        assert resp.status == 200
