"""Shared parts of the end-to-end mesh tests: a backend, the two proxies, HTTP load, log waits.

Rules / theory of operation: the rotation test and the fault drills put real
`tally proxy` processes between a load generator and a small HTTP service and
judge the system by what the load saw.  So the load is counted by outcome
(``ok``; a ``bad`` answer; ``refused``, ``closed`` before an answer or
``reset`` connections; anything else ``failed``), with the moment of each
failure kept, and can be awaited ("N more good answers") instead of slept on.
Waiting on daemons goes through their JSON log lines: an event that must
happen is awaited with a deadline, never guessed with a sleep.
"""

from __future__ import annotations

import http.client
import os
import shutil
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tally.app.launch import Daemon, DaemonError
from tests.e2e.conftest import CA, Agent, make_ca, start_agent

UID = os.geteuid()
FRONTEND = "spiffe://example.org/frontend"
BACKEND = "spiffe://example.org/backend"
SLOW_PREFIX = "/slow/"
REQUEST_TIMEOUT = 10.0


# -- the service behind the server proxy -------------------------------------------------


class Backend:
    """A threaded HTTP service: ``/slow/...`` answers after `slow_seconds`, the rest at once.

    It counts slow requests in progress so a test can wait until they are really
    in flight (past both proxies) before it disturbs anything.
    """

    def __init__(self, slow_seconds: float = 1.0) -> None:
        self.slow_seconds = slow_seconds
        self._cond = threading.Condition()
        self.slow_in_flight = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith(SLOW_PREFIX):
                    backend._slow(+1)
                    try:
                        time.sleep(backend.slow_seconds)  # the service's own latency
                    finally:
                        backend._slow(-1)
                xfcc = self.headers.get("X-Forwarded-Client-Cert", "-")
                body = f"hello {self.path} from {xfcc}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def _slow(self, delta: int) -> None:
        with self._cond:
            self.slow_in_flight += delta
            self._cond.notify_all()

    def wait_slow_in_flight(self, n: int, timeout: float = 10) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.slow_in_flight >= n, timeout), (
                f"only {self.slow_in_flight} of {n} slow requests reached the backend"
            )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the proxies --------------------------------------------------------------------------


@dataclass
class Proxy:
    daemon: Daemon
    listen: str
    metrics: str

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.listen.rsplit(":", 1)
        return host, int(port)


def start_proxy(name: str, args: list[str], timeout: float = 30) -> Proxy:
    """A started proxy, or an error with no process left behind."""
    daemon = Daemon(name, ["proxy", *args])
    try:
        started = daemon.start("proxy.started", timeout=timeout)
    except BaseException:
        daemon.stop()
        raise
    return Proxy(daemon, started["listen"], started["metrics"])


def server_proxy(socket: str, target: str, *extra: str, name: str = "server-proxy") -> Proxy:
    """In front of the backend, as BACKEND, admitting FRONTEND only."""
    return start_proxy(
        name,
        [
            "server",
            "--listen",
            "127.0.0.1:0",
            "--target",
            target,
            "--workload-socket",
            socket,
            "--spiffe-id",
            BACKEND,
            "--allow-id",
            FRONTEND,
            "--metrics",
            "127.0.0.1:0",
            *extra,
        ],
    )


def client_proxy(socket: str, target: str, *extra: str, name: str = "client-proxy") -> Proxy:
    """Beside the app, as FRONTEND, expecting BACKEND at ``target``."""
    return start_proxy(
        name,
        [
            "client",
            "--listen",
            "127.0.0.1:0",
            "--target",
            target,
            "--workload-socket",
            socket,
            "--spiffe-id",
            FRONTEND,
            "--expect-id",
            BACKEND,
            "--metrics",
            "127.0.0.1:0",
            *extra,
        ],
    )


def metric(addr: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def register(ca: CA, spiffe_id: str, parent_id: str) -> None:
    ca.cli(
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        parent_id,
        "--selector",
        f"unix:uid:{UID}",
    )


# -- log lines ---------------------------------------------------------------------------


def log_time(line: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00"))


def wait_until(
    daemon: Daemon,
    event: str,
    match: Callable[[dict[str, Any]], bool] = lambda _line: True,
    *,
    after: int = 0,
    timeout: float = 30,
) -> dict[str, Any]:
    """The first ``event`` line past the first ``after`` ones for which ``match`` holds."""
    deadline = time.monotonic() + timeout
    nth = after + 1
    while True:
        line = daemon.wait_for(event, timeout=max(0.0, deadline - time.monotonic()), count=nth)
        if match(line):
            return line
        nth += 1


def wait_first(
    daemons: list[Daemon],
    event: str,
    match: Callable[[dict[str, Any]], bool],
    *,
    after: list[int],
    timeout: float = 30,
) -> tuple[Daemon, dict[str, Any]]:
    """Which of several daemons logs a matching ``event`` first (past its first ``after``)."""
    deadline = time.monotonic() + timeout
    while True:
        for daemon, skip in zip(daemons, after, strict=True):
            for line in daemon.events(event)[skip:]:
                if match(line):
                    return daemon, line
        left = deadline - time.monotonic()
        assert left > 0, f"none of {[d.name for d in daemons]} logged a matching {event}"
        first = daemons[0]
        try:  # block on one daemon's log for a moment, then look at all again
            first.wait_for(event, timeout=min(left, 0.05), count=count(first, event) + 1)
        except DaemonError:
            pass


def count(daemon: Daemon, event: str) -> int:
    return len(daemon.events(event))


def timeline(daemon: Daemon, *events: str) -> str:
    """These events of one daemon, one short line each, for an assertion's message."""
    keep = ("serial", "old_serial", "not_after", "error", "reason", "what")
    lines = [
        f"{line['ts'][11:23]} {daemon.name} {line['event']} "
        + " ".join(f"{k}={str(line[k])[:100]}" for k in keep if k in line)
        for line in daemon.lines
        if line.get("event") in events
    ]
    return "\n".join(lines[-40:])


# -- load ----------------------------------------------------------------------------------


class Load:
    """HTTP requests to ``host:port`` from keep-alive and new-connection workers.

    ``xfcc`` is the caller ID the backend must see in X-Forwarded-Client-Cert
    (HTTP mode).  ``pace`` is a pause between one worker's requests, so that a
    drill loads the mesh without starving the daemons of two shared cores.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        keepalive: int = 4,
        new_conn: int = 2,
        xfcc: str | None = None,
        pace: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.new_conn = new_conn
        self.xfcc = xfcc
        self.pace = pace
        self.results: Counter[str] = Counter()
        self.errors: list[str] = []
        self.failed_at: list[tuple[float, str]] = []
        """(wall time, outcome) of the first requests that did not get a good answer."""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def record(self, outcome: str, detail: str = "") -> None:
        with self._cond:
            self.results[outcome] += 1
            if outcome != "ok":
                if len(self.failed_at) < 10_000:
                    self.failed_at.append((time.time(), outcome))
                if detail and len(self.errors) < 20:
                    self.errors.append(detail)
            self._cond.notify_all()

    def mark(self) -> Counter[str]:
        with self._cond:
            return Counter(self.results)

    def since(self, mark: Counter[str]) -> Counter[str]:
        with self._cond:
            return self.results - mark

    def wait_ok(self, n: int, timeout: float = 30) -> None:
        """Until ``n`` more requests than now got a good answer."""
        with self._cond:
            target = self.results["ok"] + n
            assert self._cond.wait_for(lambda: self.results["ok"] >= target, timeout), (
                f"traffic stalled: {self.results}, errors {self.errors[-5:]}"
            )

    def wait_failures(self, n: int, timeout: float = 30) -> None:
        """Until ``n`` more requests than now went without a good answer."""
        with self._cond:
            target = self._failures() + n
            assert self._cond.wait_for(lambda: self._failures() >= target, timeout), (
                f"no failures within {timeout}s: {self.results}"
            )

    def failures(self) -> int:
        with self._cond:
            return self._failures()

    def _failures(self) -> int:
        return sum(n for outcome, n in self.results.items() if outcome != "ok")

    def _check(self, resp: http.client.HTTPResponse, path: str) -> None:
        body = resp.read()
        if resp.status != 200 or not body.startswith(f"hello {path}".encode()):
            self.record("bad", f"{resp.status} {body[:80]!r}")
        elif self.xfcc is not None and f"URI={self.xfcc}".encode() not in body:
            self.record("bad", f"no XFCC: {body[:120]!r}")
        else:
            self.record("ok")

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionRefusedError):
            outcome = "refused"
        elif isinstance(exc, http.client.RemoteDisconnected):
            outcome = "closed"  # the proxy closed the connection before answering
        elif isinstance(exc, ConnectionResetError):
            outcome = "reset"
        else:
            outcome = "failed"
        self.record(outcome, repr(exc))
        self._stop.wait(0.05)  # no hot loop against a mesh that refuses

    def _keepalive_worker(self, n: int) -> None:
        conn = self._connection()
        i = 0
        while not self._stop.is_set():
            path = f"/k{n}/{i}"
            i += 1
            try:
                conn.request("GET", path)
                self._check(conn.getresponse(), path)
            except (OSError, http.client.HTTPException) as exc:
                self._failed(exc)
                conn.close()
                conn = self._connection()
            if self.pace:
                self._stop.wait(self.pace)
        conn.close()

    def _new_conn_worker(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            path = f"/n{n}/{i}"
            i += 1
            conn = self._connection()
            try:
                conn.request("GET", path, headers={"Connection": "close"})
                self._check(conn.getresponse(), path)
            except (OSError, http.client.HTTPException) as exc:
                self._failed(exc)
            finally:
                conn.close()
            if self.pace:
                self._stop.wait(self.pace)

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._keepalive_worker, args=(i,), daemon=True)
            for i in range(self.keepalive)
        ] + [
            threading.Thread(target=self._new_conn_worker, args=(i,), daemon=True)
            for i in range(self.new_conn)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self._threads), "a load worker hung"


@contextmanager
def load_on(proxy: Proxy, **kwargs: Any) -> Iterator[Load]:
    load = Load(*proxy.host_port, **kwargs)
    load.start()
    try:
        yield load
    finally:
        load.stop()


# -- the whole mesh -------------------------------------------------------------------------


@dataclass
class Mesh:
    """app -> client proxy (agent "client") -> server proxy (agent "server") -> backend.

    Each proxy takes its identity from its own agent, as on two nodes, so that
    one node can be disturbed (killed, evicted) while its peer stays healthy.
    ``retired`` keeps the log lines of daemons that were replaced by a restart.
    """

    ca: CA
    client_agent: Agent
    server_agent: Agent
    backend: Backend
    server: Proxy
    client: Proxy
    retired: list[Daemon] = field(default_factory=list)

    def daemons(self) -> list[Daemon]:
        return [
            self.ca.daemon,
            self.client_agent.daemon,
            self.server_agent.daemon,
            self.server.daemon,
            self.client.daemon,
        ]

    def story(self) -> str:
        """What the daemons said about identities and failures, in time order: the
        message of a drill's failed assertion, so a CI log says why a request failed."""
        events = {
            "svid.loaded", "svid.rotated", "svid.expired", "rotation.failed", "ca.failover",
            "workload.error", "handshake.failed", "target.failed", "target.unreachable",
            "peer.denied", "connection.peer_expired",
        }  # fmt: skip
        keep = ("serial", "not_after", "error", "reason", "what", "detail", "to")
        lines = sorted(
            (line["ts"], f"{daemon.name} {line['event']}",
             " ".join(f"{k}={str(line[k])[:80]}" for k in keep if k in line))
            for daemon in [*self.retired, *self.daemons()]
            for line in daemon.lines
            if line.get("event") in events
        )  # fmt: skip
        told: list[str] = []
        repeats = 0
        for i, (ts, what, fields) in enumerate(lines):
            if i and what == lines[i - 1][1] and what.endswith(("denied", "failed")):
                repeats += 1  # a burst of refusals is one line and a count
                continue
            if repeats:
                told[-1] += f" (and {repeats} more)"
                repeats = 0
            told.append(f"{ts[11:23]} {what} {fields}")
        if repeats:
            told[-1] += f" (and {repeats} more)"
        return "\n".join(told[-80:])

    def close(self) -> None:
        for daemon in reversed(self.daemons()):
            daemon.stop()
        for agent in (self.client_agent, self.server_agent):
            shutil.rmtree(Path(agent.socket).parent, ignore_errors=True)
        self.backend.close()


def start_mesh(base: Path, ca_args: list[str], proxy_args: list[str]) -> Mesh:
    """Start everything, stopping what already started if a later part fails."""
    ca = make_ca(base, *ca_args)
    started: list[Callable[[], object]] = [ca.daemon.stop]
    backend = Backend()
    started.append(backend.close)
    try:
        agents = []
        for name in ("node-client", "node-server"):
            agent = start_agent(ca, base, name)
            started.append(agent.daemon.stop)
            agents.append(agent)
        client_agent, server_agent = agents
        register(ca, FRONTEND, client_agent.spiffe_id)
        register(ca, BACKEND, server_agent.spiffe_id)
        server = server_proxy(server_agent.socket, backend.address, *proxy_args)
        started.append(server.daemon.stop)
        client = client_proxy(client_agent.socket, server.listen, *proxy_args)
    except BaseException:
        for stop in reversed(started):
            stop()
        raise
    return Mesh(ca, client_agent, server_agent, backend, server, client)


def assert_served_all(load: Load, mesh: Mesh) -> None:
    """No request of ``load`` failed.  If some did, the daemons' story (`Mesh.story`) is
    printed, so the report's captured output says why, in full."""
    if load.failures():
        print(mesh.story())
    assert load.failures() == 0, (load.results, load.errors[:3])
