"""proxy.settings and the CLI: one identity source, rules required, one-line operator errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from proxy.cli import register
from proxy.identity import FileSource, IdentityError
from proxy.settings import ClientSettings, FileSourceSpec, ServerSettings, WorkloadSourceSpec
from tally.app.launch import run_cli
from tally.ops.config import ConfigError, load
from tally.spiffe.spiffeid import SpiffeId, TrustDomain
from tests.pki import Authority, now

BASE = ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:8080"]
FILES = ["--cert", "/c.pem", "--key", "/k.pem", "--bundle", "/b.pem"]


def parse(mode: str, *argv: str):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="role"))
    args = parser.parse_args(["proxy", mode, *argv])
    return load(ServerSettings if mode == "server" else ClientSettings, args, env={})


def test_server_flags_build_the_policy():
    cfg = parse(
        "server",
        *BASE,
        *FILES,
        "--allow-id",
        "spiffe://example.org/web",
        "--allow-trust-domain",
        "partner.org",
        "--allow-path-prefix",
        "spiffe://example.org/ns/prod/",
    )
    assert cfg.policy().describe() == [
        "id=spiffe://example.org/web",
        "path_prefix=spiffe://example.org/ns/prod",
        "trust_domain=partner.org",
    ]
    assert isinstance(cfg.source({}), FileSourceSpec)


def test_workload_socket_defaults_to_the_environment():
    cfg = parse("client", *BASE, "--expect-id", "spiffe://example.org/api")
    assert cfg.source({"SPIFFE_ENDPOINT_SOCKET": "unix:///run/agent.sock"}) == WorkloadSourceSpec(
        Path("/run/agent.sock")
    )
    with pytest.raises(ConfigError, match="no identity source: SPIFFE_ENDPOINT_SOCKET is not set"):
        cfg.source({})


@pytest.mark.parametrize(
    ("mode", "argv", "message"),
    [
        ("server", [*FILES], "a server needs at least one allow rule"),
        ("client", [*FILES], "a client needs --expect-id"),
        ("server", ["--cert", "/c.pem", "--allow-trust-domain", "x.org"], "go together"),
        (
            "server",
            [*FILES, "--workload-socket", "/a.sock", "--allow-trust-domain", "x.org"],
            "not both",
        ),
        ("server", [*FILES, "--allow-id", "spiffe://x.org/a/*"], "allow rule"),
        ("server", [*FILES, "--allow-path-prefix", "spiffe://x.org/a/*"], "no wildcards"),
        ("server", [*FILES, "--allow-trust-domain", "x.org", "--idle-timeout", "0"], "above 0s"),
        ("server", [*FILES, "--allow-trust-domain", "x.org", "--spiffe-id", "web"], "spiffe_id"),
        (
            "server",
            ["--allow-trust-domain", "x.org", "--federated-bundle", "y.org=/y.pem"],
            "needs the file source",
        ),
        (
            "server",
            [*FILES, "--allow-trust-domain", "x.org", "--federated-bundle", "y.org"],
            "TRUST_DOMAIN=PATH",
        ),
        ("client", [*FILES, "--expect-id", "spiffe://x.org/a", "--pool-size", "-1"], "pool_size"),
        (
            "client",
            [*FILES, "--expect-id", "spiffe://x.org/a", "--tls-groups", "X25519:nosuchcurve"],
            "setting 'tls_groups': OpenSSL does not know all of the key exchange groups",
        ),
    ],
)
def test_bad_settings_name_the_problem(mode, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(mode, *BASE, *argv)


def test_tls_groups_default_is_the_tls_modules():
    # The settings module keeps its own copy so that parsing flags needs no OpenSSL.
    from tally.tls.contexts import GROUPS

    assert parse("client", *BASE, *FILES, "--expect-id", "spiffe://x.org/a").tls_groups == (GROUPS)


def test_toml_config_is_strict(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('allow_ids = ["spiffe://example.org/web"]\n')
    with pytest.raises(ConfigError, match="did you mean 'allow_id'"):
        parse("server", *BASE, *FILES, "--config", str(config))
    config.write_text('allow_id = ["spiffe://example.org/web"]\nhttp = true\nmax_connections = 3\n')
    cfg = parse("server", *BASE, *FILES, "--config", str(config))
    assert cfg.http and cfg.max_connections == 3


def test_cli_errors_are_one_line(tmp_path):
    result = run_cli(
        "proxy",
        "server",
        *BASE,
        "--cert",
        str(tmp_path / "missing.pem"),
        "--key",
        str(tmp_path / "k.pem"),
        "--bundle",
        str(tmp_path / "b.pem"),
        "--allow-trust-domain",
        "example.org",
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "missing.pem" in result.stderr and "Traceback" not in result.stderr


# -- the file source ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ex():
    return Authority.create("example.org")


def source(directory: Path, want: str | None = None, **federated: Path) -> FileSource:
    return FileSource(
        directory / "svid.pem",
        directory / "key.pem",
        directory / "bundle.pem",
        {TrustDomain(td.replace("_", ".")): p for td, p in federated.items()},
        want=SpiffeId.parse(want) if want else None,
        clock=now,
    )


def test_file_source_loads_and_checks(ex, tmp_path):
    ex.svid("spiffe://example.org/api").write(tmp_path, ex.bundle)
    identity = source(tmp_path).load()
    assert str(identity.spiffe_id) == "spiffe://example.org/api"
    other = Authority.create("other.org")
    (tmp_path / "other.pem").write_bytes(other.bundle.to_pem())
    federated = source(tmp_path, other_org=tmp_path / "other.pem").load()
    assert set(federated.trusted()) == {ex.td, other.td}
    with pytest.raises(IdentityError) as info:
        source(tmp_path, "spiffe://example.org/web").load()
    assert info.value.reason == "wrong_spiffe_id"


def test_file_source_signature_follows_replacements(ex, tmp_path):
    ex.svid("spiffe://example.org/api").write(tmp_path, ex.bundle)
    src = source(tmp_path)
    before = src.signature()
    ex.svid("spiffe://example.org/api").write(tmp_path / "next", ex.bundle)
    (tmp_path / "next" / "svid.pem").replace(tmp_path / "svid.pem")
    assert src.signature() != before


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d, ex: (d / "key.pem").write_bytes(b"not a key"), "bad_key"),
        (lambda d, ex: (d / "svid.pem").write_bytes(b""), "bad_pem"),
        (lambda d, ex: (d / "bundle.pem").unlink(), "unreadable"),
        (
            lambda d, ex: (d / "key.pem").write_bytes(
                (Path(str(d) + "-other") / "key.pem").read_bytes()
            ),
            "key_mismatch",
        ),
        (
            lambda d, ex: (d / "bundle.pem").write_bytes(
                Authority.create("example.org").bundle.to_pem()
            ),
            "untrusted",
        ),
    ],
)
def test_file_source_refuses_broken_files(ex, tmp_path, damage, reason):
    live = tmp_path / "live"
    ex.svid("spiffe://example.org/api").write(live, ex.bundle)
    ex.svid("spiffe://example.org/api").write(Path(str(live) + "-other"), ex.bundle)
    damage(live, ex)
    with pytest.raises(IdentityError) as info:
        source(live).load()
    assert info.value.reason == reason
    assert str(live) in str(info.value) or reason in ("key_mismatch", "untrusted")
