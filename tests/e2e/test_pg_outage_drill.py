"""The PostgreSQL outage drill under load: two CA servers on one real PostgreSQL, two
agents (two nodes) given both, a server and a client proxy in HTTP mode with steady
traffic, and 200 simulated agents; PostgreSQL is stopped for a full 60 s.  Meanwhile agents serve from their
cache, every renewal fails cleanly (the CA signs nothing it cannot record), both
servers' ``/readyz`` say why they are not ready, and no request fails.  When the
database returns everything recovers by itself: no daemon restarted, every SVID
renewed before it expired, and the audit chain is whole.

Rules / theory of operation (the timing is the point of the drill):

1. **Every SVID outlives the outage.**  Agent and workload SVIDs live `TTL`
   (150 s) and the intermediate an hour.  The outage starts 15-40 s after the
   mesh's first SVID was issued (`OUTAGE_START`), before any renewal: agents
   renew at 38-48 % of a lifetime (`tally.spiffe.rotation.WINDOW`), 47 s at the
   earliest with the not-before cushion.  So when the database comes back, 100 s
   after that first SVID at most, each one has 50 s or more left, more than the
   agents' retry backoff (capped at 30 s) needs.
2. **Renewals fall due during the outage.**  The first SVID comes due 72 s
   after issue at the latest, so within the 60 s that start 15 s or more after it:
   at least one real renewal is attempted against a server without its database,
   and the test also renews directly with the agent API client and reads the
   error code.
3. **A fleet beside the two nodes**: `FLEET` simulated agents of `bench.fleet`
   (each its own identity, the real agent API client given both servers, the
   agent's three loops), joined before the nodes start, so their SVIDs too are
   at most half-way through their life when the outage begins.  They run in a
   thread of their own with their own trio loop; every error they meet is
   counted by code, and the drill allows only ``datastore_unavailable`` (and a
   long poll's timeout), only while the database is away.
4. The database is one per test module on the xdist worker's one cluster
   (tests/pg.py); under ``--dist loadfile`` no other module runs on this worker
   while the cluster is stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import trio

from agent.ca_client import CAClient, CAError
from tally.ops.config import Address
from tally.spiffe import x509profile
from tests.e2e.conftest import CA, make_ca
from tests.e2e.mesh import (
    Mesh,
    assert_served_all,
    count,
    load_on,
    log_time,
    wait_first,
    wait_until,
)
from tests.e2e.sim_fleet import SimFleet
from tests.e2e.test_ca import TD, bundle_roots
from tests.e2e.test_ca_cluster import readyz
from tests.e2e.test_fault_drills import LOAD, assert_audit_complete
from tests.e2e.test_ha_drills import second_server, two_server_mesh
from tests.pg import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.drill]

OUTAGE = 60.0  # seconds, as the issue's drill says
TTL = 150  # seconds: agent and workload SVIDs (rule 1)
OUTAGE_START = (15.0, 40.0)  # seconds after the mesh's first SVID (rules 1 and 2)
CA_ARGS = ["--default-svid-ttl", f"{TTL}s", "--agent-svid-ttl", f"{TTL}s"]
CA_ARGS += ["--intermediate-ttl", "1h"]
FLEET = 200  # simulated agents, one workload each (rule 3)


@pytest.fixture
def pg_mesh(tmp_path, pg_database: str) -> Iterator[tuple[Mesh, CA, SimFleet]]:
    a = make_ca(tmp_path, *CA_ARGS, datastore=pg_database)
    b = second_server(a, tmp_path, pg_database)
    with two_server_mesh(a, b, tmp_path, FLEET) as (mesh, fleet):
        yield mesh, b, fleet


def wait_ready(cas: tuple[CA, ...], ready: bool, seconds: float) -> None:
    """Poll each server's /readyz (another process's HTTP endpoint: no event to wait on)."""
    deadline = time.monotonic() + seconds
    for ca in cas:
        while (readyz(ca)[0] == 200) != ready:
            assert time.monotonic() < deadline, f"{ca.listen} /readyz never became {ready}"
            time.sleep(0.2)


def test_postgresql_stopped_for_60_s_under_load(pg_mesh, pg_cluster: Cluster):
    mesh, b, fleet = pg_mesh
    a = mesh.ca
    servers = (a, b)
    agents = (mesh.client_agent, mesh.server_agent)
    proxies = (mesh.server, mesh.client)
    pids = [d.pid for d in (*mesh.daemons(), b.daemon)]
    roots = bundle_roots(a)
    # A client of the agent API of our own, to read the exact answer to a renewal.
    client = CAClient(Address.parse(b.listen), TD, roots)
    key = x509profile.generate_key()
    issued, _, _ = trio.run(client.attest, a.json("token", "create")["token"], key)
    client.set_identity(issued.chain, key)
    try:
        with load_on(mesh.client, **LOAD) as load:
            load.wait_ok(20)
            issues = [
                log_time(line)
                for agent in agents
                for line in agent.daemon.events("agent.attested")
                + agent.daemon.events("svid.issued")
            ]
            first = min(issues).timestamp()
            wait = first + OUTAGE_START[0] - time.time()
            if wait > 0:
                time.sleep(wait)  # rule 1: a real clock, the daemons' own
            assert time.time() - first < OUTAGE_START[1], "the mesh took too long to start"
            assert all(count(x.daemon, "svid.rotated") == 0 for x in agents), "renewed early"
            before = a.json("audit", "list", "--limit", "1000000")["records"]
            failed = [count(x.daemon, "rotation.failed") for x in agents]
            assert not fleet.errors(), fleet.errors()

            pg_cluster.stop()
            stopped = time.monotonic()
            served = load.mark()
            try:
                wait_ready(servers, False, 15)
                for ca in servers:
                    status, text = readyz(ca)
                    assert status == 503 and "datastore unreachable" in text, (status, text)
                refused = a.cli("token", "create", check=False)  # an admin write: one clear line
                assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
                assert "datastore" in refused.stderr, refused.stderr
                with pytest.raises(CAError) as info:
                    trio.run(client.renew, x509profile.generate_key())
                assert info.value.code == "datastore_unavailable" and info.value.status == 503
                # Rule 2: a real renewal falls due, fails, and is retried; nothing is signed.
                _, line = wait_first(
                    [x.daemon for x in agents],
                    "rotation.failed",
                    lambda _line: True,
                    after=failed,
                    timeout=OUTAGE - (time.monotonic() - stopped),
                )
                assert line["reason"] == "datastore_unavailable", line
                time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
                assert all(count(x.daemon, "svid.rotated") == 0 for x in agents)
                assert all(count(p.daemon, "svid.rotated") == 0 for p in proxies)
                assert load.since(served)["ok"] >= 100, load.since(served)  # served from cache
            finally:
                pg_cluster.start()
            outage = time.monotonic() - stopped
            in_outage = fleet.errors()
            wait_ready(servers, True, 30)
            renewed = fleet.renewals()
            # Renewals resume by themselves: each proxy and each agent gets its next SVID.
            for p in proxies:
                wait_until(p.daemon, "svid.rotated", timeout=60)
            for agent in agents:
                wait_until(agent.daemon, "svid.rotated", lambda x: x["kind"] == "agent", timeout=60)
            trio.run(client.renew, x509profile.generate_key())
            load.wait_ok(20)
            # The fleet renews again, and met no error once the database was back but
            # what a poll parked before it returned may still answer.
            deadline = time.monotonic() + 30
            while fleet.renewals() < renewed + FLEET // 4:
                assert time.monotonic() < deadline, "the fleet did not resume renewing"
                time.sleep(0.5)
        assert outage >= OUTAGE
        assert set(in_outage) <= {"datastore_unavailable", "TooSlowError"}, in_outage
        assert in_outage["datastore_unavailable"] > 0, "no fleet call met the outage"
        late = fleet.errors() - in_outage
        assert set(late) <= {"datastore_unavailable"} and late.total() <= FLEET, late
        assert fleet.held_until() > datetime.now(UTC), "a simulated agent's SVID ran out"
        assert fleet.failed is None, fleet.failed
        assert_served_all(load, mesh)
        for agent in agents:
            assert not agent.daemon.events("svid.expired")
            assert not agent.daemon.events("agent.reattesting")
        assert [d.pid for d in (*mesh.daemons(), b.daemon)] == pids, "a daemon restarted"
        for ca in servers:
            assert ca.daemon.events("ca.datastore_lost") and ca.daemon.events("ca.datastore_back")
        # No audit record lost: what was there before is there unchanged, the chain
        # verifies, and every certificate served before, during and after is in it.
        after = {r["seq"]: r for r in a.json("audit", "list", "--limit", "1000000")["records"]}
        assert all(after.get(r["seq"]) == r for r in before)
        assert len(after) > len(before)
        assert_audit_complete(mesh)
        expiries = [
            datetime.fromisoformat(line["not_after"])
            for agent in agents
            for line in agent.daemon.events("svid.rotated")
        ]
        assert min(expiries) > datetime.now(UTC)
    finally:
        trio.run(client.aclose)
