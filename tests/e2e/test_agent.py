"""The real `tally agent run` against a real CA, seen through py-spiffe and our own client."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
from cryptography import x509

from tally.app.launch import run_cli
from tally.wire import workload_client as wl
from tests.e2e.conftest import CA, Agent

UID = os.geteuid()


def probe(*args: str, timeout: float = 60, python: Path | None = None) -> list[dict]:
    """Run tests/e2e/spiffe_probe.py; with ``python`` (the ``dropped_python`` fixture's),
    from a copy beside that interpreter, which a probe that drops its uid can still read.
    """
    if python is None:
        command = [sys.executable, "-m", "tests.e2e.spiffe_probe"]
        cwd = Path(__file__).parents[2]
    else:
        cwd = python.parents[1]
        script = cwd / "spiffe_probe.py"
        if not script.exists():
            shutil.copyfile(Path(__file__).with_name("spiffe_probe.py"), script)
            script.chmod(0o644)
        command = [str(python), "-I", str(script)]
    result = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def register(ca: CA, agent: Agent, name: str, *selectors: str, ttl: str | None = None) -> dict:
    args = [
        "entry",
        "create",
        "--spiffe-id",
        f"spiffe://example.org/{name}",
        "--parent-id",
        agent.spiffe_id,
    ]
    for sel in selectors:
        args += ["--selector", sel]
    if ttl:
        args += ["--ttl", ttl]
    return ca.json(*args)


def wait_fetch(agent: Agent, spiffe_id: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = probe("fetch", agent.socket)[0]
        if "svids" in out and any(s["spiffe_id"] == spiffe_id for s in out["svids"]):
            return out
        assert time.monotonic() < deadline, out
        time.sleep(0.2)


def readyz(agent: Agent) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{agent.metrics}/readyz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_py_spiffe_fetches_svid_and_bundle(ca: CA, agent_factory):
    agent = agent_factory(ca)
    register(ca, agent, "web", f"unix:uid:{UID}")
    out = wait_fetch(agent, "spiffe://example.org/web")
    assert out["bundles"] == {"example.org": 1}
    svid = out["svids"][0]
    assert 3500 < svid["not_after"] - time.time() <= 3600
    status, body = readyz(agent)
    assert status == 200, body
    with urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "tally_agent_svids 1.0" in text
    assert 'tally_agent_workload_requests_total{method="FetchX509SVID"' in text
    assert "tally_agent_rotations_total" in text
    cli = run_cli("agent", "api", "fetch", "--socket", agent.socket, "--output", "json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["svids"][0]["serial"] == svid["serial"]


def test_x509_source_sees_rotation_before_half_life(ca_factory, agent_factory):
    ca = ca_factory("--default-svid-ttl", "8s")
    agent = agent_factory(ca)
    register(ca, agent, "short", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/short")
    updates = probe("source", agent.socket, "14")
    serials = [u["serial"] for u in updates]
    assert len(set(serials)) >= 3, updates
    # Each new serial arrived before its predecessor was past half its life.
    for old, new in itertools.pairwise(updates):
        if new["serial"] != old["serial"]:
            half = old["not_before"] + (old["not_after"] - old["not_before"]) / 2
            assert new["at"] < half + 0.05, (old, new)
    rotated = agent.daemon.events("svid.rotated")
    assert rotated and {"old_serial", "new_serial"} <= set(rotated[0])


def test_other_uid_is_denied_until_it_has_its_own_entry(ca: CA, agent_factory, request):
    if UID != 0:
        pytest.skip("needs root to run a client under another uid")
    python = request.getfixturevalue("dropped_python")  # not built where the test skips
    agent = agent_factory(ca)
    register(ca, agent, "root-only", "unix:uid:0")
    wait_fetch(agent, "spiffe://example.org/root-only")
    denied = probe("fetch", agent.socket, "--uid", "65534", python=python)[0]
    assert "PERMISSION_DENIED" in denied["error"]
    line = agent.daemon.wait_for("workload.denied")
    assert line["uid"] == 65534 and "unix:uid:65534" in line["selectors"]
    register(ca, agent, "nobody", "unix:uid:65534")
    deadline = time.monotonic() + 10
    while True:
        out = probe("fetch", agent.socket, "--uid", "65534", python=python)[0]
        if "svids" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.2)
    assert [s["spiffe_id"] for s in out["svids"]] == ["spiffe://example.org/nobody"]


async def test_new_entry_reaches_a_streaming_workload_within_a_second(ca: CA, agent_factory):
    agent = agent_factory(ca)
    register(ca, agent, "first", f"unix:uid:{UID}")
    async with wl.watch_x509(Path(agent.socket)) as updates:
        ctx = await updates.__anext__()
        while [s.spiffe_id for s in ctx.svids] != ["spiffe://example.org/first"]:
            ctx = await updates.__anext__()
        await trio.to_thread.run_sync(lambda: register(ca, agent, "second", f"unix:uid:{UID}"))
        created = time.monotonic()
        with trio.fail_after(5):
            ctx = await updates.__anext__()
        elapsed = time.monotonic() - created
        assert sorted(s.spiffe_id for s in ctx.svids) == [
            "spiffe://example.org/first",
            "spiffe://example.org/second",
        ]
        assert elapsed < 1.0, elapsed
        # Deleted at the CA: no longer served.
        entry = ca.json("entry", "list", "--spiffe-id", "spiffe://example.org/second")["entries"][0]
        await trio.to_thread.run_sync(lambda: ca.cli("entry", "delete", entry["id"]))
        with trio.fail_after(5):
            ctx = await updates.__anext__()
        assert [s.spiffe_id for s in ctx.svids] == ["spiffe://example.org/first"]


def test_sigterm_ends_workload_streams_cleanly(ca: CA, agent_factory):
    """SIGTERM drains the Workload API: py-spiffe's open stream ends with the agent's
    own UNAVAILABLE trailers (a reset shows grpc's "Socket closed" instead), and the
    agent exits 0 as soon as its calls have ended, well inside its drain timeout."""
    agent = agent_factory(ca, "node-1", "--drain-timeout", "20s")
    register(ca, agent, "drained", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/drained")
    with subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.spiffe_probe", "stream", agent.socket],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    ) as client:
        try:
            assert client.stdout is not None
            assert json.loads(client.stdout.readline()) == {"svids": 1}
            started = time.monotonic()
            assert agent.daemon.stop(timeout=20) == 0
            stopped = time.monotonic() - started
            end = json.loads(client.stdout.readline())
        finally:
            client.kill()
    assert end == {"end": "UNAVAILABLE", "details": "the agent is shutting down"}
    assert stopped < 10, stopped
    assert not Path(agent.socket).exists()


def test_ca_outage_serves_cache_then_catches_up(ca_factory, agent_factory):
    ca = ca_factory("--default-svid-ttl", "20s")
    agent = agent_factory(ca)
    register(ca, agent, "web", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/web")
    ca.daemon.stop()
    # With the CA gone nothing can be renewed: past the renewal point the agent keeps
    # trying and says so, and what it served before is what it serves now.
    before = probe("fetch", agent.socket)[0]["svids"][0]
    agent.daemon.wait_for("rotation.failed", timeout=20)
    during = probe("fetch", agent.socket)[0]
    assert during["svids"][0]["serial"] == before["serial"]  # served from the cache
    with urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "tally_agent_rotation_failures_total" in text
    assert "tally_agent_soonest_expiry_seconds" in text
    ca.start_again()
    deadline = time.monotonic() + 40
    while True:
        now = probe("fetch", agent.socket)[0]
        if "svids" in now and now["svids"][0]["serial"] != before["serial"]:
            break
        assert time.monotonic() < deadline, "rotation never resumed"
        time.sleep(0.5)
    assert agent.daemon.proc.poll() is None  # no agent restart was needed


def test_sigkill_restart_needs_no_token(ca: CA, agent_factory):
    agent = agent_factory(ca)
    register(ca, agent, "web", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/web")
    key_file = agent.data_dir / "agent_svid.pem"
    assert oct(os.stat(key_file).st_mode & 0o777) == "0o600"
    agent.daemon.kill()
    agent.start()  # no --join-token
    assert agent.daemon.events("agent.resumed")
    wait_fetch(agent, "spiffe://example.org/web")


def test_eviction_stops_new_identities_and_restart_says_why(ca_factory, agent_factory):
    ca = ca_factory("--agent-svid-ttl", "4s")
    agent = agent_factory(ca)
    register(ca, agent, "web", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/web")
    ca.cli("agent", "evict", agent.spiffe_id)
    line = agent.daemon.wait_for("agent.evicted", timeout=15)
    assert "join-token" in line["action"]
    status, body = readyz(agent)
    assert status == 503 and "evicted" in body
    # It does not loop: after the first refusal the CA sees no more calls from it.
    time.sleep(3)
    assert len(agent.daemon.events("agent.evicted")) == 1
    agent.daemon.stop()
    svid = x509.load_pem_x509_certificates((agent.data_dir / "agent_svid.pem").read_bytes())[0]
    time.sleep(max(0.0, svid.not_valid_after_utc.timestamp() - time.time()) + 0.5)  # expired
    result = run_cli(*agent.args)
    assert result.returncode == 1
    assert "expired" in result.stderr and "--join-token" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evicted_agent_comes_back_with_a_new_token_while_its_svid_is_valid(ca: CA, agent_factory):
    agent = agent_factory(ca)
    register(ca, agent, "web", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/web")
    ca.cli("agent", "evict", agent.spiffe_id)
    agent.daemon.wait_for("agent.evicted", timeout=15)
    agent.daemon.stop()
    token = ca.json("token", "create", "--spiffe-id", agent.spiffe_id)["token"]
    agent.start("--join-token", token)  # its stored SVID is still valid, but refused
    assert agent.daemon.events("agent.reattesting")
    assert agent.daemon.events("agent.attested")
    wait_fetch(agent, "spiffe://example.org/web")
    # A later restart with the same (now spent) token resumes instead of failing.
    agent.restart("--join-token", token)
    assert agent.daemon.events("agent.resumed")


def test_restored_backup_is_stale_not_evicted_and_a_new_token_recovers_it(
    ca_factory, agent_factory, tmp_path: Path
):
    # 40 s agent SVIDs: two renewals come by 0.96 of the first one's life, so the copy
    # taken before them is superseded twice (stale) and still unexpired when restored.
    ca = ca_factory("--agent-svid-ttl", "40s")
    agent = agent_factory(ca)
    backup = tmp_path / "backup"
    shutil.copytree(agent.data_dir, backup)
    register(ca, agent, "web", f"unix:uid:{UID}")
    wait_fetch(agent, "spiffe://example.org/web")
    agent.daemon.wait_for("svid.rotated", timeout=40, count=2)
    agent.daemon.stop()
    shutil.rmtree(agent.data_dir)
    shutil.copytree(backup, agent.data_dir)
    agent.start()  # no token: the restored SVID is valid, so the agent resumes with it
    line = agent.daemon.wait_for("agent.stale", timeout=15)
    assert "restored from a backup" in line["detail"] and "(serial " in line["detail"]
    assert f"--spiffe-id {agent.spiffe_id}" in line["action"]
    assert not agent.daemon.events("agent.evicted")
    with urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=5) as resp:
        assert "tally_agent_evicted 0.0" in resp.read().decode()
    status, body = readyz(agent)
    assert status == 503 and "stale" in body
    agent.daemon.stop()
    token = ca.json("token", "create", "--spiffe-id", agent.spiffe_id)["token"]
    agent.start("--join-token", token)
    assert agent.daemon.events("agent.reattesting")[0]["reason"] == "stale_svid"
    assert agent.daemon.events("agent.attested")[0]["spiffe_id"] == agent.spiffe_id
    wait_fetch(agent, "spiffe://example.org/web")  # its entries stayed parented to it
    records = ca.json("audit", "list", "--event", "agent.reattested")["records"]
    assert [r["spiffe_id"] for r in records] == [agent.spiffe_id]


def test_first_start_without_token_is_one_line(ca: CA, tmp_path: Path):
    bundle = tmp_path / "b.pem"
    bundle.write_text(ca.json("bundle", "show")["bundle"])
    result = run_cli(
        "agent",
        "run",
        "--trust-domain",
        "example.org",
        "--server",
        ca.listen,
        "--trust-bundle",
        str(bundle),
        "--data-dir",
        str(tmp_path / "a"),
        "--socket",
        str(tmp_path / "a.sock"),
    )
    assert result.returncode == 1
    assert "--join-token" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli(
        "agent",
        "run",
        "--trust-domain",
        "example.org",
        "--server",
        ca.listen,
        "--trust-bundle",
        str(bundle),
        "--data-dir",
        str(tmp_path / "b"),
        "--socket",
        str(tmp_path / "b.sock"),
        "--join-token",
        "0123456789abcdef.bad-secret-xxxxxxxxxxxxxxxxx",
    )
    assert result.returncode == 1 and "attestation refused" in result.stderr
