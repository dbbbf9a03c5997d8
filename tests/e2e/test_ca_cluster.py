"""Two real `tally ca run` servers on one real PostgreSQL: joining by approval, one bundle,
changes that cross servers in under a second, a token raced at both, one audit chain,
one rotation lease, and an agent that rides through restarts and a SIGKILL.  The drills
with the database gone are test_pg_outage_drill.py (PostgreSQL stopped for 60 s) and
test_ha_drills.py (one server cut off from it)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from agent.ca_client import CAClient, CAError
from tally.app.launch import Daemon
from tally.ops.config import Address
from tally.spiffe import x509profile
from tests.e2e.conftest import CA, ca_args, start_agent, start_ca
from tests.e2e.test_agent import UID, register, wait_fetch
from tests.e2e.test_ca import TD, bundle_roots

pytestmark = pytest.mark.e2e


def new_ca(base: Path, name: str, url: str) -> CA:
    return CA(
        daemon=Daemon("ca", []),
        data_dir=base / name,
        admin_socket=str(base / f"{name}.sock"),
        listen="127.0.0.1:0",
        metrics="127.0.0.1:0",
        trust_domain="example.org",
        # Short agent SVIDs: the agent in the failover test renews every few seconds.
        extra=["--datastore", url, "--intermediate-ttl", "1h", "--agent-svid-ttl", "16s"],
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory, pg_database: str):
    """Server A founds the cluster; server B asks to join and is approved through A."""
    base = tmp_path_factory.mktemp("cluster")
    a = new_ca(base, "a", pg_database)
    start_ca(a, a.extra)
    b = new_ca(base, "b", pg_database)
    b.daemon = Daemon("ca", ca_args(b, b.extra))
    waiting = b.daemon.start("ca.awaiting_approval")
    assert "tally ca server approve" in waiting["detail"]
    listed = a.json("server", "list")["servers"]
    assert {s["state"] for s in listed} == {"approved", "pending"}
    a.cli("server", "approve", waiting["server"])
    started = b.daemon.wait_for("ca.started", timeout=20)
    b.listen, b.metrics = started["listen"], started["metrics"]
    yield a, b
    for ca in (a, b):
        ca.daemon.stop()


async def attested(ca: CA, token: str) -> tuple[CAClient, str]:
    client = CAClient(Address.parse(ca.listen), TD, bundle_roots(ca))
    key = x509profile.generate_key()
    try:
        issued, _, _ = await client.attest(token, key)
    except BaseException:
        await client.aclose()
        raise
    client.set_identity(issued.chain, key)
    return client, issued.spiffe_id


def test_a_joined_server_publishes_the_same_bundle_and_no_key_file(pair):
    a, b = pair
    assert a.json("bundle", "show")["bundle"] == b.json("bundle", "show")["bundle"]
    for ca in (a, b):
        assert not list((ca.data_dir / "keys").glob("*.pem")), "keys live sealed in the DB"
        assert (ca.data_dir / "server.key").stat().st_mode & 0o077 == 0
    events = [r["event"] for r in b.json("audit", "list")["records"]]
    assert events.count("server.approved") == 2 and "server.requested" in events
    for ca in (a, b):  # no key of any kind on disk but the server's own identity
        assert not list(ca.data_dir.glob("**/jwt-*.pem"))
        assert not (ca.data_dir / "audit-anchor.key").exists()


def test_both_servers_sign_with_one_jwt_key_and_one_anchor_key(pair, tmp_path: Path):
    """The JWT keys and the audit anchor key are sealed like the X.509 keys: a JWT key
    published by one is the other's, and an anchor signed by one verifies on the other."""
    a, b = pair
    published = [
        [
            k
            for k in json.loads(ca.cli("bundle", "show", "--format", "spiffe").stdout)["keys"]
            if k.get("use") == "jwt-svid"
        ]
        for ca in (a, b)
    ]
    assert published[0] and published[0] == published[1]
    anchor = tmp_path / "anchor.json"
    anchor.write_text(a.cli("audit", "anchor").stdout)
    verified = b.cli("audit", "verify", "--anchor", str(anchor))
    assert "matches 1 signed anchor(s)" in verified.stdout, verified.stdout


async def test_an_entry_made_through_one_server_wakes_a_poll_parked_on_the_other(pair):
    a, b = pair
    token = a.json("token", "create")["token"]
    client, agent_id = await attested(b, token)  # token made on A, spent on B
    revision, _ = await client.entries()
    got: dict[str, float] = {}

    async def poll() -> None:
        _rev, entries = await client.entries(since=revision, wait=20)
        got["at"], got["count"] = time.monotonic(), len(entries)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.5)
        body = json.dumps(
            {
                "spiffe_id": "spiffe://example.org/x",
                "parent_id": agent_id,
                "selectors": ["unix:uid:1"],
            }
        ).encode()
        t0 = time.monotonic()
        await trio.to_thread.run_sync(lambda: admin_post(a, "/v1/entries", body))
    assert got["count"] == 1
    assert got["at"] - t0 < 1.0, f"{got['at'] - t0:.3f}s from A's commit to B's answer"
    await client.aclose()


def admin_post(ca: CA, path: str, body: bytes) -> dict:
    """One admin call over the Unix socket, without a CLI process's start-up time."""
    from ca.cli import call

    class Args:
        admin_socket = ca.admin_socket

    return call(Args.admin_socket, "POST", path, json.loads(body))


async def test_a_token_raced_at_both_servers_is_spent_once(pair):
    a, b = pair
    for _ in range(3):
        token = a.json("token", "create")["token"]
        results: list[object] = []

        async def one(ca: CA, token: str = token, results: list[object] = results) -> None:
            try:
                results.append(await attested(ca, token))
            except CAError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, a)
            nursery.start_soon(one, b)
        errors = [r for r in results if isinstance(r, CAError)]
        assert len(errors) == 1 and "already used" in errors[0].message, results
        for r in results:
            if isinstance(r, tuple):
                await r[0].aclose()
    assert a.json("audit", "verify")["ok"] and b.json("audit", "verify")["ok"]


def test_rotation_is_decided_by_the_lease_holder_only_and_taken_up_by_the_other(pair):
    a, b = pair
    refused = b.cli("rotate", check=False)
    assert refused.returncode == 1 and "rotation lease" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    rotated = a.json("rotate")
    [active] = [
        k["id"] for k in rotated["keys"] if k["kind"] == "intermediate" and k["state"] == "active"
    ]
    deadline = time.monotonic() + 1.0
    while b.json("health")["signing_key"]["id"] != active:
        assert time.monotonic() < deadline, "B did not take up A's new signing key in 1 s"
        time.sleep(0.05)
    assert a.json("bundle", "show")["bundle"] == b.json("bundle", "show")["bundle"]


def readyz(ca: CA) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{ca.metrics}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_an_agent_rides_through_a_rolling_restart_and_a_sigkill(pair, tmp_path: Path):
    """Last in the module: it SIGKILLs one of the two servers."""
    a, b = pair
    agent = start_agent(a, tmp_path, "node-f", "--server", b.listen)
    try:
        register(a, agent, "web-f", f"unix:uid:{UID}")
        wait_fetch(agent, "spiffe://example.org/web-f")
        # Rolling restart: one server at a time; an approved server needs no approval again.
        for ca in (a, b):
            ca.restart()
            assert not ca.daemon.events("ca.awaiting_approval")
            wait_fetch(agent, "spiffe://example.org/web-f")
        moves = agent.daemon.events("ca.failover")
        used = moves[-1]["to"] if moves else agent.daemon.events("agent.started")[0]["ca_server"]
        dead, alive = (a, b) if used == a.listen else (b, a)
        assert used == dead.listen
        rotated = len(agent.daemon.events("svid.rotated"))
        dead.daemon.kill()
        moved = agent.daemon.wait_for("ca.failover", timeout=15, count=len(moves) + 1)
        assert (moved["from"], moved["to"]) == (dead.listen, alive.listen)
        # Renewals go on through the survivor (the agent SVID lives 16 s).
        agent.daemon.wait_for("svid.rotated", timeout=20, count=rotated + 1)
        assert not agent.daemon.events("svid.expired")
        wait_fetch(agent, "spiffe://example.org/web-f")
        # The dead server's rotation lease went with its connection.
        alive.json("rotate")
        assert alive.json("audit", "verify")["ok"]
    finally:
        agent.daemon.stop()
