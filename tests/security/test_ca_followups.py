"""A stolen agent SVID after the agent renewed, and the CA's startup checks, on real daemons.

Rules / theory of operation: an agent SVID leaks with its key (a backup, a
copied data dir).  The CA accepts an agent call only with the agent's current
SVID or the one it replaced, so the copy stops working at the agent's second
renewal, long before it expires.  The drill copies a real agent's SVID from
its data dir, lets the agent renew on its own (a short ``--agent-svid-ttl``),
and plays the copy against every agent call with the real agent client: it
works while it is current and while it is the previous one (the control),
then is refused with ``stale_svid``, one ``peer.denied`` line and one count
each, and nothing issued.  The live agent, which renewed meanwhile, must not
notice: no stale refusal of its own, and a new entry still reaches it.

The agent SVID lives 24s: renewal falls at 32-43% of a life, so the copy is
replaced twice within 21s and still has at least 3s to live when it is tried
(the attack must meet ``stale_svid``, not ``expired``).

Startup: a CA refused at its admin socket or keys dir must say which path and
why, and must have created nothing (no data dir, no keys) by then; each has a
control that starts.  The attestation limits must hold for any `CAServer`,
not only for the one `tally ca run` builds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from cryptography import x509

from agent import state
from agent.ca_client import CAClient, CAError, make_csr
from ca.server import CAServer
from ca.settings import CASettings
from tally.app.launch import Daemon, run_cli
from tally.ops.config import Address, Duration
from tally.spiffe import x509profile
from tally.spiffe.spiffeid import TrustDomain
from tests.e2e.conftest import CA, Agent, ca_args, make_ca, start_agent
from tests.e2e.test_agent import register, wait_fetch
from tests.security.test_tokens import audit
from tests.security.test_workloads import one_line_refusal

pytestmark = pytest.mark.e2e

TD = TrustDomain.parse("example.org")
UID = os.geteuid()


def metric(ca: CA, name: str, reason: str) -> float:
    with urllib.request.urlopen(f"http://{ca.metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    prefix = f'{name}{{reason="{reason}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[tuple[CA, Agent]]:
    base = tmp_path_factory.mktemp("followups")
    ca = make_ca(base, "--agent-svid-ttl", "24s")
    agent = start_agent(ca, base)
    yield ca, agent
    agent.daemon.stop()
    ca.daemon.stop()
    shutil.rmtree(Path(agent.socket).parent, ignore_errors=True)


@dataclass(frozen=True)
class Loot:
    """What a thief takes from the node: the agent's SVID file (key included) and bundle."""

    identity: state.AgentIdentity
    roots: list[x509.Certificate]

    @property
    def serial(self) -> str:
        return format(self.identity.chain[0].serial_number, "x")


def copy_identity(agent: Agent, out: Path) -> Loot:
    out.mkdir(mode=0o700)
    shutil.copy2(agent.data_dir / state.IDENTITY_FILE, out / state.IDENTITY_FILE)
    identity = state.load_identity(out)
    bundle = state.load_bundle(agent.data_dir)
    assert identity is not None and bundle is not None
    return Loot(identity, bundle[0])


def as_thief(ca: CA, loot: Loot, call):
    """One agent call with the copy, through the agent's own client, on a fresh connection."""

    async def attempt():
        client = CAClient(Address.parse(ca.listen), TD, loot.roots)
        client.set_identity(loot.identity.chain, loot.identity.key)
        try:
            return await call(client)
        finally:
            await client.aclose()

    return trio.run(attempt)


def refused(ca: CA, loot: Loot, call) -> CAError:
    with pytest.raises(CAError) as info:
        as_thief(ca, loot, call)
    return info.value


def stale_lines(ca: CA) -> list[dict]:
    return [line for line in ca.daemon.events("peer.denied") if line["reason"] == "stale_svid"]


def test_a_copied_agent_svid_is_refused_once_the_agent_renewed_twice(node, tmp_path: Path):
    ca, agent = node
    web = register(ca, agent, "web", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/web", timeout=30)
    rotated = len(agent.daemon.events("svid.rotated"))
    loot = copy_identity(agent, tmp_path / "stolen")
    assert ca.json("agent", "show", agent.spiffe_id)["serial"] == loot.serial, (
        "the agent renewed before the copy was taken; the drill needs its current SVID"
    )

    # Controls: the copy works while it is the agent's current SVID, and its previous one.
    as_thief(ca, loot, lambda client: client.entries())
    agent.daemon.wait_for("svid.rotated", timeout=60, count=rotated + 1)
    revision, entries = as_thief(ca, loot, lambda client: client.entries())
    assert [e["id"] for e in entries] == [web["id"]]
    issued_before = len(audit(ca, "svid.issued"))
    denied_before = metric(ca, "tally_ca_peer_denied_total", "stale_svid")
    csr = make_csr(x509profile.generate_key())

    # Nothing slow from here on: the copy has seconds to live after the second renewal.
    agent.daemon.wait_for("svid.rotated", timeout=60, count=rotated + 2)
    for call in (
        lambda client: client.entries(),
        lambda client: client.entries(since=revision, wait=5),
        lambda client: client.sign([(web["id"], csr)]),
        lambda client: client.renew(x509profile.generate_key()),
    ):
        error = refused(ca, loot, call)
        assert (error.code, error.status) == ("stale_svid", 403), error.message
    assert loot.identity.chain[0].not_valid_after_utc > datetime.now(UTC), "met stale, not expiry"
    renewals = agent.daemon.events("svid.rotated")[rotated : rotated + 2]
    assert [line["kind"] for line in renewals] == ["agent", "agent"], renewals

    lines = stale_lines(ca)
    assert len(lines) == 4, "the four stolen calls, and never the live agent"
    paths = ("/v1/entries", "/v1/entries", "/v1/svids", "/v1/agent/renew")
    for line, path in zip(lines, paths, strict=True):
        assert line["peer_id"] == agent.spiffe_id and path in line["detail"], line
        assert loot.serial in line["detail"], line
    assert metric(ca, "tally_ca_peer_denied_total", "stale_svid") == denied_before + 4
    assert len(audit(ca, "svid.issued")) == issued_before

    # The live agent renewed through all this and keeps serving new identities.
    register(ca, agent, "api", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/api", timeout=30)
    assert agent.daemon.events("agent.evicted") == []
    assert len(stale_lines(ca)) == 4


def test_ca_server_applies_the_attestation_limits(tmp_path: Path):
    """`tally ca run` is not the only way to build a CA server: the settings hold anyway."""
    cfg = CASettings(
        trust_domain="example.org",
        data_dir=tmp_path / "data",
        admin_socket=tmp_path / "admin.sock",
        attest_burst=3,
        attest_refill=Duration(2),
        token_max_failures=2,
    )
    server = CAServer(cfg)
    try:
        throttle = server.authority.throttle
        assert (throttle.burst, throttle.refill) == (3, 2.0)
        assert server.authority.token_max_failures == 2
    finally:
        server.store.close()


def args_for(ca: CA, data_dir: Path, admin_socket: Path) -> list[str]:
    """The shared CA's command line on free ports and other paths."""
    args = ca_args(ca, [])
    for flag, value in (
        ("--listen", "127.0.0.1:0"),
        ("--metrics", "127.0.0.1:0"),
        ("--data-dir", str(data_dir)),
        ("--admin-socket", str(admin_socket)),
    ):
        args[args.index(flag) + 1] = value
    return args


def ca_run(ca: CA, data_dir: Path, admin_socket: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args_for(ca, data_dir, admin_socket))


def test_a_refused_admin_socket_stops_a_fresh_ca_before_it_makes_keys(node, tmp_path: Path):
    ca, _agent = node
    sock = tmp_path / "admin.sock"
    sock.symlink_to(tmp_path / "elsewhere.sock")
    fresh = tmp_path / "fresh"
    result = ca_run(ca, fresh, sock)
    one_line_refusal(result, sock)
    assert not fresh.exists()
    assert "key.rotated" not in result.stderr, result.stderr
    # A live CA's socket is refused the same way, before anything is made.
    result = ca_run(ca, fresh, Path(ca.admin_socket))
    assert result.returncode != 0 and "another process is serving it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not fresh.exists()
    assert ca.daemon.proc is not None and ca.daemon.proc.poll() is None
    # The control: the same fresh data dir with a free socket path starts.
    control = Daemon("ca", args_for(ca, fresh, tmp_path / "free.sock"))
    try:
        control.start("ca.started")
        assert control.events("key.rotated"), "a fresh CA makes its keys"
    finally:
        control.stop()


def test_a_keys_dir_that_is_a_symlink_is_named_as_one(ca_factory, tmp_path: Path):
    ca = ca_factory(subdir="keyed")
    ca.daemon.stop()
    keys = ca.data_dir / "keys"
    moved = tmp_path / "moved-keys"
    keys.rename(moved)
    keys.symlink_to(moved)
    result = ca_run(ca, ca.data_dir, Path(ca.admin_socket))
    one_line_refusal(result, keys)
    assert "mode" not in result.stderr, result.stderr
    # The control: the same keys in a real directory start the CA again.
    keys.unlink()
    moved.rename(keys)
    ca.start_again()
