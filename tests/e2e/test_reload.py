"""SIGHUP on the real `tally ca run` and `tally agent run`: live settings change, open
connections stay, restart-only keys are named, a broken file keeps the old settings."""

from __future__ import annotations

import itertools
import os
import signal
import socket
from pathlib import Path

import pytest
import trio

from agent.ca_client import CAClient
from tally.app.launch import Daemon
from tally.ops.config import Address
from tally.spiffe import x509profile
from tally.wire import workload_client as wl
from tests.e2e.conftest import CA, ENGINES, new_datastore
from tests.e2e.test_agent import register
from tests.e2e.test_ca import TD, bundle_roots

UID = os.geteuid()


@pytest.fixture(scope="module", params=ENGINES)
def ca_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _mint(ca: CA, ttl: str, out: Path):
    return ca.cli(
        "x509", "mint", "--spiffe-id", "spiffe://example.org/r", "--ttl", ttl, "--out", str(out),
        check=False,
    )  # fmt: skip


def _reload(daemon: Daemon, n: int, event: str = "config.reloaded") -> dict:
    """SIGHUP, then the ``n``-th line of ``event`` (the daemon logs one per reload)."""
    daemon.signal(signal.SIGHUP)
    return daemon.wait_for(event, timeout=10, count=n)


async def test_ca_sighup_applies_ttls_keeps_a_parked_poll_and_old_settings_on_a_bad_file(
    tmp_path: Path, ca_engine: str, request: pytest.FixtureRequest
):
    conf = tmp_path / "ca.toml"
    conf.write_text('trust_domain = "example.org"\nmax_svid_ttl = "4h"\n')
    args = [
        "ca", "run", "--config", str(conf), "--data-dir", str(tmp_path / "ca"),
        "--listen", "127.0.0.1:0", "--admin-socket", str(tmp_path / "admin.sock"),
    ]  # fmt: skip
    if datastore := new_datastore(ca_engine, request)():
        args += ["--datastore", datastore]
    ca = CA(
        Daemon("ca", args), tmp_path / "ca", str(tmp_path / "admin.sock"), "", "", "example.org"
    )
    ca.listen = ca.daemon.start("ca.started")["listen"]
    try:
        assert _mint(ca, "3h", tmp_path).returncode == 0
        token = ca.json("token", "create")["token"]
        client = CAClient(Address.parse(ca.listen), TD, bundle_roots(ca))
        key = x509profile.generate_key()
        issued, _, _ = await client.attest(token, key)
        client.set_identity(issued.chain, key)
        revision, _ = await client.entries()  # the connection the poll below reuses
        got: dict[str, int] = {}

        async def poll() -> None:
            rev, entries = await client.entries(since=revision, wait=30)
            got["rev"], got["count"] = rev, len(entries)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            # A live change and a restart-only one in the same file.
            conf.write_text('trust_domain = "other.org"\nmax_svid_ttl = "2h"\n')
            required = await trio.to_thread.run_sync(
                lambda: _reload(ca.daemon, 1, "config.restart_required")
            )
            assert required["settings"] == ["trust_domain"]
            reloaded = ca.daemon.wait_for("config.reloaded", timeout=10)
            assert reloaded["max_svid_ttl"] == 7200 and reloaded["changed"] == ["max_svid_ttl"]
            refused = await trio.to_thread.run_sync(lambda: _mint(ca, "3h", tmp_path))
            assert refused.returncode == 1
            assert "above the CA's maximum SVID TTL of 7200s" in refused.stderr
            # Still the old trust domain: an example.org ID is ours to mint.
            assert (
                await trio.to_thread.run_sync(lambda: _mint(ca, "1h", tmp_path))
            ).returncode == 0
            # The poll parked before the reload is still there and answers the change.
            await trio.to_thread.run_sync(
                lambda: ca.cli(
                    "entry",
                    "create",
                    "--spiffe-id",
                    "spiffe://example.org/x",
                    "--parent-id",
                    issued.spiffe_id,
                    "--selector",
                    "unix:uid:1",
                )
            )
        assert got["count"] == 1 and got["rev"] > revision
        await client.aclose()

        for bad, words in (
            ('max_svid_ttl = "5h"\nmax_svid_tl = "6h"\n', "unknown key 'max_svid_tl'"),
            ('max_svid_ttl = "5h\n', "invalid TOML"),
            ('max_svid_ttl = "5x"\n', "key 'max_svid_ttl'"),
        ):
            conf.write_text('trust_domain = "example.org"\n' + bad)
            n = len(ca.daemon.events("config.reload_failed")) + 1
            failed = await trio.to_thread.run_sync(_reload, ca.daemon, n, "config.reload_failed")
            assert words in failed["error"], failed
            assert "\n" not in failed["error"]
        assert len(ca.daemon.events("config.reloaded")) == 1
        # Still serving, still with the 2h cap of the last good file.
        assert _mint(ca, "1h", tmp_path).returncode == 0
        assert _mint(ca, "3h", tmp_path).returncode == 1
    finally:
        assert ca.daemon.stop() == 0


def _garbage_to(sock_path: str) -> None:
    """Not HTTP/2: the agent drops the connection and says why at debug level."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 4)
        while s.recv(4096):
            pass


def _debug_line(daemon: Daemon) -> dict:
    for n in itertools.count(1):
        line = daemon.wait_for("log", timeout=10, count=n)
        if line.get("level") == "debug":
            return line
    raise AssertionError("unreachable")


async def test_agent_sighup_changes_log_level_and_keeps_workload_streams(
    ca: CA, agent_factory, tmp_path: Path
):
    agent = agent_factory(ca)
    agent.daemon.stop()  # again with the metrics address from a file, not a flag
    conf = tmp_path / "agent.toml"
    conf.write_text('metrics = "127.0.0.1:0"\nlog_level = "info"\n')
    flag = agent.args.index("--metrics")
    agent.args = [*agent.args[:flag], *agent.args[flag + 2 :], "--config", str(conf)]
    agent.start()
    register(ca, agent, "first", f"unix:uid:{UID}")
    async with wl.watch_x509(Path(agent.socket)) as updates:
        ctx = await updates.__anext__()
        while [s.spiffe_id for s in ctx.svids] != ["spiffe://example.org/first"]:
            ctx = await updates.__anext__()
        conf.write_text('metrics = "127.0.0.1:1"\nlog_level = "debug"\npoll_wait = "5s"\n')
        required = await trio.to_thread.run_sync(
            lambda: _reload(agent.daemon, 1, "config.restart_required")
        )
        assert required["settings"] == ["metrics"]
        reloaded = agent.daemon.wait_for("config.reloaded", timeout=10)
        assert reloaded["log_level"] == "debug" and reloaded["poll_wait"] == 5.0
        await trio.to_thread.run_sync(_garbage_to, agent.socket)
        line = await trio.to_thread.run_sync(_debug_line, agent.daemon)
        assert "workload connection" in line["message"], line
        # A bad file: one line, old settings kept, the stream still gets news.
        conf.write_text('log_level = "loud"\n')
        failed = await trio.to_thread.run_sync(
            lambda: _reload(agent.daemon, 1, "config.reload_failed")
        )
        assert "unknown level 'loud'" in failed["error"]
        await trio.to_thread.run_sync(lambda: register(ca, agent, "second", f"unix:uid:{UID}"))
        with trio.fail_after(10):
            ctx = await updates.__anext__()
        assert sorted(s.spiffe_id for s in ctx.svids) == [
            "spiffe://example.org/first",
            "spiffe://example.org/second",
        ]
    assert len(agent.daemon.events("config.reloaded")) == 1
