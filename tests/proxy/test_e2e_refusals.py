"""Every peer that must not get through is refused in the handshake, and says why in the log."""

from __future__ import annotations

import ssl
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from tally.spiffe import pem
from tests.proxy.conftest import client_context, http_over, tls_connect, wait_until

pytestmark = pytest.mark.e2e


def refused_with(proxy, reason: str, attempt) -> dict:
    """Run ``attempt`` (which must not get an HTTP answer); return the new peer.denied line."""
    before = len(proxy.daemon.events("peer.denied"))
    answer = attempt()
    assert not answer.startswith(b"HTTP/"), answer[:200]
    line = proxy.denied(count=before + 1)
    assert line["reason"] == reason, line
    return line


def via_stdlib(proxy, ctx: ssl.SSLContext) -> bytes:
    try:
        with tls_connect(proxy.port, ctx) as sock:
            return http_over(sock, "/must-not-arrive")
    except (ssl.SSLError, ConnectionError) as exc:
        return repr(exc).encode()


def test_disallowed_id_is_refused_and_named(http_server_proxy, http_backend, certs):
    evil = certs["evil"]
    line = refused_with(
        http_server_proxy,
        "not_allowed",
        lambda: via_stdlib(http_server_proxy, client_context(evil, evil.bundle)),
    )
    assert line["peer_id"] == "spiffe://example.org/evil"
    assert line["peer"].startswith("127.0.0.1:")
    assert not any(s.path == "/must-not-arrive" for s in http_backend.seen)
    assert http_server_proxy.metric("tally_proxy_peer_denied_total", reason="not_allowed") >= 1


def test_disallowed_id_is_refused_for_curl(http_server_proxy, certs):
    evil = certs["evil"]

    def attempt() -> bytes:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--resolve",
                f"localhost:{http_server_proxy.port}:127.0.0.1",
                "--cert",
                str(evil.cert),
                "--key",
                str(evil.key),
                "--cacert",
                str(evil.bundle),
                f"https://localhost:{http_server_proxy.port}/must-not-arrive",
            ],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert result.returncode != 0
        return result.stdout

    refused_with(http_server_proxy, "not_allowed", attempt)


def test_other_trust_domain_is_refused(http_server_proxy, certs):
    other = certs["other"]
    # The client trusts our CA (to get as far as it can); its own certificate is other.org's.
    ctx = client_context(other, certs["web"].bundle)
    refused_with(http_server_proxy, "untrusted", lambda: via_stdlib(http_server_proxy, ctx))


def test_expired_certificate_is_refused(http_server_proxy, certs):
    expired = certs["expired"]
    leaf = pem.chain_from_pem(expired.cert.read_bytes())[0]
    # OpenSSL compares whole seconds: the certificate is expired once notAfter's second is over.
    expired_at = leaf.not_valid_after_utc + timedelta(seconds=1)
    wait_until(lambda: datetime.now(UTC) >= expired_at, what="the 1s SVID to expire")
    ctx = client_context(expired, expired.bundle)
    refused_with(http_server_proxy, "expired", lambda: via_stdlib(http_server_proxy, ctx))


def test_no_client_certificate_is_refused(http_server_proxy, certs):
    def attempt() -> bytes:
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-quiet",
                "-connect",
                f"127.0.0.1:{http_server_proxy.port}",
                "-CAfile",
                str(certs["web"].bundle),
            ],
            input=b"GET /must-not-arrive HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert b"certificate required" in result.stderr
        return result.stdout

    line = refused_with(http_server_proxy, "no_certificate", attempt)
    assert line["peer_id"] is None


def test_tls12_only_client_is_refused(http_server_proxy, certs):
    ctx = client_context(certs["web"], certs["web"].bundle, maximum_version=ssl.TLSVersion.TLSv1_2)
    refused_with(http_server_proxy, "tls_version", lambda: via_stdlib(http_server_proxy, ctx))


def test_plain_http_to_the_tls_port_is_refused(http_server_proxy):
    import socket

    def attempt() -> bytes:
        with socket.create_connection(("127.0.0.1", http_server_proxy.port), timeout=10) as sock:
            return http_over(sock, "/must-not-arrive")

    refused_with(http_server_proxy, "not_tls", attempt)


def test_client_proxy_refuses_an_unexpected_server(start_proxy, http_server_proxy, certs):
    import http.client

    client = start_proxy(
        "client",
        "--target",
        http_server_proxy.listen,
        "--http",
        "--expect-id",
        "spiffe://example.org/billing",
        *certs["web"].files(),
    )
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    conn.request("GET", "/must-not-arrive")
    resp = conn.getresponse()
    assert resp.status == 502
    line = client.denied()
    assert line["reason"] == "not_allowed"
    assert line["peer_id"] == "spiffe://example.org/api"


def test_federated_trust_domain_is_trusted_only_for_its_own_ids(start_proxy, certs, echo_backend):
    """With other.org's bundle configured, its workload gets through when a rule names it."""
    proxy = start_proxy(
        "server",
        "--target",
        echo_backend.address,
        "--allow-id",
        "spiffe://other.org/web",
        "--federated-bundle",
        f"other.org={certs['other'].bundle}",
        *certs["api"].files(),
    )
    other = client_context(certs["other"], certs["web"].bundle)
    with tls_connect(proxy.port, other) as sock:
        sock.sendall(b"federated")
        assert sock.recv(100) == b"federated"
    web = client_context(certs["web"], certs["web"].bundle)
    line = refused_with(proxy, "not_allowed", lambda: via_stdlib(proxy, web))
    assert line["peer_id"] == "spiffe://example.org/web"
