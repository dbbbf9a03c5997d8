"""The HA drill under load: two CA servers on one real PostgreSQL, two agents (two nodes)
each given both servers, a server and a client proxy in HTTP mode with steady traffic;
every CA server is restarted in turn, then one is SIGKILLed.  No request fails, both
proxies keep rotating, and every certificate put in service is in the one audit chain."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tally.app.launch import Daemon
from tests.e2e.conftest import CA, ca_args, make_ca, start_agent
from tests.e2e.mesh import (
    BACKEND,
    FRONTEND,
    Backend,
    Mesh,
    client_proxy,
    count,
    load_on,
    register,
    server_proxy,
    wait_until,
)
from tests.e2e.test_fault_drills import CA_ARGS, LOAD, PROXY_ARGS, assert_audit_complete

pytestmark = pytest.mark.e2e


def second_server(first: CA, base: Path) -> CA:
    """A second CA server on the same database, approved through the first."""
    ca = CA(
        daemon=Daemon("ca", []),
        data_dir=base / "ca-b",
        admin_socket=str(base / "admin-b.sock"),
        listen="127.0.0.1:0",
        metrics="127.0.0.1:0",
        trust_domain=first.trust_domain,
        extra=first.extra,
    )
    ca.daemon = Daemon("ca", ca_args(ca, ca.extra))
    waiting = ca.daemon.start("ca.awaiting_approval")
    first.cli("server", "approve", waiting["server"])
    started = ca.daemon.wait_for("ca.started", timeout=20)
    ca.listen, ca.metrics = started["listen"], started["metrics"]
    return ca


@pytest.fixture(scope="module")
def ha_mesh(tmp_path_factory, pg_database: str) -> Iterator[tuple[Mesh, CA]]:
    base = tmp_path_factory.mktemp("ha")
    a = make_ca(base, *CA_ARGS, "--datastore", pg_database)
    b = second_server(a, base)
    backend = Backend()
    stop: list[Callable[[], object]] = [a.daemon.stop, b.daemon.stop, backend.close]
    try:
        agents = []
        for name in ("node-client", "node-server"):
            agent = start_agent(a, base, name, "--server", b.listen)
            stop.append(agent.daemon.stop)
            agents.append(agent)
        register(a, FRONTEND, agents[0].spiffe_id)
        register(a, BACKEND, agents[1].spiffe_id)
        server = server_proxy(agents[1].socket, backend.address, *PROXY_ARGS)
        stop.append(server.daemon.stop)
        client = client_proxy(agents[0].socket, server.listen, *PROXY_ARGS)
        stop.append(client.daemon.stop)
        yield Mesh(a, agents[0], agents[1], backend, server, client), b
    finally:
        for fn in reversed(stop):
            fn()


def test_a_rolling_restart_of_every_ca_server_under_load(ha_mesh: tuple[Mesh, CA]):
    mesh, b = ha_mesh
    proxies = (mesh.server, mesh.client)
    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        for ca in (mesh.ca, b):  # one at a time, each back before the next goes
            rotated = [count(p.daemon, "svid.rotated") for p in proxies]
            ca.restart()
            assert not ca.daemon.events("ca.awaiting_approval")
            for p, seen in zip(proxies, rotated, strict=True):
                wait_until(p.daemon, "svid.rotated", after=seen, timeout=20)
        load.wait_ok(20)
    assert load.failures() == 0, (load.results, load.errors)
    assert_audit_complete(mesh)


def test_one_ca_server_sigkilled_under_load(ha_mesh: tuple[Mesh, CA]):
    mesh, b = ha_mesh
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
        # Both proxies take their next SVIDs (8 s) through the survivor.
        for p, seen in zip(proxies, rotated, strict=True):
            wait_until(p.daemon, "svid.rotated", after=seen, timeout=20)
            wait_until(p.daemon, "svid.rotated", after=seen + 1, timeout=20)
        load.wait_ok(20)
        assert load.since(outage)["ok"] >= 20
    assert load.failures() == 0, (load.results, load.errors)
    moved = mesh.server_agent.daemon.events("ca.failover")
    assert moved and moved[0]["from"] == dead.listen
    for agent in (mesh.client_agent, mesh.server_agent):
        assert not agent.daemon.events("svid.expired")
    mesh.ca = alive  # the audit chain is the database's: read it through the survivor
    assert_audit_complete(mesh)
    for daemon in mesh.daemons():
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.name
