"""The processes of the proxy benchmark: packages, certificates, nginx and three proxy pairs.

Rules / theory of operation: every contender gets the same path and the same
credentials, so the table compares proxies and nothing else.  One real
`tally ca run` mints an EC P-256 SVID for the client side and one for the
server side; Tally, stunnel and HAProxy all load those very files and speak
TLS 1.3 only, with the same cipher suites in the same order (Tally's:
AES-128-GCM first, as Go and BoringSSL), so that all three encrypt alike.  Key
exchange is each one's own: Tally's post-quantum hybrid X25519MLKEM768, which
costs more per handshake, against plain X25519 for the two on OpenSSL 3.0.
Each contender is two processes, an outbound (client) proxy and
an inbound (server) proxy, as two sidecars would be, in front of one shared
nginx.  Each runs with its own defaults for threads (Tally: one thread per
process; stunnel: a thread per connection; HAProxy: one thread per core) and
with per-connection logging off, since Tally's access log is off too.
stunnel and HAProxy verify the chain only (neither can pin a SPIFFE ID);
Tally also checks the peer's SPIFFE ID on both sides, so it does a little
more work per handshake.  Every process started here is registered on an
`ExitStack` before anything else can fail, so it is stopped on every exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import OpenSSL
import trio
from OpenSSL import SSL

from bench.ca_daemon import TRUST_DOMAIN, ca_daemon
from tally.app.launch import Daemon, run_cli
from tally.tls.contexts import CIPHERSUITES as _SUITES

CIPHERSUITES = _SUITES.decode()

CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/server"
SMALL_BODY = 100
BIG_BODY = 1 << 20
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

# Debian package -> the binary it provides.
PACKAGES = {"stunnel4": "stunnel4", "haproxy": "haproxy", "nginx-light": "nginx", "wrk": "wrk"}
_SBIN_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"))


class SetupError(RuntimeError):
    """The benchmark could not build its stack (a package, a process, a certificate)."""


@dataclass(frozen=True)
class Binaries:
    stunnel: str
    haproxy: str
    nginx: str
    wrk: str


@dataclass(frozen=True)
class Credentials:
    """Directories holding svid.pem, key.pem and bundle.pem, as `tally ca x509 mint` writes them."""

    client: Path
    server: Path


@dataclass(frozen=True)
class Pair:
    """One contender: the port the load generator talks to and the proxies' process ids."""

    name: str
    port: int
    pids: tuple[int, ...]
    """Outbound first, then inbound; empty for the direct (no proxy) baseline."""
    inbound_metrics: str | None = None
    """Tally only: the inbound proxy's /metrics address."""
    workloads: tuple[int, ...] = (1, 2, 3)
    """The workloads (bench.proxy's numbers) this contender runs."""


def _which(binary: str) -> str | None:
    return shutil.which(binary, path=_SBIN_PATH)


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        ["apt-get", *args], capture_output=True, text=True, env=env, check=False, timeout=900
    )


def ensure_packages() -> Binaries:
    """Install whatever of stunnel4, haproxy, nginx-light and wrk is missing, from Debian.

    ``apt-get update`` runs only when a plain install fails, so a warm machine
    never touches the network.
    """
    missing = [pkg for pkg, binary in PACKAGES.items() if _which(binary) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise SetupError(f"missing {', '.join(missing)} and no apt-get to install them")
        result = _apt("install", "-y", "--no-install-recommends", *missing)
        if result.returncode != 0:
            _apt("update")
            result = _apt("install", "-y", "--no-install-recommends", *missing)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-3:]
            raise SetupError(f"apt-get install {' '.join(missing)} failed: {' / '.join(tail)}")
    found = {binary: _which(binary) for binary in PACKAGES.values()}
    absent = [binary for binary, path in found.items() if path is None]
    if absent:
        raise SetupError(f"still missing after apt-get install: {', '.join(absent)}")
    return Binaries(
        stunnel=str(found["stunnel4"]),
        haproxy=str(found["haproxy"]),
        nginx=str(found["nginx"]),
        wrk=str(found["wrk"]),
    )


def _version(argv: list[str], *markers: str) -> str:
    """The output lines of a ``-version``-style command that contain the markers, joined."""
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    lines = (out.stdout + out.stderr).splitlines()
    found = [next((ln.strip() for ln in lines if m in ln), f"no {m!r}") for m in markers]
    return "; ".join(found)


def versions(bins: Binaries) -> list[str]:
    tally_ssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return [
        _version([bins.stunnel, "-version"], "stunnel ", "Running"),
        _version([bins.haproxy, "-vv"], "HAProxy version", "Running on OpenSSL"),
        _version([bins.nginx, "-v"], "nginx version"),
        _version([bins.wrk, "-v"], "wrk "),
        f"tally proxy: pyOpenSSL {OpenSSL.__version__} over trio {trio.__version__},"
        f" {tally_ssl} (the cryptography wheel's)",
    ]


def free_port() -> int:
    """A port nobody listens on right now (for daemons that cannot report a bound port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SetupError(f"no VmRSS for pid {pid}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system seconds of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def host_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (user, nice, system, irq, softirq), all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / _TICK


def mint_credentials(work: Path) -> Credentials:
    """Start a real CA, mint the two SVIDs (1 h), and stop the CA: it has no part in the runs."""
    ca, admin = ca_daemon(work)
    with contextlib.ExitStack() as ca_scope:
        ca_scope.callback(ca.stop)
        ca.start("ca.started")
        dirs = {}
        for side, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
            out = work / side
            out.mkdir()
            result = run_cli(
                "ca", "x509", "mint", "--spiffe-id", spiffe_id, "--ttl", "1h", "--out", str(out),
                "--admin-socket", admin, "--output", "json",
            )  # fmt: skip
            if result.returncode != 0:
                raise SetupError(f"minting {spiffe_id} failed: {result.stderr.strip()}")
            # HAProxy wants certificate and key in one file.
            (out / "haproxy.pem").write_text(
                (out / "svid.pem").read_text() + (out / "key.pem").read_text()
            )
            dirs[side] = out
    return Credentials(client=dirs["client"], server=dirs["server"])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise SetupError(f"{name} exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SetupError(f"{name} not listening on {port}: {_tail(log)}") from None
            time.sleep(0.05)


def _tail(log: Path) -> str:
    try:
        return " / ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    except OSError:
        return "(no log)"


def _spawn(
    stack: contextlib.ExitStack, name: str, argv: list[str], work: Path, port: int
) -> subprocess.Popen[bytes]:
    """Start a foreground daemon with its output in a file; stopped when the stack unwinds."""
    log = work / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    stack.callback(_stop, proc)
    _wait_listening(port, proc, log, name)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_daemon(stack: contextlib.ExitStack, daemon: Daemon) -> dict[str, str]:
    stack.callback(daemon.stop, STOP_TIMEOUT_S)
    return daemon.start("proxy.started", READY_TIMEOUT_S)


@dataclass(frozen=True)
class Backend:
    port: int
    pid: int


def start_nginx(stack: contextlib.ExitStack, bins: Binaries, work: Path) -> Backend:
    """nginx, one worker, static files: a backend far faster than any proxy in front of it."""
    root = work / "www"
    root.mkdir()
    (root / "small").write_bytes(b"x" * SMALL_BODY)
    (root / "big").write_bytes(os.urandom(BIG_BODY))
    port = free_port()
    temp = work / "nginx-temp"
    temp.mkdir()
    conf = work / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_temp_path {temp};
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
    }}
}}
""")
    proc = _spawn(stack, "nginx", [bins.nginx, "-p", str(work), "-c", str(conf)], work, port)
    return Backend(port, proc.pid)


def start_tally(
    stack: contextlib.ExitStack,
    creds: Credentials,
    backend: int,
    *,
    http: bool,
    groups: str | None = None,
    workloads: tuple[int, ...] = (1, 2, 3),
    workers: int = 1,
) -> Pair:
    """Tally's pair; ``groups`` replaces its key exchange groups (``--tls-groups``), and
    ``workers`` runs each proxy as that many processes (``--workers``)."""
    mode = ["--http"] if http else []
    if groups is not None:
        mode += ["--tls-groups", groups]
    if workers > 1:
        mode += ["--workers", str(workers)]
    common = ["--no-access-log", "--max-connections", "8192", "--drain-timeout", "2s", *mode]
    inbound = Daemon(
        "tally-inbound",
        [
            "proxy", "server", "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{backend}",
            "--cert", str(creds.server / "svid.pem"), "--key", str(creds.server / "key.pem"),
            "--bundle", str(creds.server / "bundle.pem"), "--allow-id", CLIENT_ID,
            "--metrics", "127.0.0.1:0", *common,
        ],
    )  # fmt: skip
    started_in = _start_daemon(stack, inbound)
    outbound = Daemon(
        "tally-outbound",
        [
            "proxy", "client", "--listen", "127.0.0.1:0", "--target", started_in["listen"],
            "--cert", str(creds.client / "svid.pem"), "--key", str(creds.client / "key.pem"),
            "--bundle", str(creds.client / "bundle.pem"), "--expect-id", SERVER_ID, *common,
        ],
    )  # fmt: skip
    started_out = _start_daemon(stack, outbound)
    port = int(started_out["listen"].rsplit(":", 1)[1])
    name = ("tally http" if http else "tally tcp") + (f" {groups.lower()}" if groups else "")
    if workers > 1:
        name += f" x{workers}"
    pids = (outbound.pid, inbound.pid)
    if workers > 1:  # the supervisors first, then their workers: CPU is summed over all
        pids += (*started_out["pids"], *started_in["pids"])
    return Pair(name, port, pids, started_in["metrics"], workloads)


def start_stunnel(
    stack: contextlib.ExitStack, bins: Binaries, creds: Credentials, work: Path, backend: int
) -> Pair:
    inbound_port, outbound_port = free_port(), free_port()
    common = (
        "sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nverifyChain = yes\n"
        f"ciphersuites = {CIPHERSUITES}\n"
    )
    head = "foreground = yes\npid =\ndebug = 3\n"
    server = work / "stunnel-inbound.conf"
    server.write_text(
        f"{head}[inbound]\naccept = 127.0.0.1:{inbound_port}\nconnect = 127.0.0.1:{backend}\n"
        f"cert = {creds.server}/svid.pem\nkey = {creds.server}/key.pem\n"
        f"CAfile = {creds.server}/bundle.pem\nrequireCert = yes\n{common}"
    )
    client = work / "stunnel-outbound.conf"
    client.write_text(
        f"{head}[outbound]\nclient = yes\naccept = 127.0.0.1:{outbound_port}\n"
        f"connect = 127.0.0.1:{inbound_port}\n"
        f"cert = {creds.client}/svid.pem\nkey = {creds.client}/key.pem\n"
        f"CAfile = {creds.client}/bundle.pem\n{common}"
    )
    proc_in = _spawn(stack, "stunnel-inbound", [bins.stunnel, str(server)], work, inbound_port)
    proc_out = _spawn(stack, "stunnel-outbound", [bins.stunnel, str(client)], work, outbound_port)
    return Pair("stunnel", outbound_port, (proc_out.pid, proc_in.pid))


_HAPROXY_HEAD = """global
    maxconn 8000
defaults
    mode tcp
    timeout connect 10s
    timeout client 600s
    timeout server 600s
"""


# HTTP mode's like-for-like: the inbound replaces any client-sent X-Forwarded-Client-Cert
# with its own, naming the caller by a hash of its certificate and its subject (HAProxy
# 2.6 has no fetch for URI SANs, so not by SPIFFE ID).  Connections to the next hop are
# kept alive and reused across clients (HAProxy's defaults, `http-reuse safe`), as
# Tally's pool does.
_HAPROXY_XFCC = (
    '    http-request set-header X-Forwarded-Client-Cert "Hash=%[ssl_c_der,sha2(256),hex]'
    ';Subject=\\"%[ssl_c_s_dn]\\""\n'
)


def start_haproxy(
    stack: contextlib.ExitStack,
    bins: Binaries,
    creds: Credentials,
    work: Path,
    backend: int,
    *,
    http: bool = False,
) -> Pair:
    """HAProxy's pair in ``mode tcp``, or with ``http`` in ``mode http`` adding a client
    certificate header (the like-for-like contender of Tally's HTTP mode)."""
    inbound_port, outbound_port = free_port(), free_port()
    tls13 = f"ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3 ciphersuites {CIPHERSUITES}"
    head = _HAPROXY_HEAD.replace("mode tcp", "mode http") if http else _HAPROXY_HEAD
    name = "haproxy http" if http else "haproxy"
    tag = name.replace(" ", "-")
    server = work / f"{tag}-inbound.cfg"
    server.write_text(
        f"{head}frontend inbound\n"
        f"    bind 127.0.0.1:{inbound_port} ssl crt {creds.server}/haproxy.pem"
        f" ca-file {creds.server}/bundle.pem verify required {tls13}\n"
        f"{_HAPROXY_XFCC if http else ''}"
        f"    default_backend nginx\nbackend nginx\n    server nginx 127.0.0.1:{backend}\n"
    )
    client = work / f"{tag}-outbound.cfg"
    client.write_text(
        f"{head}frontend outbound\n    bind 127.0.0.1:{outbound_port}\n"
        f"    default_backend mesh\nbackend mesh\n"
        f"    server inbound 127.0.0.1:{inbound_port} ssl crt {creds.client}/haproxy.pem"
        f" ca-file {creds.client}/bundle.pem verify required {tls13}\n"
    )
    argv = [bins.haproxy, "-db", "-f"]
    proc_in = _spawn(stack, f"{tag}-inbound", [*argv, str(server)], work, inbound_port)
    proc_out = _spawn(stack, f"{tag}-outbound", [*argv, str(client)], work, outbound_port)
    return Pair(name, outbound_port, (proc_out.pid, proc_in.pid))
