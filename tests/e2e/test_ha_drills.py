"""The HA drill under load: two CA servers on one real PostgreSQL, two agents (two nodes)
each given both servers, a server and a client proxy in HTTP mode with steady traffic,
and `FLEET` simulated agents (`tests.e2e.sim_fleet`) renewing their workloads' short SVIDs
through both servers; every CA server is restarted in turn, one is cut off from the
database, then one is SIGKILLed.  No request fails, both proxies keep rotating, no
renewal of the fleet fails but for retries that succeed on the other server, and every
certificate put in service is in the one audit chain."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import conninfo

from tally.app.launch import Daemon
from tests.e2e.conftest import CA, ca_args, make_ca, start_agent
from tests.e2e.mesh import (
    BACKEND,
    FRONTEND,
    Backend,
    Mesh,
    assert_served_all,
    client_proxy,
    count,
    load_on,
    register,
    server_proxy,
    wait_until,
)
from tests.e2e.sim_fleet import SimFleet
from tests.e2e.test_ca_cluster import readyz
from tests.e2e.test_fault_drills import (
    CA_ARGS,
    LOAD,
    PROXY_ARGS,
    ROTATION,
    assert_audit_complete,
)
from tests.pg import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.drill]

FLEET = 30
"""Simulated agents beside the two nodes: each renews its one workload SVID at about half
its life, so the fleet keeps both servers signing through every drill."""


class CuttableLink:
    """A Unix-socket relay in front of PostgreSQL that a test can cut: what one CA server
    sees when the network between it and the database fails, while agents still reach it.
    ``cut`` drops every relayed connection and refuses new ones until ``restore``."""

    def __init__(self, target: Path, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.target = target
        self.cut_off = False
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(directory / target.name))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.cut_off:
                conn.close()
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.target))
            with self._lock:
                self._open += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.cut_off = True
        with self._lock:
            opened, self._open = self._open, []
        for s in opened:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


def second_server(first: CA, base: Path, url: str) -> CA:
    """A second CA server on the same database (through ``url``) with the first's flags,
    approved through the first."""
    ca = CA(
        daemon=Daemon("ca", []),
        data_dir=base / "ca-b",
        admin_socket=str(base / "admin-b.sock"),
        listen="127.0.0.1:0",
        metrics="127.0.0.1:0",
        trust_domain=first.trust_domain,
        extra=first.extra,
        datastore=url,
    )
    ca.daemon = Daemon("ca", ca_args(ca, ca.extra))
    waiting = ca.daemon.start("ca.awaiting_approval")
    first.cli("server", "approve", waiting["server"])
    started = ca.daemon.wait_for("ca.started", timeout=20)
    ca.listen, ca.metrics = started["listen"], started["metrics"]
    return ca


@contextlib.contextmanager
def two_server_mesh(a: CA, b: CA, base: Path, fleet: int) -> Iterator[tuple[Mesh, SimFleet]]:
    """Two nodes given both CA servers, an HTTP-mode proxy pair between them with a
    backend, and ``fleet`` simulated agents.  At the end everything stops, both CA
    servers included, even after a failure; a restart gives a CA a new Daemon, so
    each is stopped through whichever it has then."""
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: a.daemon.stop())
        stack.callback(lambda: b.daemon.stop())
        backend = Backend()
        stack.callback(backend.close)
        sims = SimFleet(a, b, fleet)
        stack.callback(sims.close)
        agents = []
        for name in ("node-client", "node-server"):
            agent = start_agent(a, base, name, "--server", b.listen)
            stack.callback(agent.daemon.stop)
            agents.append(agent)
        register(a, FRONTEND, agents[0].spiffe_id)
        register(a, BACKEND, agents[1].spiffe_id)
        server = server_proxy(agents[1].socket, backend.address, *PROXY_ARGS)
        stack.callback(server.daemon.stop)
        client = client_proxy(agents[0].socket, server.listen, *PROXY_ARGS)
        stack.callback(client.daemon.stop)
        yield Mesh(a, agents[0], agents[1], backend, server, client), sims


@pytest.fixture(scope="module")
def ha_mesh(
    tmp_path_factory, pg_cluster: Cluster, pg_database: str
) -> Iterator[tuple[Mesh, CA, CuttableLink, SimFleet]]:
    base = tmp_path_factory.mktemp("ha")
    a = make_ca(base, *CA_ARGS, datastore=pg_database)
    # Server B reaches the database through a link the cut-off drill can sever.
    link = CuttableLink(pg_cluster.socket_dir / ".s.PGSQL.5432", base / "link")
    dbname = conninfo.conninfo_to_dict(pg_database)["dbname"]
    try:
        b = second_server(a, base, f"postgresql://postgres@/{dbname}?host={link.directory}")
        with two_server_mesh(a, b, base, FLEET) as (mesh, fleet):
            yield mesh, b, link, fleet
    finally:
        link.close()


def test_a_rolling_restart_of_every_ca_server_under_load(ha_mesh):
    mesh, b, _, fleet = ha_mesh
    proxies = (mesh.server, mesh.client)
    renewed = fleet.renewals()
    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        for ca in (mesh.ca, b):  # one at a time, each back before the next goes
            rotated = [count(p.daemon, "svid.rotated") for p in proxies]
            ca.restart()
            assert not ca.daemon.events("ca.awaiting_approval")
            for p, seen in zip(proxies, rotated, strict=True):
                wait_until(p.daemon, "svid.rotated", after=seen, timeout=ROTATION)
        load.wait_ok(20)
    assert_served_all(load, mesh)
    assert_fleet_renewed(fleet, renewed)
    assert_audit_complete(mesh)


def assert_fleet_renewed(fleet: SimFleet, before: int) -> None:
    """The fleet went on renewing through the drill, and no call of it failed in the
    end: each that met a dead or restarting server succeeded on the other."""
    deadline = time.monotonic() + 30
    while fleet.renewals() < before + fleet.size:
        assert time.monotonic() < deadline, "the simulated fleet stopped renewing"
        time.sleep(0.2)
    assert not fleet.errors(), (fleet.errors(), fleet.stats.why.most_common(5))
    assert fleet.failed is None, fleet.failed


def current_server(agent) -> str:
    moves = agent.daemon.events("ca.failover")
    return moves[-1]["to"] if moves else agent.daemon.events("agent.started")[0]["ca_server"]


def test_a_ca_server_cut_off_from_the_database_signs_nothing_under_load(ha_mesh):
    """B keeps its agent API but loses PostgreSQL: it answers 503 and signs nothing, its
    agents move to A, traffic never notices, and B recovers by itself."""
    mesh, b, link, fleet = ha_mesh
    proxies = (mesh.server, mesh.client)
    renewed = fleet.renewals()
    issued_by_b = len(b.daemon.events("ca.datastore_lost"))
    agents = (mesh.client_agent, mesh.server_agent)
    on_b = [current_server(x) == b.listen for x in agents]
    moves = [len(x.daemon.events("ca.failover")) for x in agents]
    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        link.cut()
        b.daemon.wait_for("ca.datastore_lost", timeout=10, count=issued_by_b + 1)
        status, text = readyz(b)
        assert status == 503 and "datastore unreachable" in text
        rotated = [count(p.daemon, "svid.rotated") for p in proxies]
        for p, seen in zip(proxies, rotated, strict=True):  # renewals go on through A
            wait_until(p.daemon, "svid.rotated", after=seen, timeout=ROTATION)
        for agent, was_on_b, seen in zip(agents, on_b, moves, strict=True):
            if was_on_b:  # its calls got 503 datastore_unavailable and moved to A
                moved = agent.daemon.wait_for("ca.failover", timeout=5, count=seen + 1)
                assert moved["reason"] == "datastore_unavailable"
        link.restore()
        b.daemon.wait_for("ca.datastore_back", timeout=15)
        load.wait_ok(20)
    assert_served_all(load, mesh)
    assert readyz(b)[0] == 200
    assert_fleet_renewed(fleet, renewed)
    assert_audit_complete(mesh)


def test_one_ca_server_sigkilled_under_load(ha_mesh):
    mesh, b, _, fleet = ha_mesh
    renewed = fleet.renewals()
    a = mesh.ca
    proxies = (mesh.server, mesh.client)
    # Kill the server the server-side node's agent is using, so at least it must move.
    used = mesh.server_agent.daemon.events("agent.started")[0]["ca_server"]
    dead, alive = (a, b) if used == a.listen else (b, a)
    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        rotated = [count(p.daemon, "svid.rotated") for p in proxies]
        dead.daemon.kill()
        outage = load.mark()
        # Both proxies take their next SVIDs through the survivor.
        for p, seen in zip(proxies, rotated, strict=True):
            wait_until(p.daemon, "svid.rotated", after=seen, timeout=ROTATION)
            wait_until(p.daemon, "svid.rotated", after=seen + 1, timeout=ROTATION)
        load.wait_ok(20)
        assert load.since(outage)["ok"] >= 20
    assert_served_all(load, mesh)
    moved = mesh.server_agent.daemon.events("ca.failover")
    assert moved and moved[0]["from"] == dead.listen
    for agent in (mesh.client_agent, mesh.server_agent):
        assert not agent.daemon.events("svid.expired")
    assert_fleet_renewed(fleet, renewed)
    mesh.ca = alive  # the audit chain is the database's: read it through the survivor
    assert_audit_complete(mesh)
    for daemon in mesh.daemons():
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.name
