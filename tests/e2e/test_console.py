"""The console of a real `tally ca run --console`: its event stream, its bounds, its doors.

Browser-level checks are in test_console_browser.py; these speak HTTP directly, so they
can count streams, watch one end on a drain and present client certificates.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest

from ca.console import MAX_STREAMS
from tally.app.launch import run_cli
from tests.e2e.conftest import ENGINES

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=ENGINES)
def ca_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def console_url(ca) -> str:
    return ca.daemon.events("ca.started")[-1]["console"]


class Events:
    """One server-sent event stream, read with a deadline on every wait."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        hostport = url.split("//", 1)[1].rstrip("/")
        host, port = hostport.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.conn.request("GET", "/api/events")
        self.resp = self.conn.getresponse()
        self.buffer = ""

    def next_snapshot(self, timeout: float = 10):
        """The next snapshot event (a dict), or None when the stream ended."""
        deadline = time.monotonic() + timeout
        while True:
            while "\n\n" in self.buffer:
                frame, self.buffer = self.buffer.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
                if fields.get("event") == "snapshot":
                    return json.loads(fields["data"])
            assert time.monotonic() < deadline, "no snapshot in time"
            chunk = self.resp.read1(65536)
            if not chunk:
                return None
            self.buffer += chunk.decode()

    def close(self) -> None:
        self.conn.close()


def test_a_change_is_pushed_on_the_stream(ca_factory):
    ca = ca_factory("--console", "127.0.0.1:0")
    events = Events(console_url(ca))
    try:
        assert events.resp.status == 200
        assert events.resp.getheader("content-type") == "text/event-stream"
        first = events.next_snapshot()
        assert first["trust_domain"] == "example.org" and first["entries"] == []
        ca.cli(
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/pushed",
            "--parent-id",
            "spiffe://example.org/agent/node-1",
            "--selector",
            "unix:uid:1000",
        )
        created = time.monotonic()
        while True:
            snap = events.next_snapshot(timeout=5)
            assert snap is not None
            if snap["entries"]:
                break
        assert time.monotonic() - created < 3  # pushed on the next poll, not on a timer
        [entry] = snap["entries"]
        assert entry["spiffe_id"] == "spiffe://example.org/pushed"
        assert entry["selectors"] == ["unix:uid:1000"]
    finally:
        events.close()


def test_streams_are_bounded_and_end_when_the_ca_drains(ca_factory):
    ca = ca_factory("--console", "127.0.0.1:0")
    url = console_url(ca)
    streams = [Events(url) for _ in range(MAX_STREAMS)]
    try:
        for s in streams:
            assert s.next_snapshot() is not None
        extra = Events(url)
        assert extra.resp.status == 503
        assert "console streams" in json.loads(extra.resp.read())["error"]
        extra.close()
        ca.daemon.signal(signal.SIGTERM)
        started = time.monotonic()
        for s in streams:
            while s.next_snapshot(timeout=8) is not None:
                pass
        assert time.monotonic() - started < 5  # ended by the drain, not by its deadline
        assert ca.daemon.proc.wait(10) == 0
    finally:
        for s in streams:
            s.close()


def test_the_page_is_served_with_a_strict_policy_and_only_to_loopback_names(ca_factory):
    ca = ca_factory("--console", "127.0.0.1:0")
    host, port = console_url(ca).split("//", 1)[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200 and '<svg id="timeline"' in page
    csp = resp.getheader("content-security-policy") or ""
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "innerHTML" not in page  # data goes in with textContent only
    conn.request("POST", "/api/snapshot", body=b"{}")
    assert conn.getresponse().status == 405
    conn.close()
    # A page that rebinds its own name to 127.0.0.1 cannot read the console.
    rebound = http.client.HTTPConnection(host, int(port), timeout=10)
    rebound.request("GET", "/api/snapshot", headers={"Host": f"attacker.example:{port}"})
    assert rebound.getresponse().status == 421
    rebound.close()


def test_off_loopback_without_client_certificates_the_ca_refuses_to_start(tmp_path):
    result = run_cli(
        "ca",
        "run",
        "--trust-domain",
        "example.org",
        "--data-dir",
        str(tmp_path / "ca"),
        "--admin-socket",
        str(tmp_path / "admin.sock"),
        "--listen",
        "127.0.0.1:0",
        "--console",
        "0.0.0.0:0",
        timeout=30,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "not a loopback address" in lines[0] and "console_admin_id" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ca").exists()  # refused before anything was created


def _mint(ca, sid: str, out: Path) -> Path:
    ca.cli("x509", "mint", "--spiffe-id", sid, "--ttl", "1h", "--out", str(out))
    return out


def _get(port: int, client: Path | None, bundle: Path) -> tuple[int, bytes]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # an X.509-SVID names a SPIFFE ID, not a host
    ctx.load_verify_locations(bundle)
    if client is not None:
        ctx.load_cert_chain(client / "svid.pem", client / "key.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET /api/snapshot HTTP/1.1\r\nHost: console\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                piece = tls.recv(65536)
                if not piece:
                    break
                data += piece
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0
    return status, data


def test_off_loopback_the_console_takes_only_an_admin_client_certificate(ca_factory, tmp_path):
    ca = ca_factory()
    server = _mint(ca, "spiffe://example.org/tally/console", tmp_path / "console")
    admin = _mint(ca, "spiffe://example.org/ops/alice", tmp_path / "alice")
    other = _mint(ca, "spiffe://example.org/ops/mallory", tmp_path / "mallory")
    ca.restart(
        "--console",
        "0.0.0.0:0",
        "--console-cert",
        str(server / "svid.pem"),
        "--console-key",
        str(server / "key.pem"),
        "--console-admin-id",
        "spiffe://example.org/ops/alice",
    )
    url = console_url(ca)
    assert url.startswith("https://")
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    bundle = server / "bundle.pem"
    status, body = _get(port, admin, bundle)
    assert status == 200 and b'"trust_domain":"example.org"' in body
    for client in (other, None):
        try:
            status, _ = _get(port, client, bundle)
        except (ssl.SSLError, OSError):
            status = 0
        assert status == 0, f"{client} was let in"
    denied = ca.daemon.events("console.denied")
    assert denied and any("mallory" in str(line.get("peer_id")) for line in denied)
