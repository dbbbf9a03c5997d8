"""`tally demo`: the whole system on loopback, rotating while you watch.

The demo drives Tally only through what an operator has: the daemons as child
processes (`tally.app.launch`), the `tally` CLI, and the Workload API.  It imports
no role, so it shows exactly what a user would see.  Whatever it started is
stopped on the way out, also on Ctrl-C, and its temporary directory removed.

The picture it builds:

    traffic -> frontend (HTTP) -> client proxy ==mTLS==> server proxy -> backend (HTTP)

with SVIDs that live a few seconds and one signing-key rotation half way, so
identities are replaced many times while requests keep succeeding.  The CA's web
console (`tally ca run --console`) is the first thing printed: the rotations, the
key schedule and the audit chain are drawn there live while the demo runs.  Then
the same frontend reaches a service that understands only bearer tokens, through
a client proxy that puts a JWT-SVID on each request and a server proxy that, like
a TLS-terminating load balancer, asks for no client certificate:

    frontend -> client proxy (--inject-jwt) ==TLS==> server proxy (--require-jwt,
    --no-client-cert) -> token-only service (checks the JWT-SVID itself)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trio

from tally.app.launch import Daemon, DaemonError, run_cli
from tally.ops.clock import wall_clock
from tally.ops.errors import CommandError
from tally.spiffe import jwt
from tally.spiffe.spiffeid import TrustDomain
from tally.wire import workload_client

TD = "demo.tally"
FRONTEND = f"spiffe://{TD}/frontend"
BACKEND = f"spiffe://{TD}/backend"
AGENT = f"spiffe://{TD}/agent/node-1"
SVID_TTL = "8s"
AUDIENCE = "orders-api"


@dataclass
class Tally:
    """What the traffic threads count and the view shows."""

    ok: int = 0
    failed: int = 0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool, error: str = "") -> None:
        with self.lock:
            if ok:
                self.ok += 1
            else:
                self.failed += 1
                self.last_error = error


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        caller = self.headers.get("X-Forwarded-Client-Cert", "")
        uri = next((p[4:] for p in caller.split(";") if p.startswith("URI=")), "nobody")
        self._send(200, json.dumps({"order": self.path, "caller": uri}).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _token_service(keys: jwt.JwtBundle, audience: str) -> type[BaseHTTPRequestHandler]:
    class TokenService(_Backend):
        """Knows nothing of certificates: it trusts a JWT-SVID for its audience, checked
        against the CA's published JWT keys, and nothing else."""

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            try:
                svid = jwt.validate(auth.removeprefix("Bearer "), audience, [keys], time.time())
            except jwt.JwtError as exc:
                self._send(401, json.dumps({"refused": exc.reason}).encode())
                return
            self._send(
                200, json.dumps({"order": self.path, "caller": str(svid.spiffe_id)}).encode()
            )

    return TokenService


def _bearer_leg(frontend_port: int, gate: str, bundle: Path) -> tuple[int, int, str]:
    """Requests over the bearer path (ok, failed), and what a tokenless caller gets."""
    ok = failed = 0
    conn = http.client.HTTPConnection("127.0.0.1", frontend_port, timeout=10)
    for i in range(20):
        conn.request("GET", f"/bearer-{i}")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 200 and FRONTEND.encode() in body:
            ok += 1
        else:
            failed += 1
    conn.close()
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    host, port = gate.rsplit(":", 1)
    tls = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        tls.request("GET", "/orders/no-token")
        resp = tls.getresponse()
        resp.read()
        tokenless = f"{resp.status} ({resp.getheader('WWW-Authenticate')})"
    except (OSError, http.client.HTTPException) as exc:
        tokenless = type(exc).__name__
    finally:
        tls.close()
    return ok, failed, tokenless


def _frontend_handler(client_proxy: tuple[str, int]) -> type[BaseHTTPRequestHandler]:
    class Frontend(_Backend):
        """Calls the backend through its client proxy: no TLS, no credentials here."""

        def do_GET(self) -> None:
            conn = http.client.HTTPConnection(*client_proxy, timeout=10)
            try:
                conn.request("GET", f"/orders{self.path}")
                resp = conn.getresponse()
                body = resp.read()
                self._send(resp.status, body)
            except OSError as exc:
                self._send(502, json.dumps({"error": str(exc)}).encode())
            finally:
                conn.close()

    return Frontend


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _cli(admin: str, *args: str) -> Any:
    result = run_cli("ca", *args, "--admin-socket", admin, "--output", "json")
    if result.returncode != 0:
        raise CommandError(f"tally ca {' '.join(args)}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def _traffic(port: int, stop: threading.Event, tally: Tally, n: int) -> None:
    """One worker: keep-alive requests to the frontend, reconnecting when needed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    i = 0
    while not stop.is_set():
        i += 1
        try:
            conn.request("GET", f"/{n}-{i}")
            resp = conn.getresponse()
            body = resp.read()
            tally.add(
                resp.status == 200 and FRONTEND.encode() in body,
                body[:100].decode(errors="replace"),
            )
        except (OSError, http.client.HTTPException) as exc:
            tally.add(False, repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        time.sleep(0.02)
    conn.close()


def _identities(endpoint_socket: Path) -> list[tuple[str, str, float]]:
    async def fetch() -> workload_client.X509Context:
        return await workload_client.fetch_x509(endpoint_socket, timeout_s=3)

    try:
        ctx = trio.run(fetch)
    except (workload_client.WorkloadApiError, OSError, ValueError):
        return []
    now = wall_clock()
    return [
        (
            s.spiffe_id,
            format(s.leaf.serial_number, "x")[:12],
            (s.leaf.not_valid_after_utc - now).total_seconds(),
        )
        for s in ctx.svids
    ]


def _intruder_refused(out: Path, server_proxy: str) -> tuple[bool, str]:
    """A caller with a valid SVID for the wrong identity tries the server proxy."""
    host, port = server_proxy.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(out / "bundle.pem")
    ctx.load_cert_chain(out / "svid.pem", out / "key.pem")
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET /orders/steal HTTP/1.1\r\nHost: x\r\n\r\n")
            data = tls.recv(100)
            return (not data), data[:60].decode(errors="replace")
    except (ssl.SSLError, OSError) as exc:
        return True, type(exc).__name__


class View:
    """Redraws in place on a terminal; plain lines (every few seconds) with --no-live."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self.lines_drawn = 0
        self.last_plain = 0.0

    def show(self, lines: list[str]) -> None:
        if self.live:
            out = f"\x1b[{self.lines_drawn}F" if self.lines_drawn else ""
            out += "".join(f"\x1b[2K{line}\n" for line in lines)
            sys.stdout.write(out)
            sys.stdout.flush()
            self.lines_drawn = len(lines)
        elif time.monotonic() - self.last_plain >= 5:
            self.last_plain = time.monotonic()
            print(" | ".join(line.strip() for line in lines[1:4] if line.strip()), flush=True)


def run_demo(args: argparse.Namespace) -> int:
    live = not args.no_live and sys.stdout.isatty()
    workdir = Path(tempfile.mkdtemp(prefix="tally-demo-"))
    daemons: list[Daemon] = []
    servers: list[ThreadingHTTPServer] = []
    stop = threading.Event()

    def start(name: str, argv: list[str], ready: str) -> dict[str, Any]:
        daemon = Daemon(name, argv)
        daemons.append(daemon)
        return daemon.start(ready, timeout=30)

    try:
        admin = str(workdir / "ca-admin.sock")
        agent_sock = str(workdir / "agent.sock")
        ca = start(
            "ca",
            [
                "ca",
                "run",
                "--trust-domain",
                TD,
                "--data-dir",
                str(workdir / "ca"),
                "--listen",
                "127.0.0.1:0",
                "--admin-socket",
                admin,
                "--default-svid-ttl",
                SVID_TTL,
                "--intermediate-ttl",
                "10m",
                "--console",
                args.console,
            ],
            "ca.started",
        )
        print(f"Console: {ca['console']}  (open it to watch the identities rotate)", flush=True)
        print(f"== Tally demo in {workdir}")
        print(f"CA up for {TD} (agent API {ca['listen']}); SVIDs live {SVID_TTL}")
        (workdir / "bundle.pem").write_text(_cli(admin, "bundle", "show")["bundle"])
        token = _cli(admin, "token", "create", "--spiffe-id", AGENT)["token"]
        start(
            "agent",
            [
                "agent",
                "run",
                "--trust-domain",
                TD,
                "--server",
                ca["listen"],
                "--trust-bundle",
                str(workdir / "bundle.pem"),
                "--join-token",
                token,
                "--data-dir",
                str(workdir / "agent"),
                "--socket",
                agent_sock,
            ],
            "agent.started",
        )
        print(f"Agent attested as {AGENT} with a one-time join token")
        uid = f"unix:uid:{os.geteuid()}"
        for sid in (FRONTEND, BACKEND):
            _cli(
                admin,
                "entry",
                "create",
                "--spiffe-id",
                sid,
                "--parent-id",
                AGENT,
                "--selector",
                uid,
            )
        print(f"Registered {FRONTEND} and {BACKEND} for {uid}")

        backend = _serve(_Backend)
        servers.append(backend)
        server_proxy = start(
            "server-proxy",
            [
                "proxy",
                "server",
                "--listen",
                "127.0.0.1:0",
                "--target",
                f"127.0.0.1:{backend.server_port}",
                "--workload-socket",
                agent_sock,
                "--spiffe-id",
                BACKEND,
                "--allow-id",
                FRONTEND,
                "--http",
                "--no-access-log",
            ],
            "proxy.started",
        )
        client_proxy = start(
            "client-proxy",
            [
                "proxy",
                "client",
                "--listen",
                "127.0.0.1:0",
                "--target",
                server_proxy["listen"],
                "--workload-socket",
                agent_sock,
                "--spiffe-id",
                FRONTEND,
                "--expect-id",
                BACKEND,
                "--http",
                "--no-access-log",
            ],
            "proxy.started",
        )
        host, port = client_proxy["listen"].rsplit(":", 1)
        frontend = _serve(_frontend_handler((host, int(port))))
        servers.append(frontend)
        print(
            f"backend <- server proxy {server_proxy['listen']} <=mTLS= client proxy "
            f"{client_proxy['listen']} <- frontend :{frontend.server_port}"
        )
        print(
            "The services hold no certificate and no password;"
            " the proxies get theirs from the agent.\n"
        )

        tally = Tally()
        workers = [
            threading.Thread(
                target=_traffic, args=(frontend.server_port, stop, tally, n), daemon=True
            )
            for n in range(3)
        ]
        for w in workers:
            w.start()
        view = View(live)
        audit: deque[str] = deque(maxlen=4)
        started_at = time.monotonic()
        rotated_key = False
        last_audit = 0.0
        while (elapsed := time.monotonic() - started_at) < args.duration:
            if not rotated_key and elapsed >= args.duration / 2:
                _cli(admin, "rotate")
                rotated_key = True
            if time.monotonic() - last_audit > 2:
                last_audit = time.monotonic()
                for r in _cli(admin, "audit", "list", "--limit", "4")["records"]:
                    audit.append(f"#{r['seq']:<5} {r['event']:<15} {(r['spiffe_id'] or '')[:40]}")
            rotations = sum(len(d.events("svid.rotated")) for d in daemons)
            lines = [
                f"-- {elapsed:4.0f}s / {args.duration:.0f}s"
                + (" -- signing key rotated" if rotated_key else "")
            ]
            for sid, serial, left in _identities(Path(agent_sock)):
                lines.append(f"  {sid:<32} serial {serial}  expires in {left:4.1f}s")
            lines.append(f"  requests ok {tally.ok}  failed {tally.failed}   rotations {rotations}")
            lines += [f"  audit {a}" for a in list(audit)]
            view.show(lines)
            time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(15)

        out = workdir / "intruder"
        out.mkdir()
        _cli(
            admin,
            "x509",
            "mint",
            "--spiffe-id",
            f"spiffe://{TD}/intruder",
            "--ttl",
            "5m",
            "--out",
            str(out),
        )
        refused, how = _intruder_refused(out, server_proxy["listen"])
        denied = daemons[2].wait_for("peer.denied", timeout=5) if refused else {}

        # The bearer leg: the CA's JWT keys, as a relying party would fetch them.
        spiffe_bundle = run_cli(
            "ca", "bundle", "show", "--format", "spiffe", "--admin-socket", admin
        )
        keys = jwt.JwtBundle.from_jwks(TrustDomain.parse(TD), spiffe_bundle.stdout.encode())
        token_service = _serve(_token_service(keys, AUDIENCE))
        servers.append(token_service)
        gate = start(
            "bearer-gate",
            [
                "proxy",
                "server",
                "--http",
                "--no-access-log",
                "--listen",
                "127.0.0.1:0",
                "--target",
                f"127.0.0.1:{token_service.server_port}",
                "--workload-socket",
                agent_sock,
                "--spiffe-id",
                BACKEND,
                "--allow-id",
                FRONTEND,
                "--require-jwt",
                AUDIENCE,
                "--no-client-cert",
            ],
            "proxy.started",
        )
        bearer_client = start(
            "bearer-client",
            [
                "proxy",
                "client",
                "--http",
                "--no-access-log",
                "--listen",
                "127.0.0.1:0",
                "--target",
                gate["listen"],
                "--workload-socket",
                agent_sock,
                "--spiffe-id",
                FRONTEND,
                "--expect-id",
                BACKEND,
                "--inject-jwt",
                AUDIENCE,
            ],
            "proxy.started",
        )
        bhost, bport = bearer_client["listen"].rsplit(":", 1)
        bearer_frontend = _serve(_frontend_handler((bhost, int(bport))))
        servers.append(bearer_frontend)
        bearer_ok, bearer_failed, tokenless = _bearer_leg(
            bearer_frontend.server_port, gate["listen"], workdir / "bundle.pem"
        )
        verdict = _cli(admin, "audit", "verify")
        rotations = sum(len(d.events("svid.rotated")) for d in daemons)
        print()
        print(
            f"An SVID for spiffe://{TD}/intruder (valid, signed by this CA, wrong identity): "
            + (f"refused ({denied.get('reason', how)})" if refused else "ACCEPTED")
        )
        print(
            f"Summary: {tally.ok} requests ok, {tally.failed} failed, {rotations} certificate "
            f"rotations (agent and proxies), audit chain of {verdict['records']} records "
            + ("verified" if verdict["ok"] else f"BROKEN: {verdict['problem']}")
        )
        print(
            f"Bearer tokens: {bearer_ok} requests ok, {bearer_failed} failed, to a service that"
            f" checks only a JWT-SVID for {AUDIENCE!r}; a caller without one got {tokenless}"
        )
        if tally.failed:
            print(f"Last failure: {tally.last_error}")
        bearer = bearer_ok > 0 and not bearer_failed and tokenless.startswith("401")
        return 0 if verdict["ok"] and refused and tally.ok and not tally.failed and bearer else 1
    except DaemonError as exc:
        raise CommandError(f"demo: {exc}") from exc
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything")
        return 130
    finally:
        stop.set()
        for server in servers:
            server.shutdown()
            server.server_close()
        for daemon in reversed(daemons):
            daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run Tally on loopback and watch identities rotate")
    p.add_argument("--duration", type=float, default=60, help="seconds of traffic (default 60)")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of a live view")
    p.add_argument(
        "--console",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where the CA serves its web console (default: a free loopback port)",
    )
    p.set_defaults(func=run_demo)
