"""Operations end to end: hot swap, SIGTERM drain, SIGHUP reload, limits, expiry, readiness."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest
from cryptography import x509

from tally.app.launch import Daemon
from tally.spiffe import pem
from tests.proxy.conftest import client_context, http_over, mint, tls_connect, wait_until

pytestmark = pytest.mark.e2e


def echo_once(sock: ssl.SSLSocket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        got += chunk
    return got


def served_serial(port: int, ctx: ssl.SSLContext) -> str:
    with tls_connect(port, ctx) as sock:
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        assert echo_once(sock, b"hi") == b"hi"
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def replace_files(src: Path, dst: Path) -> None:
    """What a cert renewer does: write beside, then rename over, one file at a time."""
    for name in ("svid.pem", "key.pem", "bundle.pem"):
        tmp = dst / f".{name}.new"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


def test_hot_swap_from_files_keeps_established_connections(
    start_proxy, certs, echo_backend, tmp_path
):
    live = tmp_path / "live"
    live.mkdir()
    replace_files(certs["api"].dir, live)
    proxy = start_proxy(
        "server",
        "--target",
        echo_backend.address,
        "--allow-id",
        "spiffe://example.org/web",
        "--cert",
        str(live / "svid.pem"),
        "--key",
        str(live / "key.pem"),
        "--bundle",
        str(live / "bundle.pem"),
    )
    ctx = client_context(certs["web"], certs["web"].bundle)
    assert served_serial(proxy.port, ctx) == certs["api"].serial
    with tls_connect(proxy.port, ctx) as established:
        assert echo_once(established, b"before") == b"before"
        replace_files(certs["api2"].dir, live)
        rotated = proxy.daemon.wait_for("svid.rotated", timeout=5)
        assert rotated["serial"] == certs["api2"].serial
        assert rotated["old_serial"] == certs["api"].serial
        assert served_serial(proxy.port, ctx) == certs["api2"].serial
        assert echo_once(established, b"after the swap") == b"after the swap"
    assert proxy.metric("tally_proxy_rotations_total") == 1
    assert (
        proxy.metric(
            "tally_proxy_svid_info",
            mode="server",
            serial=certs["api2"].serial,
            spiffe_id="spiffe://example.org/api",
        )
        == 1
    )


def test_broken_replacement_keeps_the_old_identity(start_proxy, certs, echo_backend, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    replace_files(certs["api"].dir, live)
    proxy = start_proxy(
        "server",
        "--target",
        echo_backend.address,
        "--allow-id",
        "spiffe://example.org/web",
        "--cert",
        str(live / "svid.pem"),
        "--key",
        str(live / "key.pem"),
        "--bundle",
        str(live / "bundle.pem"),
    )
    shutil.copyfile(certs["api2"].key, live / "key.pem")  # a key that is not the cert's
    proxy.daemon.signal(signal.SIGHUP)
    failed = proxy.daemon.wait_for("identity.reload_failed", timeout=5)
    assert failed["reason"] == "key_mismatch"
    ctx = client_context(certs["web"], certs["web"].bundle)
    assert served_serial(proxy.port, ctx) == certs["api"].serial


def test_sigterm_drains_open_connections_and_exits_zero(start_proxy, certs, echo_backend):
    proxy = start_proxy(
        "server",
        "--target",
        echo_backend.address,
        "--allow-id",
        "spiffe://example.org/web",
        "--drain-timeout",
        "20s",
        *certs["api"].files(),
    )
    ctx = client_context(certs["web"], certs["web"].bundle)
    with tls_connect(proxy.port, ctx) as sock:
        assert echo_once(sock, b"one") == b"one"
        proxy.daemon.signal(signal.SIGTERM)
        proxy.daemon.wait_for("proxy.draining")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:  # caught in the backlog as the listener closed
                return False
            return False

        wait_until(refused, what="the listener to close")
        assert echo_once(sock, b"still here") == b"still here"
        assert proxy.daemon.proc is not None and proxy.daemon.proc.poll() is None
    assert proxy.daemon.proc.wait(10) == 0
    assert proxy.daemon.events("proxy.stopped")


def test_sigterm_closes_idle_http_keepalive_at_once(start_proxy, certs, http_backend):
    proxy = start_proxy(
        "server",
        "--target",
        http_backend.address,
        "--http",
        "--allow-id",
        "spiffe://example.org/web",
        "--drain-timeout",
        "60s",
        *certs["api"].files(),
    )
    ctx = client_context(certs["web"], certs["web"].bundle)
    with tls_connect(proxy.port, ctx) as sock:
        conn = http.client.HTTPConnection("localhost")
        conn.sock = sock
        conn.request("GET", "/idle")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
        started = time.monotonic()
        proxy.daemon.signal(signal.SIGTERM)
        assert sock.recv(65536) == b""  # the idle keep-alive connection is closed, not kept 60s
    assert proxy.daemon.proc is not None and proxy.daemon.proc.wait(10) == 0
    assert time.monotonic() - started < 10


def test_sighup_reloads_allow_rules_without_dropping_connections(
    start_proxy, certs, echo_backend, tmp_path
):
    config = tmp_path / "proxy.toml"
    config.write_text('allow_id = ["spiffe://example.org/web"]\n')
    proxy = start_proxy(
        "server",
        "--config",
        str(config),
        "--target",
        echo_backend.address,
        *certs["api"].files(),
    )
    web = client_context(certs["web"], certs["web"].bundle)
    evil = client_context(certs["evil"], certs["evil"].bundle)
    with tls_connect(proxy.port, web) as established:
        assert echo_once(established, b"web") == b"web"
        config.write_text('allow_id = ["spiffe://example.org/evil"]\nmax_connections = 7\n')
        proxy.daemon.signal(signal.SIGHUP)
        reloaded = proxy.daemon.wait_for("config.reloaded", timeout=5)
        assert reloaded["rules"] == ["id=spiffe://example.org/evil"]
        assert reloaded["max_connections"] == 7
        assert served_serial(proxy.port, evil) == certs["api"].serial
        assert echo_once(established, b"still up") == b"still up"
        before = len(proxy.daemon.events("peer.denied"))
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            served_serial(proxy.port, web)
        assert proxy.denied(count=before + 1)["peer_id"] == "spiffe://example.org/web"
    config.write_text("allow_id = []\n")
    proxy.daemon.signal(signal.SIGHUP)
    failed = proxy.daemon.wait_for("config.reload_failed", timeout=5)
    assert "allow rule" in failed["error"]


def test_max_connections_holds_the_next_one_in_the_backlog(start_proxy, certs, echo_backend):
    proxy = start_proxy(
        "server",
        "--target",
        echo_backend.address,
        "--allow-id",
        "spiffe://example.org/web",
        "--max-connections",
        "1",
        *certs["api"].files(),
    )
    ctx = client_context(certs["web"], certs["web"].bundle)
    first = tls_connect(proxy.port, ctx)
    assert echo_once(first, b"first") == b"first"
    done = threading.Event()
    second: list[ssl.SSLSocket] = []

    def connect_second() -> None:
        second.append(tls_connect(proxy.port, ctx))
        done.set()

    thread = threading.Thread(target=connect_second)
    thread.start()
    assert not done.wait(1.0), "a second connection was served beyond --max-connections 1"
    assert proxy.metric("tally_proxy_connections_open") == 1
    first.close()
    assert done.wait(10)
    thread.join()
    with second[0] as sock:
        assert echo_once(sock, b"second") == b"second"


def test_connections_close_when_the_peer_certificate_expires(
    cas, tcp_server_proxy, http_server_proxy, tmp_path
):
    short = mint(cas["example.org"], tmp_path / "short", "spiffe://example.org/web", ttl="3s")
    not_after = pem.chain_from_pem(short.cert.read_bytes())[0].not_valid_after_utc
    ctx = client_context(short, short.bundle)
    tcp = tls_connect(tcp_server_proxy.port, ctx)
    assert echo_once(tcp, b"tcp") == b"tcp"
    with tls_connect(http_server_proxy.port, ctx) as web:
        # A response still in flight when the certificate expires is finished first.
        until = not_after.timestamp() + 0.5
        web.sendall(f"GET /slow?until={until} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        response = b""
        while b"\r\n\r\n" not in response or not response.endswith(b"}"):
            chunk = web.recv(65536)
            assert chunk, response
            response += chunk
        head = response.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 200 ")
        assert b"connection: close" in head
        assert web.recv(65536) == b""
    assert datetime.now(UTC) > not_after
    assert tcp.recv(65536) == b""  # cut at expiry (TCP mode has no "after the response")
    tcp.close()
    tcp_server_proxy.daemon.wait_for("connection.peer_expired", timeout=5)
    http_server_proxy.daemon.wait_for("connection.peer_expired", timeout=5)


def test_nothing_is_accepted_before_the_first_svid(tmp_path):
    daemon = Daemon(
        "proxy-waiting",
        [
            "proxy",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:9",
            "--allow-trust-domain",
            "example.org",
            "--workload-socket",
            str(tmp_path / "no-agent.sock"),
        ],
    )
    try:
        waiting = daemon.start("proxy.waiting")
        with pytest.raises(HTTPError) as info:
            urlopen(f"http://{waiting['metrics']}/readyz", timeout=5)
        assert info.value.code == 503
        assert "waiting for the first SVID" in info.value.read().decode()
        port = int(waiting["listen"].rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with urlopen(f"http://{waiting['metrics']}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        assert daemon.stop() == 0


def test_readyz_and_metrics_when_serving(http_server_proxy, certs):
    # A handshake of this test's own: the proxy is shared, and the other tests' may have
    # run in another worker.
    with tls_connect(
        http_server_proxy.port, client_context(certs["web"], certs["web"].bundle)
    ) as s:
        assert http_over(s, "/ready").startswith(b"HTTP/1.1 200 ")
    with urlopen(f"http://{http_server_proxy.metrics}/readyz", timeout=5) as resp:
        text = resp.read().decode()
    assert text.startswith("ready: serving as spiffe://example.org/api")
    assert 3000 < http_server_proxy.metric("tally_proxy_svid_expiry_seconds") <= 3600
    assert http_server_proxy.metric("tally_proxy_handshakes_total", outcome="ok") >= 1
