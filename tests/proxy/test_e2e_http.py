"""HTTP mode end to end: curl, openssl and the stdlib through real proxies to a real backend."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tally.spiffe import pem
from tests.proxy.backends import blob
from tests.proxy.conftest import client_context, http_over, tls_connect, wait_until

pytestmark = pytest.mark.e2e


def leaf_sha256(minted) -> str:
    leaf = pem.chain_from_pem(minted.cert.read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


def curl(proxy, minted, path, *extra):
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            f"localhost:{proxy.port}:127.0.0.1",
            "--cert",
            str(minted.cert),
            "--key",
            str(minted.key),
            "--cacert",
            str(minted.bundle),
            *extra,
            f"https://localhost:{proxy.port}{path}",
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )


def test_curl_gets_through_and_the_backend_sees_only_our_xfcc(
    http_server_proxy, http_backend, certs
):
    result = curl(
        http_server_proxy,
        certs["web"],
        "/who?curl=1",
        "-H",
        "X-Forwarded-Client-Cert: By=spiffe://example.org/admin;URI=spiffe://example.org/admin",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["path"] == "/who?curl=1"
    seen = next(s for s in http_backend.seen if s.path == "/who?curl=1")
    assert seen.all("x-forwarded-client-cert") == [
        f"By=spiffe://example.org/api;Hash={leaf_sha256(certs['web'])};URI=spiffe://example.org/web"
    ]
    # The request line is held for at most `HELD_FLUSH_S` (`tally.ops.logs` rule 5).
    daemon = http_server_proxy.daemon
    wait_until(lambda: any(r["path"] == "/who?curl=1" for r in daemon.events("http.request")))
    line = next(r for r in daemon.events("http.request") if r["path"] == "/who?curl=1")
    assert {"method", "path", "status", "peer_id", "bytes_in", "bytes_out", "duration_ms"} <= set(
        line
    )
    assert line["status"] == 200
    assert line["peer_id"] == "spiffe://example.org/web"


def test_stdlib_ssl_client_gets_through(http_server_proxy, certs):
    ctx = client_context(certs["web"], certs["web"].bundle)
    with tls_connect(http_server_proxy.port, ctx) as sock:
        assert sock.version() == "TLSv1.3"
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        peer = x509.load_der_x509_certificate(der)
        assert format(peer.serial_number, "x") == certs["api"].serial
        response = http_over(sock, "/stdlib")
    assert response.startswith(b"HTTP/1.1 200 ")


def test_openssl_s_client_gets_through(http_server_proxy, certs):
    web = certs["web"]
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-connect",
            f"127.0.0.1:{http_server_proxy.port}",
            "-cert",
            str(web.cert),
            "-cert_chain",
            str(web.cert),
            "-key",
            str(web.key),
            "-CAfile",
            str(web.bundle),
        ],
        input=b"GET /openssl HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.stdout.startswith(b"HTTP/1.1 200 "), result.stderr


def test_keep_alive_serves_many_requests_on_one_connection(http_server_proxy, certs):
    ctx = client_context(certs["web"], certs["web"].bundle)
    before = http_server_proxy.metric("tally_proxy_connections_total")
    with tls_connect(http_server_proxy.port, ctx) as sock:
        conn = http.client.HTTPConnection("localhost")
        conn.sock = sock
        for i in range(5):
            conn.request("GET", f"/keepalive/{i}")
            resp = conn.getresponse()
            assert resp.status == 200
            assert json.loads(resp.read())["path"] == f"/keepalive/{i}"
    assert http_server_proxy.metric("tally_proxy_connections_total") == before + 1


@pytest.fixture(scope="module")
def mesh(certs, http_server_proxy):
    """app -> client proxy (HTTP) -> server proxy -> backend."""
    from tests.proxy.conftest import launch

    client = launch(
        "client",
        "--target",
        http_server_proxy.listen,
        "--http",
        "--expect-id",
        "spiffe://example.org/api",
        *certs["web"].files(),
    )
    yield client
    client.daemon.stop()


def test_mesh_reuses_upstream_connections_across_app_connections(mesh, http_server_proxy):
    handshakes_before = http_server_proxy.metric("tally_proxy_handshakes_total", outcome="ok")
    for i in range(6):  # a new local connection per request, as a naive app does
        conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
        conn.request("GET", f"/mesh/{i}")
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["path"] == f"/mesh/{i}"
        conn.close()
    assert mesh.metric("tally_proxy_pool_reused_total") >= 5
    assert mesh.metric("tally_proxy_pool_dialed_total") >= 1
    dialed = http_server_proxy.metric("tally_proxy_handshakes_total", outcome="ok")
    assert dialed - handshakes_before <= 1


@pytest.mark.parametrize("chunked", [False, True])
def test_large_bodies_stream_both_ways(mesh, chunked):
    size = 8 * 1024 * 1024 + 123
    body = blob(size)
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=20)
    if chunked:
        conn.request(
            "POST",
            "/upload",
            body=iter([body[i : i + 100_000] for i in range(0, size, 100_000)]),
            encode_chunked=True,
        )
    else:
        conn.request("POST", "/upload", body=body)
    answer = json.loads(conn.getresponse().read())
    assert answer["length"] == size
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    framing = dict(answer["headers"])
    assert ("transfer-encoding" in framing) == chunked
    conn.request("GET", f"/blob?size={size}&chunked={int(chunked)}")
    resp = conn.getresponse()
    assert resp.status == 200
    assert (resp.getheader("transfer-encoding") == "chunked") == chunked
    got = resp.read()
    assert len(got) == size and got == body
    conn.close()


def test_backend_statuses_and_errors_pass_through(mesh):
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
    conn.request("GET", "/x?status=404")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 404
    conn.request("HEAD", "/blob?size=1000")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-length") == "1000"
    assert resp.read() == b""
    conn.close()


def test_a_backend_closing_kept_alive_connections_costs_no_request(mesh, http_server_proxy):
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
    for i in range(4):
        conn.request("GET", f"/hangup/{i}?hangup=1")
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["path"] == f"/hangup/{i}?hangup=1"
    conn.close()
    assert http_server_proxy.metric("tally_proxy_http_requests_total", status="5xx") == 0
