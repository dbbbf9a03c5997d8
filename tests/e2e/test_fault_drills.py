"""Fault drills: the failures that hurt rotation systems in production, on real processes.

Rules / theory of operation: one mesh (CA, two agents as two nodes, a server
and a client proxy in HTTP mode, a backend) is shared by the drills in file
order, because starting it costs more than most drills; each drill leaves it
healthy, the eviction drill (which takes a node out and brings it back) runs
last but for the clock drill, which needs only the CA.  SVIDs live
`SVID_TTL` seconds, so that renewals fall due inside every drill.  Each drill
runs load through the client proxy and asserts that no request failed and
that every certificate the agents and proxies put in service has its audit
record in an unbroken chain, unless the drill says otherwise.  Moments are
awaited on log lines (`Daemon.wait_for`) and on the load's counters, never
slept on.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tally.spiffe import pem, x509profile
from tally.spiffe.bundle import Bundle
from tally.spiffe.spiffeid import TrustDomain
from tally.wire import workload_client as wl
from tests.e2e.conftest import CA, openssl_available
from tests.e2e.mesh import (
    BACKEND,
    FRONTEND,
    SLOW_PREFIX,
    Mesh,
    Proxy,
    assert_served_all,
    client_proxy,
    count,
    load_on,
    log_time,
    start_mesh,
    timeline,
    wait_first,
    wait_until,
)

pytestmark = pytest.mark.drill

TD = TrustDomain.parse("example.org")
SVID_TTL = 20
"""Seconds an SVID lives in the drills: renewals fall due within each drill, and half a
life (10 s, from a renewal falling due to the SVID's end) covers a restart of the CA or
of an agent on a slow, shared 2-core host (4 s did not, in CI; 8 s did not always with
the suite held to one CPU here)."""
ROTATION = 2 * SVID_TTL
"""Longest wait for a proxy's next rotation."""
CA_ARGS = [
    "--default-svid-ttl", f"{SVID_TTL}s", "--intermediate-ttl", "60s", "--root-propagation", "3s"
]  # fmt: skip
PROXY_ARGS = ["--http", "--no-access-log"]
# Paced so that six daemons and the load share two cores without starving renewals.
LOAD: dict[str, Any] = {"keepalive": 2, "new_conn": 1, "xfcc": FRONTEND, "pace": 0.01}
DRAIN_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def shared_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = start_mesh(tmp_path_factory.mktemp("mesh"), CA_ARGS, PROXY_ARGS)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def mesh(shared_mesh: Mesh) -> Mesh:
    """The shared mesh, back on its feet if an earlier drill failed half-way, so that
    one failure is reported once instead of again by every drill after it."""
    recover(shared_mesh)
    return shared_mesh


def recover(mesh: Mesh) -> None:
    if mesh.ca.daemon.proc is None or mesh.ca.daemon.proc.poll() is not None:
        mesh.ca.start_again()
    for agent in (mesh.client_agent, mesh.server_agent):
        if agent.daemon.proc is None or agent.daemon.proc.poll() is not None:
            mesh.retired.append(agent.daemon)
            agent.start()
    for proxy in (mesh.server.daemon, mesh.client.daemon):
        last = (proxy.events("svid.rotated") or proxy.events("svid.loaded"))[-1]
        if datetime.fromisoformat(last["not_after"]) < datetime.now(UTC) + timedelta(seconds=2):
            wait_until(proxy, "svid.rotated", after=count(proxy, "svid.rotated"), timeout=ROTATION)
    alive(mesh)


def alive(mesh: Mesh) -> None:
    """Every daemon of the mesh is running."""
    for daemon in mesh.daemons():
        assert daemon.proc is not None and daemon.proc.poll() is None, (
            f"{daemon.name} is not running:\n" + "".join(daemon.raw[-20:])
        )


def node_pids(mesh: Mesh) -> list[int]:
    """The agents' and proxies' pids, to show that nobody restarted them."""
    return [d.pid for d in mesh.daemons() if d is not mesh.ca.daemon]


def fetch(socket_path: str) -> wl.X509Context:
    return trio.run(wl.fetch_x509, Path(socket_path))


def audited(ca: CA) -> set[tuple[str, str]]:
    records = ca.json("audit", "list", "--limit", "1000000")["records"]
    return {
        (r["spiffe_id"], r["serial"])
        for r in records
        if r["event"] in ("svid.issued", "svid.renewed")
    }


def served(mesh: Mesh) -> set[tuple[str, str]]:
    """Every (SPIFFE ID, serial) an agent handed out or a proxy put in service."""
    out = set()
    agents = [mesh.client_agent.daemon, mesh.server_agent.daemon, *mesh.retired]
    for daemon in agents:
        for line in daemon.events("agent.attested") + daemon.events("svid.issued"):
            out.add((line["spiffe_id"], line["serial"]))
        for line in daemon.events("svid.rotated"):
            out.add((line["spiffe_id"], line["new_serial"]))
    for proxy in (mesh.server.daemon, mesh.client.daemon):
        for line in proxy.events("svid.loaded") + proxy.events("svid.rotated"):
            out.add((line["spiffe_id"], line["serial"]))
    return out


def assert_audit_complete(mesh: Mesh) -> None:
    """No lost audit record: the chain verifies and every certificate served is in it."""
    result = mesh.ca.cli("audit", "verify")
    assert "unbroken" in result.stdout, result.stdout
    missing = served(mesh) - audited(mesh.ca)
    assert not missing, f"served but never audited: {sorted(missing)}"


def test_ca_killed_under_load_agents_serve_from_cache(mesh: Mesh):
    pids = node_pids(mesh)
    proxies = (mesh.server, mesh.client)
    agents = (mesh.client_agent, mesh.server_agent)
    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        failed = [count(a.daemon, "rotation.failed") for a in agents]
        mesh.ca.daemon.kill()
        outage = load.mark()
        # A renewal falls due with the CA gone: it fails, and the agents keep serving what
        # they hold.  (The first such failure is the moment to bring the CA back: every
        # SVID then still has more than half its life ahead.)
        wait_first(
            [a.daemon for a in agents],
            "rotation.failed",
            lambda line: line["what"] == "workload_svids",
            after=failed,
            timeout=SVID_TTL,
        )
        for agent, sid in zip(agents, (FRONTEND, BACKEND), strict=True):
            cached = fetch(agent.socket).default_svid
            assert cached.spiffe_id == sid
            assert cached.leaf.not_valid_after_utc > datetime.now(UTC)
        served_without_ca = load.since(outage)["ok"]  # no wait here: the CA comes back now
        rotated = [count(p.daemon, "svid.rotated") for p in proxies]
        mesh.ca.start_again()
        assert served_without_ca >= 20, load.results  # traffic flowed with no CA at all
        assert_served_all(load, mesh)
        # Rotation resumes on its own: the same agents and proxies take new SVIDs.
        for p, seen, sid in zip(proxies, rotated, (BACKEND, FRONTEND), strict=True):
            line = wait_until(p.daemon, "svid.rotated", after=seen, timeout=ROTATION)
            assert line["spiffe_id"] == sid
        load.wait_ok(20)
    assert_served_all(load, mesh)
    alive(mesh)
    assert node_pids(mesh) == pids
    assert_audit_complete(mesh)


def test_agent_killed_under_load_proxy_keeps_svid_and_reconnects(mesh: Mesh):
    """Three times in a row, as over a node's life of upgrades: each restart must be as
    quick to recover from as the first."""
    agent = mesh.client_agent
    proxy = mesh.client.daemon
    proxy_pid = proxy.pid

    def story() -> str:
        return timeline(proxy, "svid.loaded", "svid.rotated", "workload.error")

    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        n = count(proxy, "svid.rotated")
        picked_up: dict[str, Any] | None = None
        for _ in range(3):
            # Killed just after a rotation, the proxy holds an SVID with its whole life
            # ahead, as a node mostly does in production (where that is an hour, not seconds).
            fresh = wait_until(proxy, "svid.rotated", after=n, timeout=ROTATION)
            if picked_up is not None:  # the restarted agent's next rotation reached it
                assert fresh["old_serial"] == picked_up["serial"]
            mesh.retired.append(agent.daemon)
            agent.daemon.kill()
            lost = proxy.wait_for("workload.error", count=count(proxy, "workload.error") + 1)
            assert agent.socket in lost["socket"]
            load.wait_ok(20, timeout=5)  # the proxy serves on with the SVID it has
            assert count(proxy, "svid.rotated") == n + 1, story()
            agent.start()  # same data dir: no join token
            assert agent.daemon.events("agent.resumed")
            # It reconnects to the stream and takes the restarted agent's SVID in time.
            picked_up = wait_until(proxy, "svid.rotated", after=n + 1, timeout=ROTATION)
            assert picked_up["old_serial"] == fresh["serial"], story()
            held_until = datetime.fromisoformat(fresh["not_after"])
            assert log_time(picked_up) < held_until, "picked up too late:\n" + story()
            n += 2
        last = wait_until(proxy, "svid.rotated", after=n, timeout=ROTATION)
        assert picked_up is not None and last["old_serial"] == picked_up["serial"], story()
        load.wait_ok(20)
    print(story())  # shown only if an assertion below fails
    assert_served_all(load, mesh)
    assert proxy.pid == proxy_pid and proxy.proc.poll() is None
    alive(mesh)
    assert_audit_complete(mesh)


def bundle_roots(ca: CA) -> list[x509.Certificate]:
    return pem.chain_from_pem(ca.json("bundle", "show")["bundle"].encode())


def chains_to(socket_path: str, root: x509.Certificate) -> bool:
    chain = fetch(socket_path).default_svid.chain
    try:
        x509profile.verify_chain(chain, TD, (root,), datetime.now(UTC))
    except x509profile.ProfileError:
        return False
    return True


def test_signing_key_then_root_rotated_under_load(mesh: Mesh):
    ca = mesh.ca
    proxies: tuple[Proxy, ...] = (mesh.server, mesh.client)
    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        rotated = {p.daemon.name: count(p.daemon, "svid.rotated") for p in proxies}
        ca.cli("rotate")
        for p in proxies:
            wait_until(p.daemon, "svid.rotated", after=rotated[p.daemon.name], timeout=ROTATION)

        old_roots = bundle_roots(ca)
        updated = {p.daemon.name: count(p.daemon, "bundle.updated") for p in proxies}
        steps = count(ca.daemon, "key.rotated")
        ca.cli("rotate", "--root")
        new_roots = [r for r in bundle_roots(ca) if r not in old_roots]
        assert len(new_roots) == 1, new_roots
        new_root = new_roots[0]
        activated = wait_until(
            ca.daemon,
            "key.rotated",
            lambda line: line["step"] == "activate_root",
            after=steps,
            timeout=15,
        )
        # The new root reached both proxies before anything chained to it ...
        for p in proxies:
            line = wait_until(p.daemon, "bundle.updated", after=updated[p.daemon.name], timeout=5)
            assert log_time(line) < log_time(activated), (line, activated)
        # ... and the old one stays trusted while what it signed is still valid.
        assert set(old_roots) <= set(bundle_roots(ca))
        # From then on the SVIDs both proxies rotate to chain to the new root.
        for p, agent in ((mesh.server, mesh.server_agent), (mesh.client, mesh.client_agent)):
            after = count(p.daemon, "svid.rotated")
            for _ in range(3):
                wait_until(p.daemon, "svid.rotated", after=after, timeout=ROTATION)
                after += 1
                if chains_to(agent.socket, new_root):
                    break
            else:
                raise AssertionError(f"{p.daemon.name} never got an SVID under the new root")
        load.wait_ok(20)
    assert_served_all(load, mesh)
    alive(mesh)
    assert_audit_complete(mesh)


def slow_request(proxy: Proxy, results: list[Any], keepalive: bool) -> None:
    """One slow request, on a new connection or after a fast one on a kept-alive one."""
    conn = http.client.HTTPConnection(*proxy.host_port, timeout=10)
    try:
        if keepalive:
            conn.request("GET", "/warm")
            conn.getresponse().read()
        conn.request("GET", SLOW_PREFIX + ("keepalive" if keepalive else "new"))
        resp = conn.getresponse()
        results.append((resp.status, resp.read(), resp.will_close))
    except (OSError, http.client.HTTPException) as exc:
        results.append(exc)
    finally:
        conn.close()


def connect_outcome(address: tuple[str, int]) -> str:
    try:
        with socket.create_connection(address, timeout=3):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return repr(exc)


def test_proxy_drained_with_sigterm_under_load(mesh: Mesh):
    drain = client_proxy(
        mesh.client_agent.socket,
        mesh.server.listen,
        *PROXY_ARGS,
        "--drain-timeout",
        f"{DRAIN_TIMEOUT:.0f}s",
        name="drain-proxy",
    )
    try:
        with load_on(drain, **LOAD) as load:
            load.wait_ok(20)
            slow: list[Any] = []
            threads = [
                threading.Thread(target=slow_request, args=(drain, slow, keepalive))
                for keepalive in (False, False, True)
            ]
            for t in threads:
                t.start()
            mesh.backend.wait_slow_in_flight(len(threads))
            signalled = time.time()
            drain.daemon.signal(signal.SIGTERM)
            draining = drain.daemon.wait_for("proxy.draining", timeout=5)
            assert draining["open_connections"] >= len(threads)
            # Within moments new connections are refused, each at once: nothing hangs.
            # (One that the kernel completes in the instant before the listener closes
            # is reset; the load below may meet that, and only then.)
            outcomes = [connect_outcome(drain.host_port)]
            while outcomes[-1] != "refused" and time.time() < signalled + 0.5:
                outcomes.append(connect_outcome(drain.host_port))
            closed_by = time.time()
            probe_started = time.monotonic()
            outcomes += [connect_outcome(drain.host_port) for _ in range(3)]
            assert outcomes[-4:] == ["refused"] * 4, outcomes[-10:]
            assert time.monotonic() - probe_started < 1.0
            for t in threads:
                t.join(10)
            code = drain.daemon.proc.wait(DRAIN_TIMEOUT + 5)
            took = time.time() - signalled
        # In-flight requests finished, the kept-alive one told to close after its answer.
        assert len(slow) == len(threads), slow
        for result in slow:
            assert isinstance(result, tuple) and result[0] == 200, slow
            assert result[1].startswith(b"hello " + SLOW_PREFIX.encode()), slow
        assert [r[2] for r in slow] == [True] * len(threads), slow
        assert code == 0 and took < DRAIN_TIMEOUT, (code, took)
        stopped = drain.daemon.wait_for("proxy.stopped", timeout=5)
        assert stopped["open_connections"] == 0
        # The load got answers until the drain; then idle kept-alive connections were
        # closed, new ones refused; nothing hung and no request got an error answer.
        before = [outcome for at, outcome in load.failed_at if at < signalled]
        assert not before, (before, load.errors)
        assert load.results["failed"] == 0 and load.results["bad"] == 0, (
            load.results,
            load.errors,
        )
        late_resets = [at - closed_by for at, outcome in load.failed_at if outcome == "reset"]
        assert all(t < 0.5 for t in late_resets), (late_resets, load.errors)
    finally:
        drain.daemon.stop()
    alive(mesh)


def test_evicted_agent_svids_expire_and_a_new_token_restores_it(mesh: Mesh):
    ca = mesh.ca
    agent = mesh.client_agent
    proxy = mesh.client.daemon
    with load_on(mesh.client, **LOAD) as load:
        load.wait_ok(20)
        denied = count(mesh.server.daemon, "peer.denied")
        gone = count(agent.daemon, "svid.expired")  # an earlier drill's outage may have some
        ca.cli("agent", "evict", agent.spiffe_id)
        agent.daemon.wait_for("agent.evicted", timeout=ROTATION)
        # Not renewed any more: what the agent holds runs out, and the peer refuses it.
        expired = wait_until(
            agent.daemon,
            "svid.expired",
            lambda line: line["spiffe_id"] == FRONTEND,
            after=gone,
            timeout=ROTATION,
        )
        last = (proxy.events("svid.rotated") or proxy.events("svid.loaded"))[-1]
        assert last["serial"] == expired["serial"]
        refused = wait_until(
            mesh.server.daemon,
            "peer.denied",
            lambda line: line["reason"] == "expired",
            after=denied,
            timeout=ROTATION,
        )
        assert "depth 0" in refused["detail"], refused  # the caller's own certificate
        load.wait_failures(1, timeout=SVID_TTL)
        not_after = datetime.fromisoformat(last["not_after"]).timestamp()
        first_failure = load.failed_at[0][0]
        assert first_failure >= not_after - 1, ("failed before the SVID expired", load.failed_at)
        # A new join token for the same agent ID brings the node back.
        token = ca.json("token", "create", "--spiffe-id", agent.spiffe_id)["token"]
        rotated = count(proxy, "svid.rotated")
        mesh.retired.append(agent.daemon)
        agent.restart("--join-token", token)
        assert agent.daemon.events("agent.attested"), "".join(agent.daemon.raw[-10:])
        wait_until(proxy, "svid.rotated", after=rotated, timeout=ROTATION)
        load.wait_ok(10)
        mark = load.mark()
        load.wait_ok(40)
        since = load.since(mark)
        assert set(since) == {"ok"}, (since, load.errors[-5:])
    alive(mesh)
    assert_audit_complete(mesh)


def openssl_verify(leaf: Path, untrusted: Path, roots: Path, at: datetime) -> str:
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            str(int(at.timestamp())),
            "-CAfile",
            str(roots),
            "-untrusted",
            str(untrusted),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "ok" if result.returncode == 0 else (result.stdout + result.stderr).strip()


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def not_yet_valid(chain: list[x509.Certificate], bundle: Bundle, at: datetime) -> list[str]:
    """Each certificate of the chain and of its root that a peer whose clock reads ``at``
    would find not yet valid, named by its place in the chain."""
    roots = [r for r in bundle.x509_authorities if issued_by(chain[-1], r)]
    path = list(zip(("leaf", *["intermediate"] * (len(chain) - 1)), chain, strict=True))
    path += [("root", r) for r in roots]
    return [
        f"{kind} (serial {cert.serial_number:x}) starts at {cert.not_valid_before_utc:%H:%M:%S}"
        for kind, cert in path
        if cert.not_valid_before_utc > at
    ]


def mint(ca: CA, out: Path) -> tuple[list[x509.Certificate], Bundle, tuple[Path, Path, Path]]:
    out.mkdir()
    ca.json(
        "x509", "mint", "--spiffe-id", "spiffe://example.org/skew", "--ttl", "1h", "--out", str(out)
    )
    chain = pem.chain_from_pem((out / "svid.pem").read_bytes())
    bundle = Bundle.from_pem(TD, (out / "bundle.pem").read_bytes())
    (out / "leaf.pem").write_bytes(pem.chain_to_pem(chain[:1]))
    (out / "intermediates.pem").write_bytes(pem.chain_to_pem(chain[1:]))
    return chain, bundle, (out / "leaf.pem", out / "intermediates.pem", out / "bundle.pem")


def test_peer_with_clock_behind_accepts_a_fresh_svid(mesh: Mesh, ca_factory, tmp_path: Path):
    """Clocks a few seconds apart between CA and agent do not break freshly issued SVIDs.

    A test cannot set one process's clock back: changing the system clock needs
    privileges and would move every process at once, and faking time inside the
    daemons would drill the fake, not Tally.  What makes skew harmless is a property
    of the certificates themselves: the CA backdates not_before (the leaf by
    min(10 s, TTL/10), `ca.authority.not_before_cushion`), so a peer whose clock is
    N seconds behind accepts a chain as long as every certificate on it started
    more than N seconds before the CA's now.  So the drill mints real SVIDs (TTL 1 h
    asked) at the moments when the CA's keys are youngest, just after a CA's first
    start and just after a signing-key rotation (on the mesh CA, whose root is old
    by then), and validates each chain as a peer 5 s behind would: with OpenSSL
    (``verify -attime``) and with the chain validation every Tally proxy and agent
    runs (`tally.spiffe.x509profile.verify_chain`).  Controls at the real now must pass
    and before the leaf's not_before must fail, so the check can fail.
    """
    if not openssl_available():
        pytest.skip("needs the openssl command")
    fresh_ca = ca_factory(subdir="fresh")  # production lifetimes: 1 h SVIDs, 24 h signing keys
    problems = []
    for moment, ca in (
        ("just after the CA's first start", fresh_ca),
        ("just after a signing-key rotation", mesh.ca),
    ):
        if "rotation" in moment:
            ca.cli("rotate")
        before = datetime.now(UTC).replace(microsecond=0)
        chain, bundle, files = mint(ca, tmp_path / moment.replace(" ", "-").replace("'", ""))
        after = datetime.now(UTC)
        leaf = chain[0]
        # The leaf is backdated by the full cushion.
        cushion = timedelta(seconds=10)
        assert before - cushion <= leaf.not_valid_before_utc <= after - cushion, moment
        # Controls: valid now; not valid before its not_before, to either validator.
        x509profile.verify_chain(
            chain, bundle.trust_domain, bundle.x509_authorities, datetime.now(UTC)
        )
        assert openssl_verify(*files, datetime.now(UTC)) == "ok", moment
        too_early = leaf.not_valid_before_utc - timedelta(seconds=1)
        with pytest.raises(x509profile.ProfileError):
            x509profile.verify_chain(chain, bundle.trust_domain, bundle.x509_authorities, too_early)
        assert openssl_verify(*files, too_early) != "ok", moment
        # A peer 5 s behind the CA.
        behind = datetime.now(UTC) - timedelta(seconds=5)
        try:
            x509profile.verify_chain(chain, bundle.trust_domain, bundle.x509_authorities, behind)
        except x509profile.ProfileError as exc:
            problems.append(f"{moment}: verify_chain 5 s behind: {exc}")
        verdict = openssl_verify(*files, behind)
        if verdict != "ok":
            problems.append(f"{moment}: openssl verify 5 s behind: {verdict.splitlines()[:2]}")
        young = not_yet_valid(chain, bundle, behind)
        if young:
            problems.append(f"{moment}: not yet valid 5 s behind ({behind:%H:%M:%S}): {young}")
    assert not problems, "\n".join(problems)
