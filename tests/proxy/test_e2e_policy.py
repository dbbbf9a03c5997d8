"""Rotation policy end to end: real proxies refuse long-lived and stale peers, in both modes,
close a connection when its peer gets too old, and take a new policy on SIGHUP."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.pki import Authority, now
from tests.proxy.conftest import (
    Minted,
    Running,
    client_context,
    launch,
    tls_connect,
    wait_until,
)

pytestmark = pytest.mark.e2e

MAX_AGE = 1800  # 30 min, given in the TOML file
MAX_LIFETIME = "2h"  # given as a flag


@pytest.fixture(scope="module")
def pki() -> Authority:
    return Authority.create("example.org")


def minted(pki: Authority, base: Path, name: str, *, issued_ago: float, lives: float) -> Minted:
    t = now()
    nb = t - timedelta(seconds=issued_ago)
    svid = pki.svid(
        f"spiffe://example.org/{name}", not_before=nb, not_after=nb + timedelta(seconds=lives)
    )
    svid.write(base / name, pki.bundle)
    return Minted(base / name, f"spiffe://example.org/{name}", format(svid.leaf.serial_number, "x"))


@pytest.fixture(scope="module")
def server(pki, echo_backend, tmp_path_factory) -> Iterator[tuple[Running, Path]]:
    base = tmp_path_factory.mktemp("policy")
    api = minted(pki, base, "api", issued_ago=60, lives=3600)
    config = base / "proxy.toml"
    config.write_text(f"max_peer_age = {MAX_AGE}\n")
    proxy = launch(
        "server",
        "--config",
        str(config),
        "--target",
        echo_backend.address,
        "--allow-trust-domain",
        "example.org",
        "--max-peer-lifetime",
        MAX_LIFETIME,
        *api.files(),
    )
    yield proxy, base
    proxy.daemon.stop()


def echo(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes:
    """Send ``payload`` and read its echo, or b"" when the proxy refused the peer."""
    try:
        with tls_connect(port, ctx) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload) and (data := sock.recv(65536)):
                got += data
            return got
    except (ssl.SSLError, ConnectionError):
        return b""


def denied_with(proxy: Running, reason: str, attempt) -> dict:
    before = len(proxy.daemon.events("peer.denied"))
    assert attempt() == b""
    line = proxy.denied(count=before + 1)
    assert line["reason"] == reason, line
    return line


def test_compliant_long_lived_and_stale_peers(server, pki):
    proxy, base = server
    fresh = minted(pki, base, "fresh", issued_ago=60, lives=3600)
    assert echo(proxy.port, client_context(fresh, fresh.bundle)) == b"ping"

    long = minted(pki, base, "long", issued_ago=60, lives=30 * 86400)
    line = denied_with(
        proxy,
        "lifetime_exceeds_policy",
        lambda: echo(proxy.port, client_context(long, long.bundle)),
    )
    assert line["peer_id"] == "spiffe://example.org/long"
    assert "max_peer_lifetime 7200s" in line["detail"]

    stale = minted(pki, base, "stale", issued_ago=MAX_AGE + 600, lives=3600)
    line = denied_with(
        proxy, "stale_certificate", lambda: echo(proxy.port, client_context(stale, stale.bundle))
    )
    assert line["peer_id"] == "spiffe://example.org/stale" and line["mode"] == "server"

    assert proxy.metric("tally_proxy_peer_denied_total", reason="lifetime_exceeds_policy") == 1
    assert proxy.metric("tally_proxy_peer_denied_total", reason="stale_certificate") == 1
    assert proxy.metric("tally_proxy_peer_cert_age_seconds_count") >= 3
    # the fresh peer's 1 h certificate, and the 30-day one, land in their buckets
    assert proxy.metric("tally_proxy_peer_cert_remaining_seconds_bucket", le="3600") >= 2
    assert proxy.metric("tally_proxy_peer_cert_remaining_seconds_bucket", le="2.592e+06") >= 3


def test_an_open_connection_is_closed_when_its_peer_gets_too_old(server, pki):
    proxy, base = server
    nearly = minted(pki, base, "nearly", issued_ago=MAX_AGE - 3, lives=3600)
    before = len(proxy.daemon.events("connection.peer_expired"))
    with tls_connect(proxy.port, client_context(nearly, nearly.bundle)) as sock:
        sock.sendall(b"still here")
        assert sock.recv(100) == b"still here"  # admitted: it is not too old yet
        started = time.monotonic()
        sock.settimeout(10)
        try:
            assert sock.recv(100) == b""  # ... and cut when it gets there, not at expiry
        except (ssl.SSLError, ConnectionError):
            pass
        assert time.monotonic() - started < 6
    line = proxy.daemon.wait_for("connection.peer_expired", timeout=5, count=before + 1)
    assert line["peer_id"] == "spiffe://example.org/nearly"


def test_a_client_proxy_refuses_a_stale_server(pki, echo_backend, tmp_path, start_proxy):
    old_api = minted(pki, tmp_path, "api", issued_ago=MAX_AGE + 600, lives=3600)
    web = minted(pki, tmp_path, "web", issued_ago=60, lives=3600)
    server = start_proxy(
        "server", "--target", echo_backend.address, "--allow-id", web.spiffe_id, *old_api.files()
    )
    client = start_proxy(
        "client",
        "--target",
        server.listen,
        "--expect-id",
        old_api.spiffe_id,
        "--max-peer-age",
        f"{MAX_AGE}s",
        *web.files(),
    )
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as sock:
        sock.sendall(b"ping")
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass  # closed with "ping" unread
    line = client.denied()
    assert line["reason"] == "stale_certificate" and line["mode"] == "client"
    assert line["peer_id"] == old_api.spiffe_id
    assert client.metric("tally_proxy_peer_denied_total", reason="stale_certificate") == 1


def test_sighup_applies_a_new_policy_and_hooks_to_the_next_handshake(server, pki):
    """The reload also adds a ``[[hooks]]`` table: the refusal it causes runs the hook."""
    proxy, base = server
    ten_minutes_old = minted(pki, base, "tenmin", issued_ago=600, lives=3600)
    ctx = client_context(ten_minutes_old, ten_minutes_old.bundle)
    assert echo(proxy.port, ctx) == b"ping"
    out = base / "denied.jsonl"
    append = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read())"
    (base / "proxy.toml").write_text(
        'max_peer_age = "5m"\n\n[[hooks]]\non = ["peer.denied"]\n'
        f"command = {json.dumps([sys.executable, '-c', append])}\n"
    )
    proxy.daemon.signal(signal.SIGHUP)
    proxy.daemon.wait_for("config.reloaded", timeout=5)
    try:
        denied_with(proxy, "stale_certificate", lambda: echo(proxy.port, ctx))
        wait_until(
            lambda: out.exists() and out.read_text().endswith("\n"),
            timeout=5,
            what="the hook's whole line",
        )
        doc = json.loads(out.read_text().splitlines()[0])
        assert doc["daemon"] == "proxy" and doc["event"] == "peer.denied"
        assert doc["identity"] == ten_minutes_old.spiffe_id
        assert doc["reason"] == "stale_certificate" and doc["detail"]["mode"] == "server"
    finally:
        (base / "proxy.toml").write_text(f"max_peer_age = {MAX_AGE}\n")
        proxy.daemon.signal(signal.SIGHUP)
        proxy.daemon.wait_for("config.reloaded", timeout=5, count=2)
