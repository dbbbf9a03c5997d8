"""Real CAs, minted SVIDs, backends and `tally proxy` processes for the proxy's end-to-end tests.

Two CAs run for the whole session (example.org and other.org); every
certificate is minted by `tally ca x509 mint`.  Proxies are real
`tally proxy server|client` processes using the file source; a proxy is
ready when it logs ``proxy.started`` with the addresses it bound.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import pytest

from ca.cli import cmd_x509_mint
from tally.app.launch import Daemon
from tally.spiffe import pem
from tests.e2e.conftest import CA, make_ca
from tests.proxy.backends import EchoServer, HttpServer


@dataclass(frozen=True)
class Minted:
    dir: Path
    spiffe_id: str
    serial: str

    @property
    def cert(self) -> Path:
        return self.dir / "svid.pem"

    @property
    def key(self) -> Path:
        return self.dir / "key.pem"

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle.pem"

    def files(self) -> list[str]:
        return ["--cert", str(self.cert), "--key", str(self.key), "--bundle", str(self.bundle)]


def mint(ca: CA, out: Path, spiffe_id: str, ttl: str = "1h", dns: str | None = None) -> Minted:
    """`tally ca x509 mint`, run in this process (the command's own function, minus the
    interpreter start-up that a subprocess per certificate would cost this suite)."""
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        admin_socket=ca.admin_socket,
        spiffe_id=spiffe_id,
        ttl=ttl,
        dns_name=[dns] if dns else None,
        out=str(out),
        output="json",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert cmd_x509_mint(args) == 0
    leaf = pem.chain_from_pem((out / "svid.pem").read_bytes())[0]
    return Minted(out, spiffe_id, format(leaf.serial_number, "x"))


@pytest.fixture(scope="session")
def cas(tmp_path_factory) -> Iterator[dict[str, CA]]:
    base = tmp_path_factory.mktemp("cas")
    (base / "ex").mkdir()
    (base / "other").mkdir()
    with ThreadPoolExecutor(2) as pool:
        ex = pool.submit(make_ca, base / "ex", trust_domain="example.org")
        other = pool.submit(make_ca, base / "other", trust_domain="other.org")
        made = {"example.org": ex.result(), "other.org": other.result()}
    yield made
    for ca in made.values():
        ca.daemon.stop()


@pytest.fixture(scope="session")
def certs(cas, tmp_path_factory) -> dict[str, Minted]:
    base = tmp_path_factory.mktemp("certs")
    ex, other = cas["example.org"], cas["other.org"]
    wanted = {
        "api": (ex, "spiffe://example.org/api", "1h", "localhost"),
        "api2": (ex, "spiffe://example.org/api", "1h", "localhost"),
        "web": (ex, "spiffe://example.org/web", "1h", None),
        "evil": (ex, "spiffe://example.org/evil", "1h", None),
        "expired": (ex, "spiffe://example.org/web", "1s", None),
        "other": (other, "spiffe://other.org/web", "1h", None),
    }
    return {
        name: mint(ca, base / name, sid, ttl, dns) for name, (ca, sid, ttl, dns) in wanted.items()
    }


@pytest.fixture(scope="session")
def http_backend() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def echo_backend() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@dataclass
class Running:
    daemon: Daemon
    listen: str
    metrics: str

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (0 when the series does not exist yet)."""
        with urlopen(f"http://{self.metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        want = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
        )
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def denied(self, count: int = 1) -> dict:
        return self.daemon.wait_for("peer.denied", timeout=10, count=count)


def launch(mode: str, *args: str, listen: str = "127.0.0.1:0") -> Running:
    daemon = Daemon(
        f"proxy-{mode}",
        ["proxy", mode, "--listen", listen, "--metrics", "127.0.0.1:0", *args],
    )
    started = daemon.start("proxy.started")
    return Running(daemon, started["listen"], started["metrics"])


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., Running]]:
    """Start a proxy for one test; it is stopped (and must exit 0) at the end."""
    running: list[Running] = []

    def start(mode: str, *args: str, **kwargs: str) -> Running:
        proxy = launch(mode, *args, **kwargs)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        proxy.daemon.stop()


@pytest.fixture(scope="session")
def http_server_proxy(certs, http_backend) -> Iterator[Running]:
    """In front of the HTTP backend; admits spiffe://example.org/web only."""
    proxy = launch(
        "server",
        "--target",
        http_backend.address,
        "--http",
        "--allow-id",
        "spiffe://example.org/web",
        *certs["api"].files(),
    )
    yield proxy
    proxy.daemon.stop()


@pytest.fixture(scope="session")
def tcp_server_proxy(certs, echo_backend) -> Iterator[Running]:
    proxy = launch(
        "server",
        "--target",
        echo_backend.address,
        "--allow-id",
        "spiffe://example.org/web",
        *certs["api"].files(),
    )
    yield proxy
    proxy.daemon.stop()


def client_context(minted: Minted | None, bundle: Path, **kwargs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    for name, value in kwargs.items():
        setattr(ctx, name, value)
    if minted is not None:
        ctx.load_cert_chain(str(minted.cert), str(minted.key))
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def http_over(sock: socket.socket, path: str = "/", extra: str = "", close: bool = True) -> bytes:
    """Send one GET and read the response (to EOF when ``close``)."""
    conn = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{conn}{extra}\r\n".encode())
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    """Poll a condition of the outside world (a file, a clock) that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)
