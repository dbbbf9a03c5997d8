"""TCP mode end to end: app -> client proxy -> server proxy -> echo, over TCP and Unix sockets."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.proxy.backends import blob

pytestmark = pytest.mark.e2e


def echo_through(address: str | tuple[str, int], payload: bytes) -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(address)
        got: list[bytes] = []

        def read() -> None:
            while data := sock.recv(65536):
                got.append(data)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the half-close travels through both proxies
        reader.join(20)
        assert not reader.is_alive()
    return b"".join(got)


@pytest.fixture(scope="module")
def tcp_mesh(certs, tcp_server_proxy):
    from tests.proxy.conftest import launch

    client = launch(
        "client",
        "--target",
        tcp_server_proxy.listen,
        "--expect-id",
        "spiffe://example.org/api",
        *certs["web"].files(),
    )
    yield client
    client.daemon.stop()


def test_tcp_mesh_echoes_and_passes_half_close(tcp_mesh, tcp_server_proxy):
    payload = blob(3 * 1024 * 1024 + 7)
    assert echo_through(("127.0.0.1", tcp_mesh.port), payload) == payload
    assert tcp_server_proxy.metric("tally_proxy_bytes_total", direction="to_target") >= len(payload)


def test_tcp_mesh_many_concurrent_connections_resume_sessions(tcp_mesh, tcp_server_proxy):
    payloads = [blob(10_000 + i) for i in range(20)]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda p: echo_through(("127.0.0.1", tcp_mesh.port), p), payloads))
    assert results == payloads
    # The client proxy keeps the server's session: later connections skip certificate work.
    assert tcp_server_proxy.metric("tally_proxy_handshakes_total", outcome="resumed") >= 1


class UnixEcho:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)


def test_unix_sockets_for_listen_and_target(start_proxy, certs):
    short = Path(tempfile.mkdtemp(prefix="tp", dir="/tmp"))  # sun_path is 108 bytes
    try:
        echo = UnixEcho(str(short / "echo.sock"))
        server = start_proxy(
            "server",
            "--target",
            f"unix:{short / 'echo.sock'}",
            "--allow-trust-domain",
            "example.org",
            *certs["api"].files(),
            listen=str(short / "server.sock"),
        )
        client = start_proxy(
            "client",
            "--target",
            server.listen,
            "--expect-id",
            "spiffe://example.org/api",
            *certs["web"].files(),
            listen=f"unix:{short / 'app.sock'}",
        )
        assert server.listen == str(short / "server.sock")
        assert echo_through(str(short / "app.sock"), b"over unix sockets") == b"over unix sockets"
        client.daemon.stop()
        assert not (short / "app.sock").exists()
        echo.sock.close()
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.parametrize(("groups", "shown"), [("P-256", "ECDH, prime256v1"), ("X25519", "X25519")])
def test_tls_groups_choose_the_key_exchange(start_proxy, certs, echo_backend, groups, shown):
    """openssl s_client (OpenSSL 3.0) offers X25519 first; the server's list decides."""
    proxy = start_proxy(
        "server",
        "--target",
        echo_backend.address,
        "--allow-id",
        "spiffe://example.org/web",
        "--tls-groups",
        groups,
        *certs["api"].files(),
    )
    web = certs["web"]
    result = subprocess.run(
        [
            *("openssl", "s_client", "-brief", "-verify_return_error"),
            *("-connect", f"127.0.0.1:{proxy.port}", "-cert", str(web.cert)),
            *("-key", str(web.key), "-CAfile", str(web.bundle)),
        ],
        input=b"",
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert b"Verification: OK" in result.stderr, result.stderr
    assert f"Server Temp Key: {shown}".encode() in result.stderr, result.stderr
