"""Everything an operator can set on `tally ca run`, declared once.

The same declaration gives the TOML keys, the flags, the defaults, the
validation and the configuration reference in the docs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ca.datastore import Datastore, DatastoreUrlError
from ca.datastore import parse as parse_datastore
from tally.ops.config import Address, ConfigError, Duration, setting
from tally.spiffe.spiffeid import SpiffeIdError, TrustDomain


@dataclass(frozen=True)
class CASettings:
    trust_domain: str = setting(help="trust domain this CA issues for, e.g. example.org")
    data_dir: Path = setting(
        Path("/var/lib/tally/ca"), help="keys (mode 0600) and the SQLite datastore live here"
    )
    datastore: str | None = setting(
        None,
        secret=True,
        help="where the CA keeps its state: sqlite:///PATH, or postgresql://USER@HOST/DB for"
        " several CA servers on one database (default: the SQLite file ca.db in data_dir;"
        " keep a password in ~/.pgpass or TALLY_DATASTORE, never in this URL)",
    )
    listen: Address = setting(
        Address.parse("127.0.0.1:8443"), help="agent API address (TLS), HOST:PORT"
    )
    admin_socket: Path = setting(
        Path("/run/tally/ca/admin.sock"), help="admin API Unix socket (created with mode 0600)"
    )
    metrics: Address | None = setting(
        None, help="serve /healthz, /readyz and /metrics on HOST:PORT"
    )
    default_svid_ttl: Duration = setting(
        Duration(3600), help="lifetime of workload SVIDs whose entry sets none"
    )
    max_svid_ttl: Duration = setting(
        Duration(86400), help="longest SVID lifetime an entry or mint may ask for"
    )
    agent_svid_ttl: Duration = setting(Duration(3600), help="lifetime of agent SVIDs")
    intermediate_ttl: Duration = setting(
        Duration(86400), help="lifetime of each signing (intermediate) key"
    )
    root_ttl: Duration = setting(Duration(10 * 365 * 86400), help="lifetime of the CA's own root")
    root_propagation: Duration = setting(
        Duration(3600), help="how long a new root sits in the bundle before anything chains to it"
    )
    join_token_ttl: Duration = setting(Duration(600), help="default lifetime of join tokens")
    attest_burst: int = setting(
        10,
        help="failed node attestations one peer address may make at once;"
        " past them the agent API answers 429 without checking the token",
    )
    attest_refill: Duration = setting(
        Duration(6), help="after the burst, one more failed attestation per peer per this long"
    )
    token_max_failures: int = setting(
        5, help="wrong secrets tried against one join token's id before that token is revoked"
    )
    upstream_cert: Path | None = setting(
        None, help="an existing CA certificate (PEM) to sign our intermediates"
    )
    upstream_key: Path | None = setting(None, help="private key of --upstream-cert (mode 0600)")
    upstream_bundle: Path | None = setting(
        None, help="roots of the upstream PKI, when --upstream-cert is not self-signed"
    )
    handshake_timeout: Duration = setting(Duration(10), help="TLS handshake deadline")
    request_timeout: Duration = setting(Duration(30), help="deadline to receive one request")
    max_connections: int = setting(
        32768,
        help="agent API connections served at once (each agent holds about 3); the CA"
        " raises its open-file limit to fit at start",
    )
    overload_queue: int = setting(
        256,
        help="agent calls waiting for the datastore past which new ones are answered 429"
        " with Retry-After (admission control for a reconnecting herd)",
    )
    admin_max_connections: int = setting(
        64,
        help="admin socket connections served at once; past it a new one is answered"
        " 503 and closed",
    )
    log_level: str = setting("info", help="debug, info, warning or error")

    def validate(self) -> None:
        if self.datastore is not None:
            try:
                parse_datastore(self.datastore)
            except DatastoreUrlError as exc:
                raise ConfigError(f"setting 'datastore': {exc}") from None
        try:
            TrustDomain.parse(self.trust_domain)
        except SpiffeIdError as exc:
            raise ConfigError(f"setting 'trust_domain': {exc}") from exc
        if self.default_svid_ttl > self.max_svid_ttl:
            raise ConfigError(
                "setting 'default_svid_ttl' is above 'max_svid_ttl'"
                f" ({self.default_svid_ttl:.0f}s > {self.max_svid_ttl:.0f}s)"
            )
        if self.root_propagation >= self.root_ttl / 3:
            raise ConfigError("setting 'root_propagation' must be under a third of 'root_ttl'")
        if (self.upstream_cert is None) != (self.upstream_key is None):
            raise ConfigError("settings 'upstream_cert' and 'upstream_key' go together")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"setting 'log_level': unknown level {self.log_level!r}")
        if self.max_connections < 1:
            raise ConfigError("setting 'max_connections' must be at least 1")
        for name in (
            "attest_burst",
            "token_max_failures",
            "admin_max_connections",
            "overload_queue",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting '{name}' must be at least 1")
        if self.attest_refill <= 0:
            raise ConfigError("setting 'attest_refill' must be above 0s")
        for name in ("default_svid_ttl", "max_svid_ttl", "agent_svid_ttl", "intermediate_ttl"):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting '{name}' must be at least 1s")

    def where(self) -> Datastore:
        """The datastore these settings name (validated already)."""
        if self.datastore is None:
            return Datastore.sqlite(self.data_dir / "ca.db")
        return parse_datastore(self.datastore)
