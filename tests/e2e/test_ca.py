"""The real `tally ca run` process, driven by the real CLI and a real mTLS client.

Every test that starts a CA runs on both datastore engines (`ca_engine`), but
for the one about the SQLite deployment's key files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.ca_client import CAClient, CAError, make_csr
from tally.app.launch import Daemon, run_cli
from tally.ops.config import Address
from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tests.e2e.conftest import CA, ENGINES, sqlite_only

TD = TrustDomain.parse("example.org")


@pytest.fixture(scope="module", params=ENGINES)
def ca_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bundle_roots(ca: CA) -> list[x509.Certificate]:
    return pem.chain_from_pem(ca.json("bundle", "show")["bundle"].encode())


async def attested_client(ca: CA, agent_id: str | None = None) -> tuple[CAClient, str]:
    args = ["token", "create"] + (["--spiffe-id", agent_id] if agent_id else [])
    token = ca.json(*args)["token"]
    client = CAClient(Address.parse(ca.listen), TD, bundle_roots(ca))
    key = x509profile.generate_key()
    issued, _bundle, _seq = await client.attest(token, key)
    client.set_identity(issued.chain, key)
    return client, issued.spiffe_id


def test_mint_passes_openssl_verify_and_py_spiffe(ca: CA, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    shown = ca.json(
        "x509", "mint", "--spiffe-id", "spiffe://example.org/web", "--ttl", "10m", "--out", str(out)
    )
    assert shown["spiffe_id"] == "spiffe://example.org/web"
    assert "private_key" not in shown
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    chain = pem.chain_from_pem((out / "svid.pem").read_bytes())
    assert len(chain) == 2
    life = chain[0].not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=9) < life <= timedelta(minutes=10)
    (out / "leaf.pem").write_bytes(pem.chain_to_pem(chain[:1]))
    (out / "inter.pem").write_bytes(pem.chain_to_pem(chain[1:]))
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(out / "bundle.pem"),
            "-untrusted",
            str(out / "inter.pem"),
            str(out / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip().endswith("OK")
    # py-spiffe runs in its own process: its generated protobuf module must not
    # share a descriptor pool with ours (spiffe-spec.md, pitfall 1).
    code = (
        "import sys; from spiffe import X509Svid;"
        "s = X509Svid.load(sys.argv[1], sys.argv[2], serialization.Encoding.PEM);"
        "print(s.spiffe_id)"
    )
    probe = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            "from cryptography.hazmat.primitives import serialization;" + code,
            str(out / "svid.pem"),
            str(out / "key.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "spiffe://example.org/web"
    # The mint is audited like any issuance, and the audit chain holds.
    records = ca.json(
        "audit", "list", "--event", "svid.issued", "--spiffe-id", "spiffe://example.org/web"
    )["records"]
    assert [r["serial"] for r in records] == [shown["serial"]]
    assert ca.json("audit", "verify")["ok"] is True


def test_mint_above_max_ttl_is_refused(ca: CA, tmp_path: Path):
    result = ca.cli(
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--ttl",
        "25h",
        "--out",
        str(tmp_path),
        check=False,
    )
    assert result.returncode == 1
    assert "above the CA's maximum SVID TTL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_attest_list_sign_and_entry_ownership(ca: CA):
    client, agent_id = await attested_client(ca)
    assert agent_id.startswith("spiffe://example.org/agent/join_token/")
    other, other_id = await attested_client(ca, "spiffe://example.org/agent/node-b")
    assert other_id == "spiffe://example.org/agent/node-b"
    mine = ca.json(
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        agent_id,
        "--selector",
        "unix:uid:1000",
        "--ttl",
        "5m",
        "--dns-name",
        "web.internal",
    )
    theirs = ca.json(
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/db",
        "--parent-id",
        other_id,
        "--selector",
        "unix:uid:0",
    )
    revision, entries = await client.entries()
    assert [e["id"] for e in entries] == [mine["id"]]
    assert revision >= 2
    key = x509profile.generate_key()
    results = await client.sign([(mine["id"], make_csr(key)), (theirs["id"], make_csr(key))])
    assert results[1]["error"] == "not_authorized"
    chain = results[0]["chain"]
    assert x509profile.validate_leaf(chain[0]) == SpiffeId.parse("spiffe://example.org/web")
    assert chain[0].public_key().public_numbers() == key.public_key().public_numbers()
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.internal"]
    assert chain[0].not_valid_after_utc - datetime.now(UTC) <= timedelta(minutes=5)
    # The renewed agent SVID works, and the old one still works once (the overlap).
    renewed = await client.renew(key)
    client.set_identity(renewed.chain, key)
    assert (await client.entries())[0] == revision
    await client.aclose()
    await other.aclose()


async def test_change_reaches_a_long_poll_in_well_under_a_second(ca: CA):
    client, agent_id = await attested_client(ca)
    revision, _ = await client.entries()
    got: dict[str, float] = {}

    async def poll() -> None:
        rev, entries = await client.entries(since=revision, wait=20)
        got["at"] = time.monotonic()
        got["count"] = len(entries)
        got["rev"] = rev

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.5)  # let the poll reach the CA and park
        t0 = time.monotonic()
        await trio.to_thread.run_sync(
            lambda: ca.cli(
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                agent_id,
                "--selector",
                "unix:uid:1",
            )
        )
    # The CLI call itself (a fresh Python process) is most of that time.
    assert got["count"] == 1 and got["rev"] > revision
    assert got["at"] - t0 < 5.0
    await client.aclose()


async def test_token_single_use_expiry_eviction_and_ban(ca: CA):
    token = ca.json("token", "create", "--spiffe-id", "spiffe://example.org/agent/n1")["token"]
    client = CAClient(Address.parse(ca.listen), TD, bundle_roots(ca))
    key = x509profile.generate_key()
    issued, _, _ = await client.attest(token, key)
    with pytest.raises(CAError) as info:
        await client.attest(token, key)
    assert info.value.code == "attestation_failed" and "already used" in info.value.message
    short = ca.json("token", "create", "--ttl", "1s")["token"]
    await trio.sleep(2.1)
    with pytest.raises(CAError) as info:
        await client.attest(short, key)
    assert "expired" in info.value.message
    with pytest.raises(CAError) as info:
        await client.attest(token.split(".")[0] + ".wrong-secret-aaaaaaaaaaaaaaaa", key)
    assert "unknown join token" in info.value.message
    client.set_identity(issued.chain, key)
    await client.entries()
    ca.cli("agent", "evict", "spiffe://example.org/agent/n1")
    with pytest.raises(CAError) as info:
        await client.entries()
    assert info.value.code == "evicted"
    with pytest.raises(CAError) as info:
        await client.renew(key)
    assert info.value.code == "evicted"
    # A new token brings an evicted agent back...
    again = ca.json("token", "create", "--spiffe-id", "spiffe://example.org/agent/n1")["token"]
    fresh = CAClient(Address.parse(ca.listen), TD, bundle_roots(ca))
    issued2, _, _ = await fresh.attest(again, key)
    fresh.set_identity(issued2.chain, key)
    await fresh.entries()
    # ...but never a banned one.
    ca.cli("agent", "ban", "spiffe://example.org/agent/n1")
    banned = ca.json("token", "create", "--spiffe-id", "spiffe://example.org/agent/n1")["token"]
    with pytest.raises(CAError) as info:
        await fresh.attest(banned, key)
    assert "banned" in info.value.message
    events = [r["event"] for r in ca.json("audit", "list")["records"]]
    for event in (
        "token.created",
        "agent.attested",
        "attestation.failed",
        "agent.evicted",
        "agent.banned",
    ):
        assert event in events
    await client.aclose()
    await fresh.aclose()


async def test_agent_api_refuses_calls_without_a_client_certificate(ca: CA):
    client = CAClient(Address.parse(ca.listen), TD, bundle_roots(ca))
    with pytest.raises(CAError) as info:
        await client.entries()
    assert info.value.code == "no_client_certificate" and info.value.status == 401
    await client.aclose()


def test_admin_cli_mistakes_are_one_line(ca: CA, tmp_path: Path):
    cases = [
        (
            [
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/",
                "--parent-id",
                "spiffe://example.org/a",
                "--selector",
                "unix:uid:1",
            ],
            "trailing slash",
        ),
        (
            [
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://other.org/x",
                "--parent-id",
                "spiffe://example.org/a",
                "--selector",
                "unix:uid:1",
            ],
            "not in trust domain",
        ),
        (
            [
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                "spiffe://example.org/a",
                "--selector",
                "nocolon",
            ],
            "selector",
        ),
        (["entry", "show", "no-such-entry"], "no entry"),
        (["agent", "show", "spiffe://example.org/agent/none"], "no agent"),
        (["token", "create", "--ttl", "soon"], "invalid duration"),
        (
            [
                "x509",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/w",
                "--dns-name",
                "Bad_Name!",
                "--out",
                str(tmp_path),
            ],
            "DNS names",
        ),
    ]
    for args, needle in cases:
        result = ca.cli(*args, check=False)
        assert result.returncode == 1, args
        assert needle in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr
    missing = run_cli("ca", "health", "--admin-socket", str(tmp_path / "nope.sock"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def _connect_as_nobody(python: Path, path: str) -> str:
    """Connect to a Unix socket from a child that dropped to uid/gid 65534 after starting.

    ``python`` is the ``dropped_python`` fixture's, which that uid can still read.
    """
    script = (
        "import os, socket, sys\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1]); print('connected')\n"
        "except PermissionError:\n"
        "    print('denied')\n"
    )
    result = subprocess.run(
        [str(python), "-I", "-c", script, path], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_admin_socket_is_0600_and_refuses_other_users(ca: CA, tmp_path: Path, request):
    assert stat.S_IMODE(os.stat(ca.admin_socket).st_mode) == 0o600
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    python = request.getfixturevalue("dropped_python")
    # A directory the other user may enter, so only the socket's own mode decides.
    public = Path(tempfile.mkdtemp(prefix="tally-perm-"))
    try:
        public.chmod(0o755)
        os.link(ca.admin_socket, public / "admin.sock")  # same inode, same 0600 mode
        open_sock = socket.socket(socket.AF_UNIX)
        open_sock.bind(str(public / "open.sock"))
        os.chmod(public / "open.sock", 0o666)
        open_sock.listen(1)
        assert _connect_as_nobody(python, str(public / "open.sock")) == "connected"  # the control
        assert _connect_as_nobody(python, str(public / "admin.sock")) == "denied"
        open_sock.close()
    finally:
        shutil.rmtree(public)


def test_entry_crud_and_list_filters(ca: CA):
    e = ca.json(
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/a",
        "--parent-id",
        "spiffe://example.org/agent/x",
        "--selector",
        "unix:uid:1",
        "--selector",
        "unix:gid:2",
        "--hint",
        "a",
    )
    assert e["selectors"] == ["unix:gid:2", "unix:uid:1"]
    dup = ca.cli(
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/a",
        "--parent-id",
        "spiffe://example.org/agent/x",
        "--selector",
        "unix:gid:2",
        "--selector",
        "unix:uid:1",
        check=False,
    )
    assert dup.returncode == 1 and "identical entry" in dup.stderr
    updated = ca.json("entry", "update", e["id"], "--ttl", "2m")
    assert updated["ttl"] == 120 and updated["revision"] > e["revision"]
    assert ca.json("entry", "show", e["id"])["ttl"] == 120
    assert (
        len(ca.json("entry", "list", "--parent-id", "spiffe://example.org/agent/x")["entries"]) == 1
    )
    assert ca.json("entry", "list", "--spiffe-id", "spiffe://example.org/zzz")["entries"] == []
    ca.cli("entry", "delete", e["id"])
    assert ca.cli("entry", "show", e["id"], check=False).returncode == 1
    events = [
        r["event"]
        for r in ca.json("audit", "list", "--spiffe-id", "spiffe://example.org/a")["records"]
    ]
    assert events == ["entry.created", "entry.updated", "entry.deleted"]
    text = ca.cli("audit", "list").stdout
    assert "entry.created" in text


def test_audit_verify_names_altered_removed_and_reordered_records(ca: CA):
    for _ in range(6):
        ca.cli("token", "create")
    assert ca.json("audit", "verify")["ok"]
    rows = ca.sql("SELECT seq, actor FROM audit ORDER BY seq")
    target, actor = rows[4]

    # Altered: an event rewritten in place.
    ca.sql("UPDATE audit SET actor = 'someone-else' WHERE seq = ?", target)
    result = ca.cli("audit", "verify", check=False)
    assert result.returncode == 1
    assert f"record {target} was altered" in result.stdout
    ca.sql("UPDATE audit SET actor = ? WHERE seq = ?", actor, target)
    assert ca.json("audit", "verify")["ok"]

    # Reordered: two neighbours swap places.
    ca.sql("UPDATE audit SET seq = -1 WHERE seq = ?", target)
    ca.sql("UPDATE audit SET seq = ? WHERE seq = ?", target, target + 1)
    ca.sql("UPDATE audit SET seq = ? WHERE seq = -1", target + 1)
    result = ca.cli("audit", "verify", check=False)
    assert result.returncode == 1 and f"record {target} is out of order" in result.stdout
    ca.sql("UPDATE audit SET seq = -1 WHERE seq = ?", target)
    ca.sql("UPDATE audit SET seq = ? WHERE seq = ?", target, target + 1)
    ca.sql("UPDATE audit SET seq = ? WHERE seq = -1", target + 1)
    assert ca.json("audit", "verify")["ok"]

    # Removed: a record deleted from the middle.
    ca.sql("DELETE FROM audit WHERE seq = ?", target)
    result = ca.cli("audit", "verify", check=False)
    assert result.returncode == 1 and f"record {target} removed" in result.stdout
    verdict = json.loads(ca.cli("audit", "verify", "--output", "json", check=False).stdout)
    assert verdict["bad_seq"] == target


def test_sigkill_while_issuing_loses_nothing(ca_factory, tmp_path: Path):
    ca = ca_factory()
    out = tmp_path / "mints"
    out.mkdir()
    script = (
        "import json,subprocess,sys\n"
        "for i in range(10000):\n"
        "    r = subprocess.run([sys.executable,'-m','tally.app.cli','ca','x509','mint','--spiffe-id',"
        "'spiffe://example.org/m','--out',sys.argv[2],'--admin-socket',sys.argv[1],'--output','json'],"
        "capture_output=True,text=True)\n"
        "    if r.returncode: break\n"
        "    print(json.loads(r.stdout)['serial'], flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, ca.admin_socket, str(out)], stdout=subprocess.PIPE, text=True
    ) as minter:
        assert minter.stdout is not None
        seen = [minter.stdout.readline().strip() for _ in range(4)]
        ca.daemon.kill()
        rest = minter.stdout.read().split()
    confirmed = seen + rest
    assert len(confirmed) >= 4
    ca.daemon = Daemon("ca", ca.daemon.args)
    ca.daemon.start("ca.started")
    assert ca.json("audit", "verify")["ok"]
    audited = {r["serial"] for r in ca.json("audit", "list", "--event", "svid.issued")["records"]}
    assert set(confirmed) <= audited
    # And the CA carries on issuing from where it was.
    ca.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/after", "--out", str(out))


@sqlite_only  # about the key files of one server on SQLite; on PostgreSQL they are sealed rows
def test_refuses_to_start_with_a_readable_key(ca: CA):
    ca.daemon.stop()
    key = next((ca.data_dir / "keys").glob("*.pem"))
    os.chmod(key, 0o644)
    result = run_cli(
        "ca",
        "run",
        "--trust-domain",
        "example.org",
        "--data-dir",
        str(ca.data_dir),
        "--listen",
        "127.0.0.1:0",
        "--admin-socket",
        ca.admin_socket,
    )
    assert result.returncode == 1
    assert str(key) in result.stderr and "0644" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_config_and_flags_are_one_line(tmp_path: Path):
    cfg = tmp_path / "ca.toml"
    cfg.write_text('trust_domain = "example.org"\ntrust_domian = "typo"\n')
    result = run_cli("ca", "run", "--config", str(cfg))
    assert result.returncode != 0 and "trust_domian" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(
        "ca", "run", "--trust-domain", "Bad_Domain!", "--data-dir", str(tmp_path / "d")
    )
    assert result.returncode != 0 and "trust" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("ca", "run", "--trust-domain", "example.org", "--default-svid-ttl", "1x")
    assert result.returncode != 0 and "default-svid-ttl" in result.stderr


def _metrics(ca: CA) -> str:
    with urllib.request.urlopen(f"http://{ca.metrics}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_health_and_metrics(ca: CA, tmp_path: Path):
    with urllib.request.urlopen(f"http://{ca.metrics}/readyz", timeout=5) as resp:
        assert resp.status == 200
    ca.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/m", "--out", str(tmp_path))
    text = _metrics(ca)
    assert "tally_ca_svids_issued_total" in text
    issued = [line for line in text.splitlines() if line.startswith("tally_ca_svids_issued_total")]
    assert float(issued[0].split()[1]) >= 2  # the CA's own serving SVID and the mint
    assert "tally_ca_signing_key_expiry_seconds" in text
    assert "tally_ca_signing_key_age_seconds" in text
    assert "tally_ca_attestation_failures_total" in text
    health = ca.json("health")
    assert health["status"] == "ok" and health["trust_domain"] == "example.org"


async def test_signing_key_rotation_and_root_rotation(ca_factory, tmp_path: Path):
    ca = ca_factory(
        "--intermediate-ttl",
        "6s",
        "--default-svid-ttl",
        "2s",
        "--root-propagation",
        "10s",  # wide enough that slow CLI calls on a loaded machine stay inside it
        "--agent-svid-ttl",
        "3s",
    )
    out = tmp_path / "m"
    out.mkdir()

    def issuer_of_mint() -> x509.Certificate:
        ca.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/r", "--out", str(out))
        return pem.chain_from_pem((out / "svid.pem").read_bytes())[1]

    first = issuer_of_mint()
    # Automatic rotation: within two intermediate lifetimes a new intermediate signs.
    deadline = time.monotonic() + 12
    while issuer_of_mint() == first:
        assert time.monotonic() < deadline, "signing key never rotated"
        await trio.sleep(0.5)
    assert ca.daemon.events("key.rotated")
    # Root rotation: the new root joins the bundle first and is used only after the window.
    roots_before = bundle_roots(ca)
    assert len(roots_before) == 1
    ca.cli("rotate", "--root")
    roots_now = bundle_roots(ca)
    assert len(roots_now) == 2 and roots_before[0] in roots_now
    new_root = next(r for r in roots_now if r != roots_before[0])
    inter = issuer_of_mint()
    assert inter.issuer == roots_before[0].subject  # still the old root inside the window
    deadline = time.monotonic() + 20
    while issuer_of_mint().issuer != new_root.subject:
        assert time.monotonic() < deadline, "new root never used"
        await trio.sleep(0.3)
    # The old root leaves the bundle once nothing it signed is still valid (<= 6s).
    deadline = time.monotonic() + 20
    while len(bundle_roots(ca)) != 1:
        assert time.monotonic() < deadline, "old root never left the bundle"
        await trio.sleep(0.5)
    assert bundle_roots(ca) == [new_root]
    events = {r["event"] for r in ca.json("audit", "list", "--limit", "5000")["records"]}
    assert {"key.created", "key.activated", "key.retired", "key.removed"} <= events
    assert ca.json("audit", "verify")["ok"]


def _upstream(tmp_path: Path) -> tuple[Path, Path, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operator Root")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "up.pem", tmp_path / "up.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path, cert


def test_upstream_root_signs_the_intermediates(ca_factory, tmp_path: Path):
    cert_path, key_path, root = _upstream(tmp_path)
    ca = ca_factory("--upstream-cert", str(cert_path), "--upstream-key", str(key_path))
    assert bundle_roots(ca) == [root]
    out = tmp_path / "m"
    out.mkdir()
    ca.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/u", "--out", str(out))
    chain = pem.chain_from_pem((out / "svid.pem").read_bytes())
    chain[1].verify_directly_issued_by(root)
    refused = ca.cli("rotate", "--root", check=False)
    assert refused.returncode == 1 and "upstream" in refused.stderr


def test_sigterm_answers_parked_long_polls_and_closes_idle_connections_at_once(ca, agent_factory):
    """An agent always has a long poll parked on the CA; stopping must not wait it out."""
    from ca.server import DRAIN_SECONDS

    agent = agent_factory(ca)
    ca.cli(
        "entry", "create", "--spiffe-id", "spiffe://example.org/parked",
        "--parent-id", agent.spiffe_id, "--selector", "unix:uid:0",
    )  # fmt: skip
    agent.daemon.wait_for("entries.synced")  # answered; the agent parks its next poll
    listed = ca.cli("agent", "list").stdout  # times as an operator reads them, not epochs
    expires = next(line for line in listed.splitlines() if line.startswith("Expires"))
    assert datetime.fromisoformat(expires.split(": ", 1)[1]) > datetime.now(UTC), listed
    started = time.monotonic()
    assert ca.daemon.stop(timeout=30) == 0
    took = time.monotonic() - started
    assert took < DRAIN_SECONDS, f"the CA took {took:.1f}s to stop: it waited out its drain"
    assert ca.daemon.events("ca.stopped")
