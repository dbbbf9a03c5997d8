"""`tally ca datastore migrate`: a real SQLite deployment with a real agent moves onto a real
PostgreSQL; the agent keeps its identity (no new join token) and the audit chain verifies."""

from __future__ import annotations

import base64
import json
import sqlite3
from contextlib import closing

import pytest

from tally.app.launch import run_cli
from tests.e2e.conftest import CA
from tests.e2e.test_agent import UID, register, wait_fetch


def jwt_kid(socket: str, audience: str) -> str:
    """The kid of a JWT-SVID fetched through the agent (header only: no validation here)."""
    out = run_cli(
        "agent", "api", "fetch-jwt", "--audience", audience, "--socket", socket, "--output", "json"
    )
    assert out.returncode == 0, out.stderr
    header = json.loads(out.stdout)["svids"][0]["token"].split(".")[0]
    return json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]


pytestmark = pytest.mark.e2e


def test_a_deployment_moves_to_postgresql_and_its_agent_keeps_its_identity(
    ca_factory, agent_factory, fresh_pg: str
):
    # 20 s agent SVIDs: renewals every 8-10 s to watch, and at least 10 s of life left
    # when the CA stops, for two migrate runs and a restart on a loaded machine (with
    # 6 s, an agent SVID ran out meanwhile at a load average of 10).
    ca: CA = ca_factory("--agent-svid-ttl", "20s")
    agent = agent_factory(ca)
    register(ca, agent, "web", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/web")
    kid_before = jwt_kid(agent.socket, "before")
    ca.daemon.stop()
    # Counted once the CA is down: its agent renews every few seconds until then.
    with closing(sqlite3.connect(ca.data_dir / "ca.db")) as db:
        records_before = db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]

    source = f"sqlite://{ca.data_dir}/ca.db"
    moved = run_cli(
        "ca", "datastore", "migrate", "--from", source, "--to", fresh_pg, "--output", "json"
    )
    assert moved.returncode == 0, moved.stderr
    done = json.loads(moved.stdout)
    assert done["rows"]["agents"] == 1 and done["keys_sealed"] == 3  # root, intermediate, JWT key
    assert done["audit_records"] == records_before + 1
    again = run_cli("ca", "datastore", "migrate", "--from", source, "--to", fresh_pg)
    assert again.returncode == 1 and "is not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    rotated = len(agent.daemon.events("svid.rotated"))
    ca.start_again("--agent-svid-ttl", "20s", "--datastore", fresh_pg)
    assert ca.daemon.events("ca.started")[0]["server"] == done["server"]
    # The agent renews its own SVID against the new datastore, with no new join token.
    agent.daemon.wait_for("svid.rotated", timeout=45, count=rotated + 2)
    assert not agent.daemon.events("agent.reattesting")
    register(ca, agent, "api", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/api")
    assert ca.json("audit", "verify")["ok"]
    assert ca.json("audit", "list", "--event", "datastore.migrated")["records"]
    # The JWT signing key moved sealed too: the same key signs on the new datastore.
    assert jwt_kid(agent.socket, "after") == kid_before
